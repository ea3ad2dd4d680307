"""The medquant command line: compare writes its files, info, quantize, and argument errors exit with 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

import medquant
from medquant.cli import main

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
    assert meta["calibration"]["n_texts"] == 16
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
    assert cli._parser().parse_args(["compare"]).schemes == cli.DEFAULT_SCHEMES == \
        "fp32,bf16,int8-dynamic,int8-static-asym"


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
    (["frobnicate"], "invalid choice"),
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


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "medquant", "compare", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--schemes" in r.stdout
