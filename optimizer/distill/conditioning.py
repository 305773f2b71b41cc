"""Conditioning for conditional teachers (UNet2DConditionModel, class-conditional UNet2DModel).

dd-distill has no text encoder: the user gives the conditioning as tensors, one row per training
image (`--cond cond.npz` holding `encoder_hidden_states` [N, L, D] and/or `class_labels` [N]),
e.g. prompt embeddings computed once with the pipeline's own text encoder. With --data the rows
pair with the images; data-free, teacher samples are drawn for the rows in turn. Every denoiser
call of a batch (student, teacher, EMA target) sees the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from optimizer.conditioning import load_conditioning, required_keys  # noqa: F401 (re-exported)

Cond = dict[str, torch.Tensor]


def rows(cond: dict[str, np.ndarray], n: int) -> Cond:
    """n rows, cycling through the file's rows (row i -> i mod N), as tensors."""
    return {k: torch.from_numpy(a[np.arange(n) % len(a)]) for k, a in cond.items()}


def take(cond: Cond | None, idx: torch.Tensor, device: torch.device) -> Cond:
    if not cond:
        return {}
    return {k: v[idx.to(v.device)].to(device) for k, v in cond.items()}


def bind(net: Callable[..., Any], cond: Cond | None) -> Callable[..., Any]:
    """net(z, t) with this batch's conditioning attached (the plain net when there is none)."""
    if not cond:
        return net
    return lambda z, t: net(z, t, **cond)
