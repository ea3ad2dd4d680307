"""Shared pieces of the benchmark: the systems, the workloads' sizes, memory/CPU probes, oneDNN verbose parsing.

Nothing here imports torch, onnxruntime, openvino or medquant at module level, so every worker process pays only
for the runtime it measures.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

THREADS = 2
BATCH = 32
CORPUS_MAX_LENGTH = 256
QUERY_MAX_LENGTH = 256
FIXED_BATCH, FIXED_SEQ = 32, 128
SEED = 20240
REFERENCE = "medquant-int8-static"  # every ratio is taken against this system


@dataclass(frozen=True)
class System:
    name: str
    runtime: str  # medquant | torch | ort | ov
    variant: str  # medquant: fp32 | bf16 | int8-dynamic | int8-static-asym | int8-static-attn-bf16 | int8-static-attn-int8; torch: fp32 | fp32-compile | int8-dyn |
    #               int8-pt2e; ort: fp32 | int8-dyn | int8-pc; ov: fp32 | int8
    label: str
    needs: str = "hf"  # the prepared artefact (manifest path key) the system loads
    optional: bool = False  # skipped with a log line (not a failed run) when its runtime or artefact is missing


SYSTEMS: List[System] = [
    System("medquant-fp32", "medquant", "fp32", "medquant fp32"),
    System("medquant-bf16", "medquant", "bf16", "medquant bf16"),
    System("medquant-int8-dyn", "medquant", "int8-dynamic", "medquant int8 dynamic"),
    System("medquant-int8-static", "medquant", "int8-static-asym", "medquant int8 static (int8-static-asym)"),
    System("medquant-int8-static-attn-bf16", "medquant", "int8-static-attn-bf16",
           "medquant int8 static (int8-static-asym) with attention=\"bf16\""),
    System("medquant-int8-static-attn-int8", "medquant", "int8-static-attn-int8",
           "medquant int8 static (int8-static-asym) with attention=\"int8\" (int8 everywhere, as NNCF's int8)"),
    System("torch-fp32", "torch", "fp32", "PyTorch fp32"),
    System("torch-fp32-compile", "torch", "fp32-compile",
           "PyTorch fp32 under torch.compile (inductor, freezing, dynamic shapes)", optional=True),
    System("torch-int8-dyn", "torch", "int8-dyn", "PyTorch quantize_dynamic int8"),
    System("torch-int8-pt2e", "torch", "int8-pt2e",
           "PyTorch PT2E static int8 (torchao X86InductorQuantizer) + torch.compile", needs="calib", optional=True),
    System("ort-fp32", "ort", "fp32", "ONNX Runtime fp32 (optimized graph)", needs="ort-fp32"),
    System("ort-int8-dyn", "ort", "int8-dyn", "ONNX Runtime quantize_dynamic int8", needs="ort-int8-dyn"),
    System("ort-int8-pc", "ort", "int8-pc", "ONNX Runtime quantize_dynamic int8, per-channel weights",
           needs="ort-int8-pc"),
    System("ov-fp32", "ov", "fp32", "OpenVINO, fp32 IR at the CPU plugin's default inference precision",
           needs="ov-fp32", optional=True),
    System("ov-int8", "ov", "int8", "OpenVINO, NNCF static int8 (ModelType.TRANSFORMER)", needs="ov-int8",
           optional=True),
]
BY_NAME: Dict[str, System] = {s.name: s for s in SYSTEMS}

# OpenVINO CPU plugin settings of both ov systems (2 threads, one stream, latency mode)
OV_CONFIG = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

MODELS = {
    "minilm": "all-MiniLM-L6-v2",
    "bert-base": "BERT-base-sized (random weights, BertConfig())",
}


@dataclass(frozen=True)
class Sizes:
    """How much work each mode does."""

    n_corpus: int
    n_queries: int
    n_calib: int  # calibration texts for the static int8 MiniLM
    n_calib_base: int  # ... and for the BERT-base-sized model
    corpus_reps: int
    query_blocks: int  # the query set is run in this many round-robin blocks
    fixed_reps_minilm: int
    fixed_reps_base: int
    profile_reps: int
    ceiling_reps: int


FULL = Sizes(n_corpus=512, n_queries=200, n_calib=256, n_calib_base=64, corpus_reps=5, query_blocks=8,
             fixed_reps_minilm=8, fixed_reps_base=5, profile_reps=3, ceiling_reps=5)
QUICK = Sizes(n_corpus=64, n_queries=40, n_calib=256, n_calib_base=64, corpus_reps=2, query_blocks=2,
              fixed_reps_minilm=2, fixed_reps_base=1, profile_reps=1, ceiling_reps=2)


# ---------------------------------------------------------------------------------------------------- model inputs
def padded_example() -> Dict[str, np.ndarray]:
    """A 2 x 16 example batch whose second row is padded: graphs traced or exported from it keep the attention mask
    (an all-ones example lets the exporters drop it)."""
    ids = np.full((2, 16), 1000, np.int64)
    ids[:, 0], ids[0, -1], ids[1, 8] = 101, 102, 102
    mask = np.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def one_by_one(hf_dir: str, texts: List[str], max_length: int) -> List[Dict[str, np.ndarray]]:
    """Each text as a batch of one (no padding), tokenized by the model's tokenizer.json truncated to max_length:
    the calibration inputs of the OpenVINO (NNCF) and PyTorch (PT2E) static int8 systems."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    out = []
    for e in tok.encode_batch(texts):
        ids = np.array([e.ids], np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.array([e.type_ids], np.int64)})
    return out


def last_hidden_module(model):
    """A transformers BertModel as a torch Module (input_ids, attention_mask, token_type_ids) -> last hidden state."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    return LastHidden(model)


# ---------------------------------------------------------------------------------------------------- probes
def proc_status() -> Dict[str, int]:
    """VmRSS / VmHWM (peak RSS) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return {"rss": out.get("VmRSS", 0), "peak_rss": out.get("VmHWM", 0)}


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def system_busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile")


def _cpuinfo() -> Dict[str, object]:
    """Model name, flags and every core's `cpu MHz` from /proc/cpuinfo."""
    model, flags, mhz = "", set(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not model:
                    model = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu MHz":
                    mhz.append(float(value))
    except (OSError, ValueError):
        pass
    return {"model": model, "flags": flags, "mhz": mhz}


def _lscpu() -> Dict[str, str]:
    """`lscpu` as {field: value} (empty if lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _cpufreq_mhz(name: str) -> Optional[float]:
    """/sys/devices/system/cpu/cpu0/cpufreq/NAME (kHz) in MHz, if the kernel exposes it."""
    try:
        with open(f"/sys/devices/system/cpu/cpu0/cpufreq/{name}") as f:
            return int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def isa_tier(isa: Dict[str, bool]) -> str:
    """The vector ISA class that decides medquant's kernels: amx, avx512 (VNNI / BF16 or not), avx2, or baseline."""
    if isa.get("amx_int8"):
        return "amx"
    if isa.get("avx512f"):
        return "avx512"
    return "avx2" if isa.get("avx2") else "baseline"


def machine_slug(cpu_model: str, isa: Dict[str, bool]) -> str:
    """Directory name for a machine's results: the CPU model with every run of other characters as one '-', then its
    ISA tier ('AMD EPYC' with AVX-512 -> 'AMD-EPYC-avx512'): one model name covers CPUs of different generations
    (the AVX2 and the AVX-512 EPYCs here both report 'AMD EPYC'), whose results must not share a folder."""
    return (re.sub(r"[^A-Za-z0-9]+", "-", cpu_model).strip("-") or "unknown-cpu") + "-" + isa_tier(isa)


def machine_info() -> Dict[str, object]:
    """CPU model, clocks, topology, the ISA flags that decide the kernels here, RAM."""
    ci, ls = _cpuinfo(), _lscpu()
    model = ci["model"] or ls.get("Model name", "")
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    isa = {flag: flag in ci["flags"] for flag in ISA_FLAGS}
    max_mhz = _cpufreq_mhz("cpuinfo_max_freq") or (float(ls["CPU max MHz"]) if ls.get("CPU max MHz") else None)
    return {
        "cpu_model": model,
        "slug": machine_slug(model, isa),
        "vendor": ls.get("Vendor ID"),
        "family_model_stepping": "/".join(ls.get(k, "?") for k in ("CPU family", "Model", "Stepping")),
        "hypervisor": ls.get("Hypervisor vendor"),
        "sockets": _int_or_none(ls.get("Socket(s)")),
        "cores_per_socket": _int_or_none(ls.get("Core(s) per socket")),
        "threads_per_core": _int_or_none(ls.get("Thread(s) per core")),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "mhz_max": max_mhz,
        "mhz_current": _cpufreq_mhz("scaling_cur_freq") or (max(ci["mhz"]) if ci["mhz"] else None),
        "mhz_cpuinfo": ci["mhz"],
        "isa": isa,
        "avx512_vnni": isa["avx512_vnni"],
        "avx512_bf16": isa["avx512_bf16"],
        "amx": isa["amx_int8"],
        "mem_bytes": mem,
    }


def load_core(root: Path, package: str):
    """The compiled core of the medquant checkout at root as a module of its own (``<package>._core``), beside this
    checkout's (whose import has loaded oneDNN): an A/B of two commits' kernels in one process."""
    import importlib.util

    built = sorted((Path(root) / "medquant").glob("_core*.so"))
    if not built:
        raise SystemExit(f"{root}/medquant has no built core: (cd {root} && python setup.py build_ext --inplace)")
    spec = importlib.util.spec_from_file_location(f"{package}._core", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate_ab(calls: Dict[str, object], reps: int, inner: int = 1) -> Dict[str, float]:
    """calls["this"] and calls["other"] timed alternately, the order flipped every pair, reps pairs of `inner` calls
    each: both best times per call (ms), their ratio other / this, and the median of the pairs' ratios."""
    import time

    times: Dict[str, List[float]] = {"this": [], "other": []}
    for i in range(reps):
        for who in ("this", "other") if i % 2 == 0 else ("other", "this"):
            t0 = time.perf_counter()
            for _ in range(inner):
                calls[who]()
            times[who].append((time.perf_counter() - t0) / inner)
    best = {who: 1e3 * min(t) for who, t in times.items()}
    pairs = [o / t for t, o in zip(times["this"], times["other"])]
    return {"this_ms": best["this"], "other_ms": best["other"], "speedup": best["other"] / best["this"],
            "pair_median_speedup": float(np.median(pairs))}


def save_results(out_root: Path, res: dict, stem: str, md: str) -> Path:
    """res as OUT/<machine>/<stem>.json and md as <stem>.md (<machine>: res["machine"]["slug"]); returns the folder."""
    out_dir = Path(out_root) / res["machine"]["slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out_dir / f"{stem}.md").write_text(md)
    return out_dir


# ---------------------------------------------------------------------------------------------------- oneDNN verbose
_PROBLEM = re.compile(r"^(\d+(?:x\d+)*):(\d+(?:x\d+)*)$")


def parse_verbose_line(line: str) -> Optional[Dict[str, object]]:
    """One `onednn_verbose,...,exec,...` line (ONEDNN_VERBOSE=profile_exec, oneDNN 3.x) as a dict, else None."""
    if not line.startswith("onednn_verbose") or ",exec," not in line:
        return None
    parts = line.rstrip("\n").split(",")
    try:
        i = parts.index("exec")
        prim, impl, mds = parts[i + 2], parts[i + 3], parts[i + 5]
        problem, ms = parts[-2], float(parts[-1])
    except (ValueError, IndexError):
        return None
    return {"prim": prim, "impl": impl, "mds": mds, "problem": problem, "ms": ms}


def matmul_ops(problem: str) -> int:
    """2*M*K*N (times the batch) of a matmul verbose problem 'MxK:KxN' or 'BxMxK:BxKxN'."""
    m = _PROBLEM.match(problem)
    if not m:
        return 0
    a = [int(x) for x in m.group(1).split("x")]
    b = [int(x) for x in m.group(2).split("x")]
    batch = 1
    for d in a[:-2]:
        batch *= d
    return 2 * batch * a[-2] * a[-1] * b[-1]


def categorize(rec: Dict[str, object]) -> str:
    prim, mds, problem = rec["prim"], rec["mds"], rec["problem"]
    if prim == "matmul":
        if problem.count("x") > 2:  # batched (3-D): attention scores / context
            return "attention matmul"
        if "src_u8" in mds or "src_s8" in mds:
            return "linear matmul int8"
        if "src_bf16" in mds:
            return "linear matmul bf16"
        return "linear matmul f32"
    if prim == "softmax":
        return "attention softmax"
    if prim == "layer_normalization":
        return "layernorm"
    if prim == "binary":
        return "binary (epilogue)"
    return prim


def git_commit(root: Path) -> str:
    """The checkout's commit (with '+changes' when its tracked files differ from it), or '?' outside git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"]).returncode != 0
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"
