"""The whole loop, measured: quantize, export training data, fine-tune (plain and quantization-aware), re-import,
re-quantize, evaluate, and one before/after table with paired confidence intervals.

:func:`recovery_study` runs, for one fp32 model and one or more schemes:

1. the student ``fp32.quantize(scheme)``, calibrated on texts of the training split (never of the evaluated split);
2. the training data (:func:`medquant.finetune.export_training_data`: MedQuAD dev, ``test`` held out, optionally
   sources excluded entirely), with the first scheme's student flagging where quantization hurts;
3. plain fine-tuning (``finetune_config``) and, per scheme, quantization-aware fine-tuning (``qat_config`` with
   ``quantization_aware=True``). ``qat_start="finetuned"`` (default) continues from the plain fine-tuned model for
   a short phase, simulating that scheme's parameters calibrated on the fine-tuned model and distilling from the
   fine-tuned fp32 model itself: the usual recipe, and cheap (:func:`default_qat_config`: a quarter of the plain
   run's steps, another seed, the fine-tuned fp32 model's embeddings as the only target); ``qat_start="original"``
   trains the original model quantization-aware from the start, simulating the original student's parameters;
4. evaluation on the held-out collection of: fp32, each scheme (post-training), fine-tuned fp32, fine-tuned + each
   scheme (post-training, recalibrated on the same training-split texts), and quantization-aware fine-tuned +
   each scheme (quantized with the parameters training simulated).

The table has one row per system with nDCG@10 (and MRR@10, R@100), its paired difference to fp32 and to the
fine-tuned fp32 model with their confidence intervals (:func:`medquant.eval.stats.paired_comparison`), the fraction
of the post-training gap that quantization-aware training closed, and, with excluded sources, the same on the
queries of those sources (never trained on). Every step writes into ``work_dir`` and is reused when its output is
already there (``reuse=True``), so a long run can be resumed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..eval.calibration_data import CalibrationSource, held_out_texts
from ..eval.datasets import RetrievalDataset, medquad_retrieval
from ..eval.stats import paired_comparison
from ..model import limits
from ..quant.params import QuantParams
from ..quant.schemes import get_scheme
from .export import MANIFEST, ExportConfig, medquad_training_data
from .train import TRAINING_RECORD, FinetuneConfig, finetune

METRICS = ("nDCG@10", "MRR@10", "R@100")


def _trained(directory: Path, reuse: bool, source: Union[str, Path], config: FinetuneConfig) -> bool:
    """A finished training run in ``directory`` from the same source model with the same configuration."""
    rec = directory / TRAINING_RECORD
    if not (reuse and rec.is_file() and (directory / "model.safetensors").is_file()):
        return False
    record = json.loads(rec.read_text(encoding="utf-8"))
    try:  # a record from before a field existed holds that field's default
        stored = dataclasses.asdict(FinetuneConfig(**record.get("config", {})))
    except (TypeError, ValueError):
        return False
    return record.get("source_model") == str(source) and stored == dataclasses.asdict(config)


QAT_LR = 1e-4
QAT_STARTS = ("finetuned", "original")


def _check_qat_start(qat_start: str) -> None:
    if qat_start not in QAT_STARTS:
        raise ValueError(f"qat_start must be one of {', '.join(map(repr, QAT_STARTS))}, got {qat_start!r}")


def default_qat_config(ft_cfg: FinetuneConfig, qat_start: str = "finetuned") -> FinetuneConfig:
    """The quantization-aware configuration :func:`recovery_study` derives from the plain one: from the original
    model the same run quantization-aware; from the fine-tuned model a quarter of its steps, seed + 1, and pure
    distillation: the cosine distance of the quantized model's embeddings to the fine-tuned fp32 model's
    (``distill_from="source"``, ``distill_loss="embedding"``, ``contrastive_weight=0``, weight as the plain
    run's distillation, else 1), on queries and positives only (``negatives_per_pair=0``), without dropout, at lr
    ``QAT_LR`` (measured on MedQuAD, benchmarks/recovery.py: the contrastive loss and dropout in this phase move
    the model away from the fine-tuned one it should reproduce, and cost more than the quantization does; the
    hard negatives cost a third of each step and did not help: from one fine-tuned model, nDCG@10 0.8947 on the
    benchmark's sample, per-tensor 0.8949 with and without them, int8-static-sym 0.8907 with, 0.8954 without;
    distilling the in-batch margins instead, ``distill_loss="scores"``, gave per-tensor 0.8889 against 0.8892 with
    the embedding distance, same fine-tuned model and seed)."""
    _check_qat_start(qat_start)
    if qat_start == "original":
        return dataclasses.replace(ft_cfg, quantization_aware=True)
    return dataclasses.replace(ft_cfg, quantization_aware=True, steps=max(1, ft_cfg.steps // 4),
                               seed=(ft_cfg.seed + 1) % 2**32, distill_from="source", distill_loss="embedding",
                               distill_weight=ft_cfg.distill_weight or 1.0, contrastive_weight=0.0, dropout=False,
                               negatives_per_pair=0, lr=QAT_LR)


def recovery_study(model: Union[str, Path], schemes: Sequence[Any], work_dir: Union[str, Path], *,
                   test: Optional[RetrievalDataset] = None, train_limit: Optional[int] = None,
                   exclude_sources: Sequence[str] = (), export_config: Optional[ExportConfig] = None,
                   finetune_config: Optional[FinetuneConfig] = None, qat_config: Optional[FinetuneConfig] = None,
                   qat_start: str = "finetuned", qat_seeds: Sequence[int] = (), calibration_size: int = 256,
                   max_length: Optional[int] = None, seed: int = 13, reuse: bool = True,
                   show_progress_bar: Optional[bool] = None) -> pd.DataFrame:
    """Run the loop (module docstring) and return the before/after table (also written to
    ``work_dir/recovery.csv`` with the evaluation's per-query metrics in ``work_dir/per_query.csv``).

    model: the fp32 model. schemes: preset names or QuantSchemes; the first one's student flags the training data.
    test: the evaluated collection (default: the whole MedQuAD test split); it must be the held-out split of the
    training export (MedQuAD test). train_limit: a seeded sample of the dev queries to train on (None: all).
    finetune_config / qat_config: of plain / quantization-aware training (qat_config defaults to finetune_config
    with ``quantization_aware=True``, and from the fine-tuned model a quarter of its steps, seed + 1 and
    distillation from the fine-tuned fp32 model).
    qat_start: "finetuned" or "original" (module docstring). qat_seeds: further seeds of the quantization-aware
    phase (each scheme trained once more per seed, into ``qat-<scheme>-seed<s>``, evaluated as
    ``QAT + <scheme> (seed <s>)``), and a row ``QAT + <scheme> (mean of <n> seeds)`` whose per-query metrics are
    the mean over the n runs (``qat_config``'s seed and these): the expected score of the recipe, so that its
    comparison to the post-training model is not one seed's luck. max_length: of every encoder (default: the
    model's).
    """
    from .. import evaluate
    from ..model.encoder import Encoder

    work = Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    schemes = [get_scheme(s) for s in schemes]
    if not schemes:
        raise ValueError("give at least one scheme")
    _check_qat_start(qat_start)
    ft_cfg = finetune_config or FinetuneConfig(seed=seed)
    qat_cfg = qat_config or default_qat_config(ft_cfg, qat_start)
    if ft_cfg.quantization_aware or not qat_cfg.quantization_aware:
        raise ValueError("finetune_config must be plain and qat_config quantization-aware")
    qat_seeds = _check_qat_seeds(qat_seeds, qat_cfg.seed)
    test = test if test is not None else medquad_retrieval("test", seed=13)
    fp32 = Encoder.from_pretrained(model, max_length=max_length)

    # calibration texts: the training split (dev), minus every text of the evaluated collection
    dev = medquad_retrieval("dev", seed=13)
    evaluated = list(test.queries.values()) + list(test.corpus.values())
    calib, _ = held_out_texts(CalibrationSource.from_dataset(dev, kind="split"), evaluated, calibration_size, seed)
    students = {s.name: fp32.quantize(s, calibration_texts=calib, show_progress_bar=show_progress_bar)
                for s in schemes}

    data = work / "data"
    if not (reuse and (data / MANIFEST).is_file()):
        medquad_training_data(fp32, data, student=students[schemes[0].name], limit=train_limit,
                              exclude_sources=exclude_sources, config=export_config or ExportConfig(seed=seed),
                              overwrite=True, show_progress_bar=show_progress_bar)
    manifest = json.loads((data / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("holdout") != "medquad-test" or not test.name.startswith("medquad-test"):
        raise ValueError("the study evaluates on MedQuAD test, the split its training data holds out")

    ft_dir = work / "finetuned"
    if not _trained(ft_dir, reuse, model, ft_cfg):
        finetune(model, data, ft_dir, config=ft_cfg, show_progress_bar=show_progress_bar)
    ft = Encoder.from_pretrained(ft_dir, max_length=max_length)
    systems: List[tuple] = [("fine-tuned fp32", ft)]
    seed_runs: Dict[str, List[str]] = {}
    for s in schemes:
        ft_q = ft.quantize(s, calibration_texts=calib, show_progress_bar=show_progress_bar)
        systems.append((s.name, students[s.name]))
        systems.append((f"fine-tuned + {s.name}", ft_q))
        start, start_q = (ft_dir, ft_q) if qat_start == "finetuned" else (model, students[s.name])
        runs = [(f"QAT + {s.name}", work / f"qat-{s.name}", qat_cfg)]
        runs += [(f"QAT + {s.name} (seed {q})", work / f"qat-{s.name}-seed{q}", dataclasses.replace(qat_cfg, seed=q))
                 for q in qat_seeds]
        for label, qdir, cfg in runs:
            if not _trained(qdir, reuse, start, cfg):
                finetune(start, data, qdir, config=cfg, params=start_q.quant_params(),
                         show_progress_bar=show_progress_bar)
            qat = Encoder.from_pretrained(qdir, max_length=max_length)
            systems.append((label, qat.quantize(QuantParams.load(qdir / "quant_params"))))
        if qat_seeds:
            seed_runs[s.name] = [label for label, _, _ in runs]

    df = evaluate(systems, test, model=fp32, index_kinds=(), show_progress_bar=show_progress_bar)
    pq = df.attrs["per_query"]
    table = _table(list(df["scheme"]), pq, [s.name for s in schemes], test, exclude_sources, seed_runs)
    table.to_csv(work / "recovery.csv")
    pd.concat({k: v for k, v in pq.items()}, names=["system", "qid"]).to_csv(work / "per_query.csv")
    return table


def _cmp(a: pd.Series, b: pd.Series) -> Dict[str, float]:
    c = paired_comparison(a, b)
    return {"delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high}


def _check_qat_seeds(qat_seeds: Sequence[int], qat_seed: int) -> List[int]:
    seeds = [limits.seed(q) for q in qat_seeds]
    if len(set(seeds)) != len(seeds) or qat_seed in seeds:
        raise ValueError(f"qat_seeds must be distinct and differ from the quantization-aware phase's own seed "
                         f"({qat_seed}), got {list(qat_seeds)}")
    return seeds


def seed_mean_label(scheme: str, n: int) -> str:
    return f"QAT + {scheme} (mean of {n} seeds)"


def _table(labels: List[str], pq: Dict[str, pd.DataFrame], schemes: List[str], test: RetrievalDataset,
           exclude_sources: Sequence[str], seed_runs: Optional[Dict[str, List[str]]] = None) -> pd.DataFrame:
    """The study's table from the per-query metrics ``pq`` of the evaluated systems ``labels``; ``seed_runs``:
    per scheme the labels of its quantization-aware runs, averaged per query into one more row (added to pq)."""
    m = "nDCG@10"
    seed_runs = seed_runs or {}
    rows = {}
    unseen = None
    if exclude_sources and test.metadata is not None:
        unseen = [q for q in test.metadata.index[test.metadata["source"].isin(list(exclude_sources))]]
    labels = list(labels)
    for s, runs in seed_runs.items():
        mean = seed_mean_label(s, len(runs))
        pq[mean] = sum(pq[r][list(METRICS)] for r in runs) / len(runs)
        labels.insert(labels.index(runs[-1]) + 1, mean)
    for label in labels:
        per = pq[label]
        row: Dict[str, Any] = {k: float(per[k].mean()) for k in METRICS if k in per}
        for ref, tag in (("fp32", "vs_fp32"), ("fine-tuned fp32", "vs_finetuned")):
            c = _cmp(pq[ref][m], per[m])
            row.update({f"{m}_{tag}": c["delta"], f"{tag}_ci_low": c["ci_low"], f"{tag}_ci_high": c["ci_high"]})
        if unseen:
            c = _cmp(pq["fp32"][m].loc[unseen], per[m].loc[unseen])
            row.update({f"{m}_unseen": float(per[m].loc[unseen].mean()), f"{m}_unseen_vs_fp32": c["delta"],
                        "unseen_ci_low": c["ci_low"], "unseen_ci_high": c["ci_high"]})
        rows[label] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "system"
    for s in schemes:  # the fraction of the post-training gap after fine-tuning that QAT closed
        ptq = f"fine-tuned + {s}"
        gap = table.loc["fine-tuned fp32", m] - table.loc[ptq, m]
        runs = seed_runs.get(s, [f"QAT + {s}"])
        for qat in runs + ([seed_mean_label(s, len(runs))] if s in seed_runs else []):
            table.loc[qat, "gap_closed"] = (table.loc[qat, m] - table.loc[ptq, m]) / gap if gap > 0 else np.nan
    table.attrs["n_queries"] = len(test.queries)
    table.attrs["unseen_queries"] = len(unseen) if unseen else 0
    return table


__all__ = ["METRICS", "QAT_LR", "QAT_STARTS", "default_qat_config", "recovery_study", "seed_mean_label"]
