"""optimizer.metrics: known values and the documented policy for identical, zero and non-finite inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optimizer.metrics import cosine, max_abs, psnr_db, rel_l2

BAD = [float("nan"), float("inf"), float("-inf")]


def test_known_values():
    ref = np.array([3.0, 4.0], dtype=np.float32)  # ||ref|| = 5
    a = np.array([3.0, 5.0], dtype=np.float32)  # ||a - ref|| = 1
    assert rel_l2(a, ref) == pytest.approx(0.2, rel=1e-12)
    assert max_abs(a, ref) == pytest.approx(1.0)
    # (9 + 20) / (5 * sqrt(34))
    assert cosine(a, ref) == pytest.approx(29 / (5 * math.sqrt(34)), rel=1e-12)
    assert cosine(-ref, ref) == pytest.approx(-1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)


def test_psnr_known_value_is_the_mean_of_per_sample_psnr():
    ref = np.zeros((2, 1, 10, 10))
    a = ref.copy()
    a[0] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    a[1] += 0.02  # mse 4e-4 -> 40 dB
    assert psnr_db(a, ref) == pytest.approx(30.0, rel=1e-9)
    # images in [0, 1]: data range 1 -> 10 log10(1 / 0.04) = 13.98 dB
    assert psnr_db(a[:1], ref[:1], data_range=1.0) == pytest.approx(10 * math.log10(25), rel=1e-9)


def test_float32_inputs_are_compared_in_float64():
    ref = np.full(1_000_000, 1.0, np.float32)
    a = ref + np.float32(1e-7)  # rounds to 1 + 2^-23 in float32
    assert rel_l2(a, ref) == pytest.approx(2.0**-23, rel=1e-6)


def test_identical_inputs_are_a_perfect_match():
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    assert rel_l2(x, x) == 0.0
    assert max_abs(x, x) == 0.0
    assert cosine(x, x) == 1.0
    assert psnr_db(x, x) == math.inf
    zero = np.zeros((2, 3))
    assert rel_l2(zero, zero) == 0.0 and cosine(zero, zero) == 1.0 and psnr_db(zero, zero) == math.inf
    empty = np.zeros(0)
    assert rel_l2(empty, empty) == 0.0 and max_abs(empty, empty) == 0.0


def test_zero_reference_is_unbounded_not_clamped():
    zero, a = np.zeros(4), np.array([0.0, 1e-6, 0.0, 0.0])
    assert rel_l2(a, zero) == math.inf
    assert math.isnan(cosine(a, zero)) and math.isnan(cosine(zero, a))
    assert max_abs(a, zero) == pytest.approx(1e-6)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("side", ["candidate", "reference"])
def test_non_finite_on_either_side_fails_every_bar(bad, side):
    good = np.ones((2, 3), np.float32)
    broken = good.copy()
    broken[1, 2] = bad
    a, ref = (broken, good) if side == "candidate" else (good, broken)
    assert rel_l2(a, ref) == math.inf
    assert max_abs(a, ref) == math.inf
    assert psnr_db(a, ref) == -math.inf
    assert math.isnan(cosine(a, ref))
    # even when both sides hold the same non-finite value
    assert rel_l2(broken, broken) == math.inf and psnr_db(broken, broken) == -math.inf


def test_shape_mismatch_and_psnr_without_a_batch_axis_are_errors():
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(1, 3\)"):
        rel_l2(np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="batches"):
        psnr_db(np.zeros(3), np.zeros(3))
