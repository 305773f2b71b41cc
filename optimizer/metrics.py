"""Error metrics between a candidate array and its reference: rel_l2, max_abs, cosine, psnr_db.

Every comparison in the project (quantizer search, parity validation, distillation reports,
benchmarks) uses these, so a figure in report.json means the same thing as one in bench.json.

Policy (the same for all four; tests/test_metrics.py pins each case):
- Arithmetic in float64; `a` and `ref` must have the same shape (ValueError otherwise: broadcasting
  two differently shaped arrays is a bug, not a comparison).
- Identical inputs (bit-equal, including empty ones) are a perfect match: rel_l2 0, max_abs 0,
  cosine 1, psnr_db +inf.
- A NaN or +-Inf on either side fails every bar: rel_l2 inf, max_abs inf, psnr_db -inf, and cosine
  NaN (it has no bar; NaN compares False with any threshold). Non-finite values in the reference
  mean the comparison cannot be trusted, so they are not excused.
- Undefined ratios fail too instead of being clamped to a large finite number: rel_l2 against an
  all-zero reference is inf (unless `a` is zero as well), and cosine with an all-zero vector is NaN.
- psnr_db is the mean over samples (axis 0) of each sample's PSNR, the figure the sample bars are
  set in; a sample identical to its reference scores +inf, so the mean is +inf only when one is.
"""

from __future__ import annotations

import numpy as np

INF = float("inf")
NAN = float("nan")


def _pair(a: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a64, r64 = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a64.shape != r64.shape:
        raise ValueError(f"cannot compare arrays of shapes {a64.shape} and {r64.shape}")
    return a64, r64


def _finite(a: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.isfinite(a).all() and np.isfinite(ref).all())


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref||_2 / ||ref||_2 over all elements."""
    a, ref = _pair(a, ref)
    if not _finite(a, ref):
        return INF
    num, den = float(np.linalg.norm((a - ref).ravel())), float(np.linalg.norm(ref.ravel()))
    if num == 0.0:
        return 0.0
    return num / den if den > 0.0 else INF


def max_abs(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| over all elements (0 for empty arrays)."""
    a, ref = _pair(a, ref)
    if not _finite(a, ref):
        return INF
    return float(np.max(np.abs(a - ref))) if a.size else 0.0


def cosine(a: np.ndarray, ref: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays."""
    a, ref = _pair(a, ref)
    if not _finite(a, ref):
        return NAN
    if np.array_equal(a, ref):
        return 1.0
    na, nr = float(np.linalg.norm(a.ravel())), float(np.linalg.norm(ref.ravel()))
    if na == 0.0 or nr == 0.0:
        return NAN
    # rounding can put |cos| a few ulps above 1
    return float(np.clip(np.dot(a.ravel(), ref.ravel()) / (na * nr), -1.0, 1.0))


def psnr_db(a: np.ndarray, ref: np.ndarray, data_range: float = 2.0) -> float:
    """Mean over samples of 10 log10(data_range^2 / MSE) in dB; `a`, `ref` are batches [N, ...].

    data_range 2 for samples in [-1, 1] (1 for images in [0, 1])."""
    a, ref = _pair(a, ref)
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"psnr_db expects batches [N, ...] with N >= 1, got shape {a.shape}")
    if not _finite(a, ref):
        return -INF
    mse = ((a - ref) ** 2).reshape(len(a), -1).mean(axis=1)  # [N]
    with np.errstate(divide="ignore"):
        per_sample = 10.0 * np.log10(data_range**2 / mse)  # mse 0 -> +inf
    return float(per_sample.mean())
