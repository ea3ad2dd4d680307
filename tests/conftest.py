"""Shared fixtures: the packaged all-MiniLM-L6-v2, MedQuAD texts, and a random BERT-base-sized checkpoint.

Under CI (``MEDQUANT_CI=1``, set by ``.ci/run``) nothing may be skipped for want of data or of an optional test
dependency: MedQuAD must be found and every test dependency imported, else the run fails loudly (see ``require``).
Skips that remain say why (``-rs`` in pyproject.toml)."""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import medquant
from medquant.model.checkpoint import resolve_model_path


IN_CI = os.environ.get("MEDQUANT_CI") == "1"


def require(module: str):
    """``pytest.importorskip`` outside CI; under CI a missing test dependency is an error, not a skip."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def pytest_sessionstart(session):
    if IN_CI:
        from medquant.eval.datasets import data_root

        data_root()  # raises FileNotFoundError naming where MedQuAD was looked for


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    return medquant.Encoder.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def medquad():
    from medquant.eval.datasets import load_medquad

    return load_medquad()


@pytest.fixture(scope="session")
def medquad_questions(medquad):
    """80 MedQuAD questions of mixed lengths (seeded sample)."""
    rng = np.random.default_rng(0)
    qs = medquad["question"].drop_duplicates().to_numpy()
    return [str(q) for q in rng.choice(qs, size=80, replace=False)]


@pytest.fixture(scope="session")
def medquad_answers(medquad):
    rng = np.random.default_rng(1)
    ans = medquad["answer"].drop_duplicates().to_numpy()
    return [str(a) for a in rng.choice(ans, size=48, replace=False)]


@pytest.fixture(scope="session")
def mixed_texts(medquad_questions, medquad_answers):
    """Questions plus long answers (truncated at max_length), interleaved."""
    texts = list(medquad_questions[:64]) + list(medquad_answers[:16])
    rng = np.random.default_rng(2)
    rng.shuffle(texts)
    return texts


def write_random_bert(directory: Path, tokenizer_dir: Path, *, hidden=768, layers=12, heads=12, intermediate=3072,
                      seed=0) -> Path:
    """A randomly initialised BERT checkpoint (transformers' own init) with the MiniLM tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=512)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    for fn in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / fn, directory / fn)
    return directory


@pytest.fixture(scope="session")
def random_base_dir(tmp_path_factory, minilm_dir) -> Path:
    """BERT-base's widths (768 hidden, 12 heads, 3072 intermediate) in 4 layers instead of 12: every layer runs the
    same code, so more of them check nothing more."""
    return write_random_bert(tmp_path_factory.mktemp("bert_base_random"), minilm_dir, layers=4)


# ---------------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BERT (tests/tiny_bert.py) with a synthetic WordPiece vocabulary, one per test module."""
    from tiny_bert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    # one oneDNN thread: the CI machine has 2 shared cores, and OpenMP teams spin badly when oversubscribed
    return medquant.Encoder.from_pretrained(tiny_dir, n_threads=1)


@pytest.fixture(scope="module")
def tiny_int8(tiny):
    return tiny.quantize("int8-dynamic")
