"""IO spec per model family, derived from the diffusers config (after optimum's UNetOnnxConfig)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.iospec import DimRange, IOSpec, TensorSpec

OUTPUT = "out_sample"
# The denoiser families dd-compile exports; each has an IO spec below and a wrapper in models.py.
SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def sample_shape(model_class: str, config: dict[str, Any]) -> tuple[int, int, int]:
    size = config.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.get("in_channels", 4)), int(h), int(w))


def io_spec_for(
    model_class: str, config: dict[str, Any], batch_sizes: list[int] | None = None, seq_len: int = 77
) -> IOSpec:
    """Batch is always dynamic; spatial size is fixed at the config's sample_size."""
    c, h, w = sample_shape(model_class, config)
    bs = batch_sizes or [1, 16]
    inputs = [
        TensorSpec("sample", "float32", ("batch", c, h, w)),
        TensorSpec("timestep", "float32", ("batch",)),
    ]
    out_c = int(config.get("out_channels") or c)
    if model_class == "DiTTransformer2DModel":
        out_c = c  # the Denoiser wrapper keeps the mean channels only
    family = "unet2d"
    if model_class == "UNet2DConditionModel":
        family = "unet2d_condition"
        dim = config.get("cross_attention_dim")
        dim = dim[0] if isinstance(dim, list | tuple) else dim
        inputs.append(TensorSpec("encoder_hidden_states", "float32", ("batch", seq_len, int(dim))))
    if model_class == "DiTTransformer2DModel":
        family = "dit"
    if (
        config.get("num_class_embeds")
        or config.get("class_embed_type") is not None
        or model_class == "DiTTransformer2DModel"
    ):
        inputs.append(TensorSpec("class_labels", "int64", ("batch",)))
    outputs = (TensorSpec(OUTPUT, "float32", ("batch", out_c, h, w)),)
    return IOSpec(family, tuple(inputs), outputs, {"batch": DimRange(min(bs), max(bs), max(bs))})


def conditioning_feeds(
    spec: IOSpec, batch: int, rng: np.random.Generator, n_classes: int = 1
) -> dict[str, np.ndarray]:
    """Inputs besides sample/timestep (text embeddings, labels) for calibration and validation.

    Without a text encoder here, embeddings are N(0, 1) draws and labels uniform in [0, n_classes)
    (default: class 0, valid for any class-conditional model): fine for parity (same inputs to
    both sides) and timing; real prompts or labels come from `dd-compile --cond`.
    """
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name in ("sample", "timestep"):
            continue
        shape = t.concrete({"batch": batch})
        if t.name == "class_labels":
            feeds[t.name] = rng.integers(0, max(1, n_classes), size=shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds
