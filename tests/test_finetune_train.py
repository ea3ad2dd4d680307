"""Fine-tuning (medquant.finetune.train): a tiny real training run, plain and quantization-aware, gives a directory
that medquant re-imports, quantizes and evaluates; quantizing it with the trained parameters gives the model that
training simulated; the same seed gives the same weights."""
import dataclasses
import json

import numpy as np
import pytest

import medquant
from conftest import require
from medquant.eval.datasets import medquad_retrieval
from medquant.finetune import ExportConfig, FinetuneConfig, finetune, medquad_training_data
from medquant.finetune.train import TRAINING_RECORD, load_pairs

torch = require("torch")
transformers = require("transformers")
from medquant.finetune.fakequant import wrap  # noqa: E402

TINY = dict(steps=2, batch_size=8, max_seq_length=32, negatives_per_pair=1, lr=1e-4, seed=3, threads=2)
TINY_SCALE = FinetuneConfig().scale


@pytest.fixture(scope="module")
def data(tmp_path_factory, minilm_dir):
    teacher = medquant.Encoder.from_pretrained(minilm_dir, max_length=64)
    dev = medquad_retrieval("dev", limit=16, seed=5)
    student = teacher.quantize("int8-static-asym",
                               calibration_texts=list(dev.queries.values()) + list(dev.corpus.values())[:16])
    out = tmp_path_factory.mktemp("ft") / "data"
    medquad_training_data(teacher, out, student=student, limit=16, config=ExportConfig(num_negatives=2, range_max=10,
                                                                                        formats=("jsonl",)))
    return out


def test_pairs_carry_their_negatives_and_weights(data):
    pairs, manifest = load_pairs(data)
    assert len(pairs) == manifest["counts"]["pairs"]
    assert sum(len(p.negatives) for p in pairs) == manifest["counts"]["triplets"]
    assert all(len(p.negatives) == len(p.margins) <= 2 for p in pairs)
    assert {p.weight for p in pairs} <= {1.0, 2.0}


def test_finetuned_model_reimports_quantizes_and_evaluates(tmp_path, data, minilm_dir):
    res = finetune(minilm_dir, data, tmp_path / "ft", config=FinetuneConfig(**TINY))
    assert res.steps == 2 and len(res.losses) == 2 and all(np.isfinite(res.losses))
    rec = json.loads((tmp_path / "ft" / TRAINING_RECORD).read_text())
    assert rec["data"]["holdout"] == "medquad-test" and rec["steps"] == 2
    ft = medquant.Encoder.from_pretrained(tmp_path / "ft", max_length=64)
    base = medquant.Encoder.from_pretrained(minilm_dir, max_length=64)
    texts = ["What causes anemia?", "Iron deficiency is the most common cause of anemia."]
    assert ft.sentence_config.pooling == "mean" and ft.sentence_config.normalize
    e_ft, e_base = ft.encode(texts), base.encode(texts)
    assert not np.allclose(e_ft, e_base)
    # the saved weights are the trained ones: torch's embedding of the directory equals medquant's fp32 forward
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ft"))
    m = transformers.BertModel.from_pretrained(str(tmp_path / "ft"), add_pooling_layer=False).eval()
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = m(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).float()
    e_t = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(e_t - e_ft).max() < 1e-5
    test = medquad_retrieval("test", limit=12, seed=2)
    q = ft.quantize("int8-dynamic")
    df = medquant.evaluate([q], test, model=ft, index_kinds=(), n_boot=50, show_progress_bar=False)
    assert set(df["scheme"]) >= {"fp32", "int8-dynamic"} and df["nDCG@10"].between(0, 1).all()


def test_quantization_aware_run_gives_back_the_model_it_simulated(tmp_path, data, minilm_dir):
    res = finetune(minilm_dir, data, tmp_path / "qat", config=FinetuneConfig(quantization_aware=True, **TINY))
    params = medquant.load_quant_params(tmp_path / "qat" / "quant_params")
    assert params.scheme.name == "int8-static-asym"
    exported = medquant.load_quant_params(data / "quant_params")
    site = "encoder.layer.1.intermediate.dense"
    assert params.sites[site]["act_scale"] == exported.sites[site]["act_scale"]  # the activation grid as trained
    ft = medquant.Encoder.from_pretrained(tmp_path / "qat", max_length=64)
    q = ft.quantize(params)
    # the same trained weights in torch, wrapped with the same parameters, compute what medquant computes
    m = wrap(transformers.BertModel.from_pretrained(str(tmp_path / "qat"), add_pooling_layer=False).eval(), params,
             weight_scales="given")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "qat"))
    texts = list(medquad_retrieval("test", limit=8, seed=2).queries.values())
    b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h = m(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).float()
    e_t = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    e_c = q.encode(texts, normalize=True)
    assert ((e_t * e_c).sum(1) > 0.99).all()  # up to rounding flips (see test_finetune_fakequant.py)
    # the codes medquant stores are the ones training rounded to, site by site
    for name in ("encoder.layer.1.intermediate.dense", "encoder.layer.4.output.dense"):
        mod = m.get_submodule(name)
        with torch.no_grad():
            codes = (mod.wq(mod.weight) / mod.wq.scales(mod.wq.smoothed(mod.weight))).round().to(torch.int8).numpy()
        assert np.array_equal(codes, q.storage_tensors(name)[name + ".weight"])
    assert res.quant_params is not None


def test_same_seed_same_weights(tmp_path, data, minilm_dir):
    cfg = dict(TINY, steps=1)
    finetune(minilm_dir, data, tmp_path / "a", config=FinetuneConfig(**cfg))
    finetune(minilm_dir, data, tmp_path / "b", config=FinetuneConfig(**cfg))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no earlier"):
        finetune(minilm_dir, data, tmp_path / "mine", config=FinetuneConfig(**cfg))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="over its source"):
        finetune(tmp_path / "a", data, tmp_path / "a", config=FinetuneConfig(**cfg))
    for bad in (dict(steps=0), dict(batch_size=1), dict(lr=0.0), dict(weight_scales="learned"),
                dict(negatives_per_pair=-1)):
        with pytest.raises((ValueError, TypeError)):
            FinetuneConfig(**bad)


def test_distillation_from_the_source_model(tmp_path, data, minilm_dir):
    """distill_from="source": the margins come from a frozen fp32 copy of the model trained from, so at the start
    of plain training (student = teacher) the distillation term is zero, where the exported teacher's margins
    (computed at another length) are not; a quantization-aware run with it trains and re-imports."""
    from medquant.finetune.train import _batch_loss, _pool

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    bert = transformers.BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False).eval()

    def embed(texts):
        b = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return torch.nn.functional.normalize(_pool(bert(**b).last_hidden_state, b["attention_mask"], "mean"), dim=-1)

    pairs, _ = load_pairs(data)
    batch = [p for p in pairs if p.negatives][:4]
    assert len(batch) == 4
    with torch.no_grad():
        plain = _batch_loss(embed, batch, FinetuneConfig(**TINY))
        from_source = _batch_loss(embed, batch, FinetuneConfig(distill_weight=1.0, distill_from="source", **TINY),
                                  teacher_embed=embed)
        from_export = _batch_loss(embed, batch, FinetuneConfig(distill_weight=1.0, **TINY))
    assert float(from_source) == pytest.approx(float(plain), rel=1e-6)
    assert float(from_export) > float(plain)
    cfg = FinetuneConfig(quantization_aware=True, distill_weight=1.0, distill_from="source", **TINY)
    res = finetune(minilm_dir, data, tmp_path / "qat", config=cfg)
    assert res.steps == TINY["steps"] and all(np.isfinite(res.losses))
    record = json.loads((tmp_path / "qat" / TRAINING_RECORD).read_text())
    assert record["config"]["distill_from"] == "source"
    q = medquant.Encoder.from_pretrained(tmp_path / "qat").quantize(medquant.load_quant_params(tmp_path / "qat" /
                                                                                               "quant_params"))
    assert np.isfinite(q.encode(["insulin dose for type 2 diabetes"])).all()
    with pytest.raises(ValueError, match="distill_from"):
        FinetuneConfig(distill_from="teacher")


def test_embedding_distillation(tmp_path, data, minilm_dir):
    """distill_loss="embedding": scale x mean cosine distance of every embedding of the batch to the source model's;
    zero when student = teacher, positive when the student differs; with contrastive_weight 0 it is the whole
    loss. A distillation-only quantization-aware run without dropout (the recovery study's default phase) trains,
    its loss starting at the quantization error, and re-imports."""
    from medquant.finetune.study import default_qat_config
    from medquant.finetune.train import _batch_loss, _pool

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    bert = transformers.BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False).eval()

    def embedder(noise):
        def embed(texts):
            b = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
            h = _pool(bert(**b).last_hidden_state, b["attention_mask"], "mean")
            return torch.nn.functional.normalize(h + noise * torch.linspace(-1, 1, h.shape[-1]), dim=-1)
        return embed

    pairs, _ = load_pairs(data)
    batch = [p for p in pairs if p.negatives][:4]
    emb = dict(TINY, distill_weight=2.0, distill_from="source", distill_loss="embedding")
    with torch.no_grad():
        plain = _batch_loss(embedder(0.0), batch, FinetuneConfig(**TINY))
        same = _batch_loss(embedder(0.0), batch, FinetuneConfig(**emb), teacher_embed=embedder(0.0))
        only = _batch_loss(embedder(0.05), batch, FinetuneConfig(**emb, contrastive_weight=0.0),
                           teacher_embed=embedder(0.0))
        texts = [p.query for p in batch] + [p.positive for p in batch] + [p.negatives[0] for p in batch]
        cos = (embedder(0.05)(texts) * embedder(0.0)(texts)).sum(-1)
    # student = teacher, but 1 - cos is 1 - |e|^2 of unit vectors, zero only up to float rounding, times
    # distill_weight x scale: measured 2.2e-6 of 0.149 on an AVX-512 EPYC (under 1.5e-7 on AVX2)
    assert float(same) == pytest.approx(float(plain), rel=1e-4)
    assert float(only) == pytest.approx(2.0 * TINY_SCALE * float((1 - cos).mean()), rel=1e-5) and float(only) > 0
    # in-batch margins: zero for the teacher itself, else scale^2 x the squared error of each query's centred scores
    sc = dict(emb, distill_loss="scores", contrastive_weight=0.0)
    cands = [p.positive for p in batch] + [p.negatives[0] for p in batch]
    with torch.no_grad():
        q_t, c_t = embedder(0.0)([p.query for p in batch]), embedder(0.0)(cands)
        assert float(_batch_loss(embedder(0.0), batch, FinetuneConfig(**sc), teacher_embed=embedder(0.0))) == 0.0
        noisy = _batch_loss(embedder(0.05), batch, FinetuneConfig(**sc), teacher_embed=embedder(0.0))
        q_s = embedder(0.05)([p.query for p in batch])
        c_s = embedder(0.05)(cands)
        s, t = q_s @ c_s.T, q_t @ c_t.T
        want = ((s - s.mean(-1, keepdim=True) - t + t.mean(-1, keepdim=True)) ** 2).mean()
        assert float(noisy) == pytest.approx(2.0 * TINY_SCALE ** 2 * float(want), rel=1e-5) and float(noisy) > 0
    for bad, match in ((dict(distill_loss="embedding", distill_weight=1.0), "distill_from"),
                       (dict(distill_loss="scores", distill_weight=1.0), "distill_from"),
                       (dict(distill_loss="kl"), "distill_loss"), (dict(contrastive_weight=0.0), "nothing to train"),
                       (dict(contrastive_weight=0.0, distill_weight=1.0, negatives_per_pair=0), "nothing to train"),
                       (dict(contrastive_weight=-1.0), "contrastive_weight"), (dict(dropout="no"), "dropout")):
        with pytest.raises((ValueError, TypeError), match=match):
            FinetuneConfig(**bad)
    no_negs = [dataclasses.replace(p, negatives=[], margins=[]) for p in batch]
    zero = _batch_loss(embedder(0.0), no_negs, FinetuneConfig(**TINY, distill_weight=1.0, contrastive_weight=0.0))
    assert float(zero.detach()) == 0.0 and zero.requires_grad  # margins without negatives: a zero step, no error
    cfg = default_qat_config(FinetuneConfig(**dict(TINY, steps=8)))
    assert (cfg.distill_loss, cfg.contrastive_weight, cfg.dropout, cfg.negatives_per_pair, cfg.steps) == \
        ("embedding", 0.0, False, 0, 2)
    params = medquant.Encoder.from_pretrained(minilm_dir, max_length=32).quantize("w4-weight-only").quant_params()
    res = finetune(minilm_dir, data, tmp_path / "qat", config=cfg, params=params)
    assert res.steps == 2 and all(np.isfinite(res.losses)) and res.losses[0] > 0
    assert json.loads((tmp_path / "qat" / TRAINING_RECORD).read_text())["config"]["distill_loss"] == "embedding"
    q = medquant.Encoder.from_pretrained(tmp_path / "qat").quantize(res.quant_params)
    assert np.isfinite(q.encode(["insulin dose for type 2 diabetes"])).all()


def test_batches_never_repeat_a_text():
    from medquant.finetune.train import _batches, _Pair

    pairs = [_Pair(f"q{i % 7}", f"a{i % 5}", [], [], 1.0) for i in range(40)]
    gen = _batches(pairs, 8, np.random.default_rng(0))
    for _ in range(30):
        batch = next(gen)
        assert 2 <= len(batch) <= 8
        assert len({pairs[i].query for i in batch}) == len(batch) == len({pairs[i].positive for i in batch})
    with pytest.raises(ValueError, match="cannot make a batch"):
        next(_batches([_Pair("q", "a", [], [], 1.0)] * 3, 8, np.random.default_rng(0)))


def test_recovery_table_averages_the_qat_seeds():
    """recovery_study's table with further quantization-aware seeds: one row per run and a row whose per-query
    metrics are the mean over the runs, each with its paired comparisons and the fraction of the post-training gap
    closed; seeds must be distinct and differ from the phase's own."""
    import pandas as pd

    from medquant.finetune.study import METRICS, _check_qat_seeds, _table, seed_mean_label

    test = medquad_retrieval("test").sample(30, seed=13, corpus_size=60)
    qids = list(test.queries)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.9, len(qids))
    shift = {"fp32": -0.10, "s": -0.12, "fine-tuned fp32": 0.0, "fine-tuned + s": -0.04, "QAT + s": -0.02,
             "QAT + s (seed 5)": -0.01, "QAT + s (seed 6)": 0.0}
    pq = {k: pd.DataFrame({m: np.clip(base + v + rng.normal(0, 0.01, len(qids)), 0, 1) for m in METRICS},
                          index=pd.Index(qids, name="qid")) for k, v in shift.items()}
    runs = ["QAT + s", "QAT + s (seed 5)", "QAT + s (seed 6)"]
    table = _table(list(shift), pq, ["s"], test, (), {"s": runs})
    mean = seed_mean_label("s", 3)
    assert mean == "QAT + s (mean of 3 seeds)" and list(table.index) == list(shift) + [mean]
    want = (pq[runs[0]] + pq[runs[1]] + pq[runs[2]])["nDCG@10"] / 3
    assert table.loc[mean, "nDCG@10"] == pytest.approx(float(want.mean()), abs=1e-12)
    assert table.loc[mean, "nDCG@10_vs_finetuned"] == pytest.approx(
        float((want - pq["fine-tuned fp32"]["nDCG@10"]).mean()), abs=1e-12)
    gap = table.loc["fine-tuned fp32", "nDCG@10"] - table.loc["fine-tuned + s", "nDCG@10"]
    for r in runs + [mean]:
        assert table.loc[r, "gap_closed"] == pytest.approx(
            (table.loc[r, "nDCG@10"] - table.loc["fine-tuned + s", "nDCG@10"]) / gap)
    assert np.isnan(table.loc["fine-tuned + s"].get("gap_closed", np.nan))
    assert _check_qat_seeds((5, 6), 14) == [5, 6]
    for bad in ((5, 5), (14,)):
        with pytest.raises(ValueError, match="distinct"):
            _check_qat_seeds(bad, 14)
