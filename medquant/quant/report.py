"""The per-site quantization report: how far each linear layer's output of a quantized encoder is from an fp32
reference on some texts (SQNR, relative error) and how close the pooled embeddings stay (cosine)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd

from ..model import limits
from ..model.architectures import site_layer, site_module

if TYPE_CHECKING:  # pragma: no cover
    from ..model.encoder import Encoder


def quant_report(encoder: "Encoder", texts: Sequence[str], reference: Optional["Encoder"] = None,
                 batch_size: int = 16, max_length: Optional[int] = None) -> pd.DataFrame:
    """Per-site error of ``encoder`` against an fp32 reference on ``texts``.

    For every linear layer output (after its fused epilogue: GELU, or the residual add): SQNR in dB
    (10 log10 ||ref||^2 / ||ref - q||^2) and relative error ||ref - q|| / ||ref||, accumulated over all real
    tokens; plus a final row with the mean and minimum cosine of the pooled, normalized embeddings.
    Where a static int8 layer's input is quantized by its producer (intermediate.dense writes output.dense's
    u8 input), that producer's output is reported as the consumer sees it: dequantized from u8.
    """
    texts = limits.texts(texts)
    batch_size = limits.batch_size(batch_size)
    ref = reference or encoder.reference
    if ref is None:
        raise ValueError("quant_report needs an fp32 reference: pass reference=Encoder.from_pretrained(...)")
    if ref.config != encoder.config:
        raise ValueError("reference has a different architecture")
    names = encoder.site_names
    sig = np.zeros(len(names))
    err = np.zeros(len(names))
    cos = []
    for _, ids, mask, tt in encoder.batches(texts, batch_size, max_length, by_length=False, taps=True):
        pr, tr = ref.forward_taps(ids, mask, tt)
        pq, tq = encoder.forward_taps(ids, mask, tt)
        for i, (a, b) in enumerate(zip(tr, tq)):
            a64 = a.astype(np.float64)
            sig[i] += np.sum(a64 * a64)
            d = a64 - b
            err[i] += np.sum(d * d)
        cos.append(np.sum(pr * pq, axis=1))
    cos = np.concatenate(cos)
    kinds = encoder.site_kinds()
    rows = []
    for i, n in enumerate(names):
        rows.append({
            "site": n, "layer": site_layer(n), "module": site_module(n), "kind": kinds[n],
            "sqnr_db": float(10 * np.log10(sig[i] / err[i])) if err[i] > 0 else float("inf"),
            "rel_error": float(np.sqrt(err[i] / sig[i])) if sig[i] > 0 else float("nan"),
        })
    rows.append({"site": "embedding", "layer": encoder.config.num_hidden_layers, "module": "pooled", "kind": "",
                 "sqnr_db": float("nan"), "rel_error": float(1 - cos.mean()),
                 "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
    return pd.DataFrame(rows)


__all__ = ["quant_report"]
