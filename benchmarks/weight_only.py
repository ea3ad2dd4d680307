"""Weight-only int8 / int4 against fp32, per layer and end to end, on this machine, in one run.

    python benchmarks/weight_only.py [--quick] [--out benchmarks/results] [--compare DIR]

Target (issue: speed vs OpenVINO): w8 / w4 weight-only never slower than fp32 at any batch size.

1. Layers: medquant's Linear (the C core's layer) at the shapes of all-MiniLM-L6-v2 (QKV 384->1152, FFN in
   384->1536 with GELU, FFN out 1536->384 with the residual add) and BERT-base's FFN (768->3072, 3072->768), for
   M = 1 .. 4096 rows. Random weights (a speed test), quantized by medquant (s8 per channel; int4 groups of 32).
   fp32 is the f32 Linear: oneDNN's prepacked f32 matmul, or below avx512_core (where oneDNN's rows vary) medquant's
   panel matmul on f32 panels; w8 / w4 are medquant's weight-only kernels (csrc/wo_matmul.h). Systems
   are interleaved within each repetition (machine load hits all alike); the median over repetitions is reported.
   Note that the layer repeats on the same weights, so fp32's 1.8-9.4 MB matrix sits in cache here: in a model
   (MiniLM's six layers hold 42 MB of f32 weights) small-M fp32 reads them from memory.
2. End to end: the packaged all-MiniLM-L6-v2 (fp32, w8-weight-only, w4-weight-only presets) encoding MedQuAD
   questions and answers (seeded sample) at several batch sizes, texts/s (median of interleaved repetitions), and
   the mean cosine of each scheme's embeddings to fp32's.

3. With ``--compare DIR`` (instead of 1 and 2): the w8 and w4 layers alone at MiniLM's and BERT-base's shapes,
   this checkout's compiled core and that of the medquant checkout in DIR (an older commit, built in place:
   ``python setup.py build_ext --inplace``) loaded in one process and called alternately, call by call (the order
   flipped every pair), on the same weights and inputs: both best times and the median of the pairs' ratios, so
   that a change of a few percent shows through this shared machine's drift, which moves the fp32 reference of
   parts 1 and 2 by as much.

Results: OUT/<machine>/weight_only[-quick|-compare].{json,md}, <machine> from the CPU model name (as run.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import THREADS, alternate_ab, git_commit, load_core, machine_info, save_results  # noqa: E402

LAYERS = [  # (name, in, out, epilogue)
    ("minilm-qkv", 384, 1152, "none"),
    ("minilm-ffn-in", 384, 1536, "gelu"),
    ("minilm-ffn-out", 1536, 384, "residual"),
    ("bert-base-ffn-in", 768, 3072, "gelu"),
    ("bert-base-ffn-out", 3072, 768, "residual"),
]
SYSTEMS = ("fp32", "w8", "w4")


def interleaved(fns: dict, reps: int, inner: int) -> dict:
    """Median seconds per call of each function, the functions interleaved within every repetition."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: float(np.median(v)) for k, v in times.items()}


def layer_weights(rng, k: int, n: int):
    """Random weights and bias of a k -> n layer, and the weights quantized by medquant: s8 per channel (qw, sw),
    int4 in groups of 32 (p4, s4)."""
    from medquant import _core

    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    qw, sw = _core.quantize_weight_s8(w, True)
    p4, s4 = _core.quantize_weight_s4(w, 32)
    return w, b, qw, sw, p4, s4


def bench_layers(ms, reps: int) -> list:
    from medquant import _core

    epi = {"none": _core.EPI_NONE, "gelu": _core.EPI_GELU, "residual": _core.EPI_RESIDUAL}
    rng = np.random.default_rng(0)
    rows = []
    for name, k, n, e in LAYERS:
        w, b, qw, sw, p4, s4 = layer_weights(rng, k, n)
        layers = {"fp32": _core.Linear(_core.LINEAR_F32, w, None, b, epilogue=epi[e]),
                  "w8": _core.Linear(_core.LINEAR_W8, qw, sw, b, epilogue=epi[e]),
                  "w4": _core.Linear(_core.LINEAR_W4, p4, s4, b, group_size=32, epilogue=epi[e])}
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            r = rng.standard_normal((m, n)).astype(np.float32) if e == "residual" else None
            inner = int(min(2000, max(1, 5e7 / (m * k * n))))
            med = interleaved({s: (lambda lin=lin: lin.forward(x, r)) for s, lin in layers.items()}, reps, inner)
            rows.append({"layer": name, "in": k, "out": n, "epilogue": e, "M": m, "impl": layers["w8"].impl(),
                         **{f"{s}_ms": med[s] * 1e3 for s in SYSTEMS},
                         **{f"{s}_speedup": med["fp32"] / med[s] for s in SYSTEMS[1:]}})
            print(f"{name:18s} M={m:5d} fp32 {med['fp32'] * 1e3:8.3f} ms  w8 {rows[-1]['w8_speedup']:.2f}x  "
                  f"w4 {rows[-1]['w4_speedup']:.2f}x", flush=True)
    return rows


def bench_encoder(n_texts: int, reps: int, batches: dict) -> dict:
    import medquant
    from medquant.eval.datasets import load_medquad
    from medquant.model.checkpoint import resolve_model_path

    df = load_medquad().sample(2 * n_texts, random_state=20240)
    texts = {"questions": df.question.tolist()[:n_texts], "answers": df.answer.tolist()[:n_texts]}
    base = medquant.Encoder.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), n_threads=THREADS)
    encs = {"fp32": base, "w8": base.quantize("w8-weight-only", show_progress_bar=False),
            "w4": base.quantize("w4-weight-only", show_progress_bar=False)}
    out = {"size_bytes": {s: int(e.size_bytes()) for s, e in encs.items()}, "rows": [], "cosine_to_fp32": {}}
    ref = base.encode(texts["answers"][:64], show_progress_bar=False)
    for s in SYSTEMS[1:]:
        emb = encs[s].encode(texts["answers"][:64], show_progress_bar=False)
        out["cosine_to_fp32"][s] = float(np.mean(np.sum(emb * ref, 1)))
    for kind, sizes in batches.items():
        for bs in sizes:
            sample = texts[kind][: (min(64, n_texts) if bs == 1 else n_texts)]
            med = interleaved({s: (lambda e=e: e.encode(sample, batch_size=bs, show_progress_bar=False))
                               for s, e in encs.items()}, reps, 1)
            row = {"texts": kind, "batch_size": bs, "n": len(sample),
                   **{f"{s}_texts_per_s": len(sample) / med[s] for s in SYSTEMS},
                   **{f"{s}_speedup": med["fp32"] / med[s] for s in SYSTEMS[1:]}}
            out["rows"].append(row)
            print(f"{kind:9s} batch {bs:4d}: fp32 {row['fp32_texts_per_s']:7.1f}/s  w8 {row['w8_speedup']:.2f}x  "
                  f"w4 {row['w4_speedup']:.2f}x", flush=True)
    return out


def kernel_ab(other: Path, ms, reps: int) -> list:
    """Each weight-only layer on this checkout's core and other's, called alternately on 2 threads."""
    from medquant import _core

    cores = {"this": _core, "other": load_core(other, "medquant_other")}
    rng = np.random.default_rng(0)
    rows = []
    for name, k, n, e in LAYERS:
        w, b, qw, sw, p4, s4 = layer_weights(rng, k, n)
        for kind in SYSTEMS[1:]:
            def layer(c):
                epi = {"none": c.EPI_NONE, "gelu": c.EPI_GELU, "residual": c.EPI_RESIDUAL}[e]
                if kind == "w8":
                    return c.Linear(c.LINEAR_W8, qw, sw, b, epilogue=epi, n_threads=THREADS)
                return c.Linear(c.LINEAR_W4, p4, s4, b, group_size=32, epilogue=epi, n_threads=THREADS)
            layers = {who: layer(c) for who, c in cores.items()}
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                r = rng.standard_normal((m, n)).astype(np.float32) if e == "residual" else None
                inner = int(min(200, max(1, 2e7 / (m * k * n))))
                calls = {who: (lambda lin=lin: lin.forward(x, r)) for who, lin in layers.items()}
                outs = {who: call() for who, call in calls.items()}
                same = bool(np.array_equal(outs["this"].view(np.uint32), outs["other"].view(np.uint32)))
                rows.append({"layer": name, "kind": kind, "M": m, **alternate_ab(calls, reps, inner),
                             "same_bits": same, "calls": reps * inner})
                print(f"{name:18s} {kind} M={m:5d}: this {rows[-1]['this_ms']:.3f} ms, other {rows[-1]['other_ms']:.3f} ms "
                      f"({rows[-1]['speedup']:.3f}x, pairs {rows[-1]['pair_median_speedup']:.3f}x)"
                      f"{'' if same else ', bits differ'}", flush=True)
    return rows


def markdown_ab(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Weight-only kernel A/B on {m['cpu_model']} ({res['date']})", "",
             f"`{res['command']}`; this checkout ({res['this']}) against `{res['other']}` ({res['other_rev']}); "
             f"{THREADS} threads; both cores in one process, called alternately. Speed-up = other's time / this "
             "checkout's (> 1: this one is faster): of the best times, and the median of the pairs' ratios.", "",
             "| layer | kind | M | this ms | other ms | speed-up | pairs | same bits |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in res["compare"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['M']} | {r['this_ms']:.3f} | {r['other_ms']:.3f} | "
                     f"{r['speedup']:.3f}x | {r['pair_median_speedup']:.3f}x | {'yes' if r['same_bits'] else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Weight-only vs fp32 on {m['cpu_model']} ({res['date']})", "",
             f"`{res['command']}`; {THREADS} threads; {m['logical_cpus']} logical CPUs; AVX-512 VNNI "
             f"{m['avx512_vnni']}, AVX-512 BF16 {m['avx512_bf16']}, AMX {m['amx']}; weight-only kernel "
             f"`{res['layers'][0]['impl']}`. Speed-up = fp32 time / scheme time (> 1: faster than fp32).", "",
             "## Layers (ms per call for fp32; speed-ups)", "",
             "| layer | M | fp32 ms | w8 | w4 |", "|---|---:|---:|---:|---:|"]
    for r in res["layers"]:
        lines.append(f"| {r['layer']} | {r['M']} | {r['fp32_ms']:.3f} | {r['w8_speedup']:.2f}x | "
                     f"{r['w4_speedup']:.2f}x |")
    e = res["encoder"]
    lines += ["", "## all-MiniLM-L6-v2 end to end (MedQuAD texts, texts/s)", "",
              "| texts | batch | fp32 | w8 | w4 |", "|---|---:|---:|---:|---:|"]
    for r in e["rows"]:
        lines.append(f"| {r['texts']} | {r['batch_size']} | {r['fp32_texts_per_s']:.1f} | "
                     f"{r['w8_texts_per_s']:.1f} ({r['w8_speedup']:.2f}x) | "
                     f"{r['w4_texts_per_s']:.1f} ({r['w4_speedup']:.2f}x) |")
    worst = {s: min(r[f"{s}_speedup"] for r in e["rows"]) for s in SYSTEMS[1:]}
    lines += ["", "Model size: " + ", ".join(f"{s} {e['size_bytes'][s] / 1e6:.1f} MB" for s in SYSTEMS)
              + "; mean cosine to fp32 embeddings: "
              + ", ".join(f"{s} {e['cosine_to_fp32'][s]:.5f}" for s in SYSTEMS[1:]) + ".", "",
              "Target w8 / w4 never slower than fp32 at any batch size (end to end): worst w8 "
              f"{worst['w8']:.2f}x, w4 {worst['w4']:.2f}x -> "
              + ("met" if min(worst.values()) >= 1.0 else "NOT met") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results go to OUT/<machine>/")
    ap.add_argument("--compare", type=Path, help="another medquant checkout: A/B its weight-only kernel (part 3)")
    args = ap.parse_args(argv)
    if args.compare:
        ms, reps = ([256, 1024], 10) if args.quick else ([16, 64, 256, 1024, 4096], 20)
        res = {"command": f"python benchmarks/weight_only.py --compare {args.compare}" + (" --quick" if args.quick else ""),
               "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": THREADS,
               "this": git_commit(HERE.parent), "other": str(args.compare), "other_rev": git_commit(args.compare)}
        res["compare"] = kernel_ab(args.compare, ms, reps)
        md = markdown_ab(res)
        save_results(args.out, res, "weight_only-compare" + ("-quick" if args.quick else ""), md)
        print(md)
        return 0
    if args.quick:
        ms, reps, n_texts, batches = [1, 16, 256], 3, 64, {"questions": [1, 32], "answers": [32]}
    else:
        ms, reps, n_texts = [1, 4, 16, 64, 256, 1024, 4096], 7, 256
        batches = {"questions": [1, 8, 32], "answers": [1, 32, 128]}
    res = {"command": "python benchmarks/weight_only.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": THREADS}
    res["layers"] = bench_layers(ms, reps)
    res["encoder"] = bench_encoder(n_texts, reps, batches)
    md = markdown(res)
    save_results(args.out, res, "weight_only" + ("-quick" if args.quick else ""), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
