"""Loading checkpoints: every broken or unsupported input gives a clear Python exception, never a crash."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import medquant
from medquant import CheckpointError


@pytest.fixture()
def model_copy(tmp_path, minilm_dir) -> Path:
    d = tmp_path / "model"
    shutil.copytree(minilm_dir, d)
    return d


def edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_named_model_and_directory_load_the_same(minilm, minilm_dir):
    assert medquant.Encoder.from_pretrained(minilm_dir).config == minilm.config
    assert minilm.max_length == 256  # sentence-transformers' max_seq_length for this model
    enc = medquant.Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", max_length=64)
    assert enc.max_length == 64


def test_missing_directory_and_files(tmp_path, model_copy):
    with pytest.raises(CheckpointError, match="no model directory"):
        medquant.Encoder.from_pretrained(tmp_path / "nope")
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        medquant.Encoder.from_pretrained(model_copy)


def test_missing_weights_and_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        medquant.Encoder.from_pretrained(model_copy)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        medquant.Encoder.from_pretrained(model_copy)


def test_corrupt_config(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        medquant.Encoder.from_pretrained(model_copy)


@pytest.mark.parametrize("model_type,arch", [("gpt2", "GPT2LMHeadModel"), ("roberta", "RobertaModel")])
def test_unknown_architecture_is_named(model_copy, model_type, arch):
    edit_config(model_copy, model_type=model_type, architectures=[arch])
    with pytest.raises(CheckpointError, match=arch):
        medquant.Encoder.from_pretrained(model_copy)


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 2 ** 31}, "hidden_size"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"num_attention_heads": 7}, "divisible"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps"),
])
def test_bad_config_values(model_copy, change, match):
    edit_config(model_copy, **change)
    with pytest.raises(CheckpointError, match=match):
        medquant.Encoder.from_pretrained(model_copy)


def test_mismatched_tensor_shape(model_copy):
    t = load_file(str(model_copy / "model.safetensors"))
    t["encoder.layer.2.intermediate.dense.weight"] = np.zeros((10, 384), np.float32)
    save_file(t, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.2\.intermediate\.dense\.weight has shape"):
        medquant.Encoder.from_pretrained(model_copy)


def test_missing_tensor(model_copy):
    t = load_file(str(model_copy / "model.safetensors"))
    del t["encoder.layer.0.attention.self.key.bias"]
    save_file(t, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors: encoder.layer.0.attention.self.key.bias"):
        medquant.Encoder.from_pretrained(model_copy)


def test_nan_weights(model_copy):
    t = load_file(str(model_copy / "model.safetensors"))
    t["encoder.layer.1.output.dense.weight"][3, 5] = np.nan
    save_file(t, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        medquant.Encoder.from_pretrained(model_copy)


@pytest.mark.parametrize("cut", [8, 1000, 5_000_000])
def test_truncated_safetensors(model_copy, cut):
    p = model_copy / "model.safetensors"
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="safetensors"):
        medquant.Encoder.from_pretrained(model_copy)


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="safetensors"):
        medquant.Encoder.from_pretrained(model_copy)


def test_pickle_needs_allow_pickle(model_copy):
    import torch

    sd = {k: torch.from_numpy(v) for k, v in load_file(str(model_copy / "model.safetensors")).items()}
    (model_copy / "model.safetensors").unlink()
    torch.save(sd, str(model_copy / "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        medquant.Encoder.from_pretrained(model_copy)
    enc = medquant.Encoder.from_pretrained(model_copy, allow_pickle=True)
    assert enc.encode(["glaucoma"]).shape == (1, 384)


def test_malicious_pickle_is_not_executed(tmp_path, model_copy):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (model_copy / "model.safetensors").unlink()
    with open(model_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError):
        medquant.Encoder.from_pretrained(model_copy)
    with pytest.raises(CheckpointError):
        medquant.Encoder.from_pretrained(model_copy, allow_pickle=True)
    assert not marker.exists()


def test_vocab_txt_only_and_invalid_utf8(model_copy, minilm):
    (model_copy / "tokenizer.json").unlink()
    enc = medquant.Encoder.from_pretrained(model_copy)
    ids, _, _ = enc.tokenize(["What causes Glaucoma?"])
    ids2, _, _ = minilm.tokenize(["What causes Glaucoma?"])
    assert np.array_equal(ids, ids2)
    (model_copy / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(CheckpointError, match="UTF-8"):
        medquant.Encoder.from_pretrained(model_copy)


def test_corrupt_tokenizer_json(model_copy):
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer"):
        medquant.Encoder.from_pretrained(model_copy)
