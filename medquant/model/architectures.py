"""Encoder architectures: the one place that maps a Hugging Face checkpoint (config keys, parameter names) onto the
C core's layout, and that names the linear layers ("sites") of a layer.

The C core runs one layout: word / position / token-type embeddings and their LayerNorm, then per layer four linear
sites (``SITE_SUFFIXES``: the fused Q/K/V projection, the attention output, the FFN input, the FFN output) and two
LayerNorms. An :class:`Architecture` says where those tensors live in a checkpoint and which config keys describe
them: config.json is read into a :class:`BertConfig` and parameter names are mapped onto the canonical (BERT)
names that the layout functions here use. BERT (with its BioBERT / ClinicalBERT / PubMedBERT / MiniLM checkpoints)
is the one entry of ``ARCHITECTURES`` today; another family (e.g. ELECTRA: other prefixes; RoBERTa: other prefixes
and a position offset the core would have to offer) is one :class:`Architecture` subclass added to that tuple.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

# ---------------------------------------------------------------------------------------------------- sites
#: The linear layers of one encoder layer, in the core's order (site index 0..3).
SITE_SUFFIXES = (
    "attention.self.qkv",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
#: Hugging Face module names that are parts of a fused site (Q, K and V are one ``qkv`` site).
SITE_ALIASES = {"attention.self.query": 0, "attention.self.key": 0, "attention.self.value": 0}
#: The two LayerNorms of a layer, in the core's order (``which`` 0 and 1).
LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
LAYER_PREFIX = "encoder.layer."

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
WORD_EMBEDDING_SCALES = WORD_EMBEDDINGS + "_scale"
POSITION_EMBEDDINGS = "embeddings.position_embeddings.weight"
TOKEN_TYPE_EMBEDDINGS = "embeddings.token_type_embeddings.weight"
EMBEDDING_LAYER_NORM = "embeddings.LayerNorm"


def site_name(layer: int, site: int) -> str:
    """``encoder.layer.{layer}.{SITE_SUFFIXES[site]}``."""
    return f"{LAYER_PREFIX}{layer}.{SITE_SUFFIXES[site]}"


def site_names(n_layers: int) -> List[str]:
    return [site_name(layer, s) for layer in range(n_layers) for s in range(len(SITE_SUFFIXES))]


def site_layer(name: str) -> int:
    """The layer index of a site name."""
    return int(name[len(LAYER_PREFIX):].split(".", 1)[0])


def site_module(name: str) -> str:
    """The site suffix of a site name, e.g. ``attention.self.qkv``."""
    return name[len(LAYER_PREFIX):].split(".", 1)[1]


def parse_site(name: str) -> Tuple[int, int]:
    """(layer, site index) of a site name."""
    return site_layer(name), SITE_SUFFIXES.index(site_module(name))


def resolve_alias(pattern: str) -> str:
    """A site pattern with a fused part's Hugging Face name (``...attention.self.query``) replaced by its site."""
    for alias, site in SITE_ALIASES.items():
        if pattern.endswith(alias):
            return pattern[: -len(alias)] + SITE_SUFFIXES[site]
    return pattern


# ---------------------------------------------------------------------------------------------------- config
#: Config keys the core reads, all positive integers, with the largest value the core supports.
CORE_CONFIG_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 14, "num_hidden_layers": 256,
                      "num_attention_heads": 1024, "intermediate_size": 1 << 16, "max_position_embeddings": 1 << 14,
                      "type_vocab_size": 1 << 10}


#: The core's name (mq_bert_config, csrc/encoder.h) of each config key it reads.
CORE_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "intermediate_size": "intermediate",
              "max_position_embeddings": "max_position", "type_vocab_size": "type_vocab"}


@dataclass(frozen=True)
class BertConfig:
    """The shape of an encoder in the core's terms (``to_core``) and as a Hugging Face config.json (``to_hf``);
    ``family`` names its entry of ``ARCHITECTURES``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    family: str = "bert"

    def to_core(self) -> Dict:
        """The C core's configuration, in the core's own names (mq_bert_config)."""
        d = {CORE_NAMES[key]: getattr(self, key) for key in CORE_CONFIG_LIMITS}
        d["ln_eps"] = self.layer_norm_eps
        return d

    def to_hf(self, quantized: bool = False) -> Dict:
        """config.json of a save. Quantized saves name their own model type (:data:`QUANTIZED_MODEL_TYPE`, the
        family's kept under ``medquant_base_*``) so that Hugging Face and sentence-transformers refuse to load them
        as the family's float model (which would leave the int8 weights unread and the layers random)."""
        d = {key: getattr(self, key) for key in CORE_CONFIG_LIMITS}
        d["layer_norm_eps"] = self.layer_norm_eps
        d.update(architecture_of(self).hf_config)
        d["pad_token_id"] = self.pad_token_id
        if quantized:
            d["medquant_base_model_type"] = d.pop("model_type")
            d["medquant_base_architectures"] = d.pop("architectures")
            d = {"model_type": QUANTIZED_MODEL_TYPE, "architectures": [QUANTIZED_ARCHITECTURE], **d}
        return d

    @property
    def site_names(self) -> List[str]:
        return site_names(self.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------- core layout
#: The Hugging Face modules fused into the qkv site, in order.
QKV_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value")


def expected_shapes(cfg: BertConfig) -> Dict[str, tuple]:
    """Every parameter the core needs, by its (canonical, BERT) name, with its shape, in checkpoint order."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        WORD_EMBEDDINGS: (cfg.vocab_size, H),
        POSITION_EMBEDDINGS: (cfg.max_position_embeddings, H),
        TOKEN_TYPE_EMBEDDINGS: (cfg.type_vocab_size, H),
        EMBEDDING_LAYER_NORM + ".weight": (H,),
        EMBEDDING_LAYER_NORM + ".bias": (H,),
    }
    # per layer: Q, K, V, attention output, its LayerNorm, FFN in, FFN out, its LayerNorm
    layer = [*((q, (H, H)) for q in QKV_PARTS), (SITE_SUFFIXES[1], (H, H)), (LAYER_NORMS[0], (H,)),
             (SITE_SUFFIXES[2], (I, H)), (SITE_SUFFIXES[3], (H, I)), (LAYER_NORMS[1], (H,))]
    for i in range(cfg.num_hidden_layers):
        p = f"{LAYER_PREFIX}{i}."
        for name, shape in layer:
            shapes[p + name + ".weight"] = shape
            shapes[p + name + ".bias"] = shape[:1]
    return shapes


def site_shapes(cfg: BertConfig) -> Dict[str, Tuple[int, int]]:
    """(N outputs, K inputs) of every site's weight, from ``expected_shapes`` (Q, K, V stacked into qkv)."""
    shapes = expected_shapes(cfg)
    out = {}
    for i in range(cfg.num_hidden_layers):
        parts = [shapes[f"{LAYER_PREFIX}{i}.{q}.weight"] for q in QKV_PARTS]
        out[site_name(i, 0)] = (sum(n for n, _ in parts), parts[0][1])
        for s in range(1, len(SITE_SUFFIXES)):
            out[site_name(i, s)] = shapes[site_name(i, s) + ".weight"]
    return out


def float_tensors(params: Mapping[str, np.ndarray], cfg: BertConfig) -> Dict[str, np.ndarray]:
    """The parameters outside the linear sites (embeddings, LayerNorms)."""
    names = [WORD_EMBEDDINGS, POSITION_EMBEDDINGS, TOKEN_TYPE_EMBEDDINGS, EMBEDDING_LAYER_NORM + ".weight",
             EMBEDDING_LAYER_NORM + ".bias"]
    names += [f"{LAYER_PREFIX}{i}.{ln}.{t}" for i in range(cfg.num_hidden_layers) for ln in LAYER_NORMS
              for t in ("weight", "bias")]
    return {n: params[n] for n in names}


def fp32_sites(params: Mapping[str, np.ndarray], cfg: BertConfig) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per-site fp32 (weight [N, K], bias [N]); Q, K, V fused into one [3H, H] projection."""
    sites = {}
    for i in range(cfg.num_hidden_layers):
        qkv = [f"{LAYER_PREFIX}{i}.{n}" for n in QKV_PARTS]
        sites[site_name(i, 0)] = (
            np.ascontiguousarray(np.concatenate([params[n + ".weight"] for n in qkv], axis=0)),
            np.ascontiguousarray(np.concatenate([params[n + ".bias"] for n in qkv], axis=0)),
        )
        for s in range(1, len(SITE_SUFFIXES)):
            name = site_name(i, s)
            sites[name] = (params[name + ".weight"], params[name + ".bias"])
    return sites


def load_float_tensors(core, storage: Mapping[str, np.ndarray], cfg: BertConfig) -> None:
    """Hand the embeddings and LayerNorms of a storage to a ``_core.Encoder``."""
    if WORD_EMBEDDING_SCALES in storage:
        core.set_word_embeddings(storage[WORD_EMBEDDINGS], storage[WORD_EMBEDDING_SCALES])
    else:
        core.set_word_embeddings(storage[WORD_EMBEDDINGS])
    core.set_position_type_embeddings(storage[POSITION_EMBEDDINGS], storage[TOKEN_TYPE_EMBEDDINGS])
    core.set_layernorm(-1, 0, storage[EMBEDDING_LAYER_NORM + ".weight"], storage[EMBEDDING_LAYER_NORM + ".bias"])
    for i in range(cfg.num_hidden_layers):
        for which, ln in enumerate(LAYER_NORMS):
            p = f"{LAYER_PREFIX}{i}.{ln}"
            core.set_layernorm(i, which, storage[p + ".weight"], storage[p + ".bias"])


# ---------------------------------------------------------------------------------------------------- families
class Architecture:
    """A checkpoint family: how its config.json and parameter names map onto the core's (BERT-named) layout.

    A new family is a subclass added to ``ARCHITECTURES``: its ``model_types``, the state-dict prefixes and name
    renames that give the canonical names above, its config checks, and the keys written back to config.json.
    """

    #: ``BertConfig.family`` of this family
    name = ""
    #: config.json ``model_type`` values and ``architectures`` name prefixes of this family
    model_types: Tuple[str, ...] = ()
    arch_prefixes: Tuple[str, ...] = ()
    #: prefixes stripped from state-dict keys (task heads, sentence-transformers wrappers)
    state_prefixes: Tuple[str, ...] = ()
    #: parameter-name endings renamed on load to the canonical ones
    renames: Tuple[Tuple[str, str], ...] = ()
    #: keys written to config.json besides the core's
    hf_config: Dict = {}

    def matches(self, raw: Mapping) -> bool:
        archs = raw.get("architectures") or []
        return raw.get("model_type") in self.model_types or any(
            str(a).startswith(p) for a in archs for p in self.arch_prefixes)

    def check_config(self, raw: Mapping) -> None:
        """Raise ValueError for config.json settings of this family that the core does not implement."""

    def read_config(self, raw: Mapping) -> BertConfig:
        """The core's config from a config.json of this family (ValueError where it does not fit the core)."""
        self.check_config(raw)
        fields = {}
        for key in CORE_CONFIG_LIMITS:
            v = raw.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config.json: {key} must be a positive integer, got {v!r}")
            fields[key] = v
        eps = raw.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise ValueError(f"config.json: layer_norm_eps must be in (0, 1), got {eps!r}")
        if fields["hidden_size"] % fields["num_attention_heads"]:
            raise ValueError(
                f"config.json: hidden_size {fields['hidden_size']} is not divisible by num_attention_heads "
                f"{fields['num_attention_heads']}"
            )
        for key, lim in CORE_CONFIG_LIMITS.items():
            if fields[key] > lim:
                raise ValueError(f"config.json: {key}={fields[key]} exceeds the supported maximum {lim}")
        return BertConfig(**fields, layer_norm_eps=float(eps), pad_token_id=int(raw.get("pad_token_id") or 0),
                          family=self.name)

    def canonical_name(self, key: str) -> str:
        """A state-dict key as the core's layout names it: family prefix stripped, renames applied."""
        for prefix in self.state_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        for old, new in self.renames:
            if key.endswith(old):
                return key[: -len(old)] + new
        return key


class BertArchitecture(Architecture):
    """BertModel and the checkpoints that share its layout (BioBERT, ClinicalBERT, PubMedBERT, MiniLM)."""

    name = "bert"
    model_types = ("bert",)
    arch_prefixes = ("Bert",)
    state_prefixes = ("bert.", "model.", "0.auto_model.")
    # old TF-converted checkpoints name LayerNorm parameters gamma/beta
    renames = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))
    hf_config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
                 "position_embedding_type": "absolute"}

    def check_config(self, raw: Mapping) -> None:
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {raw['position_embedding_type']!r} (only absolute)")
        act = raw.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported hidden_act {act!r}: the C core implements BERT's erf GELU ('gelu')")
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT variants are not supported")


#: Every family medquant loads; ``architecture_for`` picks the first that matches a config.json.
ARCHITECTURES: Tuple[Architecture, ...] = (BertArchitecture(),)
SUPPORTED = "BERT-architecture encoders (BertModel, BioBERT, ClinicalBERT, PubMedBERT, MiniLM sentence models)"


#: config.json model type and architecture of medquant's quantized saves (unknown to Hugging Face on purpose)
QUANTIZED_MODEL_TYPE = "medquant-quantized"
QUANTIZED_ARCHITECTURE = "MedquantQuantizedEncoder"


def architecture_for(raw: Mapping) -> Architecture:
    """The family of a config.json (of a quantized save: the family it was made from), or ValueError naming what
    it is."""
    if raw.get("model_type") == QUANTIZED_MODEL_TYPE:
        raw = {**raw, "model_type": raw.get("medquant_base_model_type"),
               "architectures": raw.get("medquant_base_architectures")}
    for arch in ARCHITECTURES:
        if arch.matches(raw):
            return arch
    archs = ", ".join(map(str, raw.get("architectures") or [])) or "unknown"
    raise ValueError(f"unsupported architecture: model_type={raw.get('model_type')!r}, architectures=[{archs}]; "
                     f"medquant runs {SUPPORTED}")


def architecture_of(cfg: BertConfig) -> Architecture:
    """The family a config was read as."""
    return next(a for a in ARCHITECTURES if a.name == cfg.family)


__all__ = [
    "QUANTIZED_ARCHITECTURE", "QUANTIZED_MODEL_TYPE", "ARCHITECTURES", "Architecture", "BertArchitecture", "BertConfig", "CORE_CONFIG_LIMITS", "LAYER_NORMS",
    "QKV_PARTS", "SITE_ALIASES", "SITE_SUFFIXES", "architecture_for", "architecture_of", "expected_shapes",
    "float_tensors", "fp32_sites", "load_float_tensors", "parse_site", "resolve_alias", "site_layer", "site_module",
    "site_name", "site_names", "site_shapes",
]
