"""One benchmarked system in its own process, driven by run.py over a pipe (one JSON command per line).

Each worker imports only its own runtime, so its peak RSS is that system's. Timings are taken here, around the call
that does the work, so the pipe is never on the clock.

Commands: load, corpus, queries, fixed, status, exit (see handle()).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    INPUT_NAMES, OV_CONFIG, THREADS, cpu_seconds, last_hidden_module, one_by_one, padded_example, proc_status,
)


# ---------------------------------------------------------------------------------------------------- systems
class HFTokenized:
    """torch / ORT share this front end: the model's tokenizer.json through `tokenizers` (what medquant uses),
    truncation to max_length, length-sorted batches padded to the batch max, mean pooling + L2 normalisation."""

    def __init__(self, hf_dir: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
        self.tok.no_padding()

    def encode(self, texts, batch_size: int, max_length: int) -> np.ndarray:
        self.tok.enable_truncation(max_length)
        encs = self.tok.encode_batch(texts)
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")
        out = None
        for s in range(0, len(texts), batch_size):
            idx = order[s: s + batch_size]
            L = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), L), np.int64)
            mask = np.zeros((len(idx), L), np.int64)
            tt = np.zeros((len(idx), L), np.int64)
            for r, i in enumerate(idx):
                e = encs[i]
                n = len(e.ids)
                ids[r, :n] = e.ids
                mask[r, :n] = 1
                tt[r, :n] = e.type_ids
            pooled = self.pooled(ids, mask, tt)
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), np.float32)
            out[idx] = pooled
        return out


def mean_pool_normalize(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mf = mask[:, :, None].astype(np.float32)
    p = (h * mf).sum(1) / np.maximum(mf.sum(1), 1.0)
    return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)


class TorchSystem(HFTokenized):
    """BertModel eager (fp32, quantize_dynamic int8), under torch.compile (fp32), or PT2E static int8 + compile.

    The compiled variants are compiled at load (dynamic shapes, inductor freezing) on a padded batch and on a batch
    of one (torch.compile specializes size 1), so compile time is load time, never workload time."""

    def __init__(self, paths: dict, variant: str):
        import torch

        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(1)
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        super().__init__(paths["hf"])
        self.torch = torch
        self.extra = {}
        model = BertModel.from_pretrained(paths["hf"], add_pooling_layer=False).eval()
        self.attn = getattr(model.config, "_attn_implementation", "?")
        if variant == "int8-dyn":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8,
                                                               inplace=True)
        self.model = last_hidden_module(model)
        if variant == "int8-pt2e":
            self.model = self._pt2e(paths)
        self.run = self.model
        if variant in ("fp32-compile", "int8-pt2e"):
            self.run = self._compile(self.model)
        self.qengine = torch.backends.quantized.engine

    def _pt2e(self, paths: dict):
        """torch.export (dynamic batch and sequence) -> prepare_pt2e with X86InductorQuantizer -> calibration on
        medquant's calibration texts, one text at a time -> convert_pt2e."""
        torch = self.torch
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        t = time.perf_counter()
        example = tuple(torch.from_numpy(v) for v in padded_example().values())
        dims = {"batch": torch.export.Dim("batch", min=1, max=1024), "seq": torch.export.Dim("seq", min=2, max=512)}
        dynamic = {k: {0: dims["batch"], 1: dims["seq"]} for k in INPUT_NAMES}
        with torch.no_grad():
            gm = torch.export.export(self.model, example, dynamic_shapes=dynamic).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(gm, quantizer)
        calib = json.loads(Path(paths["calib"]).read_text())
        items = one_by_one(paths["hf"], calib["texts"], calib["max_length"])
        with torch.no_grad():
            for it in items:
                prepared(*(torch.from_numpy(it[k]) for k in INPUT_NAMES))
        converted = convert_pt2e(prepared)
        self.extra.update(pt2e_seconds=round(time.perf_counter() - t, 2), n_calib=len(items),
                          calib_max_length=calib["max_length"], quantizer="X86InductorQuantizer (default config)")
        return converted

    def _compile(self, module):
        torch = self.torch
        t = time.perf_counter()
        # freezing: weights become constants (prepacked oneDNN weights; the int8 lowering of PT2E needs it). Set
        # globally (this process compiles one model): passed as a torch.compile option it does not reach the
        # PT2E weight prepacking ("UnsupportedOperatorException: onednn.qlinear_prepack").
        torch._inductor.config.freezing = True
        compiled = torch.compile(module, dynamic=True)
        ex = padded_example()
        for rows in (slice(0, 2), slice(0, 1)):  # a padded batch, then batch 1
            with torch.inference_mode():
                compiled(*(torch.from_numpy(v[rows]) for v in ex.values()))
        self.extra.update(compile_seconds=round(time.perf_counter() - t, 2), compile="dynamic=True, freezing=True")
        return compiled

    def last_hidden(self, ids, mask, tt):
        torch = self.torch
        return self.run(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(tt))

    def pooled(self, ids, mask, tt):
        torch = self.torch
        with torch.inference_mode():
            h = self.last_hidden(ids, mask, tt)
            mf = torch.from_numpy(mask).unsqueeze(-1).to(h.dtype)
            p = (h * mf).sum(1) / mf.sum(1).clamp(min=1)
            p = torch.nn.functional.normalize(p, dim=1)
        return p.numpy()

    def forward(self, ids, mask, tt):
        with self.torch.inference_mode():
            return self.last_hidden(ids, mask, tt).numpy()

    def model_bytes(self) -> int:
        """torch.save of the state_dict; for PT2E the tensors its graph reads (int8 weights and their scales, the
        fp32 embeddings, LayerNorm and biases), since its module still holds the unused fp32 weights."""
        import io

        if isinstance(self.model, self.torch.fx.GraphModule):
            return graph_tensor_bytes(self.model)
        buf = io.BytesIO()
        self.torch.save(self.model.m.state_dict(), buf)
        return buf.getbuffer().nbytes

    def info(self) -> dict:
        return {"torch": self.torch.__version__, "attn_implementation": self.attn, "quantized_engine": self.qengine,
                "threads": self.torch.get_num_threads(), **self.extra}


def graph_tensor_bytes(gm) -> int:
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if hasattr(obj, "element_size") and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.numel() * obj.element_size()
    return total


class OrtSystem(HFTokenized):
    def __init__(self, paths: dict, variant: str):
        import onnxruntime as ort

        super().__init__(paths["hf"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path = paths[f"ort-{variant}"]
        self.sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.ort = ort

    def forward(self, ids, mask, tt):
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
        return self.sess.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[0]

    def pooled(self, ids, mask, tt):
        return mean_pool_normalize(self.forward(ids, mask, tt), mask)

    def model_bytes(self) -> int:
        return os.path.getsize(self.path)

    def info(self) -> dict:
        return {"onnxruntime": self.ort.__version__, "providers": self.sess.get_providers()}


class OvSystem(HFTokenized):
    """OpenVINO CPU plugin, one infer request reused; the inference precision is the plugin's default (reported)."""

    def __init__(self, paths: dict, variant: str):
        import openvino as ov

        super().__init__(paths["hf"])
        self.ov = ov
        self.path = paths[f"ov-{variant}"]
        self.compiled = ov.Core().compile_model(self.path, "CPU", OV_CONFIG)
        self.req = self.compiled.create_infer_request()

    def forward(self, ids, mask, tt):
        self.req.infer({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})
        return self.req.get_output_tensor(0).data  # the request's buffer: valid until the next infer

    def pooled(self, ids, mask, tt):
        return mean_pool_normalize(self.forward(ids, mask, tt), mask)

    def model_bytes(self) -> int:
        return os.path.getsize(self.path) + os.path.getsize(Path(self.path).with_suffix(".bin"))

    def info(self) -> dict:
        props = {}
        for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
                  "EXECUTION_MODE_HINT", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING"):
            try:
                v = self.compiled.get_property(k)
                props[k] = v.get_type_name() if hasattr(v, "get_type_name") else str(v)  # ov.Type -> 'bf16'/'f32'
            except Exception as e:  # a property this plugin version does not report
                props[k] = f"n/a ({type(e).__name__})"
        return {"openvino": self.ov.__version__, **props}


class MedquantSystem:
    def __init__(self, paths: dict, variant: str):
        import medquant

        self.medquant = medquant
        self.dir = paths[f"medquant-{variant}"]
        self.enc = medquant.Encoder.from_pretrained(self.dir, n_threads=THREADS)

    def encode(self, texts, batch_size: int, max_length: int) -> np.ndarray:
        return self.enc.encode(texts, batch_size=batch_size, max_length=max_length, show_progress_bar=False)

    def forward(self, ids, mask, tt):
        return self.enc.forward(ids, mask, tt)

    def model_bytes(self) -> int:
        return os.path.getsize(Path(self.dir) / "model.safetensors")

    def info(self) -> dict:
        enc = self.enc
        return {"scheme": enc.scheme.name, "threads": enc.n_threads, "in_memory_bytes": enc.size_bytes(),
                "site_impl": {s: enc.site_impl(s) for s in enc.site_names[:4]}}


RUNTIMES = {"torch": TorchSystem, "ort": OrtSystem, "ov": OvSystem, "medquant": MedquantSystem}


# ---------------------------------------------------------------------------------------------------- loop
class Worker:
    def __init__(self):
        self.sys = None
        self.texts = {}
        self.fixed = None

    def _texts(self, path: str, key: str, n: int):
        if path not in self.texts:
            self.texts[path] = json.loads(Path(path).read_text())
        return self.texts[path][key][:n]

    def handle(self, cmd: dict) -> dict:
        op = cmd["cmd"]
        if op == "load":
            before = proc_status()
            t = time.perf_counter()
            self.sys = RUNTIMES[cmd["runtime"]](cmd["paths"], cmd["variant"])
            load_s = time.perf_counter() - t
            after = proc_status()
            return {"load_seconds": load_s, "rss_before_load": before["rss"], "rss_after_load": after["rss"],
                    "peak_rss_after_load": after["peak_rss"], "model_bytes": self.sys.model_bytes(),
                    "info": self.sys.info()}
        if op == "corpus":
            texts = self._texts(cmd["texts"], "corpus", cmd["n"])
            c0, t0 = cpu_seconds(), time.perf_counter()
            emb = self.sys.encode(texts, cmd["batch_size"], cmd["max_length"])
            wall = time.perf_counter() - t0
            cpu = cpu_seconds() - c0
            if cmd.get("save"):
                np.save(cmd["save"], emb)
            return {"seconds": wall, "cpu_seconds": cpu}
        if op == "queries":
            qs = self._texts(cmd["texts"], "queries", cmd["n"])[cmd["start"]: cmd["stop"]]
            lat = []
            c0, t0 = cpu_seconds(), time.perf_counter()
            for q in qs:
                t = time.perf_counter()
                self.sys.encode([q], 1, cmd["max_length"])
                lat.append(time.perf_counter() - t)
            return {"latencies": lat, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0}
        if op == "fixed":
            if self.fixed is None or self.fixed[0] != cmd["ids"]:
                ids = np.load(cmd["ids"])
                self.fixed = (cmd["ids"], ids, np.ones_like(ids), np.zeros_like(ids))
            _, ids, mask, tt = self.fixed
            times = []
            c0, t0 = cpu_seconds(), time.perf_counter()
            for _ in range(cmd["iters"]):
                t = time.perf_counter()
                self.sys.forward(ids, mask, tt)
                times.append(time.perf_counter() - t)
            return {"times": times, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0}
        if op == "status":  # after the workloads: memory high-water mark, and what ran (e.g. oneDNN kernels)
            return {**proc_status(), "info": self.sys.info() if self.sys else {}}
        raise ValueError(f"unknown command {op!r}")


def main() -> int:
    # the protocol gets a private copy of stdout; anything a library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    w = Worker()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        try:
            res = {"ok": True, **w.handle(cmd)}
        except Exception as e:  # reported to run.py, which stops the run
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        proto.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
