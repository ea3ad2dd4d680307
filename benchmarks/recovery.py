"""Winning back what quantization costs, measured end to end on MedQuAD (issue: fine-tuning recovery).

    python benchmarks/recovery.py [--out benchmarks/results] [--work /tmp/medquant-recovery] [--quick]

One run of :func:`medquant.finetune.study.recovery_study`:

* model: the packaged all-MiniLM-L6-v2 (fp32 teacher);
* schemes: int8-static-asym (the recommended int8 scheme; its student flags the training data), int8-static-sym,
  int8-static-per-tensor, w4-weight-only (the lossy ones), each calibrated on 256 MedQuAD dev texts;
* training data: MedQuAD dev (document-disjoint from test; every text that is also a test query or answer dropped),
  with one source held out entirely (``--exclude-source``, default NIDDK) to measure generalisation on it; 4 hard
  negatives per pair from the teacher's top 30, false negatives skipped (see medquant.finetune.export);
* training: ``--steps`` steps of 32 pairs, 1 hard negative each, 128 tokens, lr 3e-5, quantization-affected
  queries weighted 2, no distillation (``--distill``: MarginMSE from the export's teacher, i.e. the original model,
  which anchors the student to where it started: weight 1 measured 0.876 nDCG@10 against 0.930 without, on 500
  test queries x 1,500 answers); then per scheme a quantization-aware phase of ``--qat-steps`` (default a quarter of
  ``--steps``) continuing from the fine-tuned model (``--qat-start finetuned``, the usual recipe), simulating that
  scheme calibrated on the fine-tuned model, another seed, trained only to reproduce the fine-tuned fp32 model's
  embeddings (cosine distance, weight ``--qat-distill``) on queries and positives (no hard negatives), without
  dropout, lr 1e-4 (``medquant.finetune.study.default_qat_config``); ``--qat-start original`` trains the original model
  quantization-aware for ``--steps`` instead (five full training runs: far over the time budget on 2 cores);
* evaluation: a seeded sample of ``--test-queries`` MedQuAD test queries against ``--corpus-size`` answers of the
  test corpus (every answer judged relevant for a sampled query, plus seeded distractors; 0: all 7,962 answers:
  each evaluated system then encodes twice as many texts), ``--max-length`` tokens; nDCG@10 with paired t-test
  intervals against fp32 and against the fine-tuned fp32 model, and the same on the held-out source's test queries.

Targets (issue): the recommended int8 scheme after the loop >= 0.83 nDCG@10 (original fp32 0.697 on the issue's
sample); QAT int8 within 0.1 points of the fine-tuned fp32 model; for each lossy scheme QAT closes >= 75% of the
post-training gap; no loss on the held-out source; the whole run within 60 minutes on 2 cores.

Seeds: ``--qat-seeds 15,16`` trains each scheme's quantization-aware phase once more per seed and adds a row per
run and one with the per-query mean over the runs (the recipe's expected score: one seed's difference to the
post-training model is within the run-to-run spread).

Results: OUT/<machine>/recovery[-quick|-whole-corpus][-seeds].{csv,json,md} (-whole-corpus: ``--corpus-size 0``;
-seeds: ``--qat-seeds``); the trained models and the exported data stay in --work (a rerun reuses them: delete
--work to start over).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import THREADS, machine_info  # noqa: E402

import medquant  # noqa: E402
from medquant.eval.datasets import medquad_retrieval  # noqa: E402
from medquant.eval.runinfo import ThroughputWarning  # noqa: E402
from medquant.finetune import ExportConfig, FinetuneConfig  # noqa: E402
from medquant.finetune.study import QAT_STARTS, default_qat_config, recovery_study  # noqa: E402

DISTILL = 0.0
CORPUS_SIZE = 4000
SCHEMES = ["int8-static-asym", "int8-static-sym", "int8-static-per-tensor", "w4-weight-only"]


def md_table(df) -> list:
    """A markdown table of a frame (index first), numbers to 4 decimals."""
    cols = [df.index.name or ""] + list(df.columns)
    rows = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for idx, r in df.iterrows():
        cells = [f"{v:+.4f}" if isinstance(v, float) and ("vs" in c or "ci" in c) else
                 f"{v:.4f}" if isinstance(v, float) else str(v) for c, v in r.items()]
        rows.append("| " + " | ".join([str(idx)] + [c.replace("nan", "") for c in cells]) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results go to OUT/<machine>/")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medquant-recovery"), help="data and trained models")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--test-queries", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--qat-steps", type=int, default=None, help="default: a quarter of --steps")
    ap.add_argument("--qat-start", choices=QAT_STARTS, default="finetuned")
    ap.add_argument("--qat-loss", choices=("embedding", "scores"), default=None,
                    help="distillation loss of the quantization-aware phase from the fine-tuned model (default: "
                         "default_qat_config's)")
    ap.add_argument("--qat-seeds", default="",
                    help="further seeds of the quantization-aware phase, comma-separated (rows per seed and their "
                         "per-query mean; results in recovery-seeds.*)")
    ap.add_argument("--distill", type=float, default=DISTILL,
                    help="MarginMSE weight of fine-tuning (the export's teacher: the original model)")
    ap.add_argument("--qat-distill", type=float, default=1.0,
                    help="distillation weight of the quantization-aware phase (embedding cosine distance to the "
                         "fine-tuned fp32 model)")
    ap.add_argument("--corpus-size", type=int, default=CORPUS_SIZE,
                    help="the test corpus: the sample's relevant answers plus seeded distractors up to this size "
                         "(0: the whole test corpus)")
    ap.add_argument("--exclude-source", default="NIDDK")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 60 training queries, 5 steps, 100 test queries against 400 answers")
    args = ap.parse_args()
    quick = args.quick
    steps = 5 if quick else args.steps
    n_test = 100 if quick else args.test_queries
    schemes = [s for s in args.schemes.split(",") if s]
    t0 = time.perf_counter()
    full_test = medquad_retrieval("test")
    test = full_test.sample(n_test, seed=13, corpus_size=4 * n_test if quick else (args.corpus_size or None))
    cfg = FinetuneConfig(steps=steps, batch_size=32, negatives_per_pair=1, max_seq_length=128, lr=3e-5,
                         distill_weight=args.distill, seed=13, threads=THREADS)
    qat_cfg = default_qat_config(cfg, args.qat_start)
    qat_cfg = dataclasses.replace(qat_cfg, steps=args.qat_steps or qat_cfg.steps,
                                  distill_weight=args.qat_distill if args.qat_start == "finetuned"
                                  else qat_cfg.distill_weight)
    if args.qat_loss and args.qat_start != "finetuned":
        ap.error("--qat-loss sets the distillation of the phase from the fine-tuned model: --qat-start finetuned")
    if args.qat_loss:
        qat_cfg = dataclasses.replace(qat_cfg, distill_loss=args.qat_loss)
    qat_steps = qat_cfg.steps
    try:
        qat_seeds = [int(x) for x in args.qat_seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--qat-seeds takes comma-separated integers, got {args.qat_seeds!r}")
    work = args.work.with_name(args.work.name + "-quick") if quick else args.work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThroughputWarning)
        table = recovery_study("all-MiniLM-L6-v2", schemes, work, test=test, train_limit=60 if quick else None,
                               exclude_sources=[args.exclude_source] if args.exclude_source else [],
                               export_config=ExportConfig(num_negatives=4, seed=13), finetune_config=cfg,
                               qat_config=qat_cfg, qat_start=args.qat_start, qat_seeds=qat_seeds,
                               calibration_size=256, max_length=args.max_length, seed=13, show_progress_bar=True)
    wall = time.perf_counter() - t0
    records = {}
    for d in sorted(work.iterdir()):
        rec = d / "medquant_finetune.json"
        if rec.is_file():
            r = json.loads(rec.read_text())
            records[d.name] = {"steps": r["steps"], "seconds": r["seconds"], "first_loss": r["losses"][0],
                               "last_loss": r["losses"][-1]}
    export = json.loads((work / "data" / "export.json").read_text())
    machine = machine_info()
    out = args.out / machine["slug"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "recovery-quick" if quick else "recovery-whole-corpus" if not args.corpus_size else "recovery"
    stem += "-seeds" if qat_seeds else ""
    table.to_csv(out / f"{stem}.csv")
    info = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "threads": THREADS, "wall_s": round(wall, 1),
            "schemes": schemes, "test_queries": len(test.queries), "test_docs": len(test.corpus),
            "unseen_source": args.exclude_source, "unseen_queries": table.attrs.get("unseen_queries"),
            "max_length": args.max_length, "finetune": cfg.__dict__, "qat": qat_cfg.__dict__,
            "qat_start": args.qat_start, "qat_seeds": [qat_cfg.seed] + qat_seeds, "training_runs": records,
            "export_counts": export["counts"], "medquant": medquant.__version__}
    (out / f"{stem}.json").write_text(json.dumps(info, indent=1, default=str))
    cols = [c for c in ["nDCG@10", "nDCG@10_vs_fp32", "vs_fp32_ci_low", "vs_fp32_ci_high", "nDCG@10_vs_finetuned",
                        "vs_finetuned_ci_low", "vs_finetuned_ci_high", "gap_closed", "nDCG@10_unseen",
                        "nDCG@10_unseen_vs_fp32", "unseen_ci_low", "unseen_ci_high"] if c in table]
    md = [f"# Recovery with fine-tuning ({info['date']}, {machine['cpu_model']}, {THREADS} threads)", "",
          f"MedQuAD test: {len(test.queries)} queries x {len(test.corpus)} answers, max_length {args.max_length}; "
          f"unseen source {args.exclude_source} ({info['unseen_queries']} of the queries); fine-tuning {steps} "
          f"steps, quantization-aware {qat_steps} steps from the {args.qat_start} model; wall time "
          f"{wall / 60:.1f} min.", "", *md_table(table[cols]), ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
