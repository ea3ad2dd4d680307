"""Training-free recovery of quantized linear layers, from calibration statistics the C core gathers (the moments of
every site's input: column sums, column sums on the layer's activation grid, the Gram matrix X^T X; see
csrc/moments.h):

* :func:`gptq_quantize`: error-compensating rounding of int8 / int4 weights (GPTQ, Frantar et al. 2023). Columns
  are rounded one at a time; each one's rounding error, weighted by the inverse Hessian H^-1 of the layer's inputs
  (H = X^T X / rows, dampened), is pushed onto the columns not yet rounded, minimising ||W X - W_q X||^2 rather
  than ||W - W_q||^2. The result is stored exactly like round-to-nearest (int codes and scales), so the kernels,
  the save format and loading do not change.
* :func:`corrected_bias`: bias correction (Nagel et al. 2019): the expected output error of the quantized layer on
  the calibration inputs, E[W_q fq(x)] - E[W x], subtracted from its bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

#: columns rounded between two lazy updates of the rest of the matrix (GPTQ's block)
GPTQ_BLOCK = 128


@dataclass(frozen=True)
class SiteMoments:
    """The moments of one site's inputs over the calibration texts (rows: tokens)."""

    rows: int
    mean: np.ndarray                   # E[x] [K]
    grid_mean: Optional[np.ndarray]    # E[fq(x)] [K] on the site's static activation grid, or None
    gram: Optional[np.ndarray]         # X^T X [K, K] (float64), or None

    @classmethod
    def from_observer(cls, moments: Dict) -> "SiteMoments":
        n = int(moments["rows"])
        grid = moments["grid_column_sum"]
        return cls(rows=n, mean=moments["column_sum"] / n, grid_mean=None if grid is None else grid / n,
                   gram=moments["gram"])

    def hessian(self) -> np.ndarray:
        """H = X^T X / rows (GPTQ's Hessian up to the factor 2, which the solve does not see)."""
        if self.gram is None:
            raise ValueError("these moments were gathered without the Gram matrix")
        return self.gram / max(self.rows, 1)


@dataclass(frozen=True)
class WeightGrid:
    """The integer grid a weight is rounded to: symmetric, ``qmax`` levels either side of 0, one scale per output
    channel (``per_channel``), per tensor, or per group of ``group`` inputs (``group > 0``: int4). Scales are
    absmax / qmax of the weights they cover (for groups: of the weights as GPTQ has updated them when the group
    starts), as the core's round-to-nearest quantizers compute them."""

    qmax: int
    per_channel: bool = True
    group: int = 0

    @staticmethod
    def scale_of(absmax: np.ndarray, qmax: int) -> np.ndarray:
        s = (np.asarray(absmax, np.float32) / np.float32(qmax)).astype(np.float32)
        tiny = np.finfo(np.float32).tiny
        return np.where(s >= tiny, s, np.where(absmax > 0, tiny, 1.0)).astype(np.float32)


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), H dampened by ``damp`` times its mean diagonal."""
    h = h + np.eye(len(h)) * (damp * float(np.mean(np.diag(h))))
    try:
        # H = R R^T with R upper (the Cholesky factor of H with rows and columns reversed, reversed back); then
        # H^-1 = R^-T R^-1, so U = R^-1: one factorisation and one inverse
        r = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    except np.linalg.LinAlgError:
        raise ValueError("GPTQ: the Hessian of the calibration inputs is not positive definite even after "
                         f"dampening by {damp}; raise gptq_damp or use more calibration texts") from None
    from scipy.linalg import lapack

    u, info = lapack.dtrtri(np.ascontiguousarray(r), lower=0)  # the inverse of a triangular matrix
    if info != 0:
        raise ValueError(f"GPTQ: the Cholesky factor of the Hessian is singular (LAPACK dtrtri info {info})")
    return np.triu(u)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, grid: WeightGrid, damp: float = 0.01
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of ``w`` [N, K] for inputs with Hessian ``hessian`` [K, K]: (codes int8 [N, K] in
    [-qmax, qmax], scales float32: [N] per channel, [1] per tensor, [N * K / group] row-major for groups)."""
    # one BLAS thread: OpenBLAS's own threads fight the core's OpenMP threads (which spin after a forward) and
    # a 1536 x 1536 factorisation then takes seconds instead of ~0.1 s
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _gptq(np.array(w, dtype=np.float64), np.array(hessian, dtype=np.float64), grid, damp)


def _gptq(w: np.ndarray, h: np.ndarray, grid: WeightGrid, damp: float) -> Tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian shape {h.shape} does not match the weight's {k} inputs")
    dead = np.diag(h) <= 0  # inputs that were always 0: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_hessian_factor(h, damp)
    codes = np.zeros((n, k), np.int8)
    if grid.group:
        if k % grid.group:
            raise ValueError(f"GPTQ: group {grid.group} does not divide the {k} inputs")
        scales = np.zeros((n, k // grid.group), np.float32)
        block = grid.group * max(1, GPTQ_BLOCK // grid.group)  # a group never straddles two blocks
    else:
        absmax = np.abs(w).max(axis=1) if grid.per_channel else np.array([np.abs(w).max()])
        scales = WeightGrid.scale_of(absmax, grid.qmax)
        block = GPTQ_BLOCK
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            if grid.group and (i1 + i) % grid.group == 0:
                g = (i1 + i) // grid.group
                scales[:, g] = WeightGrid.scale_of(np.abs(w1[:, i:i + grid.group]).max(axis=1), grid.qmax)
            s = (scales[:, (i1 + i) // grid.group] if grid.group
                 else scales if grid.per_channel else scales[0]).astype(np.float64)
            col = w1[:, i]
            q = np.clip(np.rint(col / s), -grid.qmax, grid.qmax)
            codes[:, i1 + i] = q
            e = (col - q * s) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, scales.reshape(-1)


def pack_s4(codes: np.ndarray) -> np.ndarray:
    """int4 codes [N, K] in [-7, 7] as the core stores them: (q + 8) in nibbles, the even input in the low one."""
    c = (codes.astype(np.int16) + 8).astype(np.uint8)
    return np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4))


def corrected_bias(bias: np.ndarray, w: np.ndarray, w_q: np.ndarray, moments: SiteMoments,
                   input_quantized: bool) -> np.ndarray:
    """``bias`` minus the layer's expected output error on the calibration inputs: E[W_q fq(x)] - E[W x], with
    fq(x) the static activation grid's values where ``input_quantized`` (their mean is in the moments), else x."""
    x_q = moments.grid_mean if input_quantized else moments.mean
    if x_q is None:
        raise ValueError("bias correction of a static int8 layer needs the moments on its activation grid")
    err = w_q.astype(np.float64) @ x_q - w.astype(np.float64) @ moments.mean
    return (bias.astype(np.float64) - err).astype(np.float32)


__all__ = ["GPTQ_BLOCK", "SiteMoments", "WeightGrid", "corrected_bias", "gptq_quantize", "pack_s4"]
