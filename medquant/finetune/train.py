"""Fine-tuning on exported training data, plain or quantization-aware, and a directory medquant loads back.

:func:`finetune` trains a BERT sentence encoder (a Hugging Face / sentence-transformers directory) on a directory
written by :func:`medquant.finetune.export_training_data`:

* loss: in-batch negatives plus the exported hard negatives (MultipleNegativesRankingLoss: cross-entropy over
  ``scale * cos(query, candidate)`` with the pair's own positive as the target, every other positive and every
  negative of the batch as candidates), each query weighted by its exported ``weight`` (where quantization hurts:
  ``hurt_weight``), plus, with ``distill_weight > 0``, MarginMSE distillation from an fp32 teacher
  (``scale^2 (cos(q, p) - cos(q, n) - teacher margin)^2``, Hofstaetter et al. 2020): the export's teacher margins
  (``distill_from="export"``) or the source model's own, computed during training by a frozen fp32 copy of it
  (``distill_from="source"``: for quantization-aware training of a fine-tuned model, the model it must not drift
  from), or (``distill_loss="embedding"``) ``scale * (1 - cos(student, teacher))`` over every embedding of the
  batch, to the source model's, or (``distill_loss="scores"``) the in-batch margins: per query, its cosine to every
  candidate of the batch (every positive and hard negative) minus the mean over them, ``scale^2 (student -
  teacher)^2`` (MarginMSE over every pair of the batch's candidates; a shift shared by a query's scores, which no
  ranking sees, costs nothing); ``contrastive_weight`` weighs the cross-entropy (0: distillation only) and
  ``dropout=False`` trains in eval mode (the recovery study's quantization-aware phase uses both);
* ``quantization_aware=True``: every quantized site computes as medquant's C core does under the student's
  exported quantization parameters (:mod:`medquant.finetune.fakequant`), so the weights learn around the
  quantization error;
* batches never hold two pairs with the same query or positive text (MedQuAD repeats answers: a duplicate would be a
  false in-batch negative); pairs are drawn by a generator seeded with ``seed``, torch is seeded with it too, so the
  same seed, data and thread count give the same weights;
* bounded by ``steps`` and ``max_minutes``; a progress bar; AdamW with linear warm-up and decay.

The output directory holds ``model.safetensors`` (the trained fp32 weights under the checkpoint's names),
``config.json``, the tokenizer and sentence-transformers files of the source model, ``medquant_finetune.json`` (the
configuration, the data's manifest hash and split, the loss per step, wall time) and, after quantization-aware
training, ``quant_params/``: the parameters to quantize it with (activation grids as trained, weight scales of the
trained weights), so ``Encoder.from_pretrained(out).quantize(load_quant_params(out / "quant_params"))`` gives the
model training simulated. Needs the ``[finetune]`` extra (torch, transformers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .._progress import tqdm
from ..model import limits
from ..model.checkpoint import file_digest, resolve_model_path
from ..model.sentence import copy_sentence_files, read_sentence_config
from ..model.storage import swap_into_place
from ..quant.params import QuantParams
from .export import EXPORT_FORMAT, MANIFEST

TRAINING_RECORD = "medquant_finetune.json"
DISTILL_LOSSES = ("margin", "embedding", "scores")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class FinetuneConfig:
    """How :func:`finetune` trains (see the module docstring).

    steps: optimizer steps (at most); max_minutes: stop earlier when this much wall time has passed (None: no limit).
    batch_size: pairs per step; negatives_per_pair: exported hard negatives used per pair (0: in-batch only).
    max_seq_length: token truncation in training. lr, warmup_fraction, weight_decay: AdamW with linear warm-up
    over that fraction of ``steps``, then linear decay. scale: the MultipleNegativesRankingLoss scale (1 /
    temperature). distill_weight: weight of the distillation term (0: none); distill_from: "export" (the exported
    teacher's margins) or "source" (the source model's, by a frozen fp32 copy); distill_loss: "margin" (MarginMSE)
    or "embedding" (cosine distance to the source model's embeddings) or "scores" (in-batch margins, the source
    model's; these two with ``distill_from="source"`` only).
    contrastive_weight: weight of the in-batch / hard-negative cross-entropy (0: distillation only). dropout: the
    model's dropout during training (False: eval mode). use_weights: weight queries by the export's ``weight``
    column. quantization_aware: train through the C core's quantization (needs parameters).
    weight_scales: "current" or "given" (see :func:`medquant.finetune.fakequant.wrap`). seed; threads: torch threads
    (default: ``$MEDQUANT_NUM_THREADS`` or every CPU this process may use).
    """

    steps: int = 150
    max_minutes: Optional[float] = None
    batch_size: int = 32
    negatives_per_pair: int = 1
    max_seq_length: int = 128
    lr: float = 2e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0
    distill_weight: float = 0.0
    distill_from: str = "export"
    distill_loss: str = "margin"
    contrastive_weight: float = 1.0
    dropout: bool = True
    use_weights: bool = True
    quantization_aware: bool = False
    weight_scales: str = "current"
    seed: int = 13
    threads: Optional[int] = None

    def __post_init__(self):
        self.steps = limits.positive_int(self.steps, "steps")
        if self.max_minutes is not None:
            self.max_minutes = limits.finite_float(self.max_minutes, "max_minutes", 0.0, 1e6, low_open=True)
        self.batch_size = limits.positive_int(self.batch_size, "batch_size")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (in-batch negatives)")
        if (isinstance(self.negatives_per_pair, bool) or not isinstance(self.negatives_per_pair, (int, np.integer))
                or self.negatives_per_pair < 0):
            raise ValueError(f"negatives_per_pair must be an int >= 0, got {self.negatives_per_pair!r}")
        self.max_seq_length = limits.positive_int(self.max_seq_length, "max_seq_length")
        self.lr = limits.finite_float(self.lr, "lr", 0.0, 1.0, low_open=True)
        self.warmup_fraction = limits.finite_float(self.warmup_fraction, "warmup_fraction", 0.0, 1.0)
        self.weight_decay = limits.finite_float(self.weight_decay, "weight_decay", 0.0, 1.0)
        self.scale = limits.finite_float(self.scale, "scale", 0.0, 1e4, low_open=True)
        self.distill_weight = limits.finite_float(self.distill_weight, "distill_weight", 0.0, 1e6)
        if self.distill_from not in ("export", "source"):
            raise ValueError(f"distill_from must be 'export' or 'source', got {self.distill_from!r}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(map(repr, DISTILL_LOSSES))}, "
                             f"got {self.distill_loss!r}")
        if self.distill_loss != "margin" and self.distill_from != "source":
            raise ValueError(f"distill_loss={self.distill_loss!r} needs the teacher's embeddings: "
                             "distill_from='source'")
        self.contrastive_weight = limits.finite_float(self.contrastive_weight, "contrastive_weight", 0.0, 1e6)
        if self.contrastive_weight == 0 and (self.distill_weight == 0 or (self.distill_loss == "margin"
                                                                         and self.negatives_per_pair == 0)):
            raise ValueError("contrastive_weight is 0 and there is no distillation term (distill_weight 0, or margins "
                             "without hard negatives): nothing to train")
        self.use_weights = limits.flag(self.use_weights, "use_weights")
        self.dropout = limits.flag(self.dropout, "dropout")
        self.quantization_aware = limits.flag(self.quantization_aware, "quantization_aware")
        if self.weight_scales not in ("current", "given"):
            raise ValueError(f"weight_scales must be 'current' or 'given', got {self.weight_scales!r}")
        self.seed = limits.seed(self.seed)
        self.threads = limits.threads(self.threads)


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` wrote and measured: the model directory, the loss per step, steps done, seconds, and
    the quantization parameters training simulated (quantization-aware training only)."""

    directory: Path
    losses: List[float]
    steps: int
    seconds: float
    quant_params: Optional[QuantParams] = None

    def __repr__(self) -> str:
        last = f"{self.losses[-1]:.4f}" if self.losses else "n/a"
        return f"FinetuneResult({str(self.directory)!r}, steps={self.steps}, last loss={last}, {self.seconds:.0f} s)"


# ---------------------------------------------------------------------------------------------------- data
def _read(d: Path, name: str) -> pd.DataFrame:
    if (d / f"{name}.parquet").is_file():
        return pd.read_parquet(d / f"{name}.parquet")
    if (d / f"{name}.jsonl").is_file():
        return pd.read_json(d / f"{name}.jsonl", lines=True, dtype=False)
    raise FileNotFoundError(f"{d} has no {name}.parquet or {name}.jsonl: not a medquant training export")


@dataclasses.dataclass
class _Pair:
    query: str
    positive: str
    negatives: List[str]
    margins: List[float]
    weight: float


def load_pairs(data_dir: Union[str, os.PathLike]) -> Tuple[List[_Pair], Dict[str, Any]]:
    """The training pairs of an export with their hard negatives (best-ranked first), teacher margins and query
    weights, and the export's manifest."""
    d = Path(data_dir).expanduser()
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{d / MANIFEST} cannot be read ({e}): not a medquant training export") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{d} is not a medquant training export (format {EXPORT_FORMAT!r})")
    pairs = _read(d, "pairs")
    scored, meta, queries = _read(d, "scored"), _read(d, "triplets_meta"), _read(d, "queries")
    if len(scored) != len(meta):
        raise ValueError(f"{d}: scored and triplets_meta must have the same rows")
    weight = dict(zip(queries["query_id"], queries["weight"])) if "weight" in queries else {}
    qtext = dict(zip(queries["query_id"], queries["query"]))
    negs: Dict[Tuple[str, str], List[Tuple[str, float]]] = {}
    for m_q, m_p, neg, score in zip(meta["query_id"], meta["positive_id"], scored["negative"], scored["score"]):
        negs.setdefault((qtext[m_q], str(m_p)), []).append((neg, float(score)))
    # the pairs file has texts only; positive ids come from the meta rows (pairs without negatives have none)
    pos_id: Dict[Tuple[str, str], str] = {}
    for m_q, m_p, pos in zip(meta["query_id"], meta["positive_id"], scored["positive"]):
        pos_id.setdefault((qtext[m_q], pos), str(m_p))
    qid_of = {t: q for q, t in qtext.items()}
    out = []
    for a, p in zip(pairs["anchor"], pairs["positive"]):
        key = (a, pos_id.get((a, p), ""))
        n = negs.get(key, [])
        out.append(_Pair(a, p, [x for x, _ in n], [s for _, s in n], float(weight.get(qid_of.get(a), 1.0))))
    return out, manifest


def _batches(pairs: Sequence[_Pair], batch_size: int, rng: np.random.Generator):
    """Endless batches of pair indices: seeded epochs, no two pairs of a batch share a query or positive text (a
    pair that would is kept for a later batch of the epoch)."""
    while True:
        queue = [int(i) for i in rng.permutation(len(pairs))]
        yielded = 0
        while queue:
            batch, seen, skipped = [], set(), []
            for pos, i in enumerate(queue):
                texts = {pairs[i].query, pairs[i].positive}
                if texts & seen:
                    skipped.append(i)
                    continue
                batch.append(i)
                seen |= texts
                if len(batch) == batch_size:
                    skipped.extend(queue[pos + 1:])
                    break
            if len(batch) < 2:
                break
            yielded += 1
            yield batch
            queue = skipped
        if not yielded:
            raise ValueError("the training data cannot make a batch of two pairs with different query and answer "
                             "texts; export more queries")


# ---------------------------------------------------------------------------------------------------- model
def _pool(h, mask, mode: str):
    m = mask.unsqueeze(-1).to(h.dtype)
    if mode == "mean":
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return h.masked_fill(m == 0, -1e9).amax(1)
    if mode == "mean_sqrt_len_tokens":
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0).sqrt()
    raise ValueError(f"fine-tuning supports mean, cls, max and mean_sqrt_len_tokens pooling, not {mode!r}")


def _save(bert, src: Path, out: Path, record: Dict[str, Any], params: Optional[QuantParams]) -> None:
    from safetensors.torch import save_file

    from .fakequant import unwrap_state_dict

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.medquant-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous() for k, v in unwrap_state_dict(bert).items()
                 if not k.endswith("position_ids")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(src / "config.json", tmp / "config.json")
        for fn in TOKENIZER_FILES:
            if (src / fn).is_file():
                shutil.copyfile(src / fn, tmp / fn)
        copy_sentence_files(src, tmp, quantized=False)
        if params is not None:
            params.save(tmp / "quant_params")
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def trained_params(params: QuantParams, state: Dict[str, np.ndarray], weight_scales: str) -> QuantParams:
    """The parameters that quantize trained weights as training simulated them: activation grids and SmoothQuant
    factors as given; weight scales of the trained weights (``"current"``) or as given (``"given"``)."""
    from .._native import _core

    tensors = dict(params.tensors)
    if weight_scales == "current":
        for name, spec in params.sites.items():
            if spec["kind"] in ("fp32", "bf16"):
                continue
            if name.endswith(".qkv"):
                base = name[: -len(".qkv")]
                w = np.concatenate([state[f"{base}.{a}.weight"] for a in ("query", "key", "value")])
            else:
                w = state[name + ".weight"]
            mul = params.tensors.get(name + ".act_mul")
            if mul is not None:
                w = w / mul[None, :]
            w = np.ascontiguousarray(w, dtype=np.float32)
            if "group_size" in spec:
                tensors[name + ".weight_scale"] = _core.quantize_weight_s4(w, int(spec["group_size"]))[1]
            else:
                tensors[name + ".weight_scale"] = _core.quantize_weight_s8(w, bool(spec["w_per_channel"]))[1]
    return dataclasses.replace(params, tensors=tensors, source_weights={})


def _check_dirs(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve() or src.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"refusing to write the fine-tuned model over its source ({src})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / TRAINING_RECORD).is_file()
                                               and not overwrite)):
        raise FileExistsError(f"refusing to write the fine-tuned model to {out}: it exists and holds no earlier "
                              "fine-tuned model (pass overwrite=True to replace the directory and everything in it)")


def _simulated_params(cfg: FinetuneConfig, params: Optional[QuantParams], data_dir: Path) -> Optional[QuantParams]:
    """The parameters quantization-aware training simulates (given, else the export's), or None for plain
    training."""
    if not cfg.quantization_aware:
        return None
    if params is None:
        if not (data_dir / "quant_params").is_dir():
            raise ValueError("quantization-aware training needs quantization parameters: export with a student "
                             "(its quant_params/) or pass params=")
        params = QuantParams.load(data_dir / "quant_params")
    tied = [n for n in params.sites if n + ".weight" in params.tensors or n + ".bias" in params.tensors]
    if tied:
        raise ValueError(f"parameters with GPTQ codes or corrected biases ({tied[0]} ...) belong to the weights "
                         "they were made for; train with a scheme that rounds to nearest")
    return params


def _optimizer(bert, cfg: FinetuneConfig):
    """AdamW (no decay on biases and LayerNorms) with linear warm-up over ``warmup_fraction`` of the steps, then
    linear decay."""
    import torch

    named = list(bert.named_parameters())
    plain = [p for n, p in named if any(k in n for k in ("bias", "LayerNorm"))]
    decay = [p for n, p in named if not any(k in n for k in ("bias", "LayerNorm"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=cfg.lr)
    warm = max(1, int(round(cfg.warmup_fraction * cfg.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    return opt, sched


def _batch_loss(embed, batch: List[_Pair], cfg: FinetuneConfig, teacher_embed=None):
    """In-batch + hard-negative cross-entropy, weighted per query (times ``contrastive_weight``), plus the
    distillation term when ``distill_weight`` > 0: MarginMSE on the exported margins or ``teacher_embed``'s, or
    (``distill_loss="embedding"``) the cosine distance of every embedding of the batch to ``teacher_embed``'s, or
    (``"scores"``) the in-batch margins' squared error to ``teacher_embed``'s (module docstring)."""
    import torch

    negs, owner, margins = [], [], []
    for j, p in enumerate(batch):
        for n, m in list(zip(p.negatives, p.margins))[: cfg.negatives_per_pair]:
            negs.append(n)
            owner.append(j)
            margins.append(m)
    queries, candidates = [p.query for p in batch], [p.positive for p in batch] + negs
    q, cand = embed(queries), embed(candidates)
    loss = 0.0 * q.sum()  # zero, on the graph: a step without any term (no negatives for margins) changes nothing
    if cfg.contrastive_weight > 0:
        per_query = torch.nn.functional.cross_entropy(cfg.scale * q @ cand.T, torch.arange(len(batch)),
                                                      reduction="none")
        w = torch.tensor([p.weight if cfg.use_weights else 1.0 for p in batch], dtype=per_query.dtype)
        loss = loss + cfg.contrastive_weight * (per_query * w).sum() / w.sum()
    if cfg.distill_weight == 0 or (cfg.distill_loss == "margin" and not negs):
        return loss
    if teacher_embed is not None:
        with torch.no_grad():
            tq, tc = teacher_embed(queries), teacher_embed(candidates)
    if cfg.distill_loss == "embedding":
        # 1 - cos(student, teacher) per text (both unit length), on the loss's scale like MarginMSE below
        dist = 1.0 - torch.cat([(q * tq).sum(-1), (cand * tc).sum(-1)])
        return loss + cfg.distill_weight * cfg.scale * dist.mean()
    if cfg.distill_loss == "scores":
        s, t = q @ cand.T, tq @ tc.T
        err = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
        return loss + cfg.distill_weight * cfg.scale ** 2 * err.pow(2).mean()
    own = torch.tensor(owner)
    pos_s = (q * cand[: len(batch)]).sum(-1)[own]
    neg_s = (q[own] * cand[len(batch):]).sum(-1)
    if teacher_embed is not None:
        target = (tq * tc[: len(batch)]).sum(-1)[own] - (tq[own] * tc[len(batch):]).sum(-1)
    else:
        target = torch.tensor(margins, dtype=pos_s.dtype)
    # on the loss's scale (scale x cosine), so that distill_weight 1 weighs both terms alike
    return loss + cfg.distill_weight * torch.nn.functional.mse_loss(cfg.scale * (pos_s - neg_s), cfg.scale * target)


def _train(bert, tok, pooling: str, pairs: List[_Pair], cfg: FinetuneConfig, show_progress_bar,
           teacher=None) -> Tuple[List[float], float]:
    """The optimizer steps (``teacher``: a frozen model giving the distillation targets); returns the loss per step
    and the seconds they took."""
    import torch

    def embedder(model):
        def embed(texts: List[str]):
            b = tok(texts, padding=True, truncation=True, max_length=cfg.max_seq_length, return_tensors="pt")
            h = model(**b).last_hidden_state
            return torch.nn.functional.normalize(_pool(h, b["attention_mask"], pooling), dim=-1)
        return embed

    embed = embedder(bert)
    teacher_embed = embedder(teacher) if teacher is not None else None

    opt, sched = _optimizer(bert, cfg)
    batches = _batches(pairs, cfg.batch_size, np.random.default_rng(cfg.seed))
    losses: List[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="fine-tune" + (" (quantization-aware)" if cfg.quantization_aware else ""),
               disable=show_progress_bar is False)
    bert.train(cfg.dropout)  # without dropout: the model's own eval-mode forward, the one quantized afterwards
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and time.perf_counter() - t0 > 60.0 * cfg.max_minutes:
            break
        loss = _batch_loss(embed, [pairs[i] for i in next(batches)], cfg, teacher_embed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bert.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the loss became {losses[-1]} at step {step}; lower lr")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    bert.eval()
    return losses, time.perf_counter() - t0


def finetune(model: Union[str, os.PathLike], data_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
             config: Optional[FinetuneConfig] = None, params: Optional[QuantParams] = None,
             overwrite: bool = False, show_progress_bar: Optional[bool] = None) -> FinetuneResult:
    """Fine-tune ``model`` (an fp32 model name or directory) on the export in ``data_dir``; write the trained model
    to ``out``: a new or empty directory or an earlier fine-tuned model, replaced (anything else only with
    ``overwrite``); the directory is written beside ``out`` and renamed into place. Quantization-aware training
    simulates ``params`` (default: the export's ``quant_params/``). Returns a :class:`FinetuneResult`; see the
    module docstring."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ImportError("fine-tuning needs torch and transformers: pip install 'medquant[finetune]'") from None
    from .fakequant import unwrap_state_dict, wrap

    cfg = config if config is not None else FinetuneConfig()
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError("config must be a medquant.finetune.FinetuneConfig")
    src, out, data_dir = resolve_model_path(model), Path(out).expanduser(), Path(data_dir).expanduser()
    _check_dirs(src, out, overwrite)
    pairs, manifest = load_pairs(data_dir)
    params = _simulated_params(cfg, params, data_dir)

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    bert = transformers.BertModel.from_pretrained(str(src), add_pooling_layer=False)
    teacher = None
    if cfg.distill_weight > 0 and cfg.distill_from == "source":
        teacher = transformers.BertModel.from_pretrained(str(src), add_pooling_layer=False).eval()
        teacher.requires_grad_(False)
    if params is not None:
        wrap(bert, params, weight_scales=cfg.weight_scales)
    losses, seconds = _train(bert, tok, read_sentence_config(src).pooling, pairs, cfg, show_progress_bar, teacher)
    learned = None
    if params is not None:
        state = {k: v.detach().numpy() for k, v in unwrap_state_dict(bert).items()}
        learned = trained_params(params, state, cfg.weight_scales)
    record = {
        "format": "medquant-finetune-v1", "source_model": str(model), "config": dataclasses.asdict(cfg),
        "data": {"dataset": manifest.get("dataset"), "holdout": manifest.get("holdout"),
                 "exclude_sources": manifest.get("exclude_sources"), "student": manifest.get("student"),
                 "export_sha256": file_digest(data_dir / MANIFEST)},
        "steps": len(losses), "seconds": round(seconds, 1), "losses": [round(x, 6) for x in losses],
        "quantization": params.scheme.name if params is not None else None,
    }
    _save(bert, src, out, record, learned)
    return FinetuneResult(directory=out, losses=losses, steps=len(losses), seconds=seconds, quant_params=learned)


__all__ = ["FinetuneConfig", "FinetuneResult", "TRAINING_RECORD", "finetune", "load_pairs", "trained_params"]
