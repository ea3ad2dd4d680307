"""The accuracy-aware search on MedQuAD, as README "Accuracy-aware quantization" reports it.

    python benchmarks/autoquant_medquad.py [--out benchmarks/results/autoquant] [--dev-queries 800]

1. ``medquant.autoquantize`` on a seeded sample of the dev split (``--dev-queries`` queries, 4x as many answers),
   tolerance 0.5% relative nDCG@10, objective throughput; every preset plus per-token dynamic int8 with GPTQ rounding
   as candidates. Writes trace.csv, pareto.png, info.json and the chosen model (chosen/).
2. ``medquant.evaluate`` on the whole test split (never seen by the search; static schemes calibrated on dev texts):
   fp32, the choice, and the schemes of the issue's targets with and without the training-free fixes. Writes
   test.csv.
Takes about 40 minutes on 2 cores (AMD EPYC, AVX-512 VNNI); throughput columns are this machine's.
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
TEST = ["scheme", "nDCG@10", "nDCG@10_delta", "nDCG@10_ci_low", "nDCG@10_ci_high", "MRR@10", "emb_cosine",
        "corpus_texts_per_s", "model_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/autoquant")
    ap.add_argument("--dev-queries", type=int, default=800)
    ap.add_argument("--time-budget", type=float, default=1500.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    enc = medquant.Encoder.from_pretrained()
    dev = medquad_retrieval("dev", limit=args.dev_queries)
    faithful = get_scheme("int8-dynamic-token").replace(name="int8-dynamic-token+gptq", rounding="gptq")
    res = medquant.autoquantize(enc, dev, tolerance=0.005, candidates=list(DEFAULT_CANDIDATES) + [faithful],
                                time_budget_s=args.time_budget, show_progress_bar=False)
    res.trace.to_csv(out / "trace.csv", index=False)
    (out / "info.json").write_text(json.dumps({**res.info, "chosen": res.scheme.to_dict(),
                                               "cpu": medquant.runtime_info()}, indent=1, default=str))
    res.plot_pareto().figure.savefig(out / "pareto.png", dpi=120, bbox_inches="tight")
    print(res.trace[TRACE].to_string(), flush=True)
    print("chosen", res.scheme.to_json(), f"search {res.info['search_s']:.0f} s", flush=True)
    res.encoder.save_pretrained(out / "chosen", overwrite=True)
    w4, pt, sy = (get_scheme(n) for n in ("w4-weight-only", "int8-static-per-tensor", "int8-static-sym"))
    systems = ["int8-static-asym", "w4-weight-only", w4.replace(name="w4-weight-only+gptq", rounding="gptq"),
               "int8-static-per-tensor", pt.replace(name="int8-static-per-tensor+gptq", rounding="gptq"),
               pt.replace(name="int8-static-per-tensor+gptq+bc", rounding="gptq", bias_correction=True),
               "int8-static-sym", sy.replace(name="int8-static-sym+gptq", rounding="gptq"),
               faithful, ("autoquantize", res.encoder)]
    df = medquant.evaluate(systems, medquad_retrieval("test"), model=enc, index_kinds=(), show_progress_bar=False)
    df.to_csv(out / "test.csv", index=False)
    print(df[TEST].to_string(), flush=True)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
