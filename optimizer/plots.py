"""samples.png (teacher and each variant from the same noise) and latency.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.fileio import atomic_path


def _grid(samples: np.ndarray, ncol: int) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one [H', W', C] image in [0, 1]."""
    x = np.clip((samples[:ncol] + 1) / 2, 0, 1)
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    row = np.concatenate(list(x), axis=2)  # [C, H, ncol*W]
    return np.transpose(row, (1, 2, 0))


def samples_png(rows: dict[str, np.ndarray], path: Path, ncol: int = 12) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(ncol * 0.6 + 2, len(rows) * 0.75 + 0.4), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], rows.items(), strict=True):
        img = _grid(s, ncol)
        ax.imshow(
            img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("same noise, row by row", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def latency_png(latency: dict[str, dict[str, dict[int, float]]], path: Path) -> Path:
    """latency[name][level][batch] = median ms; one panel per level, bars per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = ("per_call", "end_to_end")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(latency)
    for ax, lvl in zip(axes, levels, strict=True):
        batches = sorted({b for n in names for b in latency[n].get(lvl, {})})
        w = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [latency[n].get(lvl, {}).get(b, np.nan) for b in batches]
            ax.bar(np.arange(len(batches)) + i * w, vals, w, label=n)
        ax.set_xticks(np.arange(len(batches)) + w * (len(names) - 1) / 2, [f"b={b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(lvl.replace("_", " "))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
