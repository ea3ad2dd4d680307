"""A tiny random BERT checkpoint written with numpy + safetensors only (no torch): fast to load, encode and fuzz.

Used by tests/test_reliability.py and the fuzz harnesses in fuzz/. The vocabulary is either a small synthetic
WordPiece vocab.txt (default; loads in milliseconds) or the MiniLM tokenizer files copied from ``tokenizer_dir``
(then vocab_size is 30522).
"""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Optional

import numpy as np

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "of", "and", "to", "in", "is", "what", "are", "symptoms", "treatment", "for", "disease", "cause",
         "causes", "glaucoma", "diabetes", "heart", "blood", "pressure", "cancer", "how", "many", "people", "affected",
         "by", "who", "at", "risk", "genetic", "changes", "related", "outlook", "prevent", "research", "being", "done"]


def synthetic_vocab() -> list:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return SPECIAL + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS


def tiny_config(vocab_size: int, *, hidden=32, layers=2, heads=4, intermediate=64, max_position=128) -> dict:
    return {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "position_embedding_type": "absolute", "vocab_size": vocab_size, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
        "max_position_embeddings": max_position, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }


def tiny_state(cfg: dict, seed: int = 0) -> dict:
    """BERT parameter tensors (Hugging Face names) for ``cfg``, float32, N(0, 0.05) weights, LayerNorm ~1/0."""
    rng = np.random.default_rng(seed)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def ln(prefix, out):
        out[prefix + ".weight"] = (1.0 + rng.standard_normal(H) * 0.02).astype(np.float32)
        out[prefix + ".bias"] = w(H)

    t = {
        "embeddings.word_embeddings.weight": w(cfg["vocab_size"], H),
        "embeddings.position_embeddings.weight": w(cfg["max_position_embeddings"], H),
        "embeddings.token_type_embeddings.weight": w(cfg["type_vocab_size"], H),
    }
    ln("embeddings.LayerNorm", t)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + n + ".weight"], t[p + n + ".bias"] = w(H, H), w(H)
        ln(p + "attention.output.LayerNorm", t)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(I, H), w(I)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(H, I), w(H)
        ln(p + "output.LayerNorm", t)
    return t


def write_tiny_bert(directory: Path, tokenizer_dir: Optional[Path] = None, *, seed: int = 0, **shape) -> Path:
    """Writes config.json, model.safetensors and a tokenizer (vocab.txt, or tokenizer_dir's files) to directory."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        vocab = synthetic_vocab()
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        vocab_size = len(vocab)
    else:
        for fn in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / fn).exists():
                shutil.copyfile(Path(tokenizer_dir) / fn, directory / fn)
        vocab_size = sum(1 for _ in open(directory / "vocab.txt", encoding="utf-8"))
    cfg = tiny_config(vocab_size, **shape)
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tiny_state(cfg, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def random_texts(n: int, seed: int = 0, max_words: int = 120) -> list:
    """Medical-sounding word soup of mixed lengths (1 .. max_words words) for shape variety."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_words + 1))
        out.append(" ".join(rng.choice(WORDS, size=k)) + "?")
    return out
