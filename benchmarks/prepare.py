"""Build everything the benchmark loads, once, into a work directory (reused when its stamp matches).

    python benchmarks/prepare.py WORKDIR

Per model (all-MiniLM-L6-v2, and a BERT-base-sized model with random weights): the Hugging Face directory, the ONNX
export (legacy TorchScript exporter) run through ONNX Runtime's transformer optimizer (fused Attention /
SkipLayerNorm / BiasGelu) = the ORT fp32 model, `quantize_dynamic` of that optimized graph = the ORT int8 model, and
medquant's bf16 / int8-dynamic / int8-static-asym encoders saved with `save_pretrained` (so the workers load them
without calibration data and without keeping the fp32 weights in memory). Also the texts (seeded samples of MedQuAD)
and the fixed-shape input ids. --quick runs use prefixes of the same texts and the same models, so one cache
serves both modes.

The anchors added later are a second stage with a stamp of its own (rebuilt alone when only it changes), in
WORKDIR/<model>/anchors/: the calibration texts medquant's int8-static-asym was calibrated on (calib.json: the same
texts, the same max_length; the PT2E system calibrates on them at load), `quantize_dynamic(per_channel=True)` of
the same optimized ORT graph, and, when openvino and nncf are installed, the OpenVINO IR converted from the torch
model (eager attention, a padded example input so the graph keeps the attention mask, dynamic batch and sequence
axes, weights stored fp32) and its NNCF static int8 version (ModelType.TRANSFORMER, calibrated one text at a time on
calib.json). What could not be built is recorded with the reason, and run.py skips those systems.
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
from common import (  # noqa: E402
    CORPUS_MAX_LENGTH, FIXED_BATCH, FIXED_SEQ, FULL, INPUT_NAMES, OV_CONFIG, SEED, last_hidden_module, one_by_one,
    padded_example,
)

STAMP_VERSION = 4
ANCHOR_VERSION = 1
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
    ids = torch.ones(2, 16, dtype=torch.long)
    names = list(INPUT_NAMES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(last_hidden_module(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out),
                          dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in names + ["last_hidden_state"]})


def onnx_op_counts(path: Path) -> dict:
    import onnx

    counts = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


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
    return {"fused": fused, "ops": {"fp32": onnx_op_counts(fp32), "int8": onnx_op_counts(int8)}}


def medquant_schemes() -> dict:
    """The medquant variants the benchmark saves: preset schemes, and int8-static-asym with bf16 or int8 attention."""
    import medquant

    static = medquant.get_scheme("int8-static-asym")
    return {"bf16": medquant.get_scheme("bf16"), "int8-dynamic": medquant.get_scheme("int8-dynamic"),
            "int8-static-asym": static,
            "int8-static-attn-bf16": static.replace(name="int8-static-asym+attention-bf16", attention="bf16"),
            "int8-static-attn-int8": static.replace(name="int8-static-asym+attention-int8", attention="int8")}


def medquant_models(hf_dir: Path, out_dir: Path, calib: list, max_length: int) -> dict:
    import medquant

    fp32 = medquant.Encoder.from_pretrained(hf_dir, n_threads=2)
    info, cal = {}, None
    for variant, sch in medquant_schemes().items():
        t = time.perf_counter()
        if sch.needs_calibration:
            # calibration batches are truncated to max_length (the length the workloads use); one pass serves both
            # static variants
            cal = cal if cal is not None else fp32.calibrate(calib, method=sch.calibration, max_length=max_length, momentum=sch.momentum,
                                        percentile=sch.percentile, show_progress_bar=False)
            q = fp32.quantize(sch, calibration=cal)
        else:
            q = fp32.quantize(sch)
        q.save_pretrained(out_dir / f"medquant-{variant}")
        info[variant] = {"seconds": round(time.perf_counter() - t, 2), "n_calib": len(calib) if cal else 0}
    return info


def ort_int8_pc(fp32: Path, out: Path) -> dict:
    """quantize_dynamic with per-channel weights (what sentence-transformers' own ONNX int8 export uses)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx_op_counts(out)


def ov_op_counts(model) -> dict:
    counts = {}
    for op in model.get_ops():
        t = op.get_type_name()
        if t not in ("Constant", "Parameter", "Result"):
            counts[t] = counts.get(t, 0) + 1
    return counts


def ov_mask_check(core, xml: Path) -> float:
    """Max |difference| between a sequence run alone and the same sequence padded in a batch (0 = mask honoured)."""
    cm = core.compile_model(str(xml), "CPU", OV_CONFIG)
    ex = padded_example()
    n = int(ex["attention_mask"][1].sum())
    alone = {k: v[1:, :n] for k, v in ex.items()}
    padded = cm(ex)[0][1, :n]
    return float(abs(cm(alone)[0][0] - padded).max())


def ov_models(hf_dir: Path, out_dir: Path, calib_items: list) -> dict:
    """OpenVINO IR of the fp32 torch model (eager attention, padded example, dynamic axes) and its NNCF static int8."""
    import nncf
    import openvino as ov
    import torch
    from transformers import BertModel

    t = time.perf_counter()
    model = BertModel.from_pretrained(str(hf_dir), add_pooling_layer=False, attn_implementation="eager").eval()
    example = {k: torch.from_numpy(v) for k, v in padded_example().items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ovm = ov.convert_model(last_hidden_module(model), example_input=example,
                               input=[(k, [-1, -1], ov.Type.i64) for k in INPUT_NAMES])
    ovm.outputs[0].get_tensor().set_names({"last_hidden_state"})
    fp32, int8 = out_dir / "ov-fp32.xml", out_dir / "ov-int8.xml"
    ov.save_model(ovm, str(fp32), compress_to_fp16=False)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    q = nncf.quantize(ovm, nncf.Dataset(calib_items), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(calib_items))
    ov.save_model(q, str(int8), compress_to_fp16=False)
    core = ov.Core()
    return {"paths": {"ov-fp32": str(fp32), "ov-int8": str(int8)},
            "info": {"openvino": ov.__version__, "nncf": nncf.__version__, "convert_seconds": round(convert_s, 2),
                     "nncf_seconds": round(time.perf_counter() - t, 2), "n_calib": len(calib_items),
                     "ops": {"fp32": ov_op_counts(ovm), "int8": ov_op_counts(q)},
                     "mask_check_max_abs_diff": {"fp32": ov_mask_check(core, fp32), "int8": ov_mask_check(core, int8)}}}


def anchor_models(key: str, hf: Path, mdir: Path, calib: list, max_length: int) -> dict:
    """The anchors stage of one model: calib.json, ort-int8-pc, ov-fp32 / ov-int8 (or why they are missing)."""
    adir = mdir / "anchors"
    if adir.exists():
        shutil.rmtree(adir)
    adir.mkdir(parents=True)
    calib_file = adir / "calib.json"
    calib_file.write_text(json.dumps({"texts": calib, "max_length": max_length}))
    paths = {"calib": str(calib_file), "ort-int8-pc": str(adir / "ort-int8-pc.onnx")}
    log(f"{key}: quantize_dynamic per_channel=True")
    info = {"ort_int8_pc_ops": ort_int8_pc(mdir / "ort-fp32.onnx", adir / "ort-int8-pc.onnx")}
    skipped = {}
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        reason = f"openvino/nncf not installed ({e}); pip install openvino==2026.4.1 nncf==3.4.0"
        skipped = {"ov-fp32": reason, "ov-int8": reason}
        log(f"{key}: no OpenVINO models: {reason}")
    else:
        log(f"{key}: OpenVINO IR + NNCF static int8 ({len(calib)} calibration texts, max_length {max_length})")
        ov = ov_models(hf, adir, one_by_one(str(hf), calib, max_length))
        paths.update(ov["paths"])
        info["openvino"] = ov["info"]
        log(f"{key}: OpenVINO mask check (max |padded - alone|): {ov['info']['mask_check_max_abs_diff']}")
    return {"paths": paths, "info": info, "skipped": skipped}


def model_specs(wd: Path, sizes) -> list:
    """(key, Hugging Face dir, n calibration texts, calibration max_length, heads, hidden) per model."""
    from medquant.model.checkpoint import DEFAULT_MODEL, resolve_model_path

    return [("minilm", Path(resolve_model_path(DEFAULT_MODEL)), sizes.n_calib, CORPUS_MAX_LENGTH, 12, 384),
            ("bert-base", wd / "bert-base" / "hf", sizes.n_calib_base, FIXED_SEQ, 12, 768)]


def versions() -> dict:
    import medquant
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "medquant": medquant.__version__,
            "medquant_schemes": {k: v.to_dict() for k, v in medquant_schemes().items()}}


def optional_version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def build_core(wd: Path, sizes, stamp: dict) -> dict:
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

    specs = model_specs(wd, sizes)
    base_hf = specs[1][1]
    base_hf.mkdir(parents=True)
    log("writing the BERT-base-sized random checkpoint")
    write_random_bert(base_hf, specs[0][1])

    manifest = {"stamp": stamp, "models": {}, "paths_to_check": []}
    for key, hf, n_cal, max_len, n_heads, hidden in specs:
        mdir = wd / key
        mdir.mkdir(exist_ok=True)
        log(f"{key}: ONNX export + transformer optimizer + quantize_dynamic")
        t = time.perf_counter()
        ort_info = ort_models(hf, mdir, n_heads, hidden)
        ort_info["seconds"] = round(time.perf_counter() - t, 2)
        log(f"{key}: medquant bf16 / int8-dynamic / int8-static-asym ({n_cal} calibration texts)")
        mq_info = medquant_models(hf, mdir, texts["calib"][:n_cal], max_len)
        paths = {
            "hf": str(hf),
            "ort-fp32": str(mdir / "ort-fp32.onnx"),
            "ort-int8-dyn": str(mdir / "ort-int8-dyn.onnx"),
            "medquant-fp32": str(hf),
            "medquant-bf16": str(mdir / "medquant-bf16"),
            "medquant-int8-dynamic": str(mdir / "medquant-int8-dynamic"),
            "medquant-int8-static-asym": str(mdir / "medquant-int8-static-asym"),
            "medquant-int8-static-attn-bf16": str(mdir / "medquant-int8-static-attn-bf16"),
            "medquant-int8-static-attn-int8": str(mdir / "medquant-int8-static-attn-int8"),
        }
        manifest["models"][key] = {"paths": paths, "ort": ort_info, "medquant": mq_info}
        manifest["paths_to_check"] += list(paths.values())
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def build_anchors(wd: Path, sizes, manifest: dict, astamp: dict) -> None:
    t0 = time.perf_counter()
    calib = json.loads((wd / "texts.json").read_text())["calib"]
    checks = []
    for key, hf, n_cal, max_len, _, _ in model_specs(wd, sizes):
        a = anchor_models(key, hf, wd / key, calib[:n_cal], max_len)
        manifest["models"][key].update(anchor_paths=a["paths"], anchors=a["info"], anchor_skipped=a["skipped"])
        checks += list(a["paths"].values())
    manifest.update(anchor_stamp=astamp, anchor_paths_to_check=checks,
                    anchor_seconds=round(time.perf_counter() - t0, 1))


def all_exist(paths) -> bool:
    return all(Path(p).exists() for p in paths)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    args = ap.parse_args(argv)
    sizes = FULL  # quick mode takes prefixes of these texts
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    manifest_path = wd / "manifest.json"

    sizes_used = {k: getattr(sizes, k) for k in ("n_corpus", "n_queries", "n_calib", "n_calib_base")}
    stamp = {"version": STAMP_VERSION, "sizes": sizes_used, "seed": SEED, **versions()}
    astamp = {"version": ANCHOR_VERSION, "openvino": optional_version("openvino"),
              "nncf": optional_version("nncf")}
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if old.get("stamp") == stamp and all_exist(old.get("paths_to_check", [])):
        manifest = old
    else:
        manifest = build_core(wd, sizes, stamp)
        manifest_path.write_text(json.dumps(manifest, indent=1))
        log(f"core models done in {manifest['seconds']} s")
    if manifest.get("anchor_stamp") == astamp and all_exist(manifest.get("anchor_paths_to_check", [])):
        log(f"reusing {wd}")
        return 0
    build_anchors(wd, sizes, manifest, astamp)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"anchor models done in {manifest['anchor_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
