"""Quantized checkpoints are checked completely on load, and saving never corrupts or misleads (issue 10, classes
3 and 5).

Loading: for every preset (and a mixed-precision scheme) saved from a tiny model, removing any tensor, giving any
tensor another dtype or shape, NaN / negative / zero / denormal scales and SmoothQuant factors, bad or missing
activation parameters, missing or inconsistent scheme and site metadata all raise CheckpointError naming what is
wrong; the untouched saves load bit for bit.

Saving: ``save_pretrained`` writes to a fresh sibling directory and renames it into place; it refuses the source
directory (also through a symlink, a relative path, a parent or a child of it) and non-empty directories that are
not medquant saves unless ``overwrite=True``; replacing leaves no stale file; a failure part-way keeps the old save.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from safetensors.numpy import load_file, save_file

import medquant
from medquant import CheckpointError
from medquant.model import storage
from medquant.model.architectures import WORD_EMBEDDING_SCALES, site_shapes
from medquant.model.checkpoint import load_config, read_safetensors
from medquant.quant.schemes import PRESETS, SITE_KINDS, QuantScheme, get_scheme
from tiny_bert import random_texts, write_tiny_bert

MIXED = get_scheme("int8-smoothquant").replace(
    name="mixed", keep_fp32=("encoder.layer.1.output.dense",), keep_bf16=("encoder.layer.0.attention.self.query",))
SCHEMES = [*PRESETS, "mixed", "w4-group16"]
TEXTS = random_texts(10, seed=3, max_words=30)


def scheme_of(name):
    if name == "mixed":
        return MIXED
    if name == "w4-group16":
        return get_scheme("w4-weight-only").replace(name="w4-group16", group_size=16, embeddings="fp32")
    return get_scheme(name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_bert(tmp_path_factory.mktemp("tiny") / "fp32", seed=4)
    return medquant.Encoder.from_pretrained(d, n_threads=1)


@pytest.fixture(scope="module")
def saves(tiny, tmp_path_factory):
    """{scheme: (saved directory, embeddings of the encoder that was saved)}."""
    root = tmp_path_factory.mktemp("saves")
    out = {}
    for name in SCHEMES:
        q = tiny.quantize(scheme_of(name), calibration_texts=TEXTS)
        out[name] = (q.save_pretrained(root / name), q.encode(TEXTS))
    return out


def checkpoint(d: Path):
    state, meta = read_safetensors(d / "model.safetensors")
    return state, dict(meta), load_config(d)


def rejects(meta, state, cfg, *names):
    """read_quantized raises CheckpointError whose message names every one of ``names``."""
    with pytest.raises(CheckpointError) as e:
        storage.read_quantized(meta, state, cfg)
    for n in names:
        assert n in str(e.value), f"{n!r} not named in: {e.value}"
    return str(e.value)


# ------------------------------------------------------------------------------------------------ round trips
def test_every_scheme_round_trips_bit_for_bit(saves, tmp_path):
    assert set(PRESETS) <= set(saves)
    for name, (d, emb) in saves.items():
        loaded = medquant.Encoder.from_pretrained(d, n_threads=1)
        assert loaded.scheme == scheme_of(name)
        np.testing.assert_array_equal(loaded.encode(TEXTS), emb, err_msg=name)
        if name != "fp32":  # a loaded quantized encoder saves and loads again identically
            again = medquant.Encoder.from_pretrained(loaded.save_pretrained(tmp_path / name), n_threads=1)
            np.testing.assert_array_equal(again.encode(TEXTS), emb, err_msg=name)


def test_weight_layout_mirrors_quantize_weight():
    """What each kind's quantizer writes is exactly what loading requires (dtype and shape per stored tensor)."""
    rng = np.random.default_rng(0)
    for n, k in [(8, 32), (96, 64), (32, 128)]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        for scheme in [get_scheme(s) for s in PRESETS] + [get_scheme("w4-weight-only").replace(group_size=8)]:
            kind = SITE_KINDS[scheme.site_kind("encoder.layer.0.output.dense")]
            if kind.is_float:
                assert kind.weight_layout({}, n, k) == {"weight": (np.dtype(np.float32), (n, k))}
                continue
            tensors, spec = kind.quantize_weight(w, scheme)
            assert spec == kind.weight_spec(scheme)
            layout = kind.weight_layout(spec, n, k)
            assert {s: (t.dtype, t.shape) for s, t in tensors.items()} == layout, scheme.name


def test_expected_tensors_are_exactly_what_a_save_holds(saves):
    for name, (d, _) in saves.items():
        if name == "fp32":
            continue
        state, meta, cfg = checkpoint(d)
        scheme, sites = storage._metadata(meta)
        expected, positive = storage.expected_tensors(cfg, scheme, sites)
        assert {k: (v.dtype, v.shape) for k, v in state.items()} == expected, name
        assert all(n.endswith(("weight_scale", "act_mul")) for n in positive)
        assert bool(positive) == (name != "bf16")
        assert any(n.endswith(".bias") for n in expected)
        assert (any(n.endswith(".act_mul") for n in expected)) == (scheme.smoothquant_alpha is not None)


# ------------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("name", [s for s in SCHEMES if s != "fp32"])
def test_each_missing_tensor_is_named(saves, name):
    state, meta, cfg = checkpoint(saves[name][0])
    assert len(state) > 20
    for t in state:
        rejects(meta, {k: v for k, v in state.items() if k != t}, cfg, t, "missing")


def _other_dtypes(t):
    return {np.dtype(np.float32): [np.float16, np.float64, np.int8], np.dtype(np.int8): [np.uint8, np.float32],
            np.dtype(np.uint8): [np.int8, np.int16]}[t.dtype]


def _wrong_shapes(t):
    yield t[:-1]
    yield t.reshape(1, *t.shape)
    if t.ndim == 2:
        yield np.ascontiguousarray(t[:, :-1])
        yield np.ascontiguousarray(t.T) if t.shape[0] != t.shape[1] else t.reshape(-1)


@pytest.mark.parametrize("name", [s for s in SCHEMES if s != "fp32"])
def test_each_tensor_with_wrong_dtype_shape_or_values_is_named(saves, name):
    state, meta, cfg = checkpoint(saves[name][0])
    _, positive = storage.expected_tensors(cfg, *storage._metadata(meta))
    for t, v in state.items():
        for dt in _other_dtypes(v):
            rejects(meta, {**state, t: v.astype(dt)}, cfg, t, "dtype")
        for bad in _wrong_shapes(v):
            rejects(meta, {**state, t: bad}, cfg, t, "shape")
        if v.dtype.kind == "f":
            for x in (np.nan, np.inf, -np.inf):
                bad = v.copy()
                bad.reshape(-1)[-1] = x
                rejects(meta, {**state, t: bad}, cfg, t)
        if t in positive:
            for x in (-abs(float(v.reshape(-1)[0])), 0.0, 1e-45, -1e-30):
                bad = v.copy()
                bad.reshape(-1)[0] = x
                rejects(meta, {**state, t: bad}, cfg, t, "positive")


def test_unknown_tensor_is_rejected(saves):
    for name in ("int8-static-asym", "w4-weight-only", "bf16"):
        state, meta, cfg = checkpoint(saves[name][0])
        extra = {"encoder.layer.0.output.dense.act_mul": np.ones(64, np.float32),  # not a SmoothQuant scheme
                 "pooler.dense.weight": np.ones((32, 32), np.float32)}
        for k, v in extra.items():
            rejects(meta, {**state, k: v}, cfg, k, "does not use")
    state, meta, cfg = checkpoint(saves["bf16"][0])  # an int8 row-scale table on an fp32-embedding scheme
    rejects(meta, {**state, WORD_EMBEDDING_SCALES: np.ones(cfg.vocab_size, np.float32)}, cfg, WORD_EMBEDDING_SCALES)


# ------------------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("name", ["int8-static-asym", "w4-weight-only", "mixed"])
def test_missing_or_broken_metadata_is_named(saves, name):
    state, meta, cfg = checkpoint(saves[name][0])
    for key in ("scheme", "sites"):
        rejects({k: v for k, v in meta.items() if k != key}, state, cfg, key, "missing")
        rejects({**meta, key: "{not json"}, state, cfg, key)
        rejects({**meta, key: "[1, 2]"}, state, cfg, key)
    scheme = json.loads(meta["scheme"])
    for field in scheme:
        without = {**meta, "scheme": json.dumps({k: v for k, v in scheme.items() if k != field})}
        if field in storage.SCHEME_FIELDS_ADDED:  # saves older than the field load with its default
            assert storage.read_quantized(without, state, cfg)[0] == QuantScheme.from_dict(scheme)
        else:
            rejects(without, state, cfg, field)
    rejects({**meta, "scheme": json.dumps({**scheme, "colour": "red"})}, state, cfg, "colour")
    rejects({**meta, "scheme": json.dumps({**scheme, "weights": "int3"})}, state, cfg, "weights")
    sites = json.loads(meta["sites"])
    first = next(iter(sites))
    rejects({**meta, "sites": json.dumps({k: v for k, v in sites.items() if k != first})}, state, cfg, first)
    rejects({**meta, "sites": json.dumps({**sites, "encoder.layer.9.output.dense": sites[first]})}, state, cfg,
            "encoder.layer.9.output.dense")


def _site_mutations(spec, scheme: QuantScheme):
    """(field, bad value) pairs for one site spec; each must be rejected naming the field."""
    for field in spec:
        yield field, None  # removed
    yield "kind", "w8" if spec["kind"] != "w8" else "int8"
    yield "kind", "int3"
    yield "colour", "red"
    if "w_per_channel" in spec:
        yield "w_per_channel", not spec["w_per_channel"]
        yield "w_per_channel", int(spec["w_per_channel"])
    if "group_size" in spec:
        yield "group_size", spec["group_size"] * 2
        yield "group_size", float(spec["group_size"])
    if "act_mode" in spec:
        yield "act_mode", next(m for m in ("dynamic", "static") if m != spec["act_mode"])
        yield "act_symmetric", not spec["act_symmetric"]
    if "act_scale" in spec:
        for bad in (0.0, -spec["act_scale"], float("nan"), float("inf"), 1e-50, 1e40, "0.1", True, None, [0.1]):
            yield "act_scale", bad
        zps = [-1, 256, 2 ** 40, 1.5, float(spec["act_zero_point"]), "3", True, None]
        if scheme.act_symmetric:
            zps += [0, 127, 129, 255]
        for bad in zps:
            yield "act_zero_point", bad
        for bad in ([1.0, -1.0], [0.0], "x", [0.0, float("nan")]):
            yield "act_range", bad


@pytest.mark.parametrize("name", ["int8-static-asym", "int8-static-sym", "int8-static-per-tensor",
                                  "int8-smoothquant", "int8-dynamic", "int8-dynamic-token", "w8-weight-only",
                                  "w4-weight-only", "bf16", "mixed"])
def test_each_bad_site_field_is_named(saves, name):
    state, meta, cfg = checkpoint(saves[name][0])
    scheme = scheme_of(name)
    sites = json.loads(meta["sites"])
    n = 0
    for site in (next(iter(sites)), "encoder.layer.1.intermediate.dense"):
        for field, value in _site_mutations(sites[site], scheme):
            spec = dict(sites[site])
            if value is None and field in spec:
                del spec[field]
            else:
                spec[field] = value
            bad = {**meta, "sites": json.dumps({**sites, site: spec})}
            msg = rejects(bad, state, cfg, site)
            assert field in msg, f"{field}={value!r} not named: {msg}"
            n += 1
    assert n >= 8


def test_scheme_fields_must_agree_with_the_stored_tensors(saves):
    """Changing one scheme field (which the site specs and tensors contradict) is an error, not a default."""
    cases = {"int8-smoothquant": {"smoothquant_alpha": None}, "int8-static-asym": {"embeddings": "fp32"},
             "w4-weight-only": {"group_size": 16}, "int8-dynamic": {"mode": "static"},
             "int8-static-sym": {"act_symmetric": False}, "w8-weight-only": {"weight_granularity": "per-tensor"},
             "mixed": {"keep_fp32": []}, "bf16": {"weights": "fp32", "activations": "fp32"}}
    for name, change in cases.items():
        state, meta, cfg = checkpoint(saves[name][0])
        scheme = {**json.loads(meta["scheme"]), **change}
        rejects({**meta, "scheme": json.dumps(scheme)}, state, cfg)


# ------------------------------------------------------------------------------------------------ end to end
def _edit(d: Path, tensors=None, drop=(), site_changes=None):
    state, meta = read_safetensors(d / "model.safetensors")
    meta = dict(meta)
    state = {k: v for k, v in state.items() if k not in drop}
    state.update(tensors or {})
    if site_changes:
        sites = json.loads(meta["sites"])
        for site, change in site_changes.items():
            sites[site] = {k: v for k, v in {**sites[site], **change}.items() if v is not None}
        meta["sites"] = json.dumps(sites)
    (d / "model.safetensors").unlink()
    save_file(state, str(d / "model.safetensors"), metadata=meta)


SITE = "encoder.layer.0.intermediate.dense"


@pytest.mark.parametrize("scheme,edit,named", [
    ("int8-static-asym", dict(drop=[SITE + ".bias"]), SITE + ".bias"),
    ("w4-weight-only", dict(drop=["encoder.layer.1.output.dense.bias"]), "encoder.layer.1.output.dense.bias"),
    ("int8-static-asym", dict(site_changes={SITE: {"act_scale": None}}), "act_scale"),
    ("int8-static-asym", dict(site_changes={SITE: {"act_zero_point": None}}), "act_zero_point"),
    ("int8-static-asym", dict(site_changes={SITE: {"act_zero_point": 300}}), "act_zero_point"),
    ("int8-static-sym", dict(site_changes={SITE: {"act_scale": -0.02}}), "act_scale"),
    ("int8-smoothquant", dict(drop=[SITE + ".act_mul"]), SITE + ".act_mul"),
    ("int8-static-asym", dict(drop=["embeddings.LayerNorm.weight"]), "embeddings.LayerNorm.weight"),
    ("int8-static-asym", dict(drop=[WORD_EMBEDDING_SCALES]), WORD_EMBEDDING_SCALES),
    ("int8-dynamic", dict(drop=["embeddings.position_embeddings.weight"]), "embeddings.position_embeddings.weight"),
])
def test_issue_examples_raise_on_load(saves, tmp_path, scheme, edit, named):
    import shutil

    d = shutil.copytree(saves[scheme][0], tmp_path / "m")
    _edit(d, **edit)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        medquant.Encoder.from_pretrained(d)


def test_negative_embedding_row_scale_and_smoothquant_factor_raise(saves, tmp_path):
    import shutil

    for scheme, tensor in [("int8-dynamic", WORD_EMBEDDING_SCALES), ("int8-smoothquant", SITE + ".act_mul")]:
        d = shutil.copytree(saves[scheme][0], tmp_path / scheme)
        v = load_file(str(d / "model.safetensors"))[tensor].copy()
        v[5] = -v[5]
        _edit(d, tensors={tensor: v})
        with pytest.raises(CheckpointError, match=re.escape(tensor) + ".*positive"):
            medquant.Encoder.from_pretrained(d)


# ------------------------------------------------------------------------------------------------ saving
def tree(d: Path):
    """{relative path: sha256} of every file under d."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def no_temporaries(parent: Path):
    return not [p.name for p in parent.iterdir() if ".medquant-" in p.name]


@pytest.fixture()
def tiny_q(tiny):
    return tiny.quantize("int8-dynamic")


def test_foreign_directory_is_refused_and_overwrite_leaves_no_stale_file(tiny, tiny_q, tmp_path, minilm_dir):
    other = tmp_path / "other"
    other.mkdir()
    for fn in ("tokenizer.json", "vocab.txt", "config.json"):
        (other / fn).write_bytes((minilm_dir / fn).read_bytes())
    (other / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 7}))
    (other / "notes.txt").write_text("mine")
    before = tree(other)
    for enc in (tiny, tiny_q):
        with pytest.raises(FileExistsError, match="overwrite=True"):
            enc.save_pretrained(other)
        assert tree(other) == before
    out = tiny_q.save_pretrained(other, overwrite=True)
    marker = json.loads((out / storage.MARKER).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(marker["files"] + [storage.MARKER])
    for stale in ("tokenizer.json", "sentence_bert_config.json", "notes.txt"):
        assert not (out / stale).exists(), stale
    loaded = medquant.Encoder.from_pretrained(out, n_threads=1)
    assert loaded.max_length == tiny.max_length
    assert np.array_equal(loaded.tokenize(TEXTS)[0], tiny.tokenize(TEXTS)[0])
    np.testing.assert_array_equal(loaded.encode(TEXTS), tiny_q.encode(TEXTS))
    assert no_temporaries(tmp_path)


def test_previous_save_is_replaced_without_stale_files(tiny, tmp_path, minilm_dir):
    """A save from a model with tokenizer.json is replaced by one from a model with only vocab.txt: the old
    tokenizer.json must not survive (it would win on reload)."""
    big_tok = medquant.Encoder.from_pretrained(write_tiny_bert(tmp_path / "src2", minilm_dir, seed=1), n_threads=1)
    d = tmp_path / "save"
    big_tok.quantize("w8-weight-only").save_pretrained(d)
    assert (d / "tokenizer.json").exists() and (d / "tokenizer_config.json").exists()
    q = tiny.quantize("w4-weight-only")
    q.save_pretrained(d)  # a previous medquant save: replaced without overwrite=True
    assert not (d / "tokenizer.json").exists() and not (d / "tokenizer_config.json").exists()
    loaded = medquant.Encoder.from_pretrained(d, n_threads=1)
    assert loaded.scheme.name == "w4-weight-only"
    assert np.array_equal(loaded.tokenize(TEXTS)[0], tiny.tokenize(TEXTS)[0])
    np.testing.assert_array_equal(loaded.encode(TEXTS), q.encode(TEXTS))
    # an fp32 save is recognised too, and replaced by a quantized one
    tiny.save_pretrained(d)
    assert json.loads((d / storage.MARKER).read_text())["format"] == "huggingface"
    q.save_pretrained(d)
    assert medquant.Encoder.from_pretrained(d).scheme.name == "w4-weight-only"
    assert no_temporaries(tmp_path)


def test_previous_save_with_an_added_file_needs_overwrite(tiny_q, tmp_path):
    d = tiny_q.save_pretrained(tmp_path / "save")
    (d / "tokenizer.json").write_text("{}")  # not listed by the marker: someone else's file
    with pytest.raises(FileExistsError):
        tiny_q.save_pretrained(d)
    assert (d / "tokenizer.json").read_text() == "{}"
    tiny_q.save_pretrained(d, overwrite=True)
    assert not (d / "tokenizer.json").exists()
    medquant.Encoder.from_pretrained(d)


def test_save_without_marker_is_recognised_by_its_format(tiny_q, tmp_path):
    d = tiny_q.save_pretrained(tmp_path / "save")
    (d / storage.MARKER).unlink()  # as written before the marker existed
    assert storage.is_medquant_save(d)
    tiny_q.save_pretrained(d)
    (d / storage.MARKER).write_text("not json")  # a broken marker is no marker; extra files then refuse
    (d / "extra.bin").write_bytes(b"x")
    assert not storage.is_medquant_save(d)
    with pytest.raises(FileExistsError):
        tiny_q.save_pretrained(d)


def test_empty_directory_and_new_nested_path_are_fine(tiny_q, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tiny_q.save_pretrained(empty) == empty
    medquant.Encoder.from_pretrained(empty)
    deep = tiny_q.save_pretrained(tmp_path / "a" / "b" / "c")
    medquant.Encoder.from_pretrained(deep)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        tiny_q.save_pretrained(f, overwrite=True)
    assert f.read_text() == "x"


def _source_variants(src: Path, tmp_path: Path):
    """Paths that are, or resolve to, the source directory, or lie inside it, or contain it."""
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    return [src, link, Path(os.path.relpath(src)), src / "sub", src / ".." / src.name, link / "sub", src.parent,
            Path(".")]


@pytest.mark.parametrize("which", ["fp32", "quantized", "loaded-quantized"])
def test_source_directory_is_never_written(tiny, tmp_path, monkeypatch, which):
    import shutil

    src = Path(shutil.copytree(tiny.model_dir, tmp_path / "models" / "src"))
    enc = medquant.Encoder.from_pretrained(src, n_threads=1)
    if which == "quantized":
        enc = enc.quantize("int8-dynamic")
    elif which == "loaded-quantized":
        saved = enc.quantize("int8-dynamic").save_pretrained(tmp_path / "models" / "q")
        src, enc = saved, medquant.Encoder.from_pretrained(saved, n_threads=1)
    (tmp_path / "links").mkdir()
    monkeypatch.chdir(tmp_path / "models")
    before = tree(tmp_path / "models")
    targets = _source_variants(src, tmp_path / "links")
    for target in targets:
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="loaded from"):
                enc.save_pretrained(target, overwrite=overwrite)
    assert tree(tmp_path / "models") == before
    assert no_temporaries(tmp_path / "models") and no_temporaries(src.parent)
    # a sibling is fine
    assert medquant.Encoder.from_pretrained(enc.save_pretrained(Path("sibling"))).config == enc.config


def test_default_model_directory_is_refused(minilm, minilm_dir):
    before = {p.name: p.stat().st_mtime_ns for p in minilm_dir.iterdir()}
    with pytest.raises(ValueError, match="loaded from"):
        minilm.save_pretrained(minilm.model_dir, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in minilm_dir.iterdir()} == before


def test_failure_mid_write_keeps_the_old_save(tiny, tiny_q, tmp_path, monkeypatch):
    d = tiny_q.save_pretrained(tmp_path / "save")
    before = tree(d)
    fresh = tmp_path / "fresh"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    for enc in (tiny, tiny.quantize("w4-weight-only")):
        for target, overwrite in ((d, False), (d, True), (fresh, False)):
            with pytest.raises(OSError, match="disk full"):
                enc.save_pretrained(target, overwrite=overwrite)
            assert tree(d) == before
            assert not fresh.exists()
            assert no_temporaries(tmp_path)
    monkeypatch.undo()
    np.testing.assert_array_equal(medquant.Encoder.from_pretrained(d, n_threads=1).encode(TEXTS),
                                  tiny_q.encode(TEXTS))


def test_failure_while_swapping_restores_the_old_save(tiny_q, tmp_path, monkeypatch):
    d = tiny_q.save_pretrained(tmp_path / "save")
    before = tree(d)
    real = os.rename

    def rename(a, b):
        if ".medquant-tmp-" in str(a):
            raise OSError("rename failed (simulated)")
        return real(a, b)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        tiny_q.save_pretrained(d)
    monkeypatch.undo()
    assert tree(d) == before
    assert no_temporaries(tmp_path)


def test_cli_quantize_refuses_foreign_out_and_overwrites_on_request(tiny, tmp_path, capsys):
    from medquant.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    args = ["quantize", "--model", str(tiny.model_dir), "--scheme", "int8-dynamic", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "tokenizer.json").exists()
    assert medquant.Encoder.from_pretrained(out).scheme.name == "int8-dynamic"
    with pytest.raises(SystemExit):
        main([*args[:-1], str(tiny.model_dir), "--overwrite"])


@pytest.mark.parametrize("value", [[5], ["encoder.layer.0.*", None], "encoder.layer.0.*", {"a": 1}])
def test_keep_patterns_must_be_lists_of_strings(saves, value):
    """Found by fuzz_checkpoint.py: ``keep_bf16: [5]`` in a saved scheme raised AttributeError from site_kind."""
    with pytest.raises(TypeError, match="keep_bf16"):
        QuantScheme(weights="int8", activations="int8", keep_bf16=value)
    state, meta, cfg = checkpoint(saves["mixed"][0])
    scheme = {**json.loads(meta["scheme"]), "keep_bf16": value}
    rejects({**meta, "scheme": json.dumps(scheme)}, state, cfg, "keep_bf16")
