"""medquant.autoquantize on the real model and a small MedQuAD sample: the choice meets the tolerance on the dev
part, saves and reloads with the same metric bit for bit, and the held-out part is scored."""
import numpy as np
import pytest

import medquant
from medquant.eval.datasets import medquad_retrieval
from medquant.eval.objective import RetrievalObjective
from medquant.quant.autoquant import AutoQuantConfig, fallback_override, measure_throughput
from medquant.quant.schemes import get_scheme


@pytest.fixture(scope="module")
def splits(medquad):
    return medquad_retrieval("dev", limit=40), medquad_retrieval("test", limit=40)


@pytest.fixture(scope="module")
def result(minilm, splits):
    dev, test = splits
    return medquant.autoquantize(
        minilm, dev, test_dataset=test, tolerance=0.005, candidates=["int8-dynamic", "int8-static-per-tensor"],
        calibration_methods=("minmax", "mse"), calibration_size=48, throughput_texts=24, throughput_repeats=1,
        proxy_texts=8, max_fallback_sites=2, show_progress_bar=False)


def test_search_meets_its_tolerance_on_dev(result):
    trace = result.trace
    assert trace["configuration"].iloc[0] == "fp32" and trace["step"].iloc[0] == "reference"
    assert {"int8-dynamic", "int8-static-per-tensor"} <= set(trace["configuration"])
    assert "site-calibration" in set(trace["step"])  # the static candidate got its per-site calibration variant
    chosen = trace[trace["chosen"]]
    assert len(chosen) == 1
    row = chosen.iloc[0]
    fp32 = trace["value"].iloc[0]
    assert row["within_tolerance"] and -row["delta"] <= 0.005 * fp32 + 1e-12
    best_speed = trace.loc[trace["within_tolerance"], "texts_per_s"].max()
    assert row["texts_per_s"] == best_speed  # the fastest configuration within tolerance
    assert (trace["texts_per_s"] > 0).all() and (trace["model_bytes"] > 0).all()
    assert result.scheme.name == row["configuration"]
    assert set(result.table["split"]) == {"dev", "test"} and len(result.table) == 4


def test_choice_saves_reloads_and_reproduces_the_metric(result, splits, minilm, tmp_path):
    dev, _ = splits
    result.encoder.save_pretrained(tmp_path / "chosen")
    back = medquant.Encoder.from_pretrained(tmp_path / "chosen")
    assert back.scheme == result.scheme
    obj = RetrievalObjective(minilm, dev)
    a, b = obj.score(result.encoder), obj.score(back)
    assert a.value == b.value == result.trace.loc[result.trace["chosen"], "value"].iloc[0]
    assert a.per_query.equals(b.per_query)


def test_pareto_plot(result):
    import matplotlib

    matplotlib.use("Agg")
    ax = result.plot_pareto()
    assert ax.get_xlabel().startswith("corpus texts per second")
    assert any("chosen" in t.get_text() for t in ax.get_legend().get_texts())


def test_time_budget_stops_the_search(tiny, medquad):
    dev = medquad_retrieval("dev", limit=10)
    res = medquant.autoquantize(tiny, dev, candidates=["int8-dynamic"], time_budget_s=0.0, throughput_texts=8,
                                throughput_repeats=1, calibration_size=8, show_progress_bar=False)
    assert list(res.trace["configuration"]) == ["fp32"] and res.scheme.name == "fp32"
    assert "time budget" in res.info["stopped"]
    cfg = AutoQuantConfig(tolerance=0.02, metric="mrr@10", candidates=("int8-dynamic",), time_budget_s=0.0,
                          throughput_texts=8, throughput_repeats=1, calibration_size=8)
    res = medquant.autoquantize(tiny, dev, config=cfg, show_progress_bar=False)  # the config's values hold
    assert res.config.tolerance == 0.02 and res.config.metric == "mrr@10" and res.trace["metric"].iloc[0] == "MRR@10"


def test_fallbacks_and_config_checks():
    s = get_scheme("int8-static-asym").replace(overrides={"*.intermediate.dense": {"weights": "int4",
                                                                                 "activations": "fp32"}})
    assert fallback_override(s, "encoder.layer.0.attention.self.qkv") == {"mode": "dynamic-token",
                                                                          "act_symmetric": True}
    assert fallback_override(s, "encoder.layer.0.intermediate.dense") == {"weights": "int8"}
    assert fallback_override(get_scheme("int8-dynamic"), "encoder.layer.0.output.dense") == {
        "weights": "fp32", "activations": "fp32"}
    with pytest.raises(ValueError, match="objective"):
        AutoQuantConfig(objective="latency")
    with pytest.raises(ValueError, match="tolerance"):
        AutoQuantConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match="calibration methods"):
        AutoQuantConfig(calibration_methods=("kl",))
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        AutoQuantConfig(candidates=("int3",))


def test_measure_throughput(tiny, medquad_questions):
    assert measure_throughput(tiny, medquad_questions[:8], batch_size=4, repeats=2) > 0
