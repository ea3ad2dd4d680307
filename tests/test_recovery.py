"""Training-free recovery: the moments the C core gathers (csrc/moments.h), GPTQ rounding, bias correction, and
per-site scheme overrides."""
import json

import numpy as np
import pytest

import medquant
from medquant._native import _core
from medquant.model.architectures import fp32_sites
from medquant.quant.recovery import SiteMoments, WeightGrid, gptq_quantize, pack_s4
from medquant.quant.schemes import SITE_KINDS, QuantScheme, get_scheme


# ---------------------------------------------------------------------------------------------------- moments (C)
def _fq(x, scale, zp):
    """The u8 grid of csrc/qparams.h in numpy: q = clamp(rint(x * (1 / scale)) + zp, 0, 255)."""
    inv = np.float32(1.0) / np.float32(scale)
    q = np.clip(np.rint(x.astype(np.float32) * inv) + zp, 0, 255)
    return (q.astype(np.float64) - zp) * np.float64(np.float32(scale))


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((333, 40)) * rng.uniform(0.1, 9, 40)).astype(np.float32)
    obs = _core.Observer()
    obs.track_moments(gram=True)
    obs.set_grid(0.04, 117)
    obs.update(x[:100])
    obs.update(x[100:])
    obs.update(x[:7].ravel())  # 1-D updates feed the histogram only
    m = obs.moments()
    x64 = x.astype(np.float64)
    assert m["rows"] == 333
    np.testing.assert_allclose(m["column_sum"], x64.sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m["grid_column_sum"], _fq(x, 0.04, 117).sum(0), rtol=1e-12, atol=1e-9)
    gram = x64.T @ x64
    np.testing.assert_allclose(m["gram"], gram, rtol=1e-5, atol=1e-4 * np.abs(gram).max())
    fq = _fq(x, 0.04, 117)
    assert fq.min() > x.min() and fq.max() < x.max()  # the grid clips at both ends: covered
    obs.reset()  # forgets the sums, keeps tracking (and the grid)
    obs.update(x[:5])
    m = obs.moments()
    assert m["rows"] == 5 and m["gram"].shape == (40, 40)
    np.testing.assert_allclose(m["grid_column_sum"], _fq(x[:5], 0.04, 117).sum(0), rtol=1e-12, atol=1e-9)


def test_moments_refuse_misuse():
    obs = _core.Observer()
    with pytest.raises(ValueError, match="does not track moments"):
        obs.moments()
    obs.track_moments()
    with pytest.raises(ValueError, match="no matrix rows"):
        obs.moments()
    obs.update(np.ones((3, 4), np.float32))
    assert obs.moments()["gram"] is None and obs.moments()["grid_column_sum"] is None
    with pytest.raises(RuntimeError, match="before the first update"):
        obs.set_grid(0.1, 3)
    with pytest.raises(RuntimeError, match="from the first update"):
        obs.track_moments(gram=True)
    with pytest.raises(ValueError, match="cols must stay"):
        obs.update(np.ones((3, 5), np.float32))
    fresh = _core.Observer()
    fresh.track_moments()
    for scale, zp in ((0.0, 0), (float("nan"), 0), (0.1, 256), (0.1, -1)):
        with pytest.raises(ValueError):
            fresh.set_grid(scale, zp)
    bad = np.ones((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fresh.update(bad)
    with pytest.raises(ValueError, match="no matrix rows"):  # nothing of the refused batch was kept
        fresh.moments()


def test_collect_moments_is_the_site_inputs(tiny, medquad_questions):
    """Encoder.collect_moments == the moments of the inputs the observers of a calibration see (via a numpy
    reference of the first site: the embedding LayerNorm output over all real tokens)."""
    site = tiny.site_names[0]
    texts = medquad_questions[:12]
    m = tiny.collect_moments(texts, [site, tiny.site_names[2]], gram_sites=[site], grids={site: (0.05, 120)})
    ids, mask, tt = tiny.tokenize(texts)
    hidden0 = _embedding_ln(tiny, ids, tt)[mask.astype(bool)]
    np.testing.assert_allclose(m[site]["column_sum"], hidden0.sum(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(m[site]["gram"], hidden0.T @ hidden0, rtol=1e-4, atol=1e-2)
    assert m[site]["rows"] == int(mask.sum()) and m[tiny.site_names[2]]["gram"] is None
    with pytest.raises(ValueError, match="unknown site"):
        tiny.collect_moments(texts, ["encoder.layer.0.nope"])
    with pytest.raises(ValueError, match="listed in sites"):
        tiny.collect_moments(texts, [site], gram_sites=[tiny.site_names[1]])


def _embedding_ln(enc, ids, tt):
    p, eps = enc.fp32_params, enc.config.layer_norm_eps
    x = (p["embeddings.word_embeddings.weight"][ids] + p["embeddings.position_embeddings.weight"][None, :ids.shape[1]]
         + p["embeddings.token_type_embeddings.weight"][tt]).astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["embeddings.LayerNorm.weight"] + p["embeddings.LayerNorm.bias"]


# ---------------------------------------------------------------------------------------------------- GPTQ
def test_pack_s4_is_the_core_layout():
    rng = np.random.default_rng(1)
    codes = rng.integers(-7, 8, size=(6, 64)).astype(np.int8)
    scales = rng.uniform(0.01, 1, size=6 * 2).astype(np.float32)
    w = _core.dequantize_weight_s4(pack_s4(codes), scales, 32)
    np.testing.assert_array_equal(w, codes * np.repeat(scales.reshape(6, 2), 32, axis=1))


@pytest.mark.parametrize("grid", [WeightGrid(127, per_channel=True), WeightGrid(127, per_channel=False)])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(grid):
    """With H = I no error has anywhere to go: GPTQ is round to nearest, as the core rounds."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 48)).astype(np.float32)
    codes, scales = gptq_quantize(w, np.eye(48), grid, damp=0.01)
    q, s = _core.quantize_weight_s8(w, grid.per_channel)
    np.testing.assert_array_equal(scales, s)
    assert np.mean(codes == q) > 0.999  # float64 vs float32 division may differ on an exact tie


def test_gptq_refuses_bad_input():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, np.eye(6), WeightGrid(127))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, np.eye(8), WeightGrid(7, group=6))
    with pytest.raises(ValueError, match="gptq_damp"):
        QuantScheme(weights="int4", activations="fp32", rounding="gptq", gptq_damp=0.0)
    with pytest.raises(ValueError, match="rounding"):
        QuantScheme(weights="int4", activations="fp32", rounding="stochastic")


@pytest.fixture(scope="module")
def calib_and_heldout(medquad):
    from medquant.eval.datasets import medquad_retrieval
    from medquant.quant.calibration import sample_calibration_texts

    test = medquad_retrieval("test", limit=100)
    dev = medquad_retrieval("dev", limit=50)
    calib = sample_calibration_texts(list(test.queries.values()), list(test.corpus.values()), 64, 0)
    return calib, list(dev.queries.values())[:24] + list(dev.corpus.values())[:24]


def _tensors(enc, site):
    """A site's stored tensors by suffix (weight, bias, weight_scale, ...)."""
    return {k[len(site) + 1:]: v for k, v in enc.storage_tensors(site).items()}


def _weight_error(enc, q, name, gram):
    """tr(D G D^T): the squared output error of a site's weight rounding D = W_q - W on inputs with Gram G."""
    w = fp32_sites(enc.fp32_params, enc.config)[name][0].astype(np.float64)
    spec = q.site_specs()[name]
    d = SITE_KINDS[spec["kind"]].dequantize(_tensors(q, name), spec).astype(np.float64) - w
    return float(np.sum((d @ gram) * d))


@pytest.mark.slow
def test_gptq_lowers_every_site_output_error(minilm, calib_and_heldout):
    """On real activations of held-out texts, GPTQ's weights give a smaller layer output error than round to
    nearest at every site: int4 groups on every site, int8 per-tensor weights on every site (one scheme, by
    overrides, to quantize the model once)."""
    calib, held = calib_and_heldout
    names = minilm.site_names
    base = QuantScheme(name="mixed", weights="int4", activations="fp32", group_size=32,
                       overrides={"*.attention.*": {"weights": "int8", "weight_granularity": "per-tensor"}})
    per_tensor = base.replace(overrides={"*": {"weights": "int8", "weight_granularity": "per-tensor"}})
    grams = minilm.collect_moments(held, names, gram_sites=names)
    for scheme in (base, per_tensor):
        rtn = minilm.quantize(scheme, show_progress_bar=False)
        gptq = minilm.quantize(scheme.replace(rounding="gptq"), calibration_texts=calib, show_progress_bar=False)
        for name in names:
            e_rtn, e_gptq = (_weight_error(minilm, q, name, grams[name]["gram"]) for q in (rtn, gptq))
            assert e_gptq < e_rtn, (scheme.site_kind(name), name, e_gptq, e_rtn)


# ---------------------------------------------------------------------------------------------------- overrides
def test_overrides_choose_per_site_settings():
    s = get_scheme("int8-static-asym").replace(
        name="mixed", keep_fp32=["encoder.layer.0.output.dense"],
        overrides={"encoder.layer.*.output.dense": {"mode": "dynamic-token", "act_symmetric": True},
                   "encoder.layer.1.*": {"weights": "int4", "activations": "fp32", "rounding": "gptq"}})
    assert s.site_kind("encoder.layer.0.output.dense") == "fp32"            # keep lists first
    assert s.for_site("encoder.layer.1.output.dense").mode == "dynamic-token"  # then the first matching pattern
    assert s.site_kind("encoder.layer.1.attention.self.qkv") == "w4"
    assert s.site_kind("encoder.layer.2.attention.self.qkv") == "int8"
    assert s.recovery_sites(["encoder.layer.1.intermediate.dense", "encoder.layer.2.intermediate.dense"]) == [
        "encoder.layer.1.intermediate.dense"]
    assert s.needs_calibration_texts and s.needs_calibration
    again = QuantScheme.from_dict(json.loads(s.to_json()))
    assert again == s and again.overrides[0][0] == "encoder.layer.*.output.dense"  # order kept through JSON
    with pytest.raises(ValueError, match="cannot be set per site"):
        s.replace(overrides={"*": {"embeddings": "fp32"}})
    with pytest.raises(ValueError, match="must be symmetric"):
        s.replace(overrides={"*": {"mode": "dynamic-token"}})
    with pytest.raises(TypeError, match="pattern"):
        s.replace(overrides=[(3, {"mode": "dynamic"})])
    only_dynamic = get_scheme("w8-weight-only").replace(overrides={"*.qkv": {"activations": "int8", "mode": "static"}})
    assert only_dynamic.needs_calibration_for(["encoder.layer.0.attention.self.qkv"])
    assert not only_dynamic.needs_calibration_for(["encoder.layer.0.output.dense"])


def test_mixed_scheme_saves_and_reloads_bit_identical(tiny, tmp_path, medquad_questions):
    texts = medquad_questions[:24]
    s = get_scheme("int8-static-asym").replace(
        name="mixed", bias_correction=True,
        overrides={"encoder.layer.*.output.dense": {"mode": "dynamic-token", "act_symmetric": True},
                   "encoder.layer.0.intermediate.dense": {"weights": "int4", "activations": "fp32",
                                                          "rounding": "gptq", "group_size": 16}})
    q = tiny.quantize(s, calibration_texts=texts, show_progress_bar=False)
    assert q.site_kinds()["encoder.layer.0.intermediate.dense"] == "w4"
    assert q.site_specs()["encoder.layer.1.output.dense"]["act_mode"] == "dynamic-token"
    assert not np.array_equal(_tensors(q, "encoder.layer.0.attention.self.qkv")["bias"],
                              fp32_sites(tiny.fp32_params, tiny.config)["encoder.layer.0.attention.self.qkv"][1])
    q.save_pretrained(tmp_path / "m")
    back = medquant.Encoder.from_pretrained(tmp_path / "m")
    assert back.scheme == s
    np.testing.assert_array_equal(back.encode(texts), q.encode(texts))


def test_saves_without_the_new_scheme_fields_load(tiny_int8, tmp_path, medquad_questions):
    """Saves made before rounding / bias_correction / overrides existed load with their defaults."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    d = tiny_int8.save_pretrained(tmp_path / "old")
    path = d / "model.safetensors"
    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata())
    scheme = json.loads(meta["scheme"])
    for key in ("rounding", "gptq_damp", "bias_correction", "overrides"):
        del scheme[key]
    meta["scheme"] = json.dumps(scheme)
    save_file(load_file(str(path)), str(path), metadata=meta)
    back = medquant.Encoder.from_pretrained(d)
    assert back.scheme == tiny_int8.scheme
    np.testing.assert_array_equal(back.encode(medquad_questions[:4]), tiny_int8.encode(medquad_questions[:4]))


# ---------------------------------------------------------------------------------------------------- bias correction
@pytest.mark.slow
def test_bias_correction_lowers_every_site_mean_output_error(minilm, calib_and_heldout):
    """The mean output error of every corrected site, E[W_q fq(x) + b'] - E[W x + b] on held-out texts (fq: the
    site's static activation grid; x for weight-only sites), is smaller with the corrected bias b' than with b."""
    calib, held = calib_and_heldout
    names = minilm.site_names
    scheme = get_scheme("int8-static-asym").replace(
        name="bc", overrides={"*.intermediate.dense": {"weights": "int4", "activations": "fp32"}})
    plain = minilm.quantize(scheme, calibration_texts=calib, show_progress_bar=False)
    corrected = minilm.quantize(scheme.replace(bias_correction=True), calibration_texts=calib,
                                show_progress_bar=False)
    specs = plain.site_specs()
    grids = {n: (specs[n]["act_scale"], specs[n]["act_zero_point"]) for n in names if "act_scale" in specs[n]}
    held_moments = minilm.collect_moments(held, names, grids=grids)
    w_fp32 = fp32_sites(minilm.fp32_params, minilm.config)
    for name in names:
        m = SiteMoments.from_observer(held_moments[name])
        x_q = m.grid_mean if name in grids else m.mean
        w_q = SITE_KINDS[specs[name]["kind"]].dequantize(_tensors(plain, name), specs[name]).astype(np.float64)
        w, b = (a.astype(np.float64) for a in w_fp32[name])
        errors = [np.linalg.norm(w_q @ x_q + _tensors(q, name)["bias"] - (w @ m.mean + b)) for q in (plain, corrected)]
        assert errors[1] < errors[0], (name, errors)
    np.testing.assert_array_equal(_tensors(plain, names[0])["weight"], _tensors(corrected, names[0])["weight"])


@pytest.mark.filterwarnings("ignore::medquant.eval.runinfo.ThroughputWarning")
def test_evaluate_gives_gptq_schemes_their_calibration_texts(tiny, medquad):
    """A weight-only GPTQ scheme needs no activation calibration but does need texts: evaluate draws them."""
    from medquant.eval.datasets import medquad_retrieval

    gptq = get_scheme("w4-weight-only").replace(name="w4-gptq", rounding="gptq", group_size=16)
    df = medquant.evaluate([gptq], medquad_retrieval("dev", limit=8), model=tiny, index_kinds=(), n_boot=50,
                           calibration_size=16, show_progress_bar=False)
    assert list(df["scheme"]) == ["fp32", "w4-gptq"]
    assert df.attrs["calibration"]["n_texts"] == 16
