"""A model's own sentence-embedding settings, read from its sentence-transformers files.

A sentence-transformers directory says how token vectors become a sentence vector, and encoding with anything else
gives wrong embeddings (CLS-pooled models mean-pooled reach a cosine of 0.5-0.7 to their true embeddings):

* ``modules.json`` lists the modules: Transformer, then Pooling (its ``config.json`` in e.g. ``1_Pooling/``), then
  optionally Normalize. Other modules (Dense, LayerNorm, ...) change the vectors in ways the core does not run, so
  such a model is refused rather than encoded wrongly.
* ``config_sentence_transformers.json``: ``prompts`` (e.g. ``{"query": "query: ", "document": "passage: "}``, as
  BGE / E5 / MedCPT-style models need), ``default_prompt_name``, ``similarity_fn_name``.
* ``sentence_bert_config.json``: ``max_seq_length`` (read by :func:`checkpoint.default_max_length`),
  ``do_lower_case``.

A directory without ``modules.json`` gets medquant's defaults: mean pooling, L2-normalised, cosine similarity.
Quantized medquant saves keep the list as ``medquant_modules.json`` so that sentence-transformers refuses them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .._native import _core
from .checkpoint import MAX_CONFIG_BYTES, CheckpointError, is_present, model_file, read_json

#: pooling mode (sentence-transformers' name) -> the core's pooling code
POOLING_MODES: Dict[str, int] = {
    "mean": _core.POOL_MEAN, "cls": _core.POOL_CLS, "max": _core.POOL_MAX,
    "mean_sqrt_len_tokens": _core.POOL_MEAN_SQRT_LEN, "weightedmean": _core.POOL_WEIGHTED_MEAN,
    "lasttoken": _core.POOL_LAST,
}
#: the boolean keys of older Pooling configs, in sentence-transformers' concatenation order
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
#: the prompt names sentence-transformers' encode_document tries, in order
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
MODULES_FILE = "modules.json"
QUANTIZED_MODULES_FILE = "medquant_modules.json"
SENTENCE_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")

_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"


@dataclass(frozen=True)
class SentenceConfig:
    """How a model turns token vectors into sentence vectors, and how they are compared.

    pooling: one of :data:`POOLING_MODES`; normalize: L2-normalise the pooled vector; prompts: prompt name -> text
    prepended to the input; default_prompt_name: the prompt used when none is chosen; similarity: one of
    :data:`SIMILARITIES`; do_lower_case: lower-case inputs before tokenizing; source: where the settings came from.
    """

    pooling: str = "mean"
    normalize: bool = True
    prompts: Dict[str, str] = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    similarity: str = "cosine"
    do_lower_case: bool = False
    source: str = "medquant defaults (no modules.json)"

    def __post_init__(self):
        check_pooling(self.pooling)
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                             f"({', '.join(self.prompts) or 'none'})")

    @property
    def pooling_code(self) -> int:
        return POOLING_MODES[self.pooling]

    def prompt_text(self, prompt_name: Optional[str] = None, prompt: Optional[str] = None) -> str:
        """The text prepended to inputs: ``prompt`` if given, else the named prompt, else the default prompt."""
        if prompt is not None:
            if prompt_name is not None:
                raise ValueError("give prompt or prompt_name, not both")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is None:
            prompt_name = self.default_prompt_name
            if prompt_name is None:
                return ""
        if prompt_name not in self.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                             f"({', '.join(map(repr, self.prompts)) or 'it has none'})")
        return self.prompts[prompt_name]

    def query_prompt_name(self) -> Optional[str]:
        """The prompt sentence-transformers' ``encode_query`` uses: "query" when the model has one."""
        return "query" if "query" in self.prompts else None

    def document_prompt_name(self) -> Optional[str]:
        """The prompt ``encode_document`` uses: the first of document / passage / corpus the model has."""
        return next((n for n in DOCUMENT_PROMPT_NAMES if n in self.prompts), None)

    def inputs(self, texts: Sequence[str], prompt: str) -> List[str]:
        """The strings the tokenizer sees (new list; ``texts`` is not changed)."""
        out = [prompt + t for t in texts] if prompt else list(texts)
        return [t.lower() for t in out] if self.do_lower_case else out

    def override(self, pooling: Optional[str] = None, normalize: Optional[bool] = None) -> "SentenceConfig":
        """This config with an explicit pooling / normalize (None: keep the model's)."""
        changes = {k: v for k, v in (("pooling", pooling), ("normalize", normalize)) if v is not None}
        if not changes:
            return self
        return replace(self, source=f"{self.source}; overridden: "
                                    + ", ".join(f"{k}={v}" for k, v in changes.items()), **changes)

    def describe(self) -> str:
        """One line: pooling, normalisation, similarity, prompts."""
        parts = [self.pooling, "normalized" if self.normalize else "not normalized", self.similarity]
        if self.prompts:
            parts.append("prompts " + ", ".join(f"{k}={v!r}" for k, v in self.prompts.items()))
        if self.do_lower_case:
            parts.append("lower-cased")
        return "; ".join(parts)

    def to_dict(self) -> Dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "prompts": dict(self.prompts),
                "default_prompt_name": self.default_prompt_name, "similarity": self.similarity,
                "do_lower_case": self.do_lower_case, "source": self.source}


def check_pooling(pooling) -> str:
    if not isinstance(pooling, str) or pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
    return pooling


class _Reader:
    """Reads the JSON files of one model directory with the checkpoint module's checks (size, regular file,
    valid JSON object); every problem is a CheckpointError naming the file."""

    error = CheckpointError

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)

    def present(self, path: Path) -> bool:
        return is_present(path)

    def json(self, rel: str, default=None):
        path = self.dir / rel
        if not is_present(path):
            return default
        return read_json(path, rel)

    def modules(self) -> Optional[List[Mapping]]:
        for name in (MODULES_FILE, QUANTIZED_MODULES_FILE):
            path = self.dir / name
            if self.present(path):
                return self._module_list(path, name)
        return None

    def _module_list(self, path: Path, name: str) -> List[Mapping]:
        model_file(path, name, MAX_CONFIG_BYTES)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise self.error(f"{name} in {self.dir} cannot be read as JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                 for m in data):
            raise self.error(f"{name} in {self.dir} must be a list of modules, each with a 'type'")
        return sorted(data, key=lambda m: m.get("idx", 0) if isinstance(m.get("idx", 0), int) else 0)


def _kind(module: Mapping) -> str:
    """'Transformer', 'Pooling', 'Normalize', ... from a module type such as sentence_transformers.models.Pooling."""
    return module["type"].rsplit(".", 1)[-1]


def pooling_mode(raw: Mapping, where: str, error) -> str:
    """The single pooling mode of a Pooling config (new ``pooling_mode`` key or the legacy booleans)."""
    mode = raw.get("pooling_mode")
    if mode is None:
        active = [m for k, m in LEGACY_POOLING_KEYS.items() if raw.get(k) is True]
        mode = active if len(active) != 1 else active[0]
        if not active:
            mode = "mean"  # what sentence-transformers does when no flag is set
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise error(f"{where}: the model concatenates pooling modes {list(mode)}; medquant pools one mode "
                        f"(its vectors would have {len(mode)}x the hidden size)")
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise error(f"{where}: pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    if raw.get("include_prompt", True) is not True:
        raise error(f"{where}: include_prompt=false (prompt tokens left out of pooling) is not supported")
    return mode


def _modules_settings(reader: _Reader, modules: List[Mapping]) -> Dict:
    """pooling and normalize from the module list; any module the core does not run is refused."""
    settings: Dict = {"pooling": "mean", "normalize": False}
    kinds = [_kind(m) for m in modules]
    unsupported = [k for k in kinds if k not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unsupported:
        raise reader.error(f"{reader.dir}: sentence-transformers modules {', '.join(unsupported)} are not supported "
                           f"(medquant runs Transformer -> Pooling -> Normalize); encoding without them would give "
                           f"wrong embeddings")
    for m in modules:
        path = str(m.get("path", ""))
        if _kind(m) == _TRANSFORMER and path not in ("", "."):
            raise reader.error(f"{reader.dir}: the transformer lives in the subdirectory {path!r}; load that "
                               f"directory's files from the model root")
        if _kind(m) == _POOLING:
            rel = f"{path}/config.json"
            raw = reader.json(rel)
            if raw is None:
                raise reader.error(f"{reader.dir}: modules.json lists a Pooling module but {rel} is missing")
            settings["pooling"] = pooling_mode(raw, f"{reader.dir / rel}", reader.error)
        elif _kind(m) == _NORMALIZE:
            settings["normalize"] = True
    return settings


def _prompt_settings(reader: _Reader) -> Dict:
    raw = reader.json("config_sentence_transformers.json", {})
    prompts = raw.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in prompts.items()):
        raise reader.error(f"{reader.dir}: config_sentence_transformers.json 'prompts' must map names to strings")
    default = raw.get("default_prompt_name")
    similarity = raw.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITIES:
        raise reader.error(f"{reader.dir}: similarity_fn_name {similarity!r} is not one of {', '.join(SIMILARITIES)}")
    return {"prompts": dict(prompts), "default_prompt_name": default, "similarity": similarity}


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    """The model's :class:`SentenceConfig` (medquant's defaults when it has no sentence-transformers files)."""
    reader = _Reader(model_dir)
    modules = reader.modules()
    if modules is None:
        return SentenceConfig()
    settings = _modules_settings(reader, modules)
    settings.update(_prompt_settings(reader))
    settings["do_lower_case"] = reader.json("sentence_bert_config.json", {}).get("do_lower_case") is True
    names = [p for p in ("modules.json", *SENTENCE_FILES) if reader.present(reader.dir / p)]
    try:
        return SentenceConfig(source="sentence-transformers files: " + ", ".join(names), **settings)
    except ValueError as e:
        raise reader.error(f"{reader.dir}: {e}") from None


def copy_sentence_files(src: Path, dst: Path, quantized: bool) -> None:
    """Copy a model's sentence-transformers files (and its module directories, e.g. ``1_Pooling/``) from ``src`` to
    ``dst``. A quantized save keeps the module list as ``medquant_modules.json``: with no ``modules.json``,
    sentence-transformers does not take the directory for one of its models."""
    src, dst = Path(src), Path(dst)
    for name in SENTENCE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    listing = next((src / n for n in (MODULES_FILE, QUANTIZED_MODULES_FILE) if (src / n).is_file()), None)
    if listing is None:
        return
    shutil.copyfile(listing, dst / (QUANTIZED_MODULES_FILE if quantized else MODULES_FILE))
    for m in _Reader(src)._module_list(listing, listing.name):
        rel = str(m.get("path", ""))
        if rel not in ("", ".") and (src / rel).is_dir() and "/" not in rel.strip("/") and ".." not in rel:
            shutil.copytree(src / rel, dst / rel, dirs_exist_ok=True)


__all__ = ["POOLING_MODES", "SIMILARITIES", "SentenceConfig", "check_pooling", "copy_sentence_files",
           "read_sentence_config"]
