"""Quality of teacher and student samples (FID in a feature space fit for the data, paired PSNR to
the teacher from the same noise), the per-round sample grid and the loss plot."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.fileio import atomic_path
from engines.schedule import SamplingSchedule
from optimizer.distill.sampling import noise_for_seeds, sample

log = logging.getLogger(__name__)

EVAL_SEED0 = 0  # eval noise: engines.schedule.draw_noise(seeds 0..n-1), as dd-compile draws it
GRID_COLUMNS = 16


class Evaluator:
    def __init__(
        self,
        teacher: Any,
        teacher_net: torch.nn.Module,
        shape: tuple[int, int, int],
        n: int,
        reference: np.ndarray,
        reference_name: str,
        device: torch.device,
        cond: dict[str, torch.Tensor] | None = None,
    ):
        from optimizer.compile.quality import default_feature_extractor

        self.teacher, self.teacher_net, self.shape, self.n = teacher, teacher_net, shape, n
        self.device = device
        self.cond = cond  # n conditioning rows (conditional teachers), sample i gets row i
        self.seeds = list(range(EVAL_SEED0, EVAL_SEED0 + n))
        self.reference, self.reference_name = reference, reference_name
        self.extractor = default_feature_extractor(shape)
        self.ref_feats = self.extractor(reference)
        self._teacher_ddim: dict[int, np.ndarray] = {}
        self._fid_cache: dict[int, float] = {}
        t0 = time.perf_counter()
        self.teacher_ref = self.teacher_samples(teacher.reference_steps)
        self.teacher_ref_fid = self.fid(self.teacher_ref)
        log.info(
            "teacher %s-%d: FID %.3f (%d samples vs %s; %.0f s)",
            teacher.reference_sampler,
            teacher.reference_steps,
            self.teacher_ref_fid,
            n,
            reference_name,
            time.perf_counter() - t0,
        )

    def samples(self, net: torch.nn.Module, schedule: SamplingSchedule) -> np.ndarray:
        noise, step_noise = noise_for_seeds(self.seeds, self.shape, schedule.steps)
        was = net.training
        net.eval()
        x = sample(net, schedule, noise.to(self.device), step_noise.to(self.device), cond=self.cond)
        net.train(was)
        return x.clamp(-1, 1).cpu().numpy()

    def teacher_samples(self, steps: int) -> np.ndarray:
        if steps not in self._teacher_ddim:
            self._teacher_ddim[steps] = self.samples(self.teacher_net, self.teacher.schedule(steps))
        return self._teacher_ddim[steps]

    def fid(self, images: np.ndarray) -> float:
        from optimizer.compile.quality import frechet_distance

        return float(frechet_distance(self.extractor(images), self.ref_feats))

    def teacher_ddim_fid(self, steps: int) -> float:
        if steps not in self._fid_cache:
            self._fid_cache[steps] = self.fid(self.teacher_samples(steps))
        return self._fid_cache[steps]

    def measure(
        self, net: torch.nn.Module, schedule: SamplingSchedule
    ) -> tuple[dict[str, float], np.ndarray]:
        from optimizer.compile.quality import paired_psnr

        x = self.samples(net, schedule)
        n = schedule.steps
        t_n = self.teacher_samples(n)
        m = {
            "fid_student": round(self.fid(x), 4),
            "fid_teacher_ddim": round(self.teacher_ddim_fid(n), 4),
            "fid_teacher_reference": round(self.teacher_ref_fid, 4),
            "psnr_student_vs_teacher_db": round(paired_psnr(x, self.teacher_ref), 3),
            "psnr_teacher_ddim_vs_teacher_db": round(paired_psnr(t_n, self.teacher_ref), 3),
        }
        return m, x

    def header(self) -> dict[str, Any]:
        h = {
            "n_samples": self.n,
            "noise": f"engines.schedule.draw_noise(seeds {self.seeds[0]}..{self.seeds[-1]})",
            "fid_reference_set": self.reference_name,
            "feature_extractor": type(self.extractor).__name__,
            "teacher_reference": {
                "sampler": self.teacher.reference_sampler,
                "steps": self.teacher.reference_steps,
                "fid": round(self.teacher_ref_fid, 4),
            },
        }
        acc = getattr(self.extractor, "test_accuracy", None)
        if acc is not None:
            from optimizer.compile.quality import real_vs_real_floor

            h["feature_extractor_test_accuracy"] = round(acc, 4)
            h["real_vs_real_floor"] = round(real_vs_real_floor(self.extractor), 4)
        return h


def _to_rgb(x: np.ndarray) -> np.ndarray:
    img = np.clip((x + 1) / 2, 0, 1)
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def save_grid(path: Path, rows: list[tuple[str, np.ndarray]]) -> None:
    """One row of GRID_COLUMNS samples per (label, samples [N, C, H, W])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(GRID_COLUMNS, min(len(s) for _, s in rows))
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(cols * 0.6 + 1.6, len(rows) * 0.7 + 0.2), squeeze=False
    )
    for r, (label, s) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = _to_rgb(s[c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_loss_plot(path: Path, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, ys in curves.items():
        if ys:
            y = np.asarray(ys)
            k = max(1, len(y) // 50)  # moving average over ~2% of the phase
            ax.plot(np.convolve(y, np.ones(k) / k, mode="valid"), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (within the round)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summarize_losses(losses: list[float], points: int = 50) -> dict[str, Any]:
    """First/last values and a curve of at most `points` means, for the checkpoint record."""
    if not losses:
        return {}
    y = np.asarray(losses)
    k = max(1, int(np.ceil(len(y) / points)))
    curve = [round(float(y[i : i + k].mean()), 6) for i in range(0, len(y), k)]
    head = max(1, len(y) // 20)
    return {
        "loss_first": round(float(y[:head].mean()), 6),
        "loss_last": round(float(y[-head:].mean()), 6),
        "loss_curve": curve,
        "loss_curve_stride": k,
    }
