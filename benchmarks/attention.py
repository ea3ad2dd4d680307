"""The fused attention kernel: alone, at MiniLM and BERT-base shapes, and its share of MiniLM encoding, in one run.

    python benchmarks/attention.py [--quick] [--out benchmarks/results] [--no-kernel]

1. Kernel: ``medquant._core.attention`` (the kernel the encoder runs) on random Q/K/V packed like the encoder's QKV
   output, 12 heads of 32 (MiniLM) and of 64 (BERT-base), sequences of 16-512 tokens, batches of 1 and 32, on 1 and
   2 threads: ms per call (best of repetitions) and GFLOP/s (4 L^2 d per head and sequence: Q K^T and P V; the
   softmax is not counted), and the 2-thread speed-up; then bf16 attention (``bf16=True``: on vdpbf16ps where the CPU
   has avx512_bf16) and int8 attention (``int8=True``: on vpdpbusd where the CPU has avx512_vnni) on 2 threads and
   their speed-ups over f32.
2. Encoder: the packaged all-MiniLM-L6-v2 (fp32, int8-static-asym calibrated on 128 MedQuAD answers, and the same
   with attention="bf16" and with attention="int8") encoding 256
   MedQuAD answers (batch 32, 256 tokens; best of 3 passes) and 200 questions one at a time (p50), on 1 and 2
   threads, with ``Encoder.stage_seconds()``: the share of the forward each stage took (attention, LayerNorm,
   embeddings, pooling, linear layers and the rest).

3. With ``--compare DIR``: part 2 on 2 threads for this checkout and for the medquant checkout in DIR (an older
   commit, built in place: ``python setup.py build_ext --inplace``), each in a subprocess of its own, alternating for
   ``--rounds`` rounds (machine load hits both alike), and the ratio of the medians (this / DIR); then the kernel
   alone on 1 thread (MiniLM and BERT-base heads, 32 sequences of 128 or 256 tokens, each precision), both
   checkouts' compiled cores loaded in one process and called alternately, call by call, so that a change of a
   few percent shows through this shared machine's drift.

Results: OUT/<machine>/attention[-quick].{json,md}, <machine> from the CPU model name (as run.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import alternate_ab, git_commit, load_core, machine_info, save_results  # noqa: E402

SHAPES = [("minilm", 12, 32), ("bert-base", 12, 64)]
ENCODER_SCHEMES = ("fp32", "int8-static-asym", "int8-static-asym+attention-bf16", "int8-static-asym+attention-int8")


def best_seconds(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def bench_kernel(quick: bool) -> list:
    from medquant import _core

    rng = np.random.default_rng(0)
    cases = [(32, 128), (32, 256), (1, 16), (1, 256)] if quick else [(32, 64), (32, 128), (32, 256), (32, 512),
                                                                      (1, 16), (1, 64), (1, 256), (1, 512)]
    rows = []
    for name, heads, d in SHAPES:
        for batch, L in cases:
            lengths = np.full(batch, L, np.int32)
            qkv = rng.standard_normal((batch * L, 3 * heads * d)).astype(np.float32)
            flop = 4.0 * batch * heads * L * L * d
            reps = 3 if batch * L >= 4096 else 20
            row = {"model": name, "heads": heads, "head_dim": d, "batch": batch, "length": L}
            for t in (1, 2):
                s = best_seconds(lambda: _core.attention(qkv, lengths, heads, n_threads=t), reps)
                row[f"ms_{t}t"], row[f"gflops_{t}t"] = 1e3 * s, flop / s / 1e9
            row["speedup_2t"] = row["ms_1t"] / row["ms_2t"]
            s = best_seconds(lambda: _core.attention(qkv, lengths, heads, bf16=True, n_threads=2), reps)
            row["ms_bf16_2t"], row["bf16_speedup_2t"] = 1e3 * s, row["ms_2t"] / (1e3 * s)
            s = best_seconds(lambda: _core.attention(qkv, lengths, heads, int8=True, n_threads=2), reps)
            row["ms_int8_2t"], row["int8_speedup_2t"] = 1e3 * s, row["ms_2t"] / (1e3 * s)
            rows.append(row)
            print(f"{name:9s} batch {batch:2d} L {L:3d}: 1 thread {row['ms_1t']:8.2f} ms {row['gflops_1t']:6.1f} "
                  f"GFLOP/s, 2 threads {row['ms_2t']:8.2f} ms ({row['speedup_2t']:.2f}x), bf16 "
                  f"{row['ms_bf16_2t']:8.2f} ms ({row['bf16_speedup_2t']:.2f}x), int8 {row['ms_int8_2t']:8.2f} ms "
                  f"({row['int8_speedup_2t']:.2f}x)", flush=True)
    return rows


def bench_encoder(quick: bool, threads_list=(1, 2)) -> list:
    import medquant
    from medquant.eval.datasets import load_medquad
    from medquant.quant.schemes import ATTENTION, PRESETS

    df = load_medquad()
    answers = [t for t in df["answer"].tolist() if t]
    questions = [t for t in df["question"].tolist() if t]
    n_corpus, n_q, reps = (64, 40, 2) if quick else (256, 200, 3)
    corpus, qs, calib = answers[:n_corpus], questions[:n_q], answers[1000:1128]
    rows = []
    for threads in threads_list:
        base = medquant.Encoder.from_pretrained(n_threads=threads)
        for scheme in ENCODER_SCHEMES:
            # "+attention-X": int8-static-asym calibrated on the same texts, attention in X (when this medquant has X:
            # --compare may run an older checkout)
            attention = scheme.split("+attention-")[1] if "+attention-" in scheme else None
            if attention and attention not in ATTENTION:
                continue
            q = PRESETS["int8-static-asym"].replace(name=scheme, attention=attention) if attention else scheme
            enc = base if scheme == "fp32" else base.quantize(q, calibration_texts=calib, show_progress_bar=False)
            enc.encode(corpus[:32], batch_size=32, max_length=256, show_progress_bar=False)
            has_stages = hasattr(enc, "stage_seconds")
            passes, stages = [], None
            for _ in range(reps):
                if has_stages:
                    enc.stage_seconds(reset=True)
                t0 = time.perf_counter()
                enc.encode(corpus, batch_size=32, max_length=256, show_progress_bar=False)
                passes.append(time.perf_counter() - t0)
                if has_stages and passes[-1] == min(passes):
                    stages = enc.stage_seconds()
            lat = []
            for q in qs:
                t0 = time.perf_counter()
                enc.encode([q], batch_size=1, show_progress_bar=False)
                lat.append(time.perf_counter() - t0)
            row = {"threads": threads, "scheme": scheme, "corpus_s": min(passes),
                   "corpus_texts_per_s": len(corpus) / min(passes), "query_p50_ms": 1e3 * float(np.median(lat))}
            if stages:
                row["stage_s"] = stages
                row["attention_share"] = stages["attention"] / stages["forward"]
            rows.append(row)
            share = f", attention {100 * row['attention_share']:.1f}% of the forward" if stages else ""
            print(f"{threads} thread(s) {scheme:17s}: corpus {row['corpus_texts_per_s']:6.1f} texts/s, "
                  f"query p50 {row['query_p50_ms']:6.2f} ms{share}", flush=True)
    return rows


KERNEL_AB_CASES = [("minilm", 12, 32, 32, 128), ("minilm", 12, 32, 32, 256), ("bert-base", 12, 64, 32, 128)]


def kernel_ab(other: Path, quick: bool) -> list:
    """The kernel alone on 1 thread, this checkout's core and other's called alternately (the order flipped every
    pair): per case and precision both best times, their ratio, and the median of the pairs' ratios."""
    from medquant import _core

    cores = {"this": _core, "other": load_core(other, "medquant_other")}
    rng = np.random.default_rng(0)
    reps = 8 if quick else 30
    rows = []
    for name, heads, d, batch, L in KERNEL_AB_CASES:
        lengths = np.full(batch, L, np.int32)
        qkv = rng.standard_normal((batch * L, 3 * heads * d)).astype(np.float32)
        for precision in ("fp32", "bf16", "int8"):
            kw = {"n_threads": 1} if precision == "fp32" else {"n_threads": 1, precision: True}
            calls = {who: (lambda c=c: c.attention(qkv, lengths, heads, **kw)) for who, c in cores.items()}
            try:
                for call in calls.values():
                    call()
            except (TypeError, AttributeError):  # a precision (or, before the fused kernel, the call) it lacks
                continue
            rows.append({"model": name, "batch": batch, "length": L, "precision": precision,
                         **alternate_ab(calls, reps), "calls": reps})
            print(f"kernel {name} {L} {precision}: this {rows[-1]['this_ms']:.2f} ms, other {rows[-1]['other_ms']:.2f} ms "
                  f"({rows[-1]['speedup']:.3f}x, pairs {rows[-1]['pair_median_speedup']:.3f}x)", flush=True)
    return rows


def compare(other: Path, rounds: int, quick: bool) -> dict:
    """Part 2 on 2 threads, this checkout and `other` alternating in subprocesses, medians and ratios; then the
    kernel alone (kernel_ab)."""
    import os
    import subprocess

    here = str(HERE.parent)
    runs = {"this": [], "other": []}
    for r in range(rounds):
        for who, root in (("this", here), ("other", str(other))):
            env = {**os.environ, "PYTHONPATH": root}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + (["--quick"] if quick else [])
            out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True).stdout
            runs[who].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {who}: " + ", ".join(f"{x['scheme']} {x['corpus_texts_per_s']:.1f} texts/s "
                                                      f"{x['query_p50_ms']:.2f} ms" for x in runs[who][-1]), flush=True)
    summary = []
    for row in runs["this"][0]:
        if not any(x["scheme"] == row["scheme"] for x in runs["other"][0]):
            continue  # a scheme the other checkout cannot run
        med = {who: {k: float(np.median([x[k] for run in runs[who] for x in run if x["scheme"] == row["scheme"]]))
                     for k in ("corpus_texts_per_s", "query_p50_ms")} for who in runs}
        summary.append({"scheme": row["scheme"], "this": med["this"], "other": med["other"],
                        "corpus_speedup": med["this"]["corpus_texts_per_s"] / med["other"]["corpus_texts_per_s"],
                        "query_speedup": med["other"]["query_p50_ms"] / med["this"]["query_p50_ms"]})
    return {"other": str(other), "other_commit": git_commit(other), "this_commit": git_commit(HERE.parent),
            "rounds": rounds, "runs": runs, "summary": summary, "kernel": kernel_ab(other, quick)}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Fused attention on {m['cpu_model']} ({res['date']})", "",
             f"`{res['command']}`; {m['logical_cpus']} logical CPUs; AVX-512 {m['isa']['avx512f']}, AVX2 "
             f"{m['isa']['avx2']}; attention kernel `{res['kernel']}` (bf16: `{res.get('kernel_bf16', '?')}`, int8: "
             f"`{res.get('kernel_int8', '?')}`); medquant at "
             f"{res['medquant']}.", ""]
    if res.get("kernel_rows"):
        lines += ["## Kernel alone (random Q/K/V; GFLOP/s count Q K^T and P V)", "",
                  "| model | batch | length | 1 thread ms | GFLOP/s | 2 threads ms | GFLOP/s | 2-thread speed-up | "
                  "bf16, 2 threads ms | bf16 speed-up | int8, 2 threads ms | int8 speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["kernel_rows"]:
            bf = (f"{r['ms_bf16_2t']:.2f} | {r['bf16_speedup_2t']:.2f}x" if "ms_bf16_2t" in r else "- | -")
            bf += (f" | {r['ms_int8_2t']:.2f} | {r['int8_speedup_2t']:.2f}x" if "ms_int8_2t" in r else " | - | -")
            lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['ms_1t']:.2f} | {r['gflops_1t']:.1f} | "
                         f"{r['ms_2t']:.2f} | {r['gflops_2t']:.1f} | {r['speedup_2t']:.2f}x | {bf} |")
        lines.append("")
    lines += ["## all-MiniLM-L6-v2 on MedQuAD (answers: batch 32, 256 tokens, best pass; questions one at a time)", "",
              "| threads | scheme | corpus texts/s | query p50 ms | attention | LayerNorm | embeddings + pooling | "
              "linear + rest |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["encoder_rows"]:
        s = r.get("stage_s")
        pct = (lambda k: f"{100 * s[k] / s['forward']:.1f}%") if s else (lambda k: "-")
        ep = f"{100 * (s['embeddings'] + s['pooling']) / s['forward']:.1f}%" if s else "-"
        lines.append(f"| {r['threads']} | {r['scheme']} | {r['corpus_texts_per_s']:.1f} | {r['query_p50_ms']:.2f} | "
                     f"{pct('attention')} | {pct('layernorm')} | {ep} | {pct('linear')} |")
    c = res.get("compare")
    if c:
        lines += ["", f"## This checkout ({c.get('this_commit', '?')}) against `{c['other']}` ({c.get('other_commit', '?')}; "
                  f"2 threads, {c['rounds']} alternating rounds, medians)",
                  "", "| scheme | corpus texts/s (this / other) | speed-up | query p50 ms (this / other) | speed-up |",
                  "|---|---:|---:|---:|---:|"]
        for r in c["summary"]:
            lines.append(f"| {r['scheme']} | {r['this']['corpus_texts_per_s']:.1f} / {r['other']['corpus_texts_per_s']:.1f}"
                         f" | {r['corpus_speedup']:.3f}x | {r['this']['query_p50_ms']:.2f} / "
                         f"{r['other']['query_p50_ms']:.2f} | {r['query_speedup']:.3f}x |")
        if c.get("kernel"):
            lines += ["", f"The kernel alone on 1 thread, both cores in one process, called alternately "
                      f"({c['kernel'][0]['calls']} calls each; best times, and the median of the pairs' ratios):", "",
                      "| model | batch | length | precision | best ms (this / other) | speed-up | pairs' median |",
                      "|---|---:|---:|---|---:|---:|---:|"]
            for r in c["kernel"]:
                lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['precision']} | {r['this_ms']:.2f} / "
                             f"{r['other_ms']:.2f} | {r['speedup']:.3f}x | {r['pair_median_speedup']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, texts and repetitions")
    ap.add_argument("--no-kernel", action="store_true", help="only the encoder part (e.g. for an older checkout)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results go to OUT/<machine>/")
    ap.add_argument("--compare", type=Path, help="another medquant checkout to alternate with (part 3)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --compare")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # one side of --compare: part 2 on 2 threads, as JSON
        print(json.dumps(bench_encoder(args.quick, threads_list=(2,))))
        return 0
    import medquant

    probe = medquant.Encoder.from_pretrained(n_threads=1)
    kernel = probe.attention_info().get("kernel", "oneDNN primitives")
    kernel_bf16 = probe.quantize(medquant.QuantScheme(name="attention-bf16", attention="bf16"),
                                 show_progress_bar=False).attention_info()["kernel"]
    kernel_int8 = probe.quantize(medquant.QuantScheme(name="attention-int8", attention="int8"),
                                 show_progress_bar=False).attention_info()["kernel"]
    res = {"command": " ".join(["python benchmarks/attention.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "kernel": kernel, "kernel_bf16": kernel_bf16,
           "kernel_int8": kernel_int8,
           "medquant": str(Path(medquant.__file__).resolve().parent.parent)}
    res["kernel_rows"] = [] if args.no_kernel else bench_kernel(args.quick)
    res["encoder_rows"] = bench_encoder(args.quick)
    if args.compare:
        res["compare"] = compare(args.compare, args.rounds, args.quick)
    md = markdown(res)
    save_results(args.out, res, "attention" + ("-quick" if args.quick else ""), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
