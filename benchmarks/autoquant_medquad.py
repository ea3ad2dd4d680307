"""The accuracy-aware search on MedQuAD, as README "Accuracy-aware quantization" reports it.

    python benchmarks/autoquant_medquad.py [--out benchmarks/results/autoquant] [--dev-queries 800]

1. ``medquant.autoquantize`` on a seeded sample of the dev split (``--dev-queries`` queries, 4x as many answers),
   tolerance 0.5% relative nDCG@10, objective throughput (5% ties broken by embedding cosine); the default
   candidates plus per-token dynamic int8 with GPTQ rounding. Writes trace.csv, pareto.png, info.json and the chosen
   model (chosen/).
2. ``medquant.evaluate`` on the whole test split (never seen by the search; static schemes calibrated on dev texts):
   fp32, int8-static-asym, the choice, and the targets' schemes with and without the training-free fixes (GPTQ
   rounding, bias correction). Writes test.csv. ``--chosen OUT/chosen`` runs only this step, on a saved choice.
Step 1 takes about 13 minutes and step 2 about 28 on 2 cores (AMD EPYC, AVX-512 VNNI); throughput columns are
this machine's.
"""
import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import medquant  # noqa: E402
from medquant.eval.datasets import medquad_retrieval  # noqa: E402
from medquant.quant.autoquant import DEFAULT_CANDIDATES  # noqa: E402
from medquant.quant.schemes import get_scheme  # noqa: E402

TRACE = ["configuration", "step", "value", "delta", "ci_low", "ci_high", "relative_loss", "within_tolerance",
         "texts_per_s", "model_bytes", "emb_cosine_mean", "elapsed_s"]
FAITHFUL = get_scheme("int8-dynamic-token").replace(name="int8-dynamic-token+gptq", rounding="gptq")
TEST = ["scheme", "nDCG@10", "nDCG@10_delta", "nDCG@10_ci_low", "nDCG@10_ci_high", "MRR@10", "emb_cosine",
        "corpus_texts_per_s", "model_bytes"]


def search(enc, out: Path, dev_queries: int, time_budget: float):
    """Step 1: the search on dev; returns the chosen encoder (also saved to out/chosen)."""
    dev = medquad_retrieval("dev", limit=dev_queries)
    res = medquant.autoquantize(enc, dev, tolerance=0.005, candidates=list(DEFAULT_CANDIDATES) + [FAITHFUL],
                                time_budget_s=time_budget, show_progress_bar=False)
    res.trace.to_csv(out / "trace.csv", index=False)
    (out / "info.json").write_text(json.dumps({**res.info, "chosen": res.scheme.to_dict(),
                                               "cpu": medquant.runtime_info()}, indent=1, default=str))
    res.plot_pareto().figure.savefig(out / "pareto.png", dpi=120, bbox_inches="tight")
    print(res.trace[TRACE].to_string(), flush=True)
    print("chosen", res.scheme.to_json(), f"search {res.info['search_s']:.0f} s", flush=True)
    res.encoder.save_pretrained(out / "chosen", overwrite=True)
    return res.encoder


def heldout(enc, chosen, out: Path) -> None:
    """Step 2: the whole test split, never seen by the search (static schemes calibrated on dev texts)."""
    pt, sy = get_scheme("int8-static-per-tensor"), get_scheme("int8-static-sym")
    systems = ["int8-static-asym", "w4-weight-only", "int8-static-per-tensor", "int8-static-sym",
               get_scheme("w4-weight-only").replace(name="w4-weight-only+gptq", rounding="gptq"),
               pt.replace(name="int8-static-per-tensor+gptq", rounding="gptq"),
               pt.replace(name="int8-static-per-tensor+gptq+bc", rounding="gptq", bias_correction=True),
               sy.replace(name="int8-static-sym+gptq", rounding="gptq"), FAITHFUL, ("autoquantize", chosen)]
    df = medquant.evaluate(systems, medquad_retrieval("test"), model=enc, index_kinds=(), show_progress_bar=False)
    df.to_csv(out / "test.csv", index=False)
    print(df[TEST].to_string(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/autoquant")
    ap.add_argument("--dev-queries", type=int, default=800)
    ap.add_argument("--time-budget", type=float, default=1500.0)
    ap.add_argument("--chosen", default=None, help="skip the search: a saved choice (e.g. OUT/chosen) for step 2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    enc = medquant.Encoder.from_pretrained()
    chosen = (medquant.Encoder.from_pretrained(args.chosen) if args.chosen
              else search(enc, out, args.dev_queries, args.time_budget))
    heldout(enc, chosen, out)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
