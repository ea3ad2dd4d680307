"""medquant.autoquantize on the real model and a small MedQuAD sample: the choice meets the tolerance on the dev
part, saves and reloads with the same metric bit for bit, and the held-out part is scored."""
import json

import pytest

import medquant
from medquant.eval.datasets import medquad_retrieval
from medquant.eval.objective import RetrievalObjective
from medquant.quant.autoquant import AutoQuantConfig, fallback_override, measure_throughput
from medquant.quant.schemes import QuantScheme, get_scheme

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def splits(medquad):
    return medquad_retrieval("dev", limit=40), medquad_retrieval("test", limit=40)


@pytest.fixture(scope="module")
def enc(minilm_dir):
    """all-MiniLM-L6-v2 truncating at 64 tokens instead of its 256: the search and its checks are the same, every
    dev / test encoding (the whole cost of this file) several times cheaper."""
    return medquant.Encoder.from_pretrained(minilm_dir, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def result(enc, splits):
    dev, test = splits
    return medquant.autoquantize(
        enc, dev, test_dataset=test, tolerance=0.005, candidates=["int8-dynamic", "int8-static-per-tensor"],
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
    within = trace[trace["within_tolerance"]]
    best_speed, tie = within["texts_per_s"].max(), result.config.objective_tie
    tier = within[within["texts_per_s"] >= (1 - tie) * best_speed]  # as fast as the fastest, within timing noise
    assert row["texts_per_s"] >= (1 - tie) * best_speed
    assert row["emb_cosine_mean"] == tier["emb_cosine_mean"].max()  # of those, the most faithful
    assert (trace["texts_per_s"] > 0).all() and (trace["model_bytes"] > 0).all()
    assert result.scheme.name == row["configuration"]
    assert QuantScheme.from_dict(json.loads(row["scheme"])) == result.scheme  # the trace's JSON is the scheme
    assert set(result.table["split"]) == {"dev", "test"} and len(result.table) == 4


def test_choice_saves_reloads_and_reproduces_the_metric(result, splits, enc, tmp_path):
    dev, _ = splits
    result.encoder.save_pretrained(tmp_path / "chosen")
    back = medquant.Encoder.from_pretrained(tmp_path / "chosen", max_length=MAX_LENGTH)
    assert back.scheme == result.scheme and result.encoder.max_length == MAX_LENGTH
    obj = RetrievalObjective(enc, dev)
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


def test_objective_ties_go_to_the_most_faithful():
    """Throughputs within objective_tie of each other are timing noise: the most faithful of them is chosen."""
    from medquant.quant.autoquant import _Search

    search = object.__new__(_Search)
    search.cfg = AutoQuantConfig(objective_tie=0.05)

    def row(name, tput, cos, within=True):
        return {"configuration": name, "texts_per_s": tput, "emb_cosine_mean": cos, "value": 0.7,
                "model_bytes": 100, "within_tolerance": within}

    search.rows = [row("fast", 100.0, 0.95), row("faithful", 96.0, 0.998), row("slow", 80.0, 0.9999),
                   row("outside", 120.0, 0.99, within=False)]
    best = search.best_within()
    assert best["configuration"] == "faithful"
    assert search.better(search.rows[3], best)  # clearly faster: worth repairing
    assert not search.better(row("close", 99.0, 0.99), best)  # a tie, less faithful
    assert search.better(row("close", 99.0, 0.999), best)  # a tie, more faithful
    search.cfg = AutoQuantConfig(objective_tie=0.0)
    assert search.best_within()["configuration"] == "fast"
    with pytest.raises(ValueError, match="objective_tie"):
        AutoQuantConfig(objective_tie=2.0)
