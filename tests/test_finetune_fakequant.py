"""The torch fake-quantization wrapper (medquant.finetune.fakequant) computes what the C core computes: every site,
fed the same input, gives the C core's output of that site (same codes, same scales), and the wrapped Hugging Face
model's sentence embeddings are medquant's quantized embeddings up to rounding flips."""
import numpy as np
import pytest

import medquant
from conftest import require
from medquant._native import _core
from medquant.eval.datasets import medquad_retrieval
from medquant.quant.schemes import SITE_KINDS

torch = require("torch")
transformers = require("transformers")
from medquant.finetune.fakequant import FakeQuantLinear, wrap  # noqa: E402

MAX_LEN = 96
# every kind of grid, two schemes: static per-tensor weights (one scale over Q, K and V) with per-site dynamic,
# per-token and int4 sites; and SmoothQuant (static asymmetric, per-channel) with a weight-only int8 site.
# int8-static-asym alone: tests/test_finetune_train.py
MIXED = medquant.QuantScheme(
    name="mixed-grids", weights="int8", activations="int8", mode="static", weight_granularity="per-tensor",
    calibration="minmax", embeddings="int8",
    overrides={"encoder.layer.1.*": {"mode": "dynamic"},
               "encoder.layer.2.*": {"mode": "dynamic-token", "act_symmetric": True},
               "encoder.layer.3.intermediate.dense": {"weights": "int4", "activations": "fp32",
                                                      "weight_granularity": "per-channel"}})
SMOOTH = medquant.get_scheme("int8-smoothquant").replace(
    name="smoothquant-w8", overrides={"encoder.layer.4.output.dense": {"activations": "fp32"}})
SCHEMES = {"mixed-grids": MIXED, "smoothquant-w8": SMOOTH, "w4-weight-only": "w4-weight-only"}


@pytest.fixture(scope="module")
def fp32(minilm_dir):
    return medquant.Encoder.from_pretrained(minilm_dir, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def texts():
    dev = medquad_retrieval("dev", limit=24, seed=3)
    test = medquad_retrieval("test", limit=12, seed=4)
    return {"calibration": list(dev.queries.values()) + list(dev.corpus.values())[:24],
            "eval": list(test.queries.values())[:8] + list(test.corpus.values())[:8]}


def _hf(minilm_dir):
    torch.manual_seed(0)
    return transformers.BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False).eval()


def _embed(model, tok, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_site_computes_what_the_core_computes(scheme, fp32, texts, minilm_dir):
    q = fp32.quantize(SCHEMES[scheme], calibration_texts=texts["calibration"])
    grids = {(spec["kind"], spec.get("act_mode")) for spec in q.site_specs().values()}
    assert len(grids) == {"mixed-grids": 4, "smoothquant-w8": 2, "w4-weight-only": 1}[scheme], grids
    params = q.quant_params()
    model = wrap(_hf(minilm_dir), params)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tok(texts["eval"], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    real = batch["attention_mask"].bool()
    inputs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantLinear):
            mod.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
    emb_t = _embed(model, tok, batch)

    # per site: the same rows through the C core's layer and through the wrapper's
    for site in q.site_names:
        spec = q.site_specs()[site]
        module = site[:-len(".qkv")] + ".query" if site.endswith(".qkv") else site
        x = inputs[module][real]  # the real tokens: what the core computes (no padding)
        st = q.storage_tensors(site)
        lin = _core.Linear(SITE_KINDS[spec["kind"]].code, st[site + ".weight"], w_scales=st.get(site + ".weight_scale"),
                           bias=st[site + ".bias"], act_mul=st.get(site + ".act_mul"), n_threads=1,
                           **SITE_KINDS[spec["kind"]].core_args(spec))
        y_c = lin.forward(np.ascontiguousarray(x.numpy()))
        mods = [module[:-len("query")] + a for a in ("query", "key", "value")] if site.endswith(".qkv") else [module]
        with torch.no_grad():
            y_t = torch.cat([model.get_submodule(m)(x) for m in mods], dim=-1).numpy()
        tol = 2e-5 * max(1.0, float(np.abs(y_c).max()))
        assert np.abs(y_c - y_t).max() <= tol, (scheme, site, float(np.abs(y_c - y_t).max()))

    # end to end: the same grids and arithmetic; where an int8 input lies within float error of a rounding boundary
    # the two forwards round it to neighbouring codes (one step), and such flips spread downstream, so the
    # embeddings agree to about the size of the quantization noise itself, not to float error
    emb_c = q.encode(texts["eval"], normalize=True)
    assert (emb_t * emb_c).sum(1).min() > 0.99
    if scheme.startswith("w"):  # no activation grid: no rounding flips, the same numbers to float error
        assert np.abs(emb_t - emb_c).max() < 1e-5


def test_gradients_flow_through_the_rounding(fp32, texts, minilm_dir):
    """Straight-through: weights and the inputs inside the activation grid get gradients; the sites' parameters are
    the model's own (the optimizer trains them)."""
    q = fp32.quantize("int8-static-asym", calibration_texts=texts["calibration"])
    model = wrap(_hf(minilm_dir), q.quant_params())
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tok(texts["eval"][:4], padding=True, truncation=True, max_length=32, return_tensors="pt")
    model.train()
    out = model(**batch).last_hidden_state.pow(2).mean()
    out.backward()
    site = model.encoder.layer[2].intermediate.dense
    assert isinstance(site, FakeQuantLinear) and site.weight.grad is not None
    assert float(site.weight.grad.abs().sum()) > 0
    names = {n for n, _ in model.named_parameters()}
    assert "encoder.layer.2.intermediate.dense.weight" in names and "encoder.layer.0.attention.self.query.weight" in names
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(model, q.quant_params())
    with pytest.raises(ValueError, match="attention"):
        wrap(_hf(minilm_dir), fp32.quantize("bf16").quant_params())
