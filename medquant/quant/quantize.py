"""Quantizing an fp32 encoder under a scheme: calibration when the scheme needs it, SmoothQuant factors, and the
quantized storage (int8 / int4 weights with their scales, activation scales and zero points per site).

``Encoder.quantize`` calls :func:`quantize`; the encoder it returns holds the storage built here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._native import _core
from ..model import limits
from ..model.architectures import WORD_EMBEDDING_SCALES, WORD_EMBEDDINGS, BertConfig, fp32_sites
from ..model.storage import float_storage, smooth_weight
from .calibration import Calibration, qparams
from .recovery import SiteMoments, corrected_bias, gptq_quantize
from .schemes import SITE_KINDS, QuantScheme, get_scheme

if TYPE_CHECKING:  # pragma: no cover
    from ..model.encoder import Encoder


def calibrate_for(encoder: "Encoder", scheme: QuantScheme, texts: Sequence[str], batch_size: int = 32,
                  max_length: Optional[int] = None, show_progress_bar: Optional[bool] = None) -> Calibration:
    """``encoder.calibrate`` with the scheme's range method, momentum and percentile."""
    return encoder.calibrate(texts, method=scheme.calibration, batch_size=batch_size, max_length=max_length,
                             momentum=scheme.momentum, percentile=scheme.percentile,
                             show_progress_bar=show_progress_bar)


def quantize(encoder: "Encoder", scheme, calibration_texts: Optional[Sequence[str]] = None,
             calibration: Optional[Calibration] = None, batch_size: int = 32,
             show_progress_bar: Optional[bool] = None) -> "Encoder":
    """A new Encoder quantized under ``scheme`` (a preset name, dict or QuantScheme); ``encoder`` is untouched.

    Static int8 schemes need calibration: pass ``calibration_texts`` (a few hundred representative texts) or a
    ``calibration`` from :meth:`Encoder.calibrate`. SmoothQuant needs ``calibration_texts`` (its ranges are measured
    after smoothing), and so do GPTQ rounding and bias correction (one more pass gathers the moments of every
    site's input, see :mod:`medquant.quant.recovery`).

    ``scheme`` may be a :class:`~medquant.quant.params.QuantParams`: the weights are then quantized with its
    parameters (:meth:`QuantParams.apply`); calibration arguments are refused, nothing is calibrated.
    """
    from .params import QuantParams

    if isinstance(scheme, QuantParams):
        if calibration_texts is not None or calibration is not None:
            raise ValueError("quantize(QuantParams) applies given parameters: calibration_texts and calibration "
                             "are not used; pass the scheme instead to calibrate anew")
        return scheme.apply(encoder)
    scheme = get_scheme(scheme)
    batch_size = limits.batch_size(batch_size)
    params = encoder.fp32_params
    if params is None:
        raise ValueError("quantize() starts from fp32 weights; this encoder was loaded quantized. Load the fp32 "
                         "checkpoint and quantize that.")
    names = encoder.site_names
    int8_sites = scheme.quantized_input_sites(names)
    if calibration_texts is not None:
        calibration_texts = limits.texts(calibration_texts)
    need_calib = scheme.needs_calibration_for(names)
    if need_calib and calibration is None and calibration_texts is None:
        raise ValueError(f"scheme {scheme.name!r} needs calibration: pass calibration_texts=[...] or "
                         "calibration=encoder.calibrate(texts)")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError("calibration must be a medquant Calibration (from Encoder.calibrate)")
    if calibration is not None and calibration.sites != names:
        raise ValueError("calibration was gathered on a model with different sites")
    recovery_sites = scheme.recovery_sites(names)
    if recovery_sites and calibration_texts is None:
        raise ValueError(f"scheme {scheme.name!r} rounds with GPTQ or corrects biases: pass calibration_texts=[...] "
                         "(the statistics of every site's input are gathered from them)")

    act_mul: Dict[str, np.ndarray] = {}
    if scheme.smoothquant_alpha is not None and int8_sites:
        calibration, act_mul = _smoothquant_calibration(encoder, scheme, int8_sites, calibration, calibration_texts,
                                                        batch_size, show_progress_bar)
    elif need_calib and calibration is None:
        calibration = calibrate_for(encoder, scheme, calibration_texts, batch_size,
                                    show_progress_bar=show_progress_bar)
    moments = {}
    if recovery_sites:
        moments = recovery_moments(encoder, scheme, recovery_sites, act_mul, calibration, calibration_texts,
                                   batch_size, show_progress_bar)
    storage, sites = quantized_storage(params, encoder.config, scheme, act_mul, calibration, moments)
    return encoder.with_storage(storage, sites, scheme, fp32=params, reference=encoder)


def recovery_moments(encoder: "Encoder", scheme: QuantScheme, sites: Sequence[str], act_mul: Mapping[str, np.ndarray],
                     calibration: Optional[Calibration], texts: Sequence[str], batch_size: int = 32,
                     show_progress_bar: Optional[bool] = None) -> Dict[str, SiteMoments]:
    """The moments of the inputs of ``sites`` over ``texts``, as the fp32 model (smoothed by ``act_mul``) computes
    them: column means, the Gram matrix where the site rounds with GPTQ, and the means on the site's static
    activation grid where it corrects its bias."""
    grams, grids = [], {}
    for name in sites:
        site = scheme.for_site(name)
        if site.rounding == "gptq":
            grams.append(name)
        if site.bias_correction and SITE_KINDS[site.site_kind(name)].quantized_input and site.mode == "static":
            act = activation_spec(name, site, calibration)
            grids[name] = (act["act_scale"], act["act_zero_point"])
    if not act_mul and encoder.is_fp32 and not any(k.endswith(".act_mul") for k in encoder.storage_tensors()):
        stats = encoder  # the fp32 model itself: no second load
    else:
        fp32 = get_scheme("fp32")
        stats = encoder.with_storage(*float_storage(encoder.fp32_params, encoder.config, fp32, act_mul or None), fp32)
    raw = stats.collect_moments(texts, sites, gram_sites=grams, grids=grids, batch_size=batch_size,
                                show_progress_bar=show_progress_bar)
    return {name: SiteMoments.from_observer(m) for name, m in raw.items()}


def _smoothquant_calibration(encoder: "Encoder", scheme: QuantScheme, int8_sites, calibration, calibration_texts,
                             batch_size, show_progress_bar) -> Tuple[Calibration, Dict[str, np.ndarray]]:
    """SmoothQuant factors from a calibration of the fp32 encoder, then the ranges of the smoothed activations."""
    if calibration_texts is None:
        raise ValueError("SmoothQuant needs calibration_texts: ranges are measured after smoothing")
    base = calibration or calibrate_for(encoder, scheme, calibration_texts, batch_size,
                                        show_progress_bar=show_progress_bar)
    act_mul = smoothquant_factors(encoder.fp32_params, encoder.config, base, int8_sites, scheme.smoothquant_alpha)
    # ranges of the smoothed activations: calibrate an fp32 encoder that applies the smoothing
    fp32 = get_scheme("fp32")
    smoothed = encoder.with_storage(*float_storage(encoder.fp32_params, encoder.config, fp32, act_mul), fp32)
    calibration = calibrate_for(smoothed, scheme, calibration_texts, batch_size, show_progress_bar=show_progress_bar)
    calibration.act_mul = act_mul
    return calibration, act_mul


def smoothquant_factors(params: Mapping[str, np.ndarray], cfg: BertConfig, calib: Calibration, sites,
                        alpha: float) -> Dict[str, np.ndarray]:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); activations are multiplied by 1/s, weights by s."""
    sites_fp32 = fp32_sites(params, cfg)
    out = {}
    for n in sites:
        ax = calib.column_absmax(n).astype(np.float64)
        wx = np.abs(sites_fp32[n][0]).max(axis=0).astype(np.float64)
        s = np.power(np.maximum(ax, 1e-5), alpha) / np.power(np.maximum(wx, 1e-5), 1.0 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        out[n] = (1.0 / s).astype(np.float32)
    return out


def quantized_storage(params: Mapping[str, np.ndarray], cfg: BertConfig, scheme: QuantScheme,
                      act_mul: Mapping[str, np.ndarray], calibration: Optional[Calibration],
                      moments: Optional[Mapping[str, SiteMoments]] = None):
    """(storage, site specs) of fp32 parameters quantized under ``scheme`` (``moments``: of the sites that round
    with GPTQ or correct their bias, from :func:`recovery_moments`)."""
    moments = moments or {}
    storage, _ = float_storage(params, cfg, get_scheme("fp32"))
    if scheme.embeddings == "int8":
        q, s = _core.quantize_rows_s8(params[WORD_EMBEDDINGS])
        storage[WORD_EMBEDDINGS] = q
        storage[WORD_EMBEDDING_SCALES] = s
    sites = {}
    for name, (w, b) in fp32_sites(params, cfg).items():
        storage[name + ".bias"] = b
        sites[name] = _quantize_site(storage, name, w, scheme.for_site(name), act_mul.get(name), calibration,
                                     moments.get(name))
    return storage, sites


def activation_spec(name: str, site: QuantScheme, calibration: Optional[Calibration]) -> Dict:
    """The activation entries of a site spec whose input is int8 under the site's scheme ``site``: mode, symmetry,
    and for static quantization the calibrated range, scale and zero point."""
    spec: Dict = {"act_mode": site.mode, "act_symmetric": bool(site.act_symmetric)}
    if site.mode == "static":
        lo, hi = calibration.range(name, site.calibration, site.act_symmetric, site.percentile)
        scale, zp = qparams(lo, hi, site.act_symmetric)
        spec.update(act_scale=float(scale), act_zero_point=int(zp), act_range=[lo, hi])
    return spec


def _quantize_site(storage: Dict[str, np.ndarray], name: str, w: np.ndarray, site: QuantScheme,
                   mul: Optional[np.ndarray], calibration: Optional[Calibration],
                   moments: Optional[SiteMoments]) -> Dict:
    """Store one site's weight as its kind (see ``SITE_KINDS``) under its scheme ``site``; return the site's spec.
    GPTQ rounding and bias correction (as ``site`` asks) use the site's input ``moments``."""
    kind = SITE_KINDS[site.site_kind(name)]
    spec: Dict = {"kind": kind.name}
    if kind.is_float:
        storage[name + ".weight"] = w
        return spec
    if mul is not None:
        w = smooth_weight(w, mul)
        storage[name + ".act_mul"] = mul
    if site.rounding == "gptq":
        codes, scales = gptq_quantize(w, moments.hessian(), kind.weight_grid(site), site.gptq_damp)
        tensors, weight_spec = kind.store_codes(codes, scales), kind.weight_spec(site)
    else:
        tensors, weight_spec = kind.quantize_weight(w, site)
    storage.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
    spec.update(weight_spec)
    if kind.quantized_input:
        spec.update(activation_spec(name, site, calibration))
    if site.bias_correction:
        static_input = kind.quantized_input and site.mode == "static"
        storage[name + ".bias"] = corrected_bias(storage[name + ".bias"], w, kind.dequantize(tensors, spec), moments,
                                                 static_input)
    return spec


__all__ = ["activation_spec", "calibrate_for", "quantize", "quantized_storage", "recovery_moments", "smoothquant_factors"]
