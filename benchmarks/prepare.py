"""Build everything the benchmark loads, once, into a work directory (reused when its stamp matches).

    python benchmarks/prepare.py WORKDIR

Per model (all-MiniLM-L6-v2, and a BERT-base-sized model with random weights): the Hugging Face directory, the ONNX
export (legacy TorchScript exporter) run through ONNX Runtime's transformer optimizer (fused Attention /
SkipLayerNorm / BiasGelu) = the ORT fp32 model, `quantize_dynamic` of that optimized graph = the ORT int8 model, and
medquant's bf16 / int8-dynamic / int8-static-asym encoders saved with `save_pretrained` (so the workers load them
without calibration data and without keeping the fp32 weights in memory). Also the texts (seeded samples of MedQuAD)
and the fixed-shape input ids. --quick runs use prefixes of the same texts and the same models, so one cache
serves both modes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXED_BATCH, FIXED_SEQ, FULL, SEED  # noqa: E402

STAMP_VERSION = 3
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def sample_texts(sizes) -> dict:
    from medquant.eval.datasets import load_medquad

    df = load_medquad()
    answers = [a for a in df["answer"].drop_duplicates().tolist() if a.strip()]
    questions = [q for q in df["question"].drop_duplicates().tolist() if q.strip()]
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(answers))
    n_c, n_cal = sizes.n_corpus, max(sizes.n_calib, sizes.n_calib_base)
    corpus = [answers[i] for i in perm[:n_c]]
    calib = [answers[i] for i in perm[n_c: n_c + n_cal]]  # disjoint from the corpus
    qperm = rng.permutation(len(questions))
    queries = [questions[i] for i in qperm[: sizes.n_queries]]
    return {"corpus": corpus, "queries": queries, "calib": calib}


def write_random_bert(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    model = BertModel(BertConfig()).eval()  # 12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522
    model.save_pretrained(str(out), safe_serialization=True)
    for fn in TOKENIZER_FILES:
        src = tokenizer_dir / fn
        if src.exists():
            shutil.copyfile(src, out / fn)


def export_onnx(hf_dir: Path, out: Path) -> None:
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(hf_dir), add_pooling_layer=False, attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out),
                          dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in names + ["last_hidden_state"]})


def ort_models(hf_dir: Path, out_dir: Path, n_heads: int, hidden: int) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    raw = out_dir / "raw.onnx"
    fp32 = out_dir / "ort-fp32.onnx"
    int8 = out_dir / "ort-int8-dyn.onnx"
    export_onnx(hf_dir, raw)
    opt = optimize_model(str(raw), model_type="bert", num_heads=n_heads, hidden_size=hidden)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(fp32))
    raw.unlink()
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ops = {}
    for name, p in (("fp32", fp32), ("int8", int8)):
        g = onnx.load(str(p), load_external_data=False)
        counts = {}
        for n in g.graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        ops[name] = counts
    return {"fused": fused, "ops": ops}


def medquant_models(hf_dir: Path, out_dir: Path, calib: list, max_length: int) -> dict:
    import medquant

    fp32 = medquant.Encoder.from_pretrained(hf_dir, n_threads=2)
    info = {}
    for variant in ("bf16", "int8-dynamic", "int8-static-asym"):
        t = time.perf_counter()
        kw = {"calibration_texts": calib} if variant == "int8-static-asym" else {}
        # calibration batches are truncated to max_length (the length the workloads use)
        if kw:
            sch = medquant.get_scheme(variant)
            cal = fp32.calibrate(calib, method=sch.calibration, max_length=max_length, momentum=sch.momentum,
                                 percentile=sch.percentile, show_progress_bar=False)
            q = fp32.quantize(variant, calibration=cal)
        else:
            q = fp32.quantize(variant)
        q.save_pretrained(out_dir / f"medquant-{variant}")
        info[variant] = {"seconds": round(time.perf_counter() - t, 2), "n_calib": len(calib) if kw else 0}
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    args = ap.parse_args(argv)
    sizes = FULL  # quick mode takes prefixes of these texts
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    manifest_path = wd / "manifest.json"

    import medquant
    import onnxruntime
    import torch
    import transformers
    from medquant.model.checkpoint import DEFAULT_MODEL, resolve_model_path

    sizes_used = {k: getattr(sizes, k) for k in ("n_corpus", "n_queries", "n_calib", "n_calib_base")}
    stamp = {"version": STAMP_VERSION, "sizes": sizes_used, "seed": SEED, "torch": torch.__version__,
             "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
             "medquant": medquant.__version__}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("stamp") == stamp and all(Path(p).exists() for p in old.get("paths_to_check", [])):
            log(f"reusing {wd}")
            return 0
    for sub in ("minilm", "bert-base", "texts.json", "fixed_ids.npy", "manifest.json"):
        p = wd / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    t0 = time.perf_counter()
    texts = sample_texts(sizes)
    (wd / "texts.json").write_text(json.dumps(texts))
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1000, 30000, size=(FIXED_BATCH, FIXED_SEQ)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    np.save(wd / "fixed_ids.npy", ids)

    minilm_hf = resolve_model_path(DEFAULT_MODEL)
    base_hf = wd / "bert-base" / "hf"
    base_hf.mkdir(parents=True)
    log("writing the BERT-base-sized random checkpoint")
    write_random_bert(base_hf, minilm_hf)

    manifest = {"stamp": stamp, "models": {}, "paths_to_check": []}
    for key, hf, n_cal, n_heads, hidden in (("minilm", minilm_hf, sizes.n_calib, 12, 384),
                                             ("bert-base", base_hf, sizes.n_calib_base, 12, 768)):
        mdir = wd / key
        mdir.mkdir(exist_ok=True)
        log(f"{key}: ONNX export + transformer optimizer + quantize_dynamic")
        t = time.perf_counter()
        ort_info = ort_models(Path(hf), mdir, n_heads, hidden)
        ort_info["seconds"] = round(time.perf_counter() - t, 2)
        log(f"{key}: medquant bf16 / int8-dynamic / int8-static-asym ({n_cal} calibration texts)")
        mq_info = medquant_models(Path(hf), mdir, texts["calib"][:n_cal],
                                  256 if key == "minilm" else FIXED_SEQ)
        paths = {
            "hf": str(hf),
            "ort-fp32": str(mdir / "ort-fp32.onnx"),
            "ort-int8-dyn": str(mdir / "ort-int8-dyn.onnx"),
            "medquant-fp32": str(hf),
            "medquant-bf16": str(mdir / "medquant-bf16"),
            "medquant-int8-dynamic": str(mdir / "medquant-int8-dynamic"),
            "medquant-int8-static-asym": str(mdir / "medquant-int8-static-asym"),
        }
        manifest["models"][key] = {"paths": paths, "ort": ort_info, "medquant": mq_info}
        manifest["paths_to_check"] += list(paths.values())
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"done in {manifest['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
