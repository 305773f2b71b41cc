"""Conditioning tensors given as a file (`--cond cond.npz`), shared by dd-distill and dd-compile.

No text encoder runs here: the user computes prompt embeddings once with the pipeline's own text
encoder (or picks class labels) and saves them as an .npz with `encoder_hidden_states` [N, L, D]
and/or `class_labels` [N], one row per image / prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError


def required_keys(model_class: str, config: dict[str, Any]) -> list[str]:
    """The Denoiser keyword inputs this teacher needs."""
    keys = []
    if model_class == "UNet2DConditionModel":
        keys.append("encoder_hidden_states")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        keys.append("class_labels")
    return keys


def n_classes(config: dict[str, Any]) -> int | None:
    """Class count of a class-conditional model (UNet2DModel's num_class_embeds, DiT's ada-norm
    embeddings); None when the config does not say."""
    n = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
    return int(n) if n else None


def load_conditioning(path: str | Path, keys: list[str], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Read and check `--cond`: an .npz with one array per key, the same number of rows."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: conditioning file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / format errors: one line, the file named
        raise InputError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{p}: missing {missing} (has {sorted(arrays)}); the teacher needs {keys}")
    out: dict[str, np.ndarray] = {}
    for k in keys:
        a = arrays[k]
        if k == "encoder_hidden_states":
            dim = config.get("cross_attention_dim")
            if a.ndim != 3 or (dim is not None and a.shape[-1] != dim):
                raise InputError(
                    f"{p}: encoder_hidden_states has shape {list(a.shape)}, "
                    f"expected [N, tokens, {dim}] (the teacher's cross_attention_dim)"
                )
            if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise InputError(f"{p}: encoder_hidden_states must be real numbers, got {a.dtype}")
            a = a.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))
            if bad.size:
                raise InputError(
                    f"{p}: encoder_hidden_states has NaN/Inf in {bad.size} row(s), first row {int(bad[0])}"
                )
            out[k] = a
        else:
            n = n_classes(config)
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InputError(
                    f"{p}: class_labels must be integers of shape [N], got {a.dtype} {list(a.shape)}"
                )
            if n and (a.min() < 0 or a.max() >= n):
                raise InputError(f"{p}: class_labels outside [0, {n})")
            out[k] = a.astype(np.int64)
    rows = {len(a) for a in out.values()}
    if len(rows) != 1 or 0 in rows:
        counts = {k: len(a) for k, a in out.items()}
        raise InputError(f"{p}: arrays have different or zero row counts: {counts}")
    return out
