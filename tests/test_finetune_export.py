"""Fine-tuning data export (medquant.finetune.export) and quantization parameters (medquant.quant.params):
exported files load with pandas and datasets, no negative is relevant or a duplicate of a positive, nothing of the
held-out split leaks, the same seed gives byte-identical files, and exported parameters re-imported give bit-identical
quantized embeddings."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import medquant
from conftest import require
from medquant._native import _core
from medquant.eval.datasets import medquad_retrieval, normalize_text
from medquant.finetune import ExportConfig, export_training_data, medquad_training_data
from medquant.model.checkpoint import CheckpointError
from medquant.quant.params import PARAMS_JSON, PARAMS_TENSORS, QuantParams

GPTQ_BC = medquant.QuantScheme(name="gptq-bc-int8emb", weights="int8", activations="int8", mode="static",
                               rounding="gptq", bias_correction=True, embeddings="int8",
                               keep_fp32=("encoder.layer.5.output.dense",))
LIMIT = 24  # training queries sampled from MedQuAD dev (corpus: 4 x LIMIT answers)


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return medquant.Encoder.from_pretrained(minilm_dir, max_length=64)  # short: these tests check bookkeeping


@pytest.fixture(scope="module")
def calib_texts():
    ds = medquad_retrieval("dev", limit=24, seed=5)
    return list(ds.queries.values()) + list(ds.corpus.values())[:24]


@pytest.fixture(scope="module")
def student(teacher, calib_texts):
    return teacher.quantize("int8-static-per-tensor", calibration_texts=calib_texts)


@pytest.fixture(scope="module")
def gptq_q(teacher, calib_texts):
    return teacher.quantize(GPTQ_BC, calibration_texts=calib_texts)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher, student):
    out = tmp_path_factory.mktemp("export") / "medquad-train"
    cfg = ExportConfig(num_negatives=3, negatives_from="both", teacher_embeddings=True, seed=7)
    return medquad_training_data(teacher, out, student=student, limit=LIMIT, config=cfg)


# ---------------------------------------------------------------------------------------------------- C rounding
def test_rounding_with_given_scales_matches_chosen_scales():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 64)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    for per_channel in (True, False):
        q, s = _core.quantize_weight_s8(w, per_channel)
        q2, s2 = _core.quantize_weight_s8(w, per_channel, scales=s)
        assert np.array_equal(q, q2) and np.array_equal(s, s2) and s2 is not s
        # other scales: round(w / s) clamped to [-127, 127], as numpy computes it in float32
        s3 = (s * np.float32(0.5)).astype(np.float32)
        q3, _ = _core.quantize_weight_s8(w, per_channel, scales=s3)
        div = w / (s3[:, None] if per_channel else s3[0])
        assert np.array_equal(q3, np.clip(np.rint(div), -127, 127).astype(np.int8))
    q, s = _core.quantize_weight_s4(w, 16)
    assert np.array_equal(_core.quantize_weight_s4(w, 16, scales=s)[0], q)
    q, s = _core.quantize_rows_s8(w)
    assert np.array_equal(_core.quantize_rows_s8(w, scales=s)[0], q)
    for bad in (np.zeros(24, np.float32), np.full(24, np.inf, np.float32), -np.ones(24, np.float32)):
        with pytest.raises(ValueError, match="positive normal"):
            _core.quantize_weight_s8(w, True, scales=bad)
    with pytest.raises(ValueError, match="size 3"):
        _core.quantize_weight_s8(w, True, scales=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        _core.quantize_rows_s8(w, scales=np.ones(24, np.float64))


# ---------------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("scheme", ["int8-static-asym", "int8-smoothquant", "w4-weight-only", "int8-dynamic",
                                    GPTQ_BC.name])
def test_exported_params_reimport_bit_identical(tmp_path, teacher, calib_texts, gptq_q, scheme):
    q = gptq_q if scheme == GPTQ_BC.name else teacher.quantize(scheme, calibration_texts=calib_texts)
    q.quant_params().save(tmp_path)
    doc = json.loads((tmp_path / PARAMS_JSON).read_text())
    assert doc["format"] == "medquant-qparams-v1" and set(doc["sites"]) == set(q.site_names)
    assert set(doc["tensors"]) == set(medquant.load_quant_params(tmp_path).tensors)
    again = teacher.quantize(medquant.load_quant_params(tmp_path))
    a, b = q.storage_tensors(), again.storage_tensors()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert again.site_specs() == q.site_specs()
    assert np.array_equal(q.encode(calib_texts[:16]), again.encode(calib_texts[:16]))


def test_params_table_and_json_say_what_each_site_does(gptq_q):
    q = gptq_q
    p = q.quant_params()
    t = p.table()
    assert list(t.index) == q.site_names
    kept = "encoder.layer.5.output.dense"
    assert t.loc[kept, "kind"] == "fp32" and t.loc[kept, "weight_bits"] == 32
    others = t.drop(index=kept)
    assert (others["weight_bits"] == 8).all() and (others["act_bits"] == 8).all()
    assert others["codes_stored"].all() and others["bias_corrected"].all() and not others["smoothed"].any()
    assert ((others["act_zero_point"] >= 0) & (others["act_zero_point"] <= 255)).all()
    assert (others["act_scale"] > 0).all()
    doc = p.to_json()
    assert doc["embeddings"] == {"kind": "int8", "granularity": "per-row"}
    assert set(doc["source_weights_sha256"]) == set(others.index)


def test_params_apply_to_other_weights(tmp_path, teacher, calib_texts, gptq_q, minilm_dir):
    """Parameters applied to another checkpoint of the same shape round its weights on the exported grid; GPTQ codes
    and corrected biases, which belong to the weights they were made for, are refused there."""
    from safetensors.numpy import load_file, save_file
    import shutil

    other_dir = tmp_path / "other"
    shutil.copytree(minilm_dir, other_dir)
    st = load_file(str(other_dir / "model.safetensors"))
    name = next(k for k in st if k.endswith("layer.0.intermediate.dense.weight"))
    st[name] = (st[name] * np.float32(1.01)).astype(np.float32)
    save_file(st, str(other_dir / "model.safetensors"), metadata={"format": "pt"})
    other = medquant.Encoder.from_pretrained(other_dir, max_length=64)

    p = teacher.quantize("int8-static-asym", calibration_texts=calib_texts).quant_params()
    q = other.quantize(p)
    site = "encoder.layer.0.intermediate.dense"
    s = p.tensors[site + ".weight_scale"]
    w = other.fp32_params[name]
    want = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    assert np.array_equal(q.storage_tensors(site)[site + ".weight"], want)
    assert q.site_specs()[site]["act_scale"] == p.sites[site]["act_scale"]

    g = gptq_q.quant_params()
    with pytest.raises(ValueError, match="other fp32 weights"):
        other.quantize(g)
    with pytest.raises(ValueError, match="calibration_texts"):
        teacher.quantize(p, calibration_texts=calib_texts)


def test_params_files_are_checked(tmp_path, teacher, calib_texts, tiny):
    q = teacher.quantize("int8-static-sym", calibration_texts=calib_texts)
    p = q.quant_params()
    with pytest.raises(ValueError, match="another shape"):
        tiny.quantize(p)
    loaded = medquant.Encoder.from_pretrained(q.save_pretrained(tmp_path / "saved"), max_length=64)
    assert loaded.quant_params().to_json() == p.to_json()  # a loaded save exports the same parameters
    with pytest.raises(ValueError, match="fp32 weights"):
        p.apply(loaded)
    tmp_path = tmp_path / "params"
    p.save(tmp_path)
    doc = json.loads((tmp_path / PARAMS_JSON).read_text())

    def broken(mutate, match):
        d = json.loads(json.dumps(doc))
        mutate(d)
        (tmp_path / PARAMS_JSON).write_text(json.dumps(d))
        with pytest.raises(CheckpointError, match=match):
            QuantParams.load(tmp_path)

    site = "encoder.layer.2.attention.self.qkv"
    broken(lambda d: d.update(format="other"), "not a medquant quantization-parameter file")
    broken(lambda d: d["sites"][site].update(act_scale=-1.0), "act_scale")
    broken(lambda d: d["sites"][site].update(act_zero_point=300), "act_zero_point")
    broken(lambda d: d["sites"].pop(site), "sites do not match")
    broken(lambda d: d["model"].update(hidden_size=0), "positive integers")
    broken(lambda d: d["scheme"].update(weights="int3"), "invalid scheme")
    (tmp_path / PARAMS_JSON).write_text(json.dumps(doc))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / PARAMS_TENSORS))
    key = site + ".weight_scale"
    for bad, match in ((np.zeros_like(tensors[key]), "must be positive"), (tensors[key][:5], "expected float32"),
                       (None, "missing")):
        t = dict(tensors)
        if bad is None:
            t.pop(key)
        else:
            t[key] = bad
        save_file(t, str(tmp_path / PARAMS_TENSORS))
        with pytest.raises(CheckpointError, match=match):
            QuantParams.load(tmp_path)
    (tmp_path / PARAMS_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        QuantParams.load(tmp_path)


# ---------------------------------------------------------------------------------------------------- export
def test_export_files_load_with_documented_columns(exported):
    datasets = require("datasets")
    d = exported.directory
    for name, cols in {"pairs": ["anchor", "positive"], "triplets": ["anchor", "positive", "negative"],
                       "scored": ["query", "positive", "negative", "score"]}.items():
        for fmt, builder in (("parquet", "parquet"), ("jsonl", "json")):
            ds = datasets.load_dataset(builder, data_files=str(d / f"{name}.{fmt}"), split="train")
            assert ds.column_names == cols, (name, fmt)
            assert len(ds) == len(getattr(exported, name)) > 0
        assert pd.read_parquet(d / f"{name}.parquet").equals(getattr(exported, name))
        assert pd.read_json(d / f"{name}.jsonl", lines=True)[cols[0]].tolist() == getattr(exported, name)[cols[0]].tolist()
    meta = pd.read_parquet(d / "triplets_meta.parquet")
    assert len(meta) == len(exported.triplets) == len(exported.scored)
    assert pd.read_parquet(d / "queries.parquet").columns.tolist()[:3] == ["query_id", "query", "source"]
    # the score is the teacher's margin, recomputable from the embeddings
    from safetensors.numpy import load_file

    emb = load_file(str(d / "teacher_embeddings.safetensors"))
    qrow = {q: i for i, q in enumerate(exported.queries["query_id"])}
    drow = {x: i for i, x in enumerate(exported.documents["doc_id"])}
    assert emb["query"].shape == (len(qrow), 384) and emb["document"].shape == (len(drow), 384)
    for i in range(0, len(meta), 7):
        m = meta.iloc[i]
        qv = emb["query"][qrow[m.query_id]]
        sp, sn = float(qv @ emb["document"][drow[m.positive_id]]), float(qv @ emb["document"][drow[m.negative_id]])
        assert abs(sp - m.teacher_positive) < 1e-6 and abs(sn - m.teacher_negative) < 1e-6
        assert abs(exported.scored.score.iloc[i] - (sp - sn)) < 1e-5
        assert exported.triplets.negative.iloc[i] == exported.documents.text.iloc[drow[m.negative_id]]
    # manifest: every file with its hash, counts that add up
    man = json.loads((d / "export.json").read_text())
    assert set(man["files"]) == {p for p in exported.files if p != "export.json"}
    import hashlib

    for rel, digest in man["files"].items():
        assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == digest
    c = man["counts"]
    assert c["pairs"] == len(exported.pairs) and c["triplets"] == len(meta)
    assert c["queries"] == c["queries_in"] - c["queries_dropped_in_holdout"] - c["queries_dropped_no_positive"] \
        - c["queries_dropped_excluded_source"]
    card = (d / "dataset_card.md").read_text()
    assert "CC BY 4.0" in card and "Seed 7" in card and "medquad-test" in card


def test_export_negatives_are_not_relevant_nor_duplicates(exported):
    train = medquad_retrieval("dev", limit=LIMIT)
    meta = exported.triplets_meta
    norm = {d: normalize_text(t, lower=True) for d, t in train.corpus.items()}
    for q, group in meta.groupby("query_id"):
        relevant = {d for d, g in train.qrels[q].items() if g > 0}
        assert not set(group.negative_id) & relevant
        pos_texts = {norm[d] for d in relevant}
        assert not {norm[d] for d in group.negative_id} & pos_texts
        # at most num_negatives per pair, each negative once per pair, below the positive by the margin
        for _, pair in group.groupby("positive_id"):
            assert len(pair) <= 3 and pair.negative_id.is_unique
            assert (pair.teacher_negative <= pair.teacher_positive * (1 - 0.05 * np.sign(pair.teacher_positive))
                    + 1e-6).all()
        assert ((group.teacher_rank >= 0) | (group.student_rank >= 0)).all()
    q = exported.queries.set_index("query_id")
    assert (q["delta"] == q["student_nDCG@10"] - q["teacher_nDCG@10"]).all()
    assert (q["quant_hurt"] == (q["delta"] < 0)).all()
    assert (q.loc[q.quant_hurt, "weight"] == 2.0).all() and (q.loc[~q.quant_hurt, "weight"] == 1.0).all()
    assert (meta.quant_hurt == meta.query_id.map(q["quant_hurt"])).all()


def test_export_does_not_leak_the_test_split(exported):
    test = medquad_retrieval("test")
    held_q = {normalize_text(t, lower=True) for t in test.queries.values()}
    held_d = {normalize_text(t, lower=True) for t in test.corpus.values()}
    for col in ("anchor",):
        assert not {normalize_text(t, lower=True) for t in exported.triplets[col]} & held_q
        assert not {normalize_text(t, lower=True) for t in exported.pairs[col]} & held_q
    for col in ("positive", "negative"):
        assert not {normalize_text(t, lower=True) for t in exported.triplets[col]} & (held_d | held_q)
    assert not {normalize_text(t, lower=True) for t in exported.pairs["positive"]} & held_d
    assert not set(exported.documents.doc_id) & set(test.corpus)
    assert exported.counts["queries_dropped_in_holdout"] > 0  # MedQuAD repeats questions across documents


def test_export_same_seed_same_bytes(tmp_path, teacher, student, exported):
    cfg = ExportConfig(num_negatives=3, negatives_from="both", teacher_embeddings=True, seed=7)
    again = medquad_training_data(teacher, tmp_path / "again", student=student, limit=LIMIT, config=cfg)
    for rel in exported.files:
        assert (again.directory / rel).read_bytes() == (exported.directory / rel).read_bytes(), rel
    # random sampling: seeded per pair, another seed draws other negatives
    ds = medquad_retrieval("dev", limit=12)
    runs = [export_training_data(teacher, ds, tmp_path / f"r{i}",
                                 config=ExportConfig(sampling="random", range_max=20, seed=s, formats=("jsonl",)))
            for i, s in enumerate((1, 1, 2))]
    assert (runs[0].directory / "triplets.jsonl").read_bytes() == (runs[1].directory / "triplets.jsonl").read_bytes()
    assert not runs[0].triplets.equals(runs[2].triplets)
    assert "license: not recorded" in (runs[0].directory / "dataset_card.md").read_text()


def test_export_holds_out_a_whole_source(tmp_path, teacher):
    ds = medquad_retrieval("dev", limit=30)
    assert "NIDDK" in set(ds.metadata.source)
    ex = export_training_data(teacher, ds, tmp_path / "no-niddk", exclude_sources=["NIDDK"],
                              config=ExportConfig(formats=("jsonl",), range_max=10))
    assert "NIDDK" not in set(ex.queries.source) and "NIDDK" not in set(ex.documents.source)
    assert ex.counts["queries_dropped_excluded_source"] == int((ds.metadata.source == "NIDDK").sum())
    niddk_docs = {d for q in ds.metadata.index[ds.metadata.source == "NIDDK"] for d in ds.qrels[q]}
    assert not niddk_docs & set(ex.triplets_meta.negative_id) and not niddk_docs & set(ex.documents.doc_id)
    with pytest.raises(ValueError, match="no source named"):
        export_training_data(teacher, ds, tmp_path / "x", exclude_sources=["NIDKK"])


def test_export_refuses_bad_input_and_keeps_what_is_there(tmp_path, teacher, student):
    ds = medquad_retrieval("dev", limit=8)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_training_data(teacher, ds, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="fp32"):
        export_training_data(student, ds, tmp_path / "a")
    with pytest.raises(ValueError, match="needs a student"):
        export_training_data(teacher, ds, tmp_path / "a", config=ExportConfig(negatives_from="student"))
    for bad in (dict(num_negatives=0), dict(range_min=5, range_max=5), dict(sampling="best"),
                dict(metric="ndcg"), dict(formats=("csv",)), dict(relative_margin=2.0), dict(seed=-1)):
        with pytest.raises((ValueError, TypeError)):
            ExportConfig(**bad)
    assert not (tmp_path / "a").exists()
    # an earlier export is replaced in place
    first = export_training_data(teacher, ds, tmp_path / "e", config=ExportConfig(formats=("jsonl",), range_max=8))
    again = export_training_data(teacher, ds, tmp_path / "e", config=ExportConfig(formats=("parquet",), range_max=8))
    assert sorted(p.name for p in again.directory.iterdir()) == sorted(again.files)
    assert first.directory == again.directory and not (again.directory / "pairs.jsonl").exists()


def test_import_medquant_and_finetune_export_do_not_import_torch():
    code = ("import sys, medquant, medquant.finetune; "
            "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
