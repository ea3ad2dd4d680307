"""The medquant command line: compare writes its files, info, quantize, and argument errors exit with 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

import medquant
from medquant.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::medquant.eval.runinfo.ThroughputWarning")

FAST = ["--limit", "40", "--corpus-factor", "2", "--max-length", "64", "--n-boot", "200", "--no-progress"]


def test_compare_writes_files(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["compare", "--schemes", "fp32,int8-static-sym", "--calibration-size", "16", "--out", str(out), *FAST])
    assert rc == 0
    pngs = ("quality_vs_throughput.png", "quality_vs_size.png", "deltas.png")
    for name in ("results.csv", "results.json", "per_query.csv", *pngs):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = pd.read_csv(out / "results.csv")
    assert list(df["scheme"]) == ["fp32", "fp32+index-int8", "fp32+index-int8+rescore4", "fp32+index-binary",
                                  "fp32+index-binary+rescore4", "int8-static-sym"]
    # one TREC run per system: 40 queries, 6 fields, tagged with the system
    for scheme in df["scheme"]:
        lines = (out / "runs" / f"{scheme}.trec").read_text().splitlines()
        fields = [line.split() for line in lines]
        assert len({f[0] for f in fields}) == 40 and all(len(f) == 6 and f[5] == scheme for f in fields)
    assert {f"{m}_p_holm" for m in ("nDCG@10", "MRR@10", "R@100")} <= set(df.columns)
    assert df["calibration_s"].iloc[-1] > 0
    meta = json.loads((out / "results.json").read_text())
    assert meta["runtime_info"]["onednn_version"] == medquant.runtime_info()["onednn_version"]
    assert meta["config"]["max_length"] == 64 and meta["config"]["seed"] == 13
    assert meta["dataset"]["n_queries"] == 40
    assert meta["calibration"]["n_texts"] == 16 and meta["calibration"]["source"] == "medquad-test"
    assert [r["scheme"] for r in meta["results"]] == list(df["scheme"])
    pq = pd.read_csv(out / "per_query.csv")
    assert len(pq) == len(df) * 40 and {"scheme", "qid", "source", "nDCG@10"} <= set(pq.columns)
    printed = capsys.readouterr().out
    assert "int8-static-sym" in printed and "nDCG@10" in printed


def test_compare_default_is_the_quick_sample(tmp_path, capsys, monkeypatch):
    """Without --limit or --full, MedQuAD is evaluated on the documented quick sample, and the output says so and
    names the command of the full study."""
    from medquant import cli

    monkeypatch.setattr(cli, "QUICK_LIMIT", 30)
    out = tmp_path / "quick"
    rc = main(["compare", "--schemes", "fp32", "--index-kinds", "none", "--max-length", "64", "--n-boot", "100",
               "--corpus-factor", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "results.json").read_text())
    assert meta["dataset"]["n_queries"] == 30 and meta["dataset"]["name"] == "medquad-dev-limit30"
    printed = capsys.readouterr().out
    assert "quick sample: 30 of" in printed and cli.FULL_STUDY in printed
    assert cli.DEFAULT_SCHEMES == "fp32,bf16,int8-dynamic,int8-static-asym"
    assert cli._parser().parse_args(["compare"]).schemes is None  # DEFAULT_SCHEMES, or fp32 alone with --system


def test_compare_beir_directory(tmp_path):
    beir = tmp_path / "tiny"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": "Metformin is a first-line drug for type 2 diabetes.",
            "d2": "Warfarin needs regular INR monitoring.",
            "d3": "Asthma attacks are treated with inhaled bronchodilators.",
            "d4": "Iron deficiency causes a microcytic anemia."}
    queries = {"q1": "first treatment for type 2 diabetes", "q2": "blood test for warfarin", "q3": "inhaler for asthma"}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    out = tmp_path / "out"
    rc = main(["compare", "--dataset", str(beir), "--schemes", "fp32", "--index-kinds", "none", "--n-boot", "50",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "results.csv")
    assert list(df["scheme"]) == ["fp32"] and df.loc[0, "nDCG@10"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["compare", "--schemes", "fp32,int3"], "unknown scheme"),
    (["compare", "--dataset", "no-such-collection"], "unknown dataset"),
    (["compare", "--split", "train"], "--split"),
    (["compare", "--index-kinds", "pq"], "unknown index kind"),
    (["compare", "--limit", "0"], "--limit"),
    (["compare", "--full", "--limit", "10"], "exclude each other"),
    (["quantize", "--scheme", "int2", "--out", "x"], "unknown scheme"),
    (["compare", "--system", "/no/such/dir"], "not a directory"),
    (["compare", "--calibration-split", "test", "--calibration-file", "x.txt"], "not allowed with"),
    (["compare", "--calibration-split", "train", "--schemes", "int8-static-asym", "--limit", "5"],
     "--calibration-split"),
    (["frobnicate"], "invalid choice"),
    (["export", "--out", "x", "--range-min", "5", "--range-max", "3"], "range_max"),
    (["export", "--out", "x", "--split", "test", "--holdout-split", "test"], "must differ"),
    (["export", "--out", "x", "--scheme", "int3"], "unknown scheme"),
    (["export", "--out", "x", "--format", "csv"], "formats"),
    (["export", "--out", "x", "--scheme", "int8-dynamic", "--student", "y"], "not allowed with"),
])
def test_argument_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    assert "onednn_version" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_threads"] >= 1


def test_quantize_saves_loadable_model(tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", "--scheme", "int8-dynamic", "--out", str(out)]) == 0
    enc = medquant.Encoder.from_pretrained(out)
    assert enc.scheme.name == "int8-dynamic"
    assert "saved int8-dynamic" in capsys.readouterr().out


def test_export_writes_training_data(tmp_path, capsys):
    out = tmp_path / "train"
    rc = main(["export", "--scheme", "int8-static-asym", "--limit", "8", "--max-length", "32", "--calibration-size",
               "16", "--format", "jsonl", "--num-negatives", "2", "--range-max", "8", "--out", str(out)])
    assert rc == 0
    assert "exported" in capsys.readouterr().out
    man = json.loads((out / "export.json").read_text())
    assert man["holdout"] == "medquad-test" and man["dataset"] == "medquad-dev-limit8"
    assert man["license"] == "CC BY 4.0" and man["student"].endswith("[int8-static-asym]")
    trip = pd.read_json(out / "triplets.jsonl", lines=True)
    assert list(trip.columns) == ["anchor", "positive", "negative"] and len(trip) == man["counts"]["triplets"] > 0
    assert medquant.load_quant_params(out / "quant_params").scheme.name == "int8-static-asym"


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "medquant", "compare", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--schemes" in r.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"medquant {medquant.__version__}"


# ---------------------------------------------------------------------------------------------------- saved models
TINY = ["--limit", "20", "--corpus-factor", "2", "--max-length", "64", "--n-boot", "100", "--index-kinds", "none",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def saved_static(tiny_dir, tmp_path_factory):
    """The tiny model quantized int8-static-asym by the CLI (calibrated on MedQuAD test, the default)."""
    out = tmp_path_factory.mktemp("saved") / "q8"
    assert main(["quantize", "--model", str(tiny_dir), "--scheme", "int8-static-asym", "--calibration-size", "16",
                 "--threads", "1", "--out", str(out)]) == 0
    return out


def test_quantized_model_as_model_is_refused(saved_static, capsys):
    """The bug of issue 13: a saved quantized model as --model was reported as the fp32 baseline."""
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--model", str(saved_static), "--out", "unused", *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is a quantized model (int8-static-asym)" in err and f"--system {saved_static}" in err


def test_saved_models_as_systems(tiny_dir, tiny, saved_static, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["compare", "--model", str(tiny_dir), "--system", str(saved_static), "--system", f"mine={saved_static}",
               "--out", str(out), *TINY])
    assert rc == 0
    df = pd.read_csv(out / "results.csv")  # --system alone: fp32 plus the systems
    assert list(df["scheme"]) == ["fp32", "int8-static-asym@q8", "mine"]
    assert list(df["model_scheme"]) == ["fp32", "int8-static-asym", "int8-static-asym"]
    assert df.loc[0, "model_bytes"] == tiny.size_bytes() and (df.loc[1:, "model_bytes"] < tiny.size_bytes()).all()
    assert df.loc[1, "nDCG@10"] == df.loc[2, "nDCG@10"]  # one saved model under two labels
    meta = json.loads((out / "results.json").read_text())
    assert [(s["label"], s["scheme"]) for s in meta["systems"]] == [("int8-static-asym@q8", "int8-static-asym"),
                                                                    ("mine", "int8-static-asym")]
    assert meta["calibration"]["calibrated_elsewhere"] == ["int8-static-asym@q8", "mine"]
    assert meta["calibration"]["n_texts"] == 0  # nothing calibrated here
    run = meta["run"]
    assert run["medquant_version"] == medquant.__version__ and run["cpu_isa"] == medquant.runtime_info()["cpu_isa"]
    assert isinstance(run["cpu_model"], str) and run["cpu_model"]
    assert len(run["load_before"]) == 3 and len(run["load_after"]) == 3
    assert run["max_length"] == {"fp32": 64, "int8-static-asym@q8": 64, "mine": 64}
    assert run["threads"] == {"fp32": 1, "int8-static-asym@q8": 1, "mine": 1}
    assert list(df["max_length"]) == [64, 64, 64]
    # 20 queries are below the 100-text floor of a meaningful throughput figure, whatever the timing
    small = [(w["scheme"], w["figure"]) for w in run["throughput_warnings"] if "20 < 100 texts" in w["reason"]]
    assert small == [(s, "query_texts_per_s") for s in ("fp32", "int8-static-asym@q8", "mine")]
    assert "throughput figure(s) come from a sample too small" in capsys.readouterr().err


def test_system_of_another_architecture_is_refused(saved_static, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--system", str(saved_static), "--out", "unused", *TINY])  # --model: MiniLM
    assert exc.value.code == 2 and "another architecture" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- calibration
def _spy_calibration(monkeypatch):
    """Record the texts every calibration pass of evaluate() is run on."""
    from medquant.eval import evaluate as ev

    seen = []
    real = ev.calibrate_for

    def spy(baseline, scheme, texts, *args, **kwargs):
        seen.append(list(texts))
        return real(baseline, scheme, texts, *args, **kwargs)

    monkeypatch.setattr(ev, "calibrate_for", spy)
    return seen


def _evaluated_keys(split: str, limit: int = 20, corpus_factor: int = 2, seed: int = 13) -> set:
    from medquant import cli
    from medquant.eval.calibration_data import text_key
    from medquant.eval.datasets import medquad_retrieval

    ds = cli._sample(medquad_retrieval(split), limit, corpus_factor, seed)
    return {text_key(t) for t in [*ds.queries.values(), *ds.corpus.values()]}


@pytest.mark.parametrize("split, source", [("dev", "medquad-test"), ("test", "medquad-dev")])
def test_default_calibration_never_sees_evaluated_texts(split, source, tiny_dir, tmp_path, monkeypatch):
    from medquant.eval.calibration_data import text_key
    from medquant.eval.datasets import medquad_retrieval

    seen = _spy_calibration(monkeypatch)
    out = tmp_path / split
    assert main(["compare", "--model", str(tiny_dir), "--split", split, "--schemes", "int8-static-asym",
                 "--calibration-size", "64", "--out", str(out), *TINY]) == 0
    (texts,) = seen
    assert len(texts) == 64
    keys = {text_key(t) for t in texts}
    assert not keys & _evaluated_keys(split)  # the actual text sets are disjoint
    other = medquad_retrieval(source.split("-")[1])
    assert keys <= {text_key(t) for t in [*other.queries.values(), *other.corpus.values()]}
    cal = json.loads((out / "results.json").read_text())["calibration"]
    assert (cal["source"], cal["kind"], cal["default"], cal["seed"], cal["n_texts"]) == (source, "split", True, 13, 64)
    assert cal["n_overlap_evaluated"] == 0 and cal["n_from_queries"] == 32


def test_calibration_split_of_the_evaluated_split_excludes_the_sample(tiny_dir, tmp_path, monkeypatch):
    from medquant.eval.calibration_data import text_key

    seen = _spy_calibration(monkeypatch)
    out = tmp_path / "same"
    assert main(["compare", "--model", str(tiny_dir), "--schemes", "int8-static-asym", "--calibration-split", "dev",
                 "--calibration-size", "32", "--out", str(out), *TINY]) == 0
    assert not {text_key(t) for t in seen[0]} & _evaluated_keys("dev")
    cal = json.loads((out / "results.json").read_text())["calibration"]
    # the 20 queries and 40 answers of the sample are removed from the dev pool
    assert cal["source"] == "medquad-dev" and cal["default"] is False and cal["n_excluded_evaluated"] >= 60


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_calibration_file(fmt, tiny_dir, tmp_path, monkeypatch):
    from medquant import cli
    from medquant.eval.datasets import medquad_retrieval

    evaluated = list(cli._sample(medquad_retrieval("dev"), 20, 2, 13).queries.values())[:3]
    own = [f"calibration sentence number {i} about blood pressure" for i in range(12)]
    path = tmp_path / f"calib.{fmt}"
    lines = own + evaluated + ["", "  "]
    path.write_text("".join((json.dumps({"text": t}) if fmt == "jsonl" and t.strip() else t) + "\n"
                            for t in lines))
    seen = _spy_calibration(monkeypatch)
    out = tmp_path / "out"
    assert main(["compare", "--model", str(tiny_dir), "--schemes", "int8-static-asym", "--calibration-file",
                 str(path), "--calibration-size", "8", "--out", str(out), *TINY]) == 0
    assert len(seen[0]) == 8 and set(seen[0]) <= set(own)
    cal = json.loads((out / "results.json").read_text())["calibration"]
    assert (cal["kind"], cal["source"], cal["n_texts"], cal["pool_size"]) == ("file", str(path), 8, 12)
    assert cal["n_excluded_evaluated"] == 3


def _write_beir(root):
    (root / "qrels").mkdir(parents=True)
    docs = {f"d{i}": f"document {i} on diabetes and blood pressure" for i in range(8)}
    queries = {f"q{i}": f"what causes disease {i}" for i in range(6)}
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    (root / "qrels" / "train.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in (4, 5)))
    return root


def test_beir_calibration_needs_held_out_texts(tiny_dir, tmp_path, capsys):
    beir = _write_beir(tmp_path / "beir")
    base = ["compare", "--model", str(tiny_dir), "--dataset", str(beir), "--schemes", "int8-static-asym",
            "--max-length", "64", "--n-boot", "50", "--index-kinds", "none", "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as exc:  # the whole collection is evaluated: nothing held out
        main([*base, "--out", str(tmp_path / "a")])
    assert exc.value.code == 2 and "--calibration-split" in capsys.readouterr().err
    assert main([*base, "--calibration-split", "train", "--out", str(tmp_path / "b")]) == 0
    cal = json.loads((tmp_path / "b" / "results.json").read_text())["calibration"]
    # train's 2 queries; its documents are all in the evaluated corpus and are removed
    assert (cal["source"], cal["n_texts"], cal["n_from_queries"], cal["n_excluded_evaluated"]) == \
        ("beir-train", 2, 2, 8)
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", str(tiny_dir), "--scheme", "int8-static-asym", "--dataset", str(beir),
              "--out", str(tmp_path / "q")])
    assert exc.value.code == 2 and "--calibration-split" in capsys.readouterr().err
