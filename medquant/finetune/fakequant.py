"""Quantization-aware fine-tuning: a Hugging Face BERT whose quantized sites compute what medquant's C core computes.

:func:`wrap` takes a ``transformers`` BERT (a ``BertModel``, or a sentence-transformers model holding one) and a
:class:`medquant.QuantParams` and swaps, in place, every quantized site for a module that applies the C core's
arithmetic in the forward pass (needs torch: ``pip install 'medquant[finetune]'``):

* int8 input (static): ``q = clamp(rint(x * m * (1 / s)) + zp, 0, 255)``, computed with ``(x * m) * (1 / s)`` in
  float32 as ``csrc/qparams.h`` does (m: the SmoothQuant factors, 1 without), the layer then multiplies
  ``(q - zp) * s``; dynamic: ``s, zp`` from the min / max over the real (unpadded) tokens of the batch, asymmetric
  (or symmetric, zero point 128), the range widened to hold 0, as ``mq_qparams_asym_u8`` / ``_sym_u8``; per-token:
  one symmetric scale per token, ``max|x * m| / 127``.
* int8 weights: ``w' = w / m``; per channel ``s_n = max_k |w'_nk| / 127`` (per tensor: one scale over the site's
  whole weight, over Q, K and V together for the fused ``qkv`` site), ``q = clamp(rint(w' / s), -127, 127)``;
  int4: one scale per group of ``group_size`` inputs, ``max |w'| / 7``, codes in [-7, 7]. Scales are recomputed from
  the current weights at every step (``weight_scales="current"``: what quantizing the trained model with the scheme
  does) or taken from the parameters (``"given"``: what :meth:`QuantParams.apply` does).
* bf16 sites: input and weight rounded to bf16 (round to nearest even), products in float32.
* int8 word embeddings: each row ``rint(e / s_r) * s_r`` with ``s_r = max |e_r| / 127``.

Gradients pass straight through the rounding (the straight-through estimator) and stop where a value is clipped
(outside the activation grid), so training sees its quantization error and learns around it. Sites kept in fp32 are
left as they are. Attention in bf16 (the ``bf16`` preset's ``attention="bf16"``) is not simulated: such parameters
are refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from ..model.architectures import parse_site, site_names

if TYPE_CHECKING:  # pragma: no cover
    from ..quant.params import QuantParams

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - the [finetune] extra is missing
    raise ImportError("medquant.finetune.fakequant needs torch: pip install 'medquant[finetune]'") from e

WEIGHT_SCALES = ("current", "given")
_QKV = ("query", "key", "value")


def _f32(a) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, the identity's gradient to ``x`` in the backward pass."""
    return x + (q - x).detach()


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to bf16 (nearest even) and widen back, as ``mq_f32_to_bf16`` does for finite values."""
    return x.to(torch.bfloat16).to(torch.float32)


class _Mask:
    """The attention mask of the batch being computed (set by a forward pre-hook on the BERT model), so that dynamic
    ranges are taken over the real tokens only, as the C core (which computes no padding) takes them."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None


class ActQuant(nn.Module):
    """The u8 input grid of one int8 site (see the module docstring); ``mul``: SmoothQuant factors or None."""

    def __init__(self, spec: Dict, mul: Optional[np.ndarray], mask: _Mask):
        super().__init__()
        self.mode = spec["act_mode"]
        self.symmetric = bool(spec["act_symmetric"])
        self._mask = mask
        self.register_buffer("mul", _f32(mul) if mul is not None else None)
        if self.mode == "static":
            self.register_buffer("scale", torch.tensor(float(np.float32(spec["act_scale"])), dtype=torch.float32))
            self.register_buffer("zero_point", torch.tensor(float(spec["act_zero_point"]), dtype=torch.float32))

    def _real_rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self._mask.mask
        if m is None or m.shape != x.shape[:-1]:
            return x.reshape(-1, x.shape[-1])
        return x[m.to(torch.bool)]

    def grid(self, xs: torch.Tensor):
        """(scale, zero point) as float32 tensors for the smoothed input ``xs``: static, or from this batch."""
        if self.mode == "static":
            return self.scale, self.zero_point
        with torch.no_grad():
            real = self._real_rows(xs)
            lo, hi = real.min().clamp(max=0.0), real.max().clamp(min=0.0)
            if self.symmetric:
                a = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-30)
                return (a / 127.0).to(torch.float32), torch.tensor(128.0)
            span = (hi - lo).clamp(min=1e-30)
            scale = (span / 255.0).to(torch.float32)
            zp = torch.clamp(torch.round(-lo / scale), 0.0, 255.0)
            return scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x * self.mul if self.mul is not None else x
        if self.mode == "dynamic-token":
            with torch.no_grad():
                a = xs.abs().amax(dim=-1, keepdim=True)
                scale = torch.where(a > 1e-30, a / 127.0, torch.full_like(a, 1e-30))
            zp = 128.0
        else:
            scale, zp = self.grid(xs)
        inv = 1.0 / scale
        with torch.no_grad():
            q = torch.clamp(torch.round(torch.clamp(xs * inv, -512.0, 512.0)) + zp, 0.0, 255.0)
        lo, hi = (0.0 - zp) * scale, (255.0 - zp) * scale
        inside = torch.maximum(torch.minimum(xs, hi), lo) if torch.is_tensor(lo) else xs.clamp(lo, hi)
        return _ste(inside, (q - zp) * scale)


class WeightQuant(nn.Module):
    """The stored grid of one site's weight: int8 per channel / per tensor or int4 group-wise (module docstring)."""

    def __init__(self, spec: Dict, given: Optional[np.ndarray], weight_scales: str, mul: Optional[np.ndarray]):
        super().__init__()
        self.bits = 4 if "group_size" in spec else 8
        self.qmax = 7.0 if self.bits == 4 else 127.0
        self.group = int(spec.get("group_size", 0))
        self.per_channel = bool(spec.get("w_per_channel", True))
        self.weight_scales = weight_scales
        self.register_buffer("given", _f32(given) if given is not None else None)
        self.register_buffer("mul", _f32(mul) if mul is not None else None)

    def smoothed(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.mul[None, :] if self.mul is not None else w

    def scales(self, ws: torch.Tensor, tensor_absmax: Optional[torch.Tensor] = None,
               rows: Optional[slice] = None) -> torch.Tensor:
        """Scales broadcastable to ``ws`` ([N, K] or [N, K/g, g] for int4)."""
        tiny = torch.finfo(torch.float32).tiny
        if self.weight_scales == "given":
            s = self.given
            if self.bits == 4:
                return s.reshape(-1, ws.shape[1] // self.group)[rows or slice(None)][..., None]
            return s[rows or slice(None)][:, None] if self.per_channel else s.reshape(1, 1)
        with torch.no_grad():
            if self.bits == 4:
                a = ws.reshape(ws.shape[0], -1, self.group).abs().amax(dim=-1, keepdim=True)
            elif self.per_channel:
                a = ws.abs().amax(dim=1, keepdim=True)
            else:
                a = tensor_absmax.reshape(1, 1)
            s = a / self.qmax
            return torch.where(s >= tiny, s, torch.where(a > 0, torch.full_like(s, tiny), torch.ones_like(s)))

    def forward(self, w: torch.Tensor, tensor_absmax: Optional[torch.Tensor] = None,
                rows: Optional[slice] = None) -> torch.Tensor:
        ws = self.smoothed(w)
        s = self.scales(ws, tensor_absmax, rows)
        if self.bits == 4:
            shaped = ws.reshape(ws.shape[0], -1, self.group)
            with torch.no_grad():
                q = torch.clamp(torch.round(shaped / s), -self.qmax, self.qmax)
            return _ste(shaped, q * s).reshape(ws.shape)
        with torch.no_grad():
            q = torch.clamp(torch.round(ws / s), -self.qmax, self.qmax)
        return _ste(ws, q * s)


class FakeQuantLinear(nn.Module):
    """A linear layer of one site (or one of Q, K, V of the fused ``qkv`` site) computing as the C core does.

    ``linear``: the original ``nn.Linear`` (its parameters are reused, so the optimizer trains them); ``kind``: the
    site's kind; ``share``: for Q, K and V, the other two layers' weights (a per-tensor scale spans all three) and
    this layer's rows of the fused weight (given scales)."""

    def __init__(self, linear: nn.Linear, kind: str, act: Optional[ActQuant], wq: Optional[WeightQuant],
                 siblings: Optional[List[nn.Linear]] = None, rows: Optional[slice] = None):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.kind = kind
        self.act = act
        self.wq = wq
        self._siblings = siblings or []  # plain list: not registered twice as submodules
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bf16":
            return nn.functional.linear(_ste(x, round_bf16(x)), _ste(self.weight, round_bf16(self.weight)),
                                        self.bias)
        xin = self.act(x) if self.act is not None else x
        absmax = None
        if self.wq.bits == 8 and not self.wq.per_channel and self.wq.weight_scales == "current":
            with torch.no_grad():
                ws = [self.wq.smoothed(w).abs().amax() for w in [self.weight] + [s.weight for s in self._siblings]]
                absmax = torch.stack(ws).amax()
        return nn.functional.linear(xin, self.wq(self.weight, absmax, self.rows), self.bias)


class FakeQuantEmbedding(nn.Module):
    """int8 word embeddings: every looked-up row on its own symmetric grid (``rint(e / s_r) * s_r``)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.weight = emb.weight
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = nn.functional.embedding(ids, self.weight, self.padding_idx)
        with torch.no_grad():
            a = e.abs().amax(dim=-1, keepdim=True)
            tiny = torch.finfo(torch.float32).tiny
            s = a / 127.0
            s = torch.where(s >= tiny, s, torch.where(a > 0, torch.full_like(s, tiny), torch.ones_like(s)))
            q = torch.clamp(torch.round(e / s), -127.0, 127.0)
        return _ste(e, q * s)


def _bert(model) -> nn.Module:
    """The BertModel inside ``model`` (itself, a sentence-transformers model, or a model with ``.bert``)."""
    if hasattr(model, "encoder") and hasattr(model, "embeddings"):
        return model
    for attr in ("auto_model", "bert", "model"):
        inner = getattr(model, attr, None)
        if inner is not None and hasattr(inner, "encoder") and hasattr(inner, "embeddings"):
            return inner
    if isinstance(model, nn.Sequential) or hasattr(model, "_first_module"):
        first = model[0]
        return _bert(first)
    raise TypeError(f"cannot find a BERT model (embeddings + encoder) in {type(model).__name__}")


def wrap(model, params: "QuantParams", *, weight_scales: str = "current") -> nn.Module:
    """Swap ``model``'s quantized sites (in place) for modules that compute as the C core does under ``params``;
    returns ``model``. ``weight_scales``: "current" (recomputed from the weights at every step) or "given" (the
    exported scales). See the module docstring."""
    if weight_scales not in WEIGHT_SCALES:
        raise ValueError(f"weight_scales must be one of {', '.join(WEIGHT_SCALES)}, got {weight_scales!r}")
    if params.scheme.attention != "fp32":
        raise ValueError(f"scheme {params.scheme.name!r} computes attention in {params.scheme.attention}; "
                         "quantization-aware training simulates fp32 attention only")
    bert = _bert(model)
    if getattr(bert, "_medquant_wrapped", False):
        raise ValueError("this model is already wrapped for quantization-aware training")
    cfg = bert.config
    have = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}
    if have != params.model:
        raise ValueError(f"the parameters are for a model of another shape ({params.model} vs {have})")
    mask = _Mask()
    bert.register_forward_pre_hook(_mask_hook(mask), with_kwargs=True)
    if params.scheme.embeddings == "int8":
        bert.embeddings.word_embeddings = FakeQuantEmbedding(bert.embeddings.word_embeddings)
    for name in site_names(cfg.num_hidden_layers):
        spec = params.sites[name]
        kind = spec["kind"]
        if kind == "fp32":
            continue
        layer, _ = parse_site(name)
        block = bert.encoder.layer[layer]
        mul = params.tensors.get(name + ".act_mul")
        given = params.tensors.get(name + ".weight_scale")
        act = ActQuant(spec, mul, mask) if kind == "int8" else None
        if name.endswith(".qkv"):
            lins = [getattr(block.attention.self, a) for a in _QKV]
            n = lins[0].out_features
            for i, a in enumerate(_QKV):
                wq = None if kind == "bf16" else WeightQuant(spec, given, weight_scales, mul)
                others = [lin for j, lin in enumerate(lins) if j != i]
                setattr(block.attention.self, a, FakeQuantLinear(lins[i], kind, act, wq, others,
                                                                 slice(i * n, (i + 1) * n)))
        else:
            parent_name, attr = name.rsplit(".", 1)
            parent = bert.get_submodule(parent_name)
            wq = None if kind == "bf16" else WeightQuant(spec, given, weight_scales, mul)
            setattr(parent, attr, FakeQuantLinear(getattr(parent, attr), kind, act, wq))
    bert._medquant_wrapped = True
    return model


def _mask_hook(mask: _Mask):
    def hook(module, args, kwargs):
        m = kwargs.get("attention_mask")
        if m is None and len(args) > 1:
            m = args[1]
        mask.mask = m if (m is not None and m.dim() == 2) else None
        return None

    return hook


def unwrap_state_dict(model) -> Dict[str, torch.Tensor]:
    """The trained float weights of a wrapped model, under the original parameter names (the fake-quant modules
    hold the original parameters, so a state dict of the model already has them; this drops the buffers)."""
    bert = _bert(model)
    return {k: v for k, v in bert.state_dict().items()
            if not any(k.endswith(s) for s in (".mul", ".scale", ".zero_point", ".given"))}


__all__ = ["ActQuant", "FakeQuantEmbedding", "FakeQuantLinear", "WeightQuant", "round_bf16", "unwrap_state_dict",
           "wrap"]
