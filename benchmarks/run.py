"""medquant vs PyTorch vs ONNX Runtime vs OpenVINO on CPU: same weights, texts, threads and batches, in one run.

    python benchmarks/run.py            # full run (26 minutes measured on 2 cores, 2026-12-03)
    python benchmarks/run.py --quick    # smaller samples, fewer repetitions (15-16 minutes measured on 2 cores
                                        # that other processes kept 0.6-0.9 cores busy)

Both modes pay the same loading cost, 2-6 minutes per model phase in those runs: torch.compile of the two compiled
PyTorch systems and the PT2E calibration (256 MiniLM / 64 BERT-base texts, one at a time). prepare.py builds the ORT
per-channel and OpenVINO models once (about 4 minutes; cached).

Systems
  medquant   fp32 / bf16 / int8 dynamic / int8 static (int8-static-asym, the reference of every ratio)
  PyTorch    fp32 eager; fp32 under torch.compile (inductor, freezing, dynamic=True, compiled at load so compile time
             never lands in a workload); quantize_dynamic int8; PT2E static int8 (torchao's X86InductorQuantizer,
             calibrated at load on the texts medquant's static int8 was calibrated on, then torch.compile)
  ORT        fp32 and quantize_dynamic int8 (per-tensor, and per_channel=True as sentence-transformers' own export
             does), all on the graph fused by ORT's transformer optimizer
  OpenVINO   the fp32 IR at the CPU plugin's default inference precision (bf16 where the CPU has it: the compiled
             model's INFERENCE_PRECISION_HINT is recorded), and NNCF static int8 (ModelType.TRANSFORMER, calibrated
             on the same texts); INFERENCE_NUM_THREADS=2, NUM_STREAMS=1, PERFORMANCE_HINT=LATENCY
The OpenVINO systems need `pip install openvino==2026.4.1 nncf==3.4.0` and PT2E needs `torchao==0.18.0` (all three
are in the `bench` extra); without them those systems are skipped with a log line, as is a torch.compile system
whose compilation fails (the reason goes into the results' Systems section). Every system's corpus embeddings are
compared with PyTorch fp32's (the cos column), so an export that ignores the attention mask cannot look fast.

Every system runs in its own worker process (its own peak RSS), all with 2 threads; workloads run round-robin across
the systems (the order rotates every round) so drift and other load hit all of them alike. All systems but medquant
share one front end: the model's tokenizer.json with padding off, truncation to max_length, per-batch padding to the
batch max, mean pooling and normalisation.

Workloads
  corpus   MedQuAD answers (seeded sample), max_length 256, batch 32, length-sorted batches padded to the batch max
           (medquant packs the real tokens itself); end to end: tokenize, forward, mean-pool, normalise.
  query    batch-1 latency of MedQuAD questions, end to end, p50/p95.
  fixed    batch 32 x seq 128 forward (last hidden state), all-MiniLM-L6-v2 and a BERT-base-sized random model.
  gemm     the int8 matmul ceiling of this machine (oneDNN, large matmul) and the share of it the int8 encoder's
           matmuls reach on BERT-base at 32 x 128; the useful int8 efficiency of the MiniLM corpus encoding
           (real-token linear-layer ops per second end to end over that ceiling); where medquant int8's time goes
           (oneDNN profile).
  headroom a bound on a MiniLM corpus pass from the run's own numbers (int8 linear ops at the int8 ceiling, attention
           at the f32 matmul rate or the int8 ceiling, tokenization, nothing else) and the share of it each corpus
           target needs: how close to every op at its ceiling a pass would have to be.

The models and texts are built once into --workdir (default ~/.cache/medquant-bench) by prepare.py and reused.
Results are kept per machine: benchmarks/results/<machine>/benchmark[-quick].{json,md}, <machine> = the CPU model name
with every run of other characters as '-', then the ISA tier (common.machine_slug, e.g. AMD-EPYC-avx512); the Machine
section records the CPU model, clocks, topology and the ISA flags that decide the kernels.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    BATCH, BY_NAME, CORPUS_MAX_LENGTH, FIXED_BATCH, FIXED_SEQ, FULL, QUERY_MAX_LENGTH, QUICK, REFERENCE, SYSTEMS,
    THREADS, machine_info, system_busy_seconds,
)

TARGETS = {
    "corpus_vs_ort_int8": 1.5,
    "corpus_vs_torch_int8": 2.5,
    "query_p50_vs_ort_int8": 1.0,
    "fp32_vs_torch_fp32": 1.0,
    "bert_base_int8_matmul_efficiency": 0.70,
    "corpus_vs_ov_int8": 1.5,
    "bf16_corpus_vs_ov_fp32": 1.0,
    "query_p50_vs_ov": 2.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("ONEDNN_VERBOSE", None)
    env.pop("DNNL_VERBOSE", None)
    env["MEDQUANT_NUM_THREADS"] = str(THREADS)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


# ---------------------------------------------------------------------------------------------------- workers
class WorkerError(RuntimeError):
    def __init__(self, name: str, error: str, tb: str):
        super().__init__(f"worker {name}: {error}\n{tb}")
        self.error = error

    def reason(self) -> str:
        """The error message on one line, without the worker's traceback."""
        text = " ".join(self.error.split())
        return text if len(text) <= 400 else text[:400] + " ..."


class WorkerProc:
    def __init__(self, system, logdir: Path):
        self.system = system
        self.log = open(logdir / f"worker-{system.name}.log", "w")
        self.p = subprocess.Popen([sys.executable, str(HERE / "worker.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env(), bufsize=1)
        self.busy_other = 0.0  # CPU-seconds other processes used while this worker was measured
        self.window = 0.0

    def call(self, **cmd) -> dict:
        b0, t0 = system_busy_seconds(), time.perf_counter()
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        wall = time.perf_counter() - t0
        busy = system_busy_seconds() - b0
        if not line:
            raise RuntimeError(f"worker {self.system.name} died; see {self.log.name}")
        res = json.loads(line)
        if not res.get("ok"):
            raise WorkerError(self.system.name, res.get("error", ""), res.get("traceback", ""))
        if "cpu_seconds" in res:
            self.busy_other += max(0.0, busy - res["cpu_seconds"])
            self.window += wall
        return res

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()
        self.log.close()


def rotated(items, r):
    k = r % len(items)
    return items[k:] + items[:k]


def model_paths(model: dict) -> dict:
    """The manifest paths of one model: the core artefacts and the anchors stage's."""
    return {**model["paths"], **model.get("anchor_paths", {})}


def available_systems(model: dict, skipped: dict) -> list:
    """The systems whose prepared artefact exists; the others are logged and recorded in skipped with the reason."""
    paths, out = model_paths(model), []
    for s in SYSTEMS:
        if s.needs in paths:
            out.append(s)
            continue
        skipped[s.name] = model.get("anchor_skipped", {}).get(s.needs, f"prepare.py built no {s.needs!r}")
        log(f"  skipping {s.name}: {skipped[s.name]}")
    return out


def start_workers(systems, paths, logdir, skipped: dict):
    """One worker per system, loaded one at a time (load times do not overlap). An optional system that fails to
    load (runtime missing, compile error) is left out with a log line and its reason in skipped."""
    workers = {s.name: WorkerProc(s, logdir) for s in systems}
    loads = {}
    for s in systems:
        try:
            loads[s.name] = workers[s.name].call(cmd="load", runtime=s.runtime, variant=s.variant, paths=paths)
        except WorkerError as e:
            if not s.optional:
                raise
            w = workers.pop(s.name)
            w.log.write(f"\n[run.py] load failed:\n{e}\n")
            w.close()
            skipped[s.name] = f"load failed: {e.reason()}"
            log(f"  skipping {s.name}: {skipped[s.name]} (traceback in {w.log.name})")
            continue
        log(f"  loaded {s.name} in {loads[s.name]['load_seconds']:.1f} s")
    return workers, loads


def stop_workers(workers) -> dict:
    status = {n: w.call(cmd="status") for n, w in workers.items()}
    inter = {n: (w.busy_other / w.window if w.window else 0.0) for n, w in workers.items()}
    for w in workers.values():
        w.close()
    return {"status": status, "interference_cores": inter}


# ---------------------------------------------------------------------------------------------------- workloads
def run_corpus(workers, texts_file, n, reps, save_dir):
    names = list(workers)
    times = {k: [] for k in names}
    log(f"corpus: warm-up ({n} texts per system)")
    for k in names:
        workers[k].call(cmd="corpus", texts=texts_file, n=n, batch_size=BATCH, max_length=CORPUS_MAX_LENGTH,
                        save=str(save_dir / f"emb-{k}.npy"))
    for r in range(reps):
        for k in rotated(names, r):
            res = workers[k].call(cmd="corpus", texts=texts_file, n=n, batch_size=BATCH, max_length=CORPUS_MAX_LENGTH)
            times[k].append(res["seconds"])
        log(f"corpus round {r + 1}/{reps}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names))
    return times


def run_queries(workers, texts_file, n, blocks):
    names = list(workers)
    for k in names:  # warm-up
        workers[k].call(cmd="queries", texts=texts_file, n=n, start=0, stop=min(8, n), max_length=QUERY_MAX_LENGTH)
    lat = {k: [] for k in names}
    edges = np.linspace(0, n, blocks + 1).astype(int)
    for b in range(blocks):
        for k in rotated(names, b):
            res = workers[k].call(cmd="queries", texts=texts_file, n=n, start=int(edges[b]), stop=int(edges[b + 1]),
                                  max_length=QUERY_MAX_LENGTH)
            lat[k] += res["latencies"]
    log("queries p50 ms: " + ", ".join(f"{k} {1e3 * np.median(lat[k]):.2f}" for k in names))
    return lat


def run_fixed(workers, ids_file, reps, iters=2):
    names = list(workers)
    for k in names:
        workers[k].call(cmd="fixed", ids=ids_file, iters=1)
    times = {k: [] for k in names}
    for r in range(reps):
        for k in rotated(names, r):
            times[k] += workers[k].call(cmd="fixed", ids=ids_file, iters=iters)["times"]
    log("fixed 32x128 ms: " + ", ".join(f"{k} {1e3 * np.median(times[k]):.1f}" for k in names))
    return times


def run_gemm_script(args_list, out_json: Path, verbose_file: Path) -> dict:
    with open(verbose_file, "w") as vf:
        subprocess.run([sys.executable, str(HERE / "gemm.py"), *args_list, str(out_json)], stdout=vf,
                       stderr=subprocess.DEVNULL, env=child_env(), check=True)
    return json.loads(out_json.read_text())


# ---------------------------------------------------------------------------------------------------- summary
def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def token_counts(hf_dir, texts, max_length, batch):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    lens = np.array([len(e.ids) for e in tok.encode_batch(texts)])
    srt = np.sort(lens)[::-1]
    padded = sum(int(srt[s: s + batch].max()) * len(srt[s: s + batch]) for s in range(0, len(srt), batch))
    return {"real_tokens": int(lens.sum()), "padded_tokens": padded, "sum_sq_len": int((lens ** 2).sum()),
            "mean_len": float(lens.mean()),
            "median_len": float(np.median(lens)), "max_len": int(lens.max()),
            "truncated": int((lens >= max_length).sum())}


def linear_ops_per_token(hf_dir) -> int:
    """2 x the multiply-adds of one token through the encoder's linear layers (QKV, attention output, FFN in/out)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return 2 * cfg["num_hidden_layers"] * (4 * h * h + 2 * h * i)


def attention_ops_per_sq_token(hf_dir) -> int:
    """2 x the multiply-adds of attention (Q K^T and P V, every head and layer) per squared sequence length: a sequence
    of L tokens costs L^2 x this (medquant computes each sequence at its own length)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    return 2 * 2 * cfg["num_hidden_layers"] * cfg["hidden_size"]


def summarize_corpus(raw: dict) -> dict:
    out, tc = {}, raw["corpus"]["tokens"]
    for k, ts in raw["corpus"]["times"].items():
        med = statistics.median(ts)
        out[k] = {"seconds_median": med, "seconds_min": min(ts), "seconds_max": max(ts),
                  "spread": (max(ts) - min(ts)) / med, "texts_per_s": raw["corpus"]["n"] / med,
                  "tokens_per_s": tc["real_tokens"] / med}
    for v in out.values():
        v["ratio_to_ref"] = v["texts_per_s"] / out[REFERENCE]["texts_per_s"]
        v["ref_speedup"] = out[REFERENCE]["texts_per_s"] / v["texts_per_s"]
    return out


def summarize_query(raw: dict) -> dict:
    out = {}
    for k, lat in raw["query"]["latencies"].items():
        out[k] = {"p50_ms": 1e3 * pct(lat, 50), "p95_ms": 1e3 * pct(lat, 95), "p99_ms": 1e3 * pct(lat, 99),
                  "mean_ms": 1e3 * float(np.mean(lat)), "n": len(lat)}
    for v in out.values():
        v["p50_ratio_to_ref"] = v["p50_ms"] / out[REFERENCE]["p50_ms"]
        v["p95_ratio_to_ref"] = v["p95_ms"] / out[REFERENCE]["p95_ms"]
    return out


def summarize_fixed(times: dict) -> dict:
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"ms_median": 1e3 * med, "ms_min": 1e3 * min(ts), "seq_per_s": FIXED_BATCH / med,
                  "tokens_per_s": FIXED_BATCH * FIXED_SEQ / med}
    for v in out.values():
        v["ratio_to_ref"] = v["seq_per_s"] / out[REFERENCE]["seq_per_s"]
    return out


def cosine_to_torch_fp32(embedding_files: dict) -> dict:
    """Per system: mean and min cosine of its corpus embeddings to PyTorch fp32's (a broken export cannot hide)."""
    embs = {k: np.load(p) for k, p in embedding_files.items()}
    r = embs.get("torch-fp32")
    if r is None:
        return {}
    cos = {}
    for k, e in embs.items():
        c = np.sum(r * e, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(e, axis=1))
        cos[k] = {"mean": float(c.mean()), "min": float(c.min())}
    return cos


def summarize_gemm(raw: dict, corpus: dict) -> dict:
    ceil = raw["gemm"]["ceiling"]
    prof = raw["gemm"]["profiles"]["bert-base-fixed"]
    # useful int8 efficiency: the linear-layer ops of the real (unpadded) tokens per second of medquant int8 static's
    # end-to-end corpus encoding (the corpus table's tokens/s), over the int8 ceiling
    useful = corpus[REFERENCE]["tokens_per_s"] * raw["corpus"]["linear_ops_per_token"] / 1e12
    lin, wall = prof["linear_tops"], prof["linear_tops_over_wall"]  # None: no oneDNN matmul in the linear layers

    def over(a, b):
        return None if a is None else a / b

    return {
        "int8_ceiling_tops": ceil["int8_ceiling_tops"], "int8_large_tops": ceil["int8_large_tops"],
        "bert_base_int8_linear_tops": lin,
        "bert_base_int8_efficiency": over(lin, ceil["int8_ceiling_tops"]),
        "bert_base_int8_efficiency_vs_large": over(lin, ceil["int8_large_tops"]),
        "bert_base_int8_linear_tops_over_wall": wall,
        "bert_base_int8_wall_efficiency": over(wall, ceil["int8_ceiling_tops"]),
        "minilm_corpus_useful_int8_tops": useful,
        "minilm_corpus_useful_int8_efficiency": useful / ceil["int8_ceiling_tops"],
    }


ATTN_INT8 = "medquant-int8-static-attn-int8"


def headroom(raw: dict, c: dict, g: dict) -> dict | None:
    """How fast a MiniLM corpus pass could be on this CPU, from this run's own measurements: every int8 linear-layer op
    at the int8 ceiling, attention's ops at the f32 matmul rate of the ceiling table (medquant int8 static: f32
    attention) or at the int8 ceiling (int8 attention), tokenization as profiled, and nothing else (no LayerNorm,
    quantization, embeddings, pooling, binding). Then the pass time each corpus target needs, as a share of that bound:
    the efficiency the whole pass would have to reach. None when a measurement it needs is missing."""
    corpus, tok = raw["corpus"], raw["corpus"]["tokens"]
    f32 = [r for r in raw["gemm"]["ceiling"]["rows"] if r["kind"] == "f32" and r.get("timed", "oneDNN") == "oneDNN"]
    prof = raw["gemm"]["profiles"].get("minilm-corpus", {})
    if not f32 or "sum_sq_len" not in tok or "attention_ops_per_sq_token" not in corpus or not prof.get("tokenize_ms"):
        return None
    lin_ops = tok["real_tokens"] * corpus["linear_ops_per_token"]
    att_ops = tok["sum_sq_len"] * corpus["attention_ops_per_sq_token"]
    ceil, f32_tops = g["int8_ceiling_tops"] * 1e12, max(r["best_tops"] for r in f32) * 1e12
    tok_s = prof["tokenize_ms"] / 1e3
    bounds = {"f32 attention": lin_ops / ceil + att_ops / f32_tops + tok_s,
              "int8 attention": lin_ops / ceil + att_ops / ceil + tok_s}
    n = corpus["n"]
    need = {"corpus_vs_ov_int8": ("ov-int8", TARGETS["corpus_vs_ov_int8"]),
            "corpus_vs_torch_int8": ("torch-int8-dyn", TARGETS["corpus_vs_torch_int8"])}
    needs = {k: n / (t * c[sys_]["texts_per_s"]) for k, (sys_, t) in need.items() if sys_ in c}
    needs["useful_int8_60"] = lin_ops / (0.6 * ceil)
    measured = {k: n / c[k]["texts_per_s"] for k in (REFERENCE, ATTN_INT8, "ov-int8") if k in c}
    return {"linear_ops": lin_ops, "attention_ops": att_ops, "f32_tops": f32_tops / 1e12, "tokenize_s": tok_s,
            "bound_s": bounds, "needs_s": needs, "measured_s": measured}


def targets(c: dict, q: dict, g: dict) -> dict:
    """Each target's measured ratio, or None with the reason when a system it needs did not run."""
    ref = REFERENCE
    ov_p50 = [q[k]["p50_ms"] for k in ("ov-fp32", "ov-int8") if k in q]
    measured = {
        "corpus_vs_ort_int8": c[ref]["texts_per_s"] / c["ort-int8-dyn"]["texts_per_s"],
        "corpus_vs_torch_int8": c[ref]["texts_per_s"] / c["torch-int8-dyn"]["texts_per_s"],
        "query_p50_vs_ort_int8": q["ort-int8-dyn"]["p50_ms"] / q[ref]["p50_ms"],
        "fp32_vs_torch_fp32": c["medquant-fp32"]["texts_per_s"] / c["torch-fp32"]["texts_per_s"],
        "bert_base_int8_matmul_efficiency": g["bert_base_int8_efficiency"],
        "corpus_vs_ov_int8": c[ref]["texts_per_s"] / c["ov-int8"]["texts_per_s"] if "ov-int8" in c else None,
        "bf16_corpus_vs_ov_fp32": (c["medquant-bf16"]["texts_per_s"] / c["ov-fp32"]["texts_per_s"]
                                   if "ov-fp32" in c else None),
        "query_p50_vs_ov": min(ov_p50) / q[ref]["p50_ms"] if ov_p50 else None,
    }
    why = {"bert_base_int8_matmul_efficiency": "the int8 linear layers ran medquant's own matmul here (oneDNN's int8 "
                                               "is not exact on this CPU), which oneDNN's profile does not time"}
    return {k: {"measured": v, "target": TARGETS[k], "met": None if v is None else bool(v >= TARGETS[k]),
                **({"why": why.get(k, "the OpenVINO system(s) it compares with did not run")} if v is None else {})}
            for k, v in measured.items()}


def summarize(raw: dict) -> dict:
    out = {"corpus": summarize_corpus(raw), "query": summarize_query(raw),
           "fixed": {m: summarize_fixed(raw["fixed"][m]) for m in ("minilm", "bert-base")},
           "cosine_to_torch_fp32": cosine_to_torch_fp32(raw["corpus"]["embeddings"])}
    out["gemm"] = summarize_gemm(raw, out["corpus"])
    out["targets"] = targets(out["corpus"], out["query"], out["gemm"])
    out["headroom"] = headroom(raw, out["corpus"], out["gemm"])
    return out


TARGET_TEXT = {
    "corpus_vs_ort_int8": "medquant int8 corpus throughput vs ORT int8 (>= 1.5x)",
    "corpus_vs_torch_int8": "medquant int8 corpus throughput vs PyTorch dynamic int8 (>= 2.5x)",
    "query_p50_vs_ort_int8": "ORT int8 p50 / medquant int8 p50, batch-1 query latency (>= 1.0: medquant <= ORT)",
    "fp32_vs_torch_fp32": "medquant fp32 vs PyTorch fp32 corpus throughput (>= 1.0x)",
    "bert_base_int8_matmul_efficiency": "BERT-base int8 32x128: encoder matmuls / int8 ceiling (>= 70%)",
    "corpus_vs_ov_int8": "medquant int8 corpus throughput vs OpenVINO NNCF int8 (>= 1.5x)",
    "bf16_corpus_vs_ov_fp32": "medquant bf16 corpus throughput vs OpenVINO at its default precision (>= 1.0x)",
    "query_p50_vs_ov": "OpenVINO's best p50 (fp32 or int8) / medquant int8 p50, batch-1 queries (>= 2.0: medquant "
                       "<= 0.5x OpenVINO)",
}


def fmt_bytes(b):
    return f"{b / 2**20:.1f} MiB"


def fmt_mhz(x) -> str:
    return f"{x:.0f} MHz" if x else "not exposed"


def md_cpu(mi: dict) -> list:
    topo = (f"{mi.get('sockets')} socket(s) x {mi.get('cores_per_socket')} core(s) x {mi.get('threads_per_core')} "
            f"thread(s) per core, {mi['logical_cpus']} logical CPUs ({mi['affinity_cpus']} usable)")
    virt = f", under {mi['hypervisor']}" if mi.get("hypervisor") else ""
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mi.get("isa", {}).items())
    return [f"- CPU: {mi['cpu_model']} ({mi.get('vendor')}, family/model/stepping {mi.get('family_model_stepping')}"
            f"{virt}); {topo}; {mi['mem_bytes'] / 2**30:.1f} GiB RAM",
            f"- clock: max {fmt_mhz(mi.get('mhz_max'))}, current {fmt_mhz(mi.get('mhz_current'))} (cpufreq if the "
            f"kernel exposes it, else /proc/cpuinfo)",
            f"- ISA: {isa}"]


def md_machine(raw: dict) -> list:
    m, mi, ri = raw["meta"], raw["meta"]["machine"], raw["meta"]["runtime_info"]
    L = ["## Machine\n"]
    L += md_cpu(mi)
    L.append(f"- medquant {ri['medquant_version']}: oneDNN {ri['onednn_version']} ({ri['threading']}, "
             f"ISA {ri['cpu_isa']}); torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}, "
             f"transformers {m['versions']['transformers']}, openvino {m['versions'].get('openvino')}, nncf "
             f"{m['versions'].get('nncf')}, torchao {m['versions'].get('torchao')}, Python {m['versions']['python']}")
    L.append(f"- threads: {THREADS} for every system; load average at start {m['loadavg_start']}, at end "
             f"{m['loadavg_end']}")
    inter = m["interference_cores"]
    L.append(f"- CPU used by other processes while measuring (cores, mean over all measurements): "
             f"MiniLM phase {inter['minilm']:.2f}, BERT-base phase {inter['bert-base']:.2f}")
    if max(inter.values()) > 0.15:
        L.append(f"- **Warning: other processes used the CPU during this run; with {THREADS} OpenMP threads on "
                 f"{mi['affinity_cpus']} cores such interference inflates times unevenly (a descheduled thread stalls "
                 f"every barrier). Re-run on an idle machine before quoting these numbers.**")
    L.append("")
    return L


def top_ops(ops: dict, n: int = 6) -> str:
    return ", ".join(f"{o} x{c}" for o, c in sorted(ops.items(), key=lambda kv: -kv[1])[:n])


def torch_detail(info: dict) -> str:
    d = f"BertModel, attention {info.get('attn_implementation')}, quantized engine {info.get('quantized_engine')}"
    if "pt2e_seconds" in info:
        d += (f"; torch.export + {info['quantizer']}, calibrated on {info['n_calib']} texts (max_length "
              f"{info['calib_max_length']}, one at a time), {info['pt2e_seconds']:.0f} s at load")
    if "compile_seconds" in info:
        d += f"; torch.compile ({info['compile']}), compiled at load in {info['compile_seconds']:.0f} s"
    return d


def ov_detail(raw: dict, variant: str, info: dict) -> str:
    ov = raw["meta"]["prepare"]["minilm"]["anchors"].get("openvino", {})
    d = (f"openvino {info.get('openvino')}, compiled INFERENCE_PRECISION_HINT **{info.get('INFERENCE_PRECISION_HINT')}**, "
         f"{info.get('NUM_STREAMS')} stream, {info.get('INFERENCE_NUM_THREADS')} threads, "
         f"{info.get('PERFORMANCE_HINT')}")
    if ov:
        d += (f"; mask check (max abs diff, padded vs alone) {ov['mask_check_max_abs_diff'][variant]:.2g}; "
              f"graph: {top_ops(ov['ops'][variant])}")
    return d


def system_detail(raw: dict, k: str) -> str:
    sysd = BY_NAME[k]
    info = raw["status"]["minilm"][k].get("info", {})
    if sysd.runtime == "medquant":
        impls = sorted(set(v for v in info.get("site_impl", {}).values() if v))
        return f"scheme {info.get('scheme')}, linear kernels: {', '.join(impls) or '?'}"
    if sysd.runtime == "torch":
        return torch_detail(info)
    if sysd.runtime == "ov":
        return ov_detail(raw, sysd.variant, info)
    prep = raw["meta"]["prepare"]["minilm"]
    ops = prep["anchors"]["ort_int8_pc_ops"] if sysd.variant == "int8-pc" else \
        prep["ort_ops"]["int8" if "int8" in k else "fp32"]
    return "graph: " + top_ops(ops)


def md_systems(raw: dict, names: list) -> list:
    L = ["## Systems\n"]
    L.append(f"Ratios are taken against **{REFERENCE}** (int8-static-asym: static asymmetric u8 activations calibrated "
             f"(MSE) on MedQuAD answers disjoint from the corpus, s8 per-channel weights, int8 word embeddings). "
             f"The static int8 anchors (OpenVINO NNCF, PyTorch PT2E) are calibrated on the same texts.\n")
    for k in names:
        L.append(f"- `{k}`: {BY_NAME[k].label}; {system_detail(raw, k)}")
    for phase, skipped in raw["skipped"].items():
        for k, why in skipped.items():
            L.append(f"- `{k}` not run ({phase}): {why}")
    L.append("")
    return L


def md_corpus(raw: dict, s: dict, names: list) -> list:
    tc = raw["corpus"]["tokens"]
    L = ["## Corpus encoding (all-MiniLM-L6-v2)\n"]
    L.append(f"{raw['corpus']['n']} MedQuAD answers (seeded sample), max_length {CORPUS_MAX_LENGTH}, batch {BATCH}, "
             f"length-sorted; {tc['real_tokens']} real tokens (mean {tc['mean_len']:.0f}, median "
             f"{tc['median_len']:.0f}, {tc['truncated']} truncated), {tc['padded_tokens']} after padding each batch "
             f"to its max. Median of {len(next(iter(raw['corpus']['times'].values())))} round-robin repetitions; "
             f"end to end (tokenize + forward + mean pooling + normalise). Ratio = texts/s / medquant int8 static.\n")
    L.append("| system | texts/s | tokens/s | s / pass (min-max) | ratio to mq int8 | cos vs torch fp32 (mean / min) |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for k in names:
        v = s["corpus"][k]
        cs = s["cosine_to_torch_fp32"].get(k, {})
        L.append(f"| {k} | {v['texts_per_s']:.1f} | {v['tokens_per_s']:.0f} | {v['seconds_median']:.2f} "
                 f"({v['seconds_min']:.2f}-{v['seconds_max']:.2f}) | {v['ratio_to_ref']:.2f} | "
                 f"{cs.get('mean', float('nan')):.4f} / {cs.get('min', float('nan')):.4f} |")
    L.append("")
    return L


def md_query(raw: dict, s: dict, names: list) -> list:
    L = ["## Query latency (all-MiniLM-L6-v2, batch 1)\n"]
    L.append(f"{raw['query']['n']} MedQuAD questions, one at a time, end to end; run in "
             f"{raw['query']['blocks']} round-robin blocks.\n")
    L.append("| system | p50 ms | p95 ms | p99 ms | mean ms | p50 ratio to mq int8 |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for k in names:
        v = s["query"][k]
        L.append(f"| {k} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {v['p99_ms']:.2f} | {v['mean_ms']:.2f} | "
                 f"{v['p50_ratio_to_ref']:.2f} |")
    L.append("")
    return L


def md_fixed(s: dict, names: list) -> list:
    L = [f"## Fixed shapes: batch {FIXED_BATCH} x seq {FIXED_SEQ} (forward, last hidden state)\n"]
    L.append("| system | MiniLM ms | MiniLM seq/s | ratio | BERT-base ms | BERT-base seq/s | BERT-base tokens/s | ratio |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in names:
        a, b = s["fixed"]["minilm"][k], s["fixed"]["bert-base"].get(k)
        right = (f"{b['ms_median']:.1f} | {b['seq_per_s']:.1f} | {b['tokens_per_s']:.0f} | {b['ratio_to_ref']:.2f}"
                 if b else "- | - | - | -")
        L.append(f"| {k} | {a['ms_median']:.1f} | {a['seq_per_s']:.1f} | {a['ratio_to_ref']:.2f} | {right} |")
    L.append("")
    return L


def md_memory(raw: dict, names: list) -> list:
    L = ["## Memory and model size\n"]
    L.append("Each system in its own process. Peak RSS = the process's high-water mark over the whole phase (imports, "
             "load, all workloads); 'after load' = resident set right after loading (includes the runtime's "
             "libraries; for the compiled PyTorch systems also compilation); model bytes = the file the system "
             "loads (medquant safetensors, ONNX file, OpenVINO .xml + .bin, torch state_dict as torch.save writes "
             "it; PT2E: the tensors its quantized graph reads).\n")
    L.append("| system | MiniLM model bytes | MiniLM RSS before load | after load | peak | "
             "BERT-base model bytes | RSS after load | peak |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in names:
        a, pa = raw["load"]["minilm"][k], raw["status"]["minilm"][k]
        b, pb = raw["load"]["bert-base"].get(k), raw["status"]["bert-base"].get(k)
        right = (f"{fmt_bytes(b['model_bytes'])} | {fmt_bytes(b['rss_after_load'])} | {fmt_bytes(pb['peak_rss'])}"
                 if b else "- | - | -")
        L.append(f"| {k} | {fmt_bytes(a['model_bytes'])} | {fmt_bytes(a['rss_before_load'])} | "
                 f"{fmt_bytes(a['rss_after_load'])} | {fmt_bytes(pa['peak_rss'])} | {right} |")
    L.append("")
    return L


def md_gemm(raw: dict, s: dict) -> list:
    g, ceil = s["gemm"], raw["gemm"]["ceiling"]
    L = ["## GEMM efficiency\n"]
    L.append("oneDNN execution time (ONEDNN_VERBOSE profile_exec) of medquant's int8 Linear (u8 activations with a "
             "zero point x s8 per-channel weights, prepacked: the encoder's own primitive), best of the repetitions, "
             "measured in the same process and interleaved with the profiled BERT-base int8 forwards below:\n")
    L.append("| kind | M x K x N | implementation | timed by | best ms | TOP/s (best) | TOP/s (median) |")
    L.append("|---|---|---|---|---:|---:|---:|")
    for r in ceil["rows"]:
        L.append(f"| {r['kind']} | {r['shape']} | {r['impl']} | {r.get('timed', 'oneDNN')} | {r['best_ms']:.2f} | "
                 f"{r['best_tops']:.3f} | {r['median_tops']:.3f} |")
    L.append("")
    L.append(f"int8 ceiling (best of the int8 rows) = **{g['int8_ceiling_tops']:.3f} TOP/s** "
             f"(4096^3: {g['int8_large_tops']:.3f}). ")
    if g["bert_base_int8_linear_tops"] is None:
        L[-1] += ("BERT-base-sized medquant int8 static at 32 x 128: its linear layers ran medquant's own matmul "
                  "(no oneDNN records to time them by).\n")
    else:
        L[-1] += (f"BERT-base-sized medquant int8 static at 32 x 128: its 48 linear matmuls run at "
                  f"{g['bert_base_int8_linear_tops']:.3f} TOP/s = **{100 * g['bert_base_int8_efficiency']:.0f}%** of "
                  f"the ceiling ({100 * g['bert_base_int8_efficiency_vs_large']:.0f}% of the 4096^3 rate); counting "
                  f"the whole forward's wall time, {g['bert_base_int8_linear_tops_over_wall']:.3f} TOP/s "
                  f"({100 * g['bert_base_int8_wall_efficiency']:.0f}%).\n")
    c = s["corpus"][REFERENCE]
    L.append(f"Useful int8 efficiency, MiniLM corpus end to end: the real (unpadded) tokens medquant int8 static "
             f"encodes per second in the corpus table ({c['tokens_per_s']:.0f}) x the int8 linear-layer ops of one "
             f"token ({raw['corpus']['linear_ops_per_token'] / 1e6:.1f} M) = {g['minilm_corpus_useful_int8_tops']:.3f} "
             f"TOP/s = **{100 * g['minilm_corpus_useful_int8_efficiency']:.0f}%** of the int8 ceiling (tokenization, "
             f"attention, LayerNorm, pooling and any padded rows all count as overhead here).\n")
    return L


def md_profile(p: dict, title: str) -> list:
    L = [f"**{title}**: wall {p['wall_ms']:.1f} ms profiled ({p['unprofiled_wall_ms']:.1f} ms without "
         f"profiling), {p['onednn_calls']} oneDNN calls\n"]
    L.append("| part | ms (wall est.) | share | calls | implementations |")
    L.append("|---|---:|---:|---:|---|")
    for c, v in p["categories"].items():
        impl = ", ".join(f"{i} x{n}" for i, n in v["impls"].items())
        extra = f" ({v['tops']:.3f} TOP/s)" if v.get("tops") and c.startswith("linear") else ""
        L.append(f"| {c}{extra} | {v['wall_ms_est']:.1f} | {100 * v['wall_ms_est'] / p['wall_ms']:.0f}% | "
                 f"{v['calls']} | {impl} |")
    if p["tokenize_ms"]:
        L.append(f"| tokenize + sort + pad (Python, tokenizers) | {p['tokenize_ms']:.1f} | "
                 f"{100 * p['tokenize_ms'] / p['wall_ms']:.0f}% | | |")
    L.append(f"| rest: C loops + binding + Python | {p['rest_ms']:.1f} | {100 * p['rest_ms'] / p['wall_ms']:.0f}% "
             f"| | |")
    L.append("")
    return L


def md_profiles(raw: dict) -> list:
    L = ["## Where medquant int8 static spends its time\n"]
    L.append("Per pass: wall time without instrumentation (best of the repetitions); oneDNN categories from the "
             "profiled passes (attention of a multi-sequence batch runs one sequence per thread, so its summed time "
             "is divided by the thread count to estimate wall time); 'rest' = wall - oneDNN - tokenization = "
             "medquant's C loops (embedding gather, activation quantization, attention copies, pooling) + binding "
             "+ Python.\n")
    for key, title in (("minilm-corpus", "MiniLM corpus encoding (one pass)"),
                       ("minilm-queries", "MiniLM batch-1 queries (all queries, one pass)"),
                       ("bert-base-fixed", "BERT-base-sized 32 x 128 forward")):
        L += md_profile(raw["gemm"]["profiles"][key], title)
    return L


def md_targets(s: dict) -> list:
    L = ["## Targets\n", "| target | measured | met |", "|---|---:|---|"]
    for k, v in s["targets"].items():
        if v["measured"] is None:
            L.append(f"| {TARGET_TEXT[k]} | not measured ({v['why']}) | - |")
            continue
        meas = f"{100 * v['measured']:.0f}%" if k.endswith("efficiency") else f"{v['measured']:.2f}x"
        L.append(f"| {TARGET_TEXT[k]} | {meas} | {'yes' if v['met'] else 'NO'} |")
    L.append("")
    return L


def md_headroom(raw: dict, s: dict) -> list:
    h = s.get("headroom")
    if not h:
        return []
    n, b = raw["corpus"]["n"], h["bound_s"]
    L = ["## How close the corpus targets are to what this CPU allows\n"]
    L.append(f"A bound on one MiniLM corpus pass from this run's own measurements: the pass's int8 linear-layer ops "
             f"({h['linear_ops'] / 1e12:.2f} T, real tokens) at the int8 ceiling, its attention ops "
             f"({h['attention_ops'] / 1e9:.0f} G: Q K^T and P V of each sequence at its own length) at the f32 matmul "
             f"rate of the ceiling table ({h['f32_tops']:.3f} TOP/s; medquant int8 static runs attention in f32) or "
             f"at the int8 ceiling (int8 attention), tokenization as profiled ({1e3 * h['tokenize_s']:.0f} ms), and "
             f"nothing else: no LayerNorm, activation quantization, embeddings, pooling or binding. A pass time as a "
             f"share of the bound is the efficiency the whole pass has (100% = every op at its ceiling; a needed pass "
             f"over 100% is faster than the bound: not possible on this CPU).\n")
    L.append("| pass | s / pass | texts/s | f32-attention bound / this | int8-attention bound / this |")
    L.append("|---|---:|---:|---:|---:|")

    def row(name, t):
        L.append(f"| {name} | {t:.2f} | {n / t:.1f} | {100 * b['f32 attention'] / t:.0f}% | "
                 f"{100 * b['int8 attention'] / t:.0f}% |")

    row("bound, f32 attention", b["f32 attention"])
    row("bound, int8 attention", b["int8 attention"])
    names = {REFERENCE: "measured: medquant int8 static (f32 attention)",
             ATTN_INT8: "measured: medquant int8 static, int8 attention", "ov-int8": "measured: OpenVINO NNCF int8"}
    for k, t in h["measured_s"].items():
        row(names[k], t)
    texts = {"corpus_vs_ov_int8": "needed: 1.5x OpenVINO NNCF int8", "corpus_vs_torch_int8":
             "needed: 2.5x PyTorch dynamic int8", "useful_int8_60": "needed: useful int8 60% of the ceiling"}
    for k, t in h["needs_s"].items():
        row(texts[k], t)
    L.append("")
    return L


def markdown(raw: dict, s: dict) -> str:
    m = raw["meta"]
    names = [x.name for x in SYSTEMS if x.name in s["corpus"]]
    L = [f"# medquant benchmark{' (quick)' if m['quick'] else ''}\n",
         f"{m['date']} - `{m['command']}` - {m['seconds']:.0f} s\n"]
    L += md_machine(raw)
    L += md_systems(raw, names)
    L += md_corpus(raw, s, names)
    L += md_query(raw, s, names)
    L += md_fixed(s, names)
    L += md_memory(raw, names)
    L += md_gemm(raw, s)
    L += md_profiles(raw)
    L += md_targets(s)
    L += md_headroom(raw, s)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller samples and fewer repetitions")
    ap.add_argument("--workdir", type=Path,
                    default=Path(os.environ.get("MEDQUANT_BENCH_CACHE", Path.home() / ".cache" / "medquant-bench")),
                    help="where prepared models and texts are cached")
    ap.add_argument("--out", type=Path, default=HERE / "results",
                    help="results go to OUT/<machine>/ (<machine>: CPU model and ISA tier, e.g. AMD-EPYC-avx512)")
    return ap.parse_args(argv)


def dist_version(name: str):
    """An installed distribution's version without importing it (None if absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def new_raw(args, sizes, manifest, loadavg_start) -> dict:
    import medquant  # noqa: E402  (runtime info only; the parent never runs a model)

    return {"meta": {"quick": args.quick, "sizes": sizes.__dict__, "machine": machine_info(),
                     "runtime_info": medquant.runtime_info(), "loadavg_start": loadavg_start,
                     "command": "python benchmarks/run.py" + (" --quick" if args.quick else ""),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "versions": {"python": platform.python_version(), **{k: manifest["stamp"][k] for k in
                                                                         ("torch", "transformers", "onnxruntime")},
                                  **{k: dist_version(k) for k in ("openvino", "nncf", "torchao")}},
                     "prepare": {k: {"ort_fused": v["ort"]["fused"], "ort_ops": v["ort"]["ops"],
                                     "medquant": v["medquant"], "anchors": v.get("anchors", {})}
                                 for k, v in manifest["models"].items()}},
            "load": {}, "status": {}, "skipped": {}, "gemm": {"profiles": {}}}


def minilm_phase(raw, model, sizes, quick, files, texts, run_dir) -> float:
    """Corpus, queries and fixed shapes on MiniLM; returns the mean interference (cores)."""
    paths, skipped = model_paths(model), raw["skipped"].setdefault("minilm", {})
    systems = available_systems(model, skipped)
    log(f"MiniLM: starting {len(systems)} workers")
    workers, raw["load"]["minilm"] = start_workers(systems, paths, run_dir, skipped)
    try:
        n = sizes.n_corpus
        raw["corpus"] = {"n": n, "tokens": token_counts(paths["hf"], texts["corpus"][:n], CORPUS_MAX_LENGTH, BATCH),
                         "linear_ops_per_token": linear_ops_per_token(paths["hf"]),
                         "attention_ops_per_sq_token": attention_ops_per_sq_token(paths["hf"]),
                         "times": run_corpus(workers, files["texts"], n, sizes.corpus_reps, run_dir),
                         "embeddings": {k: str(run_dir / f"emb-{k}.npy") for k in workers}}
        raw["query"] = {"n": sizes.n_queries, "blocks": sizes.query_blocks,
                        "latencies": run_queries(workers, files["texts"], sizes.n_queries, sizes.query_blocks)}
        raw["fixed"] = {"minilm": run_fixed(workers, files["ids"], sizes.fixed_reps_minilm, iters=1 if quick else 2)}
    finally:
        st = stop_workers(workers)
    raw["status"]["minilm"] = st["status"]
    return float(np.mean(list(st["interference_cores"].values())))


def profile_minilm(raw, paths, sizes, texts_file, run_dir) -> None:
    from gemm import finish_profile

    log("profiling medquant int8 static (MiniLM corpus and queries)")
    static_dir = paths["medquant-int8-static-asym"]
    for wl, n in (("corpus", sizes.n_corpus), ("queries", sizes.n_queries)):
        meta = run_gemm_script(["profile", "--dir", static_dir, "--workload", wl, "--texts", texts_file, "--n", str(n),
                                "--reps", str(sizes.profile_reps), "--batch-size", str(BATCH if wl == "corpus" else 1),
                                "--max-length", str(CORPUS_MAX_LENGTH)],
                               run_dir / f"profile-{wl}.json", run_dir / f"profile-{wl}.verbose")
        raw["gemm"]["profiles"][f"minilm-{wl}"] = finish_profile(run_dir / f"profile-{wl}.verbose", meta, THREADS,
                                                                 batched_attention=(wl == "corpus"))


def bert_base_phase(raw, model, sizes, ids_file, run_dir) -> float:
    """Fixed shapes on the BERT-base-sized model; returns the mean interference (cores)."""
    skipped = raw["skipped"].setdefault("bert-base", {})
    systems = available_systems(model, skipped)
    log(f"BERT-base: starting {len(systems)} workers")
    workers, raw["load"]["bert-base"] = start_workers(systems, model_paths(model), run_dir, skipped)
    try:
        raw["fixed"]["bert-base"] = run_fixed(workers, ids_file, sizes.fixed_reps_base, iters=1)
    finally:
        st = stop_workers(workers)
    raw["status"]["bert-base"] = st["status"]
    return float(np.mean(list(st["interference_cores"].values())))


def ceiling_phase(raw, paths, sizes, ids_file, run_dir) -> None:
    from gemm import finish_profile

    log("int8 matmul ceiling, interleaved with profiled BERT-base int8 static 32x128 forwards")
    meta = run_gemm_script(["profile", "--dir", paths["medquant-int8-static-asym"], "--workload", "fixed", "--ids",
                            ids_file, "--reps", str(sizes.ceiling_reps), "--ceiling"],
                           run_dir / "profile-fixed.json", run_dir / "profile-fixed.verbose")
    prof = finish_profile(run_dir / "profile-fixed.verbose", meta, THREADS, batched_attention=True)
    raw["gemm"]["ceiling"] = prof.pop("ceiling")
    raw["gemm"]["profiles"]["bert-base-fixed"] = prof
    log(f"  int8 ceiling {raw['gemm']['ceiling']['int8_ceiling_tops']:.3f} TOP/s, BERT-base int8 linear matmuls "
        f"{prof['linear_tops'] or 0:.3f} TOP/s (0: not run by oneDNN)")


def write_results(raw: dict, s: dict, out_dir: Path, stem: str) -> str:
    md = markdown(raw, s)
    raw_small = {k: v for k, v in raw.items() if k not in ("corpus", "query")}
    raw_small["corpus"] = {k: v for k, v in raw["corpus"].items() if k != "embeddings"}
    raw_small["query"] = {**{k: v for k, v in raw["query"].items() if k != "latencies"},
                          "latencies_ms": {k: [round(1e3 * x, 3) for x in v]
                                           for k, v in raw["query"]["latencies"].items()}}
    (out_dir / f"{stem}.json").write_text(json.dumps({"summary": s, "raw": raw_small}, indent=1))
    (out_dir / f"{stem}.md").write_text(md)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    log(f"load average {loadavg_start}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / ("run-quick" if args.quick else "run-full")
    run_dir.mkdir(exist_ok=True)

    log("preparing models and texts (cached)")
    subprocess.run([sys.executable, str(HERE / "prepare.py"), str(args.workdir)], check=True, env=child_env())
    manifest = json.loads((args.workdir / "manifest.json").read_text())
    files = {"texts": str(args.workdir / "texts.json"), "ids": str(args.workdir / "fixed_ids.npy")}
    texts = json.loads(Path(files["texts"]).read_text())
    raw = new_raw(args, sizes, manifest, loadavg_start)

    inter = {}
    minilm, base = manifest["models"]["minilm"], manifest["models"]["bert-base"]
    inter["minilm"] = minilm_phase(raw, minilm, sizes, args.quick, files, texts, run_dir)
    profile_minilm(raw, minilm["paths"], sizes, files["texts"], run_dir)
    inter["bert-base"] = bert_base_phase(raw, base, sizes, files["ids"], run_dir)
    ceiling_phase(raw, base["paths"], sizes, files["ids"], run_dir)

    raw["meta"]["interference_cores"] = inter
    raw["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    raw["meta"]["seconds"] = time.perf_counter() - t_start
    s = summarize(raw)
    stem = "benchmark-quick" if args.quick else "benchmark"
    out_dir = args.out / raw["meta"]["machine"]["slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    print(write_results(raw, s, out_dir, stem))
    print("\nratios to medquant int8 static (texts/s, corpus): " + ", ".join(
        f"{k} {v['ratio_to_ref']:.2f}" for k, v in s["corpus"].items()))
    for k, v in s["targets"].items():
        if v["measured"] is None:
            print(f"target {k}: not measured ({v['why']})")
        else:
            print(f"target {k}: {v['measured']:.3f} (>= {v['target']}) {'met' if v['met'] else 'NOT met'}")
    log(f"wrote {out_dir / (stem + '.md')} and .json in {raw['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
