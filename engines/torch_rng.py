"""PyTorch's CPU `torch.randn` (float32) from a seed, in numpy, so the torch-free runtime reproduces
diffusers' latents and per-step noise (diffusers' randn_tensor draws both from one torch.Generator).

What torch does (ATen, CPUGeneratorImpl + native/cpu/DistributionTemplates.h), and so this module:

* engine: at::mt19937 seeded with the low 32 bits of the 64-bit seed (init_genrand); its first draw
  twists the state first, exactly as numpy's MT19937 at `pos=624`, so numpy's C engine makes the words.
* numel >= 16 (a fresh randn tensor is contiguous): `normal_fill` draws one float per element,
  `(random() & 0xFFFFFF) * 2**-24`, then Box-Muller on each block of 16 (u1 = 1 - data[0:8],
  u2 = data[8:16] -> data[0:8] = r cos, data[8:16] = r sin); when numel % 16 != 0 it draws 16 *more*
  floats and recomputes the last 16 elements from them. On x86 CPUs with AVX2 or AVX-512 (the
  capabilities give the same values) the block transform is `normal_fill_16_AVX2`: float32
  Cephes polynomials from avx_mathfun.h (log256_ps, sincos256_ps). The shipped x86 builds contract
  every multiply-add there to an FMA (GCC's default fp-contract; without it ~38% of the elements of
  torch 2.13's draws come out different); `_log_avx` and `_sincos_avx` repeat those operations one
  for one, FMAs rounded once, so the result is bitwise torch's.
* numel < 16: one `at::normal_distribution<double>` per element: two 53-bit uniforms from random64()
  (high word drawn first), r = sqrt(-2 log1p(-u2)), theta = 2 pi u1, returns r cos(theta) and caches
  r sin(theta) in the generator for the next scalar draw (the cache survives between randn calls and
  the vectorised path leaves it alone). Done in double with Python's math (the same libm calls).

Not reproduced bitwise: torch on a CPU without AVX2 (ATEN_CPU_CAPABILITY=default; likewise non-x86
builds) takes the scalar normal_fill_16 with libm's logf/cosf/sinf, which round differently from the
Cephes polynomials: against it ~38% of the elements of draws >= 16 differ by a few float32 ulps
(max abs 2.3e-6 measured on torch 2.13). Draws < 16 match on every CPU.
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32
_MT_N = 624
_MASK24 = np.uint32(0xFFFFFF)
_TWO_POW_M24 = _F32(2.0**-24)
_MASK53 = (1 << 53) - 1

# avx_mathfun.h constants (Cephes), rounded to float32 as the C initialisers are
_LOG_P = tuple(
    _F32(v)
    for v in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_COS_P = (_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002))
_FOPI = _F32(1.27323954473516)  # 4 / pi
_TWO_PI = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)
_ONE = _F32(1.0)
_HALF = _F32(0.5)


def _mt_key(seed: int) -> np.ndarray:
    """at::mt19937's init_with_uint32: Knuth's init_genrand on the seed's low 32 bits."""
    s = seed & 0xFFFFFFFF
    key = np.empty(_MT_N, dtype=np.uint32)
    key[0] = s
    for j in range(1, _MT_N):
        s = (1812433253 * (s ^ (s >> 30)) + j) & 0xFFFFFFFF
        key[j] = s
    return key


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add, rounded once (as vfmadd*ps).

    a*b is exact in double; the double sum is made round-to-odd (exact sum's sticky bit kept in the
    last bit) so its rounding to float32 equals a single rounding of the exact a*b + c."""
    p = a.astype(np.float64) * np.float64(b) if np.isscalar(b) else a.astype(np.float64) * b
    c64 = np.asarray(c, dtype=np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # TwoSum: s + err == p + c exactly
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    if fix.any():
        # move |s| one double ulp toward the exact sum: the odd neighbour
        bits = np.where(fix, bits + np.where((err > 0) == (s > 0), 1, -1), bits)
        s = bits.view(np.float64)
    return s.astype(_F32)


def _log_avx(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h log256_ps for x in (0, 1], FMAs as GCC contracts them."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(_F32) + _ONE
    m = ((bits & ~0x7F800000) | _HALF.view(np.int32)).view(_F32)  # mantissa in [0.5, 1)
    small = m < _SQRTHF
    x = (m - _ONE) + np.where(small, m, _F32(0))
    e = e - small.astype(_F32)
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = y * x
    y = _fma(y, z, e * _LOG_Q1)
    y = _fma(z, -_HALF, y)  # y - z*0.5 (z*0.5 is exact)
    return _fma(e, _LOG_Q2, x + y)


def _sincos_avx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun.h sincos256_ps for x >= 0 (theta = 2 pi u2), FMAs as GCC contracts them."""
    j = (x * _FOPI).astype(np.int32)  # cvttps: truncation
    j = (j + 1) & ~1
    y = j.astype(_F32)
    neg_sin = (j & 4) != 0
    neg_cos = (~(j - 2) & 4) != 0
    sin_poly = (j & 2) == 0  # sin from the sine polynomial, cos from the cosine one
    for d in _DP:  # extended-precision x - y*pi/4
        x = _fma(y, d, x)
    z = x * x
    yc = _fma(np.full_like(x, _COS_P[0]), z, _COS_P[1])
    yc = _fma(yc, z, _COS_P[2])
    yc = yc * z
    yc = _fma(yc, z, -(z * _HALF)) + _ONE
    ys = _fma(np.full_like(x, _SIN_P[0]), z, _SIN_P[1])
    ys = _fma(ys, z, _SIN_P[2])
    ys = ys * z
    ys = _fma(ys, x, x)
    s = np.where(sin_poly, ys, yc)
    c = np.where(sin_poly, yc, ys)
    return np.where(neg_sin, -s, s), np.where(neg_cos, -c, c)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """normal_fill_16_AVX2 on each block of 16 uniforms (len(u) % 16 == 0); mean 0, std 1."""
    blocks = u.reshape(-1, 2, 8)
    radius = np.sqrt(_F32(-2.0) * _log_avx(_ONE - blocks[:, 0]))
    sin, cos = _sincos_avx(_TWO_PI * blocks[:, 1])
    out = np.empty_like(blocks)
    # _mm256_fmadd_ps(n, std=1, mean=0): n*1 + 0 (also turns -0.0 into +0.0)
    out[:, 0] = radius * cos + _F32(0)
    out[:, 1] = radius * sin + _F32(0)
    return out.reshape(-1)


class TorchGenerator:
    """What torch.Generator().manual_seed(seed) draws on CPU, without torch."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._bits = np.random.MT19937(0)
        # pos=624: the first draw twists, as at::mt19937's left_=1 does
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt_key(self.seed), "pos": _MT_N}}
        self._next_double_normal: float | None = None  # CPUGeneratorImpl::next_double_normal_sample_

    def _random(self, n: int) -> np.ndarray:
        """n successive random() words (uint32)."""
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform_float(self, n: int) -> np.ndarray:
        """n at::uniform_real_distribution<float>(0, 1) draws: 24 bits of one word each."""
        return (self._random(n) & _MASK24).astype(_F32) * _TWO_POW_M24

    def _normal_double(self) -> float:
        """at::normal_distribution<double>(0, 1), with torch's one-value cache."""
        if self._next_double_normal is not None:
            v, self._next_double_normal = self._next_double_normal, None
            return v
        w = [int(x) for x in self._random(4)]
        # random64() = (first << 32) | second; uniform_real<double> keeps 53 bits
        u1 = (((w[0] << 32) | w[1]) & _MASK53) * 2.0**-53
        u2 = (((w[2] << 32) | w[3]) & _MASK53) * 2.0**-53
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32, equal to torch.randn(shape, generator=g, dtype=torch.float32)."""
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        if n < 16:
            # scalar path: double normal * std(1) + mean(0), cast to float
            vals = [self._normal_double() * 1.0 + 0.0 for _ in range(n)]
            return np.array(vals, dtype=np.float64).astype(_F32).reshape(shape)
        out = np.empty(n, dtype=_F32)
        whole = n - n % 16
        out[:whole] = _box_muller_16(self._uniform_float(n)[:whole])
        if whole != n:
            # torch transforms whole blocks of the n uniforms (the last n % 16 are never used), then
            # draws 16 fresh ones and recomputes the last 16 elements from them
            out[n - 16 :] = _box_muller_16(self._uniform_float(16))
        return out.reshape(shape)

    def standard_normal(self, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """`randn` under numpy Generator's name, so either serves as a per-seed noise source."""
        if np.dtype(dtype) != np.float32:
            raise TypeError("TorchGenerator draws float32 only (torch.randn's default dtype)")
        return self.randn(shape)
