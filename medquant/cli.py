"""The ``medquant`` command (also ``python -m medquant``).

    medquant compare --model all-MiniLM-L6-v2 --dataset medquad --schemes fp32,bf16,int8-dynamic --out results/
    medquant info
    medquant quantize --model all-MiniLM-L6-v2 --scheme int8-static-asym --out int8-model/
    medquant compare --model all-MiniLM-L6-v2 --system int8-model/ --out results-saved/
    medquant export --model all-MiniLM-L6-v2 --scheme int8-static-asym --out train-data/
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence

PRESET_HELP = "comma-separated preset names, or 'all'"
# The default run on MedQuAD: a seeded sample of the split, so that a first run gives a complete table in minutes
# (README, command 1). --full evaluates the whole split.
QUICK_LIMIT = 150
DEFAULT_SCHEMES = "fp32,bf16,int8-dynamic,int8-static-asym"
CALIBRATION_RULE = ("calibration texts never include evaluated texts: by default MedQuAD dev is calibrated on the "
                    "test split and test on dev; MedQuAD all and BEIR collections on the texts of the split outside "
                    "the evaluated --limit sample (none with the whole split: give --calibration-split or "
                    "--calibration-file)")
FILE_HELP = ("a file of calibration texts: one text per line, or JSONL (*.jsonl) with a 'text' field per line; "
             "texts that are also evaluated are dropped, then --calibration-size are sampled (--seed)")
FULL_STUDY = ("medquant compare --full --schemes all --index-kinds int8,binary --rescore-multiplier 4 "
              "--out results-full")


def _parser() -> argparse.ArgumentParser:
    from . import PRESETS, __version__
    from .model.checkpoint import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="medquant", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"medquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{compare,info,quantize,export}")
    sub.required = True
    presets = ", ".join(PRESETS)
    _compare_parser(sub, presets)

    i = sub.add_parser("info", help="print the runtime (oneDNN version, ISA, threads)")
    i.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize a model with a preset and save it with save_pretrained. Static "
                                   "schemes are calibrated on a seeded sample of queries and corpus texts of "
                                   "--calibration-split (MedQuAD default: test, because medquant compare evaluates "
                                   "dev by default; calibrate on dev a model you will evaluate on test) or on "
                                   "--calibration-file.")
    q.add_argument("--model", default=DEFAULT_MODEL, help="fp32 model name or directory")
    q.add_argument("--scheme", required=True, help=f"preset: {presets}")
    q.add_argument("--calibration-size", type=int, default=256, help="calibration texts (default 256)")
    q.add_argument("--dataset", default="medquad", help="calibration collection: 'medquad' or a BEIR directory")
    _calibration_flags(q, "split of --dataset to calibrate on (MedQuAD: dev, test (default) or all; BEIR: a qrels "
                          "split, required); --split is an alias")
    q.add_argument("--seed", type=int, default=13)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--out", required=True, help="output model directory (new, empty, or a previous medquant save)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds other files (everything in it is removed)")
    _export_parser(sub, presets)
    return p


def _export_parser(sub, presets: str) -> None:
    from .finetune.export import FORMATS, NEGATIVE_SOURCES, SAMPLINGS, ExportConfig
    from .model.checkpoint import DEFAULT_MODEL

    d = ExportConfig()
    e = sub.add_parser("export", help="write fine-tuning data: hard negatives, teacher scores, quantization losses",
                       description="Mine hard negatives for every (query, relevant document) pair of a training "
                                   "split with the fp32 --model (the teacher), score them with it, flag the queries a "
                                   "quantized student ranks worse, and write Parquet / JSONL files that datasets and "
                                   "sentence-transformers trainers load as they are, a dataset card and the "
                                   "student's quantization parameters (see medquant.finetune.export). MedQuAD: "
                                   "trains on dev and holds out test (no text of test is exported).")
    e.add_argument("--model", default=DEFAULT_MODEL, help="the fp32 teacher: model name or directory")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--scheme", default=None, help=f"quantize the teacher into the student with this preset ({presets}); "
                                                  "static schemes are calibrated on --calibration-size texts of the "
                                                  "training split")
    g.add_argument("--student", default=None, metavar="DIR", help="a saved quantized model as the student")
    e.add_argument("--dataset", default="medquad", help="'medquad' or a BEIR-layout directory")
    e.add_argument("--split", default=None, help="the training split (MedQuAD: dev, the default; BEIR: required)")
    e.add_argument("--holdout-split", default=None,
                   help="the split evaluation uses; none of its texts is exported (MedQuAD default: test; BEIR: "
                        "optional)")
    e.add_argument("--limit", type=int, default=None, help="a seeded sample of N training queries (corpus 4 x N)")
    e.add_argument("--exclude-source", action="append", default=[], metavar="SOURCE",
                   help="drop a source's queries and documents entirely (MedQuAD e.g. NIDDK); repeatable")
    e.add_argument("--num-negatives", type=int, default=d.num_negatives, help="per pair (default %(default)s)")
    e.add_argument("--range-min", type=int, default=d.range_min, help="best rank a negative may have, 0-based")
    e.add_argument("--range-max", type=int, default=d.range_max, help="candidates: the top N (default %(default)s)")
    e.add_argument("--margin", type=float, default=d.margin, help="absolute false-negative margin (default 0)")
    e.add_argument("--relative-margin", type=float, default=d.relative_margin,
                   help="relative false-negative margin, a fraction of the positive's score (default %(default)s)")
    e.add_argument("--duplicate-cosine", type=float, default=d.duplicate_cosine,
                   help="a candidate this close (teacher cosine) to a positive is a duplicate (default %(default)s)")
    e.add_argument("--sampling", choices=SAMPLINGS, default=d.sampling)
    e.add_argument("--negatives-from", choices=NEGATIVE_SOURCES, default=d.negatives_from)
    e.add_argument("--metric", default=d.metric, help="per-query metric that flags quantization losses")
    e.add_argument("--hurt-weight", type=float, default=d.hurt_weight, help="weight of a flagged query")
    e.add_argument("--teacher-embeddings", action="store_true", help="also write the teacher's embeddings")
    e.add_argument("--format", default=",".join(FORMATS), help="parquet and/or jsonl, comma-separated")
    e.add_argument("--calibration-size", type=int, default=256)
    e.add_argument("--seed", type=int, default=13, help="seed of sampling, --limit and calibration (default 13)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export)")
    e.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")


def _compare_parser(sub, presets: str) -> None:
    from .eval.retrieval import INDEX_SCORINGS
    from .eval.stats import DEFAULT_TEST, TESTS
    from .model.sentence import POOLING_MODES
    from .model.checkpoint import DEFAULT_MODEL

    c = sub.add_parser("compare", help="evaluate quantization schemes on a retrieval collection",
                       description="Encode a collection with fp32 and every scheme, compare retrieval quality with "
                                   "fp32 (one paired test gives each delta's CI and p-value, Holm-adjusted over the "
                                   "systems), measure throughput and bytes, and write results.csv, results.json, "
                                   "per_query.csv, TREC run files (runs/) and three PNG plots.")
    c.add_argument("--model", default=DEFAULT_MODEL,
                   help="the fp32 baseline: model name or directory (default %(default)s); a quantized save is "
                        "refused: compare it with --system")
    c.add_argument("--system", action="append", default=[], metavar="[LABEL=]DIR",
                   help="a saved model (e.g. from medquant quantize) evaluated as it is, against the fp32 --model; "
                        "repeatable; labelled LABEL, else <saved scheme>@<directory name>")
    c.add_argument("--dataset", default="medquad", help="'medquad' or a BEIR-layout directory (default %(default)s)")
    c.add_argument("--split", default=None,
                   help="MedQuAD: dev (default), test or all; BEIR: the qrels file (default test)")
    c.add_argument("--schemes", default=None,
                   help=f"{PRESET_HELP} (default {DEFAULT_SCHEMES}; with --system: fp32); presets: {presets}")
    c.add_argument("--limit", type=int, default=None,
                   help="keep N queries (seeded) and a corpus of corpus-factor * N documents (their relevant "
                        f"documents plus random distractors); default for MedQuAD: {QUICK_LIMIT}, a quick sample "
                        "(--full for the whole split); other collections are evaluated whole by default")
    c.add_argument("--full", action="store_true", help="MedQuAD: evaluate the whole split instead of the quick sample")
    c.add_argument("--corpus-factor", type=int, default=4, help="corpus size per query with --limit (default 4)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--max-length", type=int, default=None, help="token truncation (default: the model's)")
    c.add_argument("--threads", type=int, default=None, help="oneDNN threads (default: all available cores)")
    c.add_argument("--out", default="results", help="output directory (default %(default)s/)")
    c.add_argument("--seed", type=int, default=13,
                   help="seed of the --limit sample, the calibration sample and the resampling tests (default 13; "
                        "the MedQuAD dev/test document split is fixed)")
    c.add_argument("--calibration-size", type=int, default=256,
                   help="calibration texts for static schemes, half queries and half corpus texts (default 256); "
                        + CALIBRATION_RULE)
    _calibration_flags(c, "MedQuAD: dev, test or all; BEIR: a qrels split (its queries and the corpus), minus "
                          "the evaluated texts")
    c.add_argument("--test", choices=TESTS, default=DEFAULT_TEST,
                   help="paired test of every delta vs fp32; its CI and p-value come from the same test "
                        "(default %(default)s)")
    c.add_argument("--n-boot", type=int, default=2000,
                   help="resamples of --test bootstrap / randomization (default 2000)")
    c.add_argument("--pooling", choices=POOLING_MODES, default=None,
                   help="pooling of every model (default: each model's own, from its sentence-transformers files)")
    c.add_argument("--index-kinds", default="int8,binary",
                   help="quantized corpus indexes of the fp32 embeddings: int8, binary, comma-separated, or none")
    c.add_argument("--index-scoring", choices=INDEX_SCORINGS, default="codes",
                   help="score quantized queries against codes (default) or float queries against the "
                        "dequantized corpus")
    c.add_argument("--rescore-multiplier", type=int, default=4,
                   help="also rescore k * M index candidates with float vectors (0: no rescoring rows)")
    c.add_argument("--passages", action="store_true", help="split documents into passages, score by best passage")
    c.add_argument("--max-words", type=int, default=160, help="passage length in words (default 160)")
    c.add_argument("--stride", type=int, default=120, help="passage stride in words (default 120)")
    c.add_argument("--metric", default="nDCG@10", help="metric of the plots (default %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _calibration_flags(parser: argparse.ArgumentParser, split_help: str) -> None:
    g = parser.add_mutually_exclusive_group()
    names = ("--calibration-split", "--split") if parser.prog.endswith("quantize") else ("--calibration-split",)
    g.add_argument(*names, dest="calibration_split", default=None, help=split_help)
    g.add_argument("--calibration-file", default=None, metavar="PATH", help=FILE_HELP)


def _parse_schemes(parser: argparse.ArgumentParser, text: str) -> List[str]:
    from . import PRESETS

    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(PRESETS)
    if not names:
        parser.error("--schemes is empty")
    unknown = [s for s in names if s not in PRESETS]
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(unknown)}; presets: {', '.join(PRESETS)} (or 'all')")
    return list(dict.fromkeys(names))


def _is_medquad(dataset: str) -> bool:
    return dataset.lower() == "medquad"


def _load_dataset(parser: argparse.ArgumentParser, dataset: str, split: Optional[str], flag: str = "--split"):
    """MedQuAD (split default dev) or a BEIR directory (qrels split default test); bad input -> usage error."""
    from .eval.datasets import load_beir, medquad_retrieval

    if _is_medquad(dataset):
        split = split or "dev"
        if split not in ("dev", "test", "all"):
            parser.error(f"{flag} for medquad must be dev, test or all, not {split!r}")
        try:
            return medquad_retrieval(split)
        except FileNotFoundError as e:
            parser.error(str(e))
    path = Path(dataset)
    if not path.is_dir():
        parser.error(f"unknown dataset {dataset!r}: use 'medquad' or a BEIR-layout directory "
                     "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    try:
        return load_beir(path, split=split or "test")
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(f"cannot load BEIR dataset {path} ({flag} {split or 'test'}): {e}")


def _check_counts(parser: argparse.ArgumentParser, counts) -> None:
    """Options that count something (given as (flag, value); None: not given) must be positive ints."""
    from .model.limits import positive_int

    for name, value in counts:
        if value is not None:
            try:
                positive_int(value, name)
            except ValueError as e:
                parser.error(str(e))


def _check_seed_and_out(parser: argparse.ArgumentParser, args) -> None:
    """--seed must be a non-negative int (numpy's generators refuse others); --out must not be an existing file."""
    from .model.limits import seed

    try:
        seed(args.seed, "--seed")
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")


def _sample(ds, limit: int, corpus_factor: int, seed: int):
    """``limit`` queries (seeded) and a corpus of ``corpus_factor * limit`` documents, named after the sample."""
    name = ds.name
    ds = ds.sample(int(limit), seed=seed, corpus_size=int(corpus_factor) * int(limit))
    ds.name = f"{name}-limit{int(limit)}"
    return ds


def _fmt_table(df) -> str:
    import pandas as pd

    t = pd.DataFrame({"scheme": df["scheme"]})
    t["nDCG@10"] = df["nDCG@10"].map("{:.4f}".format) if "nDCG@10" in df else ""
    if "nDCG@10_delta" in df:
        t["nDCG@10_delta"] = df["nDCG@10_delta"].map("{:+.4f}".format)
        t["nDCG@10_ci"] = [f"[{a:+.4f}, {b:+.4f}]" for a, b in zip(df["nDCG@10_ci_low"], df["nDCG@10_ci_high"])]
        t["nDCG@10_p"] = df["nDCG@10_p"].map("{:.3g}".format)
        if "nDCG@10_p_holm" in df:
            t["p_holm"] = df["nDCG@10_p_holm"].map("{:.3g}".format)
    for m in ("MRR@10", "R@100", "overlap@10"):
        if m in df:
            t[m] = df[m].map("{:.4f}".format)
    t["texts/s"] = df["corpus_texts_per_s"].map("{:.1f}".format)
    t["model_MiB"] = (df["model_bytes"] / 2**20).map("{:.1f}".format)
    t["index_MiB"] = (df["index_bytes"] / 2**20).map("{:.2f}".format)
    return t.to_string(index=False)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def _save_plots(df, out: Path, metric: str) -> List[Path]:
    from matplotlib.figure import Figure

    from .eval.plots import plot_deltas, plot_quality_vs_size, plot_quality_vs_throughput

    paths = []
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    plot_quality_vs_throughput(df, metric=metric, ax=fig.add_subplot())
    paths.append(out / "quality_vs_throughput.png")
    fig.savefig(paths[-1], dpi=120)
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    plot_quality_vs_size(df, metric=metric, ax=axes, what="both")
    paths.append(out / "quality_vs_size.png")
    fig.savefig(paths[-1], dpi=120)
    if (df["scheme"] != "fp32").any():
        fig = Figure(figsize=(8, 0.4 * len(df) + 1.8), layout="constrained")
        plot_deltas(df, metric=metric, ax=fig.add_subplot())
        paths.append(out / "deltas.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def _save_runs(df, out: Path) -> List[Path]:
    """TREC run files of every system's ranked lists, ``out/runs/<system>.trec``; returns ``[out/runs]`` (nothing,
    with a warning, when an id holds whitespace and so cannot be a field of a run file)."""
    from .eval.evaluate import write_trec_runs

    try:
        write_trec_runs(df, out / "runs")
    except ValueError as e:
        print(f"warning: run files not written: {e}", file=sys.stderr)
        return []
    return [out / "runs"]


def _compare_config(parser, args):
    """The EvalConfig of the compare options (usage errors for bad values)."""
    from .eval.evaluate import EvalConfig
    from .eval.metrics import DEFAULT_KS, metric_columns
    from .eval.retrieval import INDEX_KINDS

    _check_counts(parser, (("--limit", args.limit), ("--batch-size", args.batch_size), ("--threads", args.threads),
                           ("--calibration-size", args.calibration_size), ("--n-boot", args.n_boot),
                           ("--corpus-factor", args.corpus_factor)))
    kinds = [] if args.index_kinds.strip().lower() in ("", "none") else \
        [s.strip() for s in args.index_kinds.split(",") if s.strip()]
    bad = [s for s in kinds if s not in INDEX_KINDS]
    if bad:
        parser.error(f"unknown index kind(s) {', '.join(bad)}; use {', '.join(INDEX_KINDS)} or none")
    if args.rescore_multiplier < 0:
        parser.error("--rescore-multiplier must be >= 0")
    if args.metric not in metric_columns(DEFAULT_KS):
        parser.error(f"--metric {args.metric!r} is not computed; e.g. nDCG@10, MRR@10, R@100")
    try:
        cfg = EvalConfig(batch_size=args.batch_size, max_length=args.max_length, calibration_size=args.calibration_size,
                         n_boot=args.n_boot, seed=args.seed, passages=args.passages, max_words=args.max_words,
                         stride=args.stride, index_kinds=tuple(kinds), index_scoring=args.index_scoring,
                         rescore_multiplier=args.rescore_multiplier or None, threads=args.threads,
                         test=args.test, pooling=args.pooling)
    except ValueError as e:
        parser.error(str(e))
    if args.metric not in cfg.main_metrics:
        cfg = EvalConfig(**{**cfg.to_dict(), "main_metrics": tuple(cfg.main_metrics) + (args.metric,)})
    return cfg


def _parse_systems(parser, specs: Sequence[str], schemes: Sequence[str]) -> List[tuple]:
    """(label or None, directory) per --system: DIR, or LABEL=DIR when the whole argument is not a directory."""
    out, labels = [], set(schemes) | {"fp32"}
    for spec in specs:
        label, path = (None, spec) if Path(spec).is_dir() or "=" not in spec else spec.split("=", 1)
        if not Path(path).is_dir():
            parser.error(f"--system {spec}: {path} is not a directory (use DIR or LABEL=DIR)")
        if label is not None:
            if not label.strip() or label in labels or label.startswith("fp32+"):
                parser.error(f"--system {spec}: label {label!r} is empty, reserved or used twice")
            labels.add(label)
        out.append((label, path))
    return out


def _load_models(parser, args, systems: Sequence[tuple]):
    """The fp32 baseline (--model; a quantized save is refused) and the --system encoders as (label, encoder):
    LABEL, else ``<saved scheme>@<directory name>`` (made unique)."""
    from . import Encoder
    from .eval.evaluate import encoder_label, unique_label
    from .model.limits import max_length

    def load(flag: str, path: str):
        try:
            enc = Encoder.from_pretrained(path, n_threads=args.threads)
        except ValueError as e:  # CheckpointError is a ValueError
            parser.error(f"{flag} {path}: {e}")
        if args.max_length is not None:  # the model's range, checked before any work is done
            try:
                max_length(args.max_length, enc.config.max_position_embeddings)
            except (TypeError, ValueError) as e:
                parser.error(f"--max-length: {e} ({flag} {path})")
        return enc

    baseline = load("--model", args.model)
    if not baseline.is_fp32:
        parser.error(f"--model {args.model} is a quantized model ({baseline.scheme.name}); --model is the fp32 "
                     f"baseline. Compare a saved model as a system: medquant compare --model <its fp32 model> "
                     f"--system {args.model}")
    encoders, taken = [], {label for label, _ in systems if label is not None} | {"fp32"}
    for label, path in systems:
        enc = load("--system", path)
        if enc.config != baseline.config:
            parser.error(f"--system {path} has another architecture than --model {args.model}: give its own fp32 "
                         "model as --model")
        if label is None:
            label = unique_label(encoder_label(enc), taken)
            taken.add(label)
        encoders.append((label, enc))
    return baseline, encoders


def _calibration_source(parser, args, full_ds):
    """Where compare draws calibration texts: --calibration-file, --calibration-split, else None for MedQuAD
    dev/test (evaluate's default: the other split) and the loaded split's texts outside the sample otherwise."""
    from .eval.calibration_data import CalibrationSource

    if args.calibration_file:
        try:
            return CalibrationSource.from_file(args.calibration_file)
        except (OSError, ValueError) as e:
            parser.error(f"--calibration-file: {e}")
    if args.calibration_split:
        cal = _load_dataset(parser, args.dataset, args.calibration_split, "--calibration-split")
        return CalibrationSource.from_dataset(cal, kind="split")
    if _is_medquad(args.dataset) and (args.split or "dev") in ("dev", "test"):
        return None
    return CalibrationSource.from_dataset(full_ds, kind="held-out")


def _run_evaluate(parser, args, schemes, ds, baseline, systems, cfg, source):
    """evaluate(), with the throughput warnings printed as plain lines and calibration problems as usage errors."""
    import warnings

    from .eval.calibration_data import CalibrationSourceError
    from .eval.evaluate import evaluate
    from .eval.runinfo import ThroughputWarning, describe_warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ThroughputWarning)
            df = evaluate(list(schemes) + list(systems), ds, model=baseline, config=cfg, calibration_source=source,
                          show_progress_bar=not args.no_progress)
    except CalibrationSourceError as e:
        parser.error(f"{e} (--calibration-split, --calibration-file)")
    if df.attrs["run"]["throughput_warnings"]:
        print(f"warning: {describe_warnings(df.attrs['run']['throughput_warnings'])}", file=sys.stderr)
    return df


def _compare(parser, args) -> int:
    import pandas as pd

    from . import runtime_info
    from .eval.evaluate import per_query_table

    schemes = _parse_schemes(parser, args.schemes or ("fp32" if args.system else DEFAULT_SCHEMES))
    cfg = _compare_config(parser, args)
    _check_seed_and_out(parser, args)
    system_dirs = _parse_systems(parser, args.system, schemes)
    quick = args.limit is None and not args.full and _is_medquad(args.dataset)
    if args.full and args.limit is not None:
        parser.error("--full and --limit exclude each other")
    baseline, systems = _load_models(parser, args, system_dirs)
    full_ds = _load_dataset(parser, args.dataset, args.split)
    limit = QUICK_LIMIT if quick else args.limit
    ds = full_ds if limit is None else _sample(full_ds, limit, args.corpus_factor, args.seed)
    if not ds.corpus or not any(len(j) for q, j in ds.qrels.items() if q in ds.queries):
        parser.error(f"dataset {ds.name} has an empty corpus or no judged queries")
    source = _calibration_source(parser, args, full_ds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"medquant compare: {args.model} on {ds.name} ({len(ds.queries)} queries, {len(ds.corpus)} docs), "
          f"schemes {','.join(schemes)}" + "".join(f", system {p}" for _, p in system_dirs), file=sys.stderr,
          flush=True)
    df = _run_evaluate(parser, args, schemes, ds, baseline, systems, cfg, source)

    with pd.option_context("display.width", 200):
        print(_fmt_table(df))
    for embedding, rows in df.groupby("embedding", sort=False)["scheme"]:
        which = "every system" if len(rows) == len(df) else ", ".join(rows)
        print(f"embeddings ({which}): {embedding}")
    df.to_csv(out / "results.csv", index=False)
    per_query_table(df).to_csv(out / "per_query.csv", index=False)
    payload = {
        "command": "medquant compare",
        "argv": vars(args),
        "model": args.model,
        "systems": [{"label": label, "directory": str(Path(path).resolve()), "scheme": enc.scheme.name}
                    for (label, enc), (_, path) in zip(systems, system_dirs)],
        "dataset": df.attrs["dataset"],
        "schemes": schemes,
        "config": df.attrs["config"],
        "calibration": df.attrs["calibration"],
        "run": df.attrs["run"],
        "runtime_info": runtime_info(),
        "results": df.to_dict(orient="records"),
    }
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe(payload), f, indent=2, allow_nan=False)
    plots = _save_plots(df, out, args.metric) + _save_runs(df, out)
    written = [out / "results.csv", out / "results.json", out / "per_query.csv", *plots]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if quick:
        print(f"\nThis was the quick sample: {len(ds.queries)} of {len(full_ds.queries)} {full_ds.name} queries "
              f"(seed {args.seed}) against {len(ds.corpus)} of {len(full_ds.corpus)} answers (their relevant answers "
              f"plus random distractors), so the intervals are wide and scores are higher than on the whole split.\n"
              f"The full study (every scheme, the whole split, quantized indexes): {FULL_STUDY}")
    return 0


def _info(args) -> int:
    from . import runtime_info

    info = runtime_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _quantize_calibration(parser, args) -> List[str]:
    """quantize's calibration texts: --calibration-file, else a seeded sample of --calibration-split (MedQuAD
    default test, the split compare does not evaluate by default; BEIR: required)."""
    from .eval.calibration_data import CalibrationSource, held_out_texts

    if args.calibration_file:
        try:
            source = CalibrationSource.from_file(args.calibration_file)
        except (OSError, ValueError) as e:
            parser.error(f"--calibration-file: {e}")
    else:
        if not _is_medquad(args.dataset) and not args.calibration_split:
            parser.error(f"--dataset {args.dataset}: name the qrels split to calibrate on (--calibration-split, one "
                         "you will not evaluate on) or give --calibration-file")
        split = args.calibration_split or "test"
        source = CalibrationSource.from_dataset(_load_dataset(parser, args.dataset, split, "--calibration-split"),
                                                kind="split")
    texts, info = held_out_texts(source, (), args.calibration_size, args.seed)
    print(f"calibrating on {len(texts)} texts from {info['source']} ({info['n_from_queries']} queries, "
          f"{info['n_from_documents']} documents; seed {args.seed}; sha256 {info['sha256'][:12]})", file=sys.stderr)
    if _is_medquad(args.dataset) and not args.calibration_file:
        evaluate_on = "dev" if split == "test" else "test" if split == "dev" else None
        print(f"evaluate this model on medquad-{evaluate_on} (texts disjoint from its calibration)" if evaluate_on
              else "this model was calibrated on texts of every MedQuAD split", file=sys.stderr)
    return texts


def _quantize(parser, args) -> int:
    from . import Encoder, PRESETS
    from .model.checkpoint import CheckpointError

    if args.scheme not in PRESETS:
        parser.error(f"unknown scheme {args.scheme!r}; presets: {', '.join(PRESETS)}")
    _check_counts(parser, (("--calibration-size", args.calibration_size), ("--batch-size", args.batch_size),
                           ("--threads", args.threads)))
    _check_seed_and_out(parser, args)
    scheme = PRESETS[args.scheme]
    try:
        enc = Encoder.from_pretrained(args.model, n_threads=args.threads)
    except CheckpointError as e:
        parser.error(str(e))
    calib = _quantize_calibration(parser, args) if scheme.needs_calibration else None
    try:
        q = enc.quantize(scheme, calibration_texts=calib, batch_size=args.batch_size, show_progress_bar=True)
    except ValueError as e:  # e.g. --model is already a quantized directory
        parser.error(str(e))
    try:
        out = q.save_pretrained(args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as e:  # --out holds other files, or is the model's own directory
        parser.error(str(e))
    size = (Path(out) / "model.safetensors").stat().st_size
    print(f"saved {args.scheme} {args.model} to {out} (model.safetensors {size / 2**20:.1f} MiB, "
          f"{q.size_bytes() / 2**20:.1f} MiB in memory)")
    return 0


def _export(parser, args) -> int:
    from . import Encoder, PRESETS
    from .eval.calibration_data import CalibrationSource, held_out_texts
    from .finetune.export import MEDQUAD_CITATION, MEDQUAD_LICENSE, ExportConfig, export_training_data
    from .model.checkpoint import CheckpointError

    _check_counts(parser, (("--calibration-size", args.calibration_size), ("--batch-size", args.batch_size),
                           ("--threads", args.threads), ("--limit", args.limit), ("--max-length", args.max_length)))
    _check_seed_and_out(parser, args)
    if args.scheme is not None and args.scheme not in PRESETS:
        parser.error(f"unknown scheme {args.scheme!r}; presets: {', '.join(PRESETS)}")
    try:
        cfg = ExportConfig(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                           margin=args.margin, relative_margin=args.relative_margin,
                           duplicate_cosine=args.duplicate_cosine, sampling=args.sampling,
                           negatives_from=args.negatives_from, metric=args.metric, hurt_weight=args.hurt_weight,
                           teacher_embeddings=args.teacher_embeddings, seed=args.seed, batch_size=args.batch_size,
                           max_length=args.max_length, formats=tuple(f for f in args.format.split(",") if f))
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    medquad = _is_medquad(args.dataset)
    if not medquad and not args.split:
        parser.error(f"--dataset {args.dataset}: name the training split (--split)")
    train = _load_dataset(parser, args.dataset, args.split or "dev", "--split")
    holdout_split = args.holdout_split or ("test" if medquad else None)
    if holdout_split == (args.split or ("dev" if medquad else None)):
        parser.error("--holdout-split must differ from the training --split")
    holdout = _load_dataset(parser, args.dataset, holdout_split, "--holdout-split") if holdout_split else None
    if args.limit:
        train = _sample(train, args.limit, 4, args.seed)
    try:
        teacher = Encoder.from_pretrained(args.model, n_threads=args.threads, max_length=args.max_length)
        student = (Encoder.from_pretrained(args.student, n_threads=args.threads, max_length=args.max_length)
                   if args.student else None)
    except (CheckpointError, ValueError) as e:
        parser.error(str(e))
    if args.scheme is not None:
        scheme = PRESETS[args.scheme]
        calib = None
        if scheme.needs_calibration:
            source = CalibrationSource.from_dataset(train, kind="split")
            calib, info = held_out_texts(source, list(holdout.queries.values()) + list(holdout.corpus.values())
                                         if holdout else (), args.calibration_size, args.seed)
            print(f"calibrating {args.scheme} on {len(calib)} texts of {info['source']} (seed {args.seed})",
                  file=sys.stderr)
        student = teacher.quantize(scheme, calibration_texts=calib, batch_size=args.batch_size,
                                   show_progress_bar=True)
    try:
        ex = export_training_data(teacher, train, args.out, student=student, holdout=holdout,
                                  exclude_sources=args.exclude_source, config=cfg,
                                  license=MEDQUAD_LICENSE if medquad else None,
                                  citation=MEDQUAD_CITATION if medquad else None, overwrite=args.overwrite,
                                  show_progress_bar=True)
    except (OSError, ValueError, ImportError) as e:
        parser.error(str(e))
    c = ex.counts
    print(f"exported {c['pairs']} pairs and {c['triplets']} triplets of {c['queries']} queries from {train.name} "
          f"to {ex.directory}" + (f"; the student ranks {c['queries_hurt']} queries worse ({cfg.metric})"
                                  if "queries_hurt" in c else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``medquant`` command line; returns the exit code (argument errors exit with 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(_sub(parser, "compare"), args)
    if args.command == "info":
        return _info(args)
    if args.command == "quantize":
        return _quantize(_sub(parser, "quantize"), args)
    if args.command == "export":
        return _export(_sub(parser, "export"), args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand's parser (its error() prints that subcommand's usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
