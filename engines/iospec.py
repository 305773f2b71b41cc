"""Declarative IO spec of a denoiser: names, dtypes, dynamic axes and their min/opt/max.

Single source for ONNX export (dynamic axes), dummy/calibration inputs, runner input checks,
TensorRT optimization profiles and Triton's config.pbtxt. Torch-free on purpose: the runtime
reads it back from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.errors import InputError

Dim = int | str  # an int is a fixed size; a str names a dynamic axis ("batch", "height", ...)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class IOSpec:
    family: str  # "unet2d", "unet2d_condition", ...
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)  # every named dynamic axis

    # -- derived views -------------------------------------------------------------------
    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes argument."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def with_batch_range(self, batch_sizes: list[int]) -> IOSpec:
        """Same spec with the batch axis spanning the requested sizes (opt = the largest)."""
        dims = dict(self.dims)
        dims["batch"] = DimRange(min(batch_sizes), max(batch_sizes), max(batch_sizes))
        return IOSpec(self.family, self.inputs, self.outputs, dims)

    def profile(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        """Concrete input shapes at the min, opt or max end of every dynamic axis."""
        sizes = {k: getattr(r, which) for k, r in self.dims.items()}
        return {t.name: t.concrete(sizes) for t in self.inputs}

    def profiles(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """name -> (min, opt, max) shapes, as TensorRT optimization profiles want them."""
        lo, opt, hi = self.profile("min"), self.profile("opt"), self.profile("max")
        return {n: (lo[n], opt[n], hi[n]) for n in self.input_names}

    # -- checks ----------------------------------------------------------------------------
    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Collect every problem (names, dtypes, ranks, fixed sizes, ranges), raise once."""
        problems: list[str] = []
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing:
            problems.append(f"missing input(s) {missing}")
        if extra:
            problems.append(f"unexpected input(s) {extra}")
        bound: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in feeds:
                continue
            a = feeds[t.name]
            if not isinstance(a, np.ndarray):
                problems.append(f"{t.name}: expected numpy.ndarray, got {type(a).__name__}")
                continue
            if a.dtype != np.dtype(t.dtype):
                problems.append(f"{t.name}: dtype {a.dtype}, expected {t.dtype}")
            if a.ndim != len(t.shape):
                problems.append(f"{t.name}: rank {a.ndim} {a.shape}, expected {len(t.shape)}")
                continue
            for axis, (want, got) in enumerate(zip(t.shape, a.shape, strict=False)):
                if isinstance(want, int):
                    if want != got:
                        problems.append(f"{t.name}: axis {axis} is {got}, expected {want}")
                    continue
                if want in bound and bound[want] != got:
                    problems.append(
                        f"{t.name}: axis {axis} ({want}) is {got}, other inputs say {bound[want]}"
                    )
                bound.setdefault(want, got)
                r = self.dims.get(want)
                if r is not None and not (r.min <= got <= r.max):
                    problems.append(f"{t.name}: {want}={got} outside [{r.min}, {r.max}]")
        if problems:
            raise InputError("invalid feed: " + "; ".join(problems))

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOSpec:
        return cls(
            family=d["family"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            dims={k: DimRange(*v) for k, v in d.get("dims", {}).items()},
        )


def random_feeds(
    spec: IOSpec, dims: dict[str, int], rng: np.random.Generator, timestep_range: tuple[int, int] = (0, 999)
) -> dict[str, np.ndarray]:
    """Dummy inputs: N(0, 1) for float tensors, uniform timesteps, small ints for labels."""
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.concrete(dims)
        if t.name == "timestep":
            feeds[t.name] = rng.integers(*timestep_range, size=shape).astype(t.dtype)
        elif np.issubdtype(np.dtype(t.dtype), np.integer):
            feeds[t.name] = rng.integers(0, 2, size=shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds
