"""What Dask costs: corpus encoding on 2 workers x 1 thread and 1 worker x 2 threads against one process with
2 threads, on the same MedQuAD passages, and a projection to PubMed scale from the measured per-core rate.

    python benchmarks/distributed_encode.py [--texts 20000] [--scheme int8-static-asym] [--partition-rows 500]

Texts: MedQuAD answers (all documents) split into 160-word passages with a 120-word stride (README "Retrieval
quality", passage mode), a seeded sample of ``--texts``. The model: all-MiniLM-L6-v2 quantized with ``--scheme``
(static schemes calibrated on 256 MedQuAD questions), saved once and loaded by every runner. Order of runs:
one process, Dask 2x1, Dask 1x2, one process again (the two single-process runs bound the machine's drift).
Every Dask run's shards are checked bit for bit against the single-process embeddings. Cluster start-up is
timed separately; a Dask run's time is encode_corpus's wall time (scheduling, each worker's model load, encoding,
shard writes). Writes ``results.json`` and ``results.md`` under ``--out`` (default
``benchmarks/results/distributed/<machine>``, <machine> as in common.machine_slug). Takes about 10 minutes for 20,000 texts on 2 cores.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info as bench_machine_info  # noqa: E402

PUBMED_ABSTRACTS = 36_000_000  # PubMed's size as the issue states it ("about 36 million abstracts")


def passages(n: int, seed: int):
    from medquant.eval.datasets import medquad_retrieval, split_corpus

    texts, _ = split_corpus(medquad_retrieval("all").corpus, max_words=160, stride=120)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(texts), size=min(n, len(texts)), replace=False))
    return pd.DataFrame({"id": [f"p{i}" for i in pick], "text": [texts[i] for i in pick]})


def single_process(model_dir: Path, texts, threads: int):
    import medquant

    enc = medquant.Encoder.from_pretrained(model_dir, n_threads=threads)
    enc.encode_document(texts[:64], show_progress_bar=False)  # warm-up (primitive creation)
    t0 = time.perf_counter()
    emb = enc.encode_document(texts, show_progress_bar=False)
    return emb, time.perf_counter() - t0


def dask_run(df, model_dir: Path, out: Path, workers: int, threads: int, partition_rows: int):
    from distributed import Client, LocalCluster

    from medquant.distributed import ShardedIndex, encode_corpus

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0")
    client = Client(cluster)
    client.wait_for_workers(workers)
    startup = time.perf_counter() - t0
    try:
        s = encode_corpus(df, model_dir, out, client, partition_rows=partition_rows, show_progress_bar=False)
    finally:
        client.close()
        cluster.close()
    print(s, flush=True)
    return ShardedIndex(out).load(), s, startup


def token_count(model_dir: Path, texts) -> int:
    import medquant

    enc = medquant.Encoder.from_pretrained(model_dir, n_threads=1)
    ids, mask, _ = enc.tokenize(texts)
    return int(np.asarray(mask).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=20_000)
    ap.add_argument("--scheme", default="int8-static-asym")
    ap.add_argument("--partition-rows", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--price-per-core-hour", type=float, default=0.04,
                    help="USD per vCPU-hour used for the cost projection (an assumption you set, not a measurement)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import medquant
    from medquant.eval.datasets import medquad_retrieval
    from medquant.eval.runinfo import load_average, machine_info

    info = machine_info()
    out = args.out or Path(__file__).parent / "results" / "distributed" / bench_machine_info()["slug"]
    out.mkdir(parents=True, exist_ok=True)
    df = passages(args.texts, args.seed)
    texts = df["text"].tolist()
    work = Path(tempfile.mkdtemp(prefix="mq-dist-"))
    try:
        fp32 = medquant.Encoder.from_pretrained(n_threads=2)
        calib = list(medquad_retrieval("dev").queries.values())[:256]
        model_dir = fp32.quantize(args.scheme, calibration_texts=calib).save_pretrained(work / "model")
        del fp32
        n_tokens = token_count(model_dir, texts)
        load_before = load_average()
        runs = []
        ref, t1 = single_process(model_dir, texts, 2)
        runs.append({"run": "1 process x 2 threads", "seconds": t1})
        print(f"single process: {len(texts) / t1:.1f} texts/s", flush=True)
        for workers, threads in ((2, 1), (1, 2)):
            emb, s, startup = dask_run(df, model_dir, work / f"dask{workers}x{threads}", workers, threads,
                                       args.partition_rows)
            name = f"Dask {workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"
            runs.append({"run": name, "seconds": s.wall_s, "cluster_start_s": startup,
                         "bit_identical": bool(np.array_equal(emb, ref)), "per_worker": s.workers.to_dict("records")})
        _, t2 = single_process(model_dir, texts, 2)
        runs.append({"run": "1 process x 2 threads (again)", "seconds": t2})
        load_after = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = min(t1, t2)
    for r in runs:
        r["texts_per_s"] = len(texts) / r["seconds"]
        r["tokens_per_s"] = n_tokens / r["seconds"]
        r["vs_single_process"] = base / r["seconds"]
    two_by_one = runs[1]
    per_core = float(np.mean([w["texts_per_s"] for w in two_by_one["per_worker"]]))
    per_core_tok = per_core * n_tokens / len(texts)
    efficiency = two_by_one["vs_single_process"]
    proj = []
    for machines, cores in ((1, 2), (1, 64), (10, 64), (100, 64)):
        # every abstract counted as a full 256-token window (PubMed abstracts average over 200 words): an upper
        # bound on the work; rate = measured tokens/s per 1-thread worker x cores x Dask's measured efficiency
        rate = per_core_tok / 256 * cores * machines * min(1.0, efficiency)
        hours = PUBMED_ABSTRACTS / rate / 3600
        proj.append({"machines": machines, "cores_each": cores, "abstracts_per_s": rate, "hours": hours,
                     "core_hours": hours * cores * machines,
                     "cost_usd": hours * cores * machines * args.price_per_core_hour})
    result = {"machine": info, "scheme": args.scheme, "texts": len(texts), "tokens": n_tokens,
              "mean_tokens": n_tokens / len(texts), "partition_rows": args.partition_rows, "runs": runs,
              "load_before": load_before, "load_after": load_after, "per_core_texts_per_s": per_core,
              "per_core_tokens_per_s": per_core_tok, "dask_efficiency_2x1": efficiency,
              "pubmed_projection": proj, "price_per_core_hour_assumed": args.price_per_core_hour}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# Dask corpus encoding on {info['cpu_model']} ({info['cpus_available']} CPUs, {info['cpu_isa']})", "",
             f"{len(texts)} MedQuAD passages ({n_tokens / len(texts):.0f} tokens on average, max_length 256), "
             f"`{args.scheme}`, partitions of {args.partition_rows} rows; load average before {load_before}, "
             f"after {load_after}.", "",
             "| run | seconds | texts/s | vs one process (best of 2) | cluster start s | bit-identical |",
             "|---|---:|---:|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {r['seconds']:.1f} | {r['texts_per_s']:.1f} | {r['vs_single_process']:.3f} | "
                     f"{r.get('cluster_start_s', float('nan')):.1f} | {r.get('bit_identical', '')} |")
    lines += ["", f"Per-core rate (2 workers x 1 thread, mean per worker): {per_core:.1f} texts/s, "
                  f"{per_core_tok:.0f} tokens/s.", "",
              f"PubMed projection ({PUBMED_ABSTRACTS:,} abstracts, each counted as 256 tokens; Dask efficiency "
              f"{min(1.0, efficiency):.3f} as measured; cost at an assumed ${args.price_per_core_hour}/core-hour):", "",
              "| machines x cores | abstracts/s | wall hours | core-hours | cost USD |", "|---|---:|---:|---:|---:|"]
    for p in proj:
        lines.append(f"| {p['machines']} x {p['cores_each']} | {p['abstracts_per_s']:.0f} | {p['hours']:.1f} | "
                     f"{p['core_hours']:.0f} | {p['cost_usd']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
