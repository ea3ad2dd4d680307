"""oneDNN-level measurements of medquant, run by run.py in a process of its own with stdout sent to a file.

    python benchmarks/gemm.py profile OUT.json --dir ENCODER_DIR --workload fixed|corpus|queries [--ceiling] [...]

One medquant encoder on one workload. Per repetition: a plain pass (its wall time), then the same pass with oneDNN's
exec profiling switched on (dnnl_set_verbose(2) through ctypes, then off again; ONEDNN_VERBOSE=profile_exec
output), summed per primitive category. What oneDNN does not account for is the encoder's own C loops (embedding
gather, LayerNorm, activation quantization, the fused attention kernel, pooling) plus the binding and Python;
tokenization (the same steps Encoder.encode takes) is timed on its own.

--ceiling interleaves, in the same process and repetitions (so load on the machine hits both alike), the machine's
int8 matmul ceiling: medquant's own int8 Linear (u8 activations with a zero point, s8 per-channel weights,
prepacked: the primitive the encoder uses) on a large 4096 x 4096 x 4096 matmul and on BERT-base's four shapes at
4096 rows, timed by oneDNN itself (so the binding's work and activation quantization are not counted); bf16
and f32 at one shape for context. A Linear runs 4096 rows as four 1024-row primitives (its row plan, csrc/linear.h),
so the ceiling is that of 1024-row matmuls, each record timed and counted on its own. Where a ceiling layer runs no
oneDNN matmul (below avx512_core medquant's own panel matmul computes f32-arithmetic layers, csrc/linear.h), its row
is timed by the wall clock around the whole Linear call instead (input quantization included) and says so.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, categorize, matmul_ops, parse_verbose_line  # noqa: E402

_libc = ctypes.CDLL(None)


def mark(text: str) -> None:
    """A marker line in the same C stdio stream oneDNN's verbose output goes to (so the order is kept)."""
    _libc.printf(b"%s\n", text.encode())
    _libc.fflush(None)


def set_verbose(on: bool) -> None:
    from medquant import _native

    _libc.fflush(None)
    _native._LIBDNNL.dnnl_set_verbose(2 if on else 0)


def sections(verbose_file: Path):
    """{section name: [parsed exec records]} from a file written by this script."""
    out, cur = {}, None
    with open(verbose_file, errors="replace") as f:
        for line in f:
            if line.startswith("MQBENCH "):
                cur = line.split(None, 1)[1].strip()
                out.setdefault(cur, [])
                continue
            rec = parse_verbose_line(line)
            if rec is not None and cur is not None:
                out[cur].append(rec)
    return out


# ---------------------------------------------------------------------------------------------------- ceiling
CEIL_SHAPES = [(4096, 4096, 4096), (4096, 768, 2304), (4096, 768, 3072), (4096, 3072, 768), (4096, 768, 768)]


def ceiling_linears():
    """(name, Linear, input) for the ceiling: int8 at every shape, bf16 and f32 at one BERT-base shape."""
    from medquant import _core

    rng = np.random.default_rng(0)
    plan = [("int8", s) for s in CEIL_SHAPES] + [("bf16", (4096, 768, 3072)), ("f32", (4096, 768, 3072))]
    out = []
    for kind, (M, K, N) in plan:
        if kind == "int8":
            w = rng.integers(-127, 128, (N, K), dtype=np.int8)
            lin = _core.Linear(_core.LINEAR_INT8, w, np.full(N, 0.01, np.float32), None, None,
                               act_mode=_core.ACT_STATIC, act_symmetric=False, act_scale=0.02, act_zero_point=128,
                               w_per_channel=True, n_threads=THREADS)
        else:
            w = (rng.standard_normal((N, K), dtype=np.float32) * 0.05).astype(np.float32)
            lin = _core.Linear(_core.LINEAR_BF16 if kind == "bf16" else _core.LINEAR_F32, w, n_threads=THREADS)
        out.append((f"{kind} {M}x{K}x{N}", lin, rng.standard_normal((M, K), dtype=np.float32)))
    return out


def wall_ceiling_rows(meta: dict, rows: list) -> list:
    """Ceiling rows, timed by the wall clock, of the ceiling layers oneDNN recorded nothing for (medquant's own
    matmul ran them)."""
    out = []
    for name, secs in meta.get("ceiling_wall_s", {}).items():
        kind, shape = name.split()
        if not secs or any(r["kind"] == kind and r["shape"] == shape for r in rows):
            continue
        m, k, n = (int(v) for v in shape.split("x"))
        ops = 2 * m * k * n
        best, med = min(secs), statistics.median(secs)
        out.append({"kind": kind, "shape": shape, "impl": meta["ceiling_impls"][name], "ops": ops,
                    "best_ms": 1e3 * best, "median_ms": 1e3 * med, "n": len(secs), "best_tops": ops / best / 1e12,
                    "median_tops": ops / med / 1e12, "timed": "wall clock, whole Linear call"})
    return out


def ceiling_rows(secs: dict) -> list:
    rows = []
    for name, recs in secs.items():
        if not name.startswith("ceil "):
            continue
        _, kind, shape = name.split()
        mm = [r for r in recs if r["prim"] == "matmul"]
        if not mm:
            continue
        row = next((r for r in rows if r["kind"] == kind and r["shape"] == shape), None)
        if row is None:
            row = {"kind": kind, "shape": shape, "impl": mm[0]["impl"], "ops": matmul_ops(mm[0]["problem"]), "ms": []}
            rows.append(row)
        row["ms"] += [r["ms"] for r in mm]
    for row in rows:
        ms = row.pop("ms")
        row.update(best_ms=min(ms), median_ms=statistics.median(ms), n=len(ms))
        row.update(best_tops=row["ops"] / row["best_ms"] / 1e9, median_tops=row["ops"] / row["median_ms"] / 1e9,
                   timed="oneDNN")
    return rows


# ---------------------------------------------------------------------------------------------------- profile
def _tokenize_like_encode(enc, texts, batch_size, max_length):
    """The tokenization + sorting + padding Encoder.encode does, alone (to separate it from the forward)."""
    tok = enc.tokenizer
    tok.enable_truncation(max_length)
    try:
        encs = tok.encode_batch(texts)
    finally:
        tok.no_truncation()
    order = np.argsort([-len(e.ids) for e in encs], kind="stable")
    for s in range(0, len(texts), batch_size):
        idx = order[s: s + batch_size]
        L = max(len(encs[i].ids) for i in idx)
        ids = np.zeros((len(idx), L), np.int32)
        mask = np.zeros((len(idx), L), np.int32)
        for r, i in enumerate(idx):
            n = len(encs[i].ids)
            ids[r, :n] = encs[i].ids
            mask[r, :n] = 1
    return len(encs)


def run_profile(args) -> dict:
    """Alternates, per repetition: [ceiling matmuls, profiled,] a plain pass (wall), a profiled pass (wall + records)."""
    import medquant

    enc = medquant.Encoder.from_pretrained(args.dir, n_threads=THREADS)
    tokenize = None
    if args.workload == "fixed":
        ids = np.load(args.ids).astype(np.int32)
        mask, tt = np.ones_like(ids), np.zeros_like(ids)
        n_items = int(ids.shape[0])

        def one_pass():
            enc.forward(ids, mask, tt)
    else:
        texts = json.loads(Path(args.texts).read_text())[args.workload][: args.n]
        n_items = len(texts)
        if args.workload == "corpus":
            def one_pass():
                enc.encode(texts, batch_size=args.batch_size, max_length=args.max_length, show_progress_bar=False)

            def tokenize():
                _tokenize_like_encode(enc, texts, args.batch_size, args.max_length)
        else:
            def one_pass():
                for q in texts:
                    enc.encode([q], batch_size=1, max_length=args.max_length, show_progress_bar=False)

            def tokenize():
                for q in texts:
                    _tokenize_like_encode(enc, [q], 1, args.max_length)
    ceil = ceiling_linears() if args.ceiling else []
    for _, lin, x in ceil:
        lin.forward(x)
    one_pass()  # warm-up: builds every primitive shape the workload needs
    walls, prof_walls, tok_s = [], [], []
    ceil_wall = {name: [] for name, _, _ in ceil}
    for r in range(args.reps):
        for name, lin, x in ceil:
            mark(f"MQBENCH ceil {name}")
            set_verbose(True)
            t = time.perf_counter()
            lin.forward(x)
            ceil_wall[name].append(time.perf_counter() - t)
            set_verbose(False)
        t = time.perf_counter()
        one_pass()
        walls.append(time.perf_counter() - t)
        mark(f"MQBENCH pass {r}")
        set_verbose(True)
        t = time.perf_counter()
        one_pass()
        _libc.fflush(None)
        prof_walls.append(time.perf_counter() - t)
        set_verbose(False)
        if tokenize is not None:
            t = time.perf_counter()
            tokenize()
            tok_s.append(time.perf_counter() - t)
    return {"wall_s": walls, "profiled_wall_s": prof_walls, "tokenize_s": tok_s, "scheme": enc.scheme.name,
            "n_items": n_items, "ceiling_impls": {name: lin.impl() for name, lin, _ in ceil},
            "ceiling_wall_s": ceil_wall}


def finish_profile(verbose_file: Path, meta: dict, threads: int, batched_attention: bool) -> dict:
    secs = sections(verbose_file)
    passes = []
    for r in range(len(meta["profiled_wall_s"])):
        cats = {}
        for rec in secs.get(f"pass {r}", []):
            c = categorize(rec)
            d = cats.setdefault(c, {"ms": 0.0, "calls": 0, "ops": 0, "impls": {}})
            d["ms"] += rec["ms"]
            d["calls"] += 1
            if rec["prim"] == "matmul":
                d["ops"] += matmul_ops(rec["problem"])
            d["impls"][rec["impl"]] = d["impls"].get(rec["impl"], 0) + 1
        passes.append((1e3 * meta["profiled_wall_s"][r], cats))

    def lin_ms(c):
        return sum(v["ms"] for k, v in c.items() if k.startswith("linear matmul"))

    # matmul efficiency: best-of over passes (like the ceiling); the breakdown: the profiled pass with the least wall
    best_lin = min(passes, key=lambda p: lin_ms(p[1]))[1]
    wall_ms, best = min(passes, key=lambda p: p[0])
    cats = {}
    onednn_ms = 0.0
    for k, v in sorted(best.items(), key=lambda kv: -kv[1]["ms"]):
        # attention primitives of a multi-sequence batch run one sequence per thread concurrently:
        # their summed time over-counts wall time by about the thread count
        concurrent = batched_attention and k in ("attention matmul", "attention softmax")
        wall_est = v["ms"] / threads if concurrent else v["ms"]
        onednn_ms += wall_est
        cats[k] = {**v, "wall_ms_est": wall_est, "thread_summed": concurrent,
                   "tops": (v["ops"] / v["ms"] / 1e9) if v["ops"] and v["ms"] else None}
    tok_ms = 1e3 * min(meta["tokenize_s"]) if meta["tokenize_s"] else 0.0
    lin = {k: v for k, v in best_lin.items() if k.startswith("linear matmul")}
    lin_ms_best = sum(v["ms"] for v in lin.values())
    lin_ops = sum(v["ops"] for v in lin.values())
    plain_ms = 1e3 * min(meta["wall_s"])
    out = {
        "scheme": meta["scheme"], "n_items": meta["n_items"], "wall_ms": wall_ms, "unprofiled_wall_ms": plain_ms,
        "unprofiled_wall_ms_median": 1e3 * statistics.median(meta["wall_s"]),
        "tokenize_ms": tok_ms, "categories": cats, "onednn_wall_ms_est": onednn_ms,
        "rest_ms": wall_ms - onednn_ms - tok_ms,
        "linear_ms": lin_ms_best, "linear_ops": lin_ops,
        "linear_tops": lin_ops / lin_ms_best / 1e9 if lin_ms_best else None,
        "linear_tops_over_wall": lin_ops / plain_ms / 1e9 if plain_ms and lin_ops else None,
        "onednn_calls": sum(v["calls"] for v in cats.values()),
    }
    rows = ceiling_rows(secs)
    rows += wall_ceiling_rows(meta, rows)
    if rows:
        int8 = [r for r in rows if r["kind"] == "int8"]
        out["ceiling"] = {"rows": rows, "int8_ceiling_tops": max(r["best_tops"] for r in int8),
                          "int8_large_tops": next(r["best_tops"] for r in int8 if r["shape"] == "4096x4096x4096"),
                          "impls": meta["ceiling_impls"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["profile"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir")
    ap.add_argument("--workload", choices=["fixed", "corpus", "queries"])
    ap.add_argument("--ids")
    ap.add_argument("--texts")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ceiling", action="store_true", help="interleave the int8 ceiling matmuls with the passes")
    args = ap.parse_args(argv)
    meta = run_profile(args)
    _libc.fflush(None)
    args.out.write_text(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
