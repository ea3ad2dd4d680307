"""By hand, not CI: peak RSS of streaming every MedQuAD answer through Encoder.encode_to into a .npy memmap, and
RSS over 1,000 mixed-shape encode calls on the real model.

    python fuzz/measure_stream_rss.py [--model all-MiniLM-L6-v2] [--chunk 2048] [--out /tmp/medquad_answers.npy]

Texts are produced by a generator, so neither all texts' tokens nor all embeddings are held in memory: the
embeddings go to the memmap chunk by chunk. Prints JSON with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    from medquant.model.checkpoint import DEFAULT_MODEL

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="/tmp/medquad_answers.npy")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()

    import medquant
    from medquant.eval.datasets import load_medquad

    answers = load_medquad()["answer"].astype(str).tolist()
    enc = medquant.Encoder.from_pretrained(args.model)
    enc.encode(["warm up"])
    res = {"model": args.model, "n_answers": len(answers), "threads": enc.n_threads,
           "rss_after_load_mib": round(rss_mib(), 1), "peak_before_mib": round(peak_mib(), 1)}

    if not args.skip_stream:
        out = np.lib.format.open_memmap(args.out, mode="w+", dtype=np.float32, shape=(len(answers), enc.hidden_size))
        start_peak = peak_mib()
        t = time.perf_counter()
        n = enc.encode_to((a for a in answers), out, chunk_size=args.chunk, batch_size=args.batch)
        out.flush()
        res.update(stream_texts=n, stream_seconds=round(time.perf_counter() - t, 1), chunk_size=args.chunk,
                   peak_rss_mib=round(peak_mib(), 1), peak_before_stream_mib=round(start_peak, 1),
                   all_embeddings_mib=round(out.nbytes / 2**20, 1), finite=bool(np.isfinite(out).all()))
        del out

    # 1,000 encode calls, mixed shapes: RSS after a warm-up pass vs after all calls
    rng = np.random.default_rng(0)
    batches = [[answers[int(i)][: int(rng.integers(10, 2000))] for i in rng.integers(0, len(answers), size=int(b))]
               for b in rng.integers(1, 17, size=50)]
    for b in batches:
        enc.encode(b)
    before = rss_mib()
    t = time.perf_counter()
    for i in range(1000):
        enc.encode(batches[i % len(batches)])
    res.update(calls=1000, calls_seconds=round(time.perf_counter() - t, 1), rss_before_calls_mib=round(before, 1),
               rss_after_calls_mib=round(rss_mib(), 1), rss_growth_calls_mib=round(rss_mib() - before, 2))

    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
