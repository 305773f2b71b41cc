"""dd-distill's configuration: a typed dataclass, saved in the checkpoint's distillation record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("progressive", "consistency")


@dataclass
class DistillConfig:
    teacher: str  # diffusers save_pretrained folder (unet/ + scheduler/)
    out: str  # student.ckpt path; the training state and report go to <out stem>.distill/
    method: str = "progressive"  # "progressive" (Salimans & Ho 2022) | "consistency" (LCM)
    steps: int = 4  # the student's sampling steps
    teacher_steps: int | None = None  # progressive: start from the teacher's DDIM at this many
    # steps, halved each round (default: steps * 2^k nearest the teacher's reference steps)
    iters: int = 500  # training iterations per round (progressive) or in total (consistency)
    round_iters: tuple[int, ...] | None = None  # progressive: iterations of each round (overrides
    # `iters`; early rounds need fewer: the student starts as a teacher that is nearly right)
    batch_size: int = 128  # global batch (split across DDP ranks)
    lr: float = 1e-4  # Adam; linearly annealed to 0 over each round (Salimans & Ho 2022, Sec. 4)
    seed: int = 0
    width: float = 1.0  # < 1: a smaller (BK-SDM style) student; channel multiplier
    layers_per_block: int | None = None  # smaller student: layers per block (default: teacher's)
    kd_iters: int = 0  # smaller student: output + feature KD iterations before step distillation
    # (0: use `iters`)
    kd_lr: float = 3e-4  # smaller student: learning rate of the KD phase
    feature_weight: float = 1.0  # smaller student: weight of the feature-matching loss
    data: str | None = None  # folder of images or an .npy array; None: data-free (teacher samples)
    cond: str | None = None  # conditional teachers: .npz of encoder_hidden_states / class_labels
    data_free_samples: int = 2048  # data-free mode: teacher reference samples to train on
    eval_samples: int = 1000  # samples per FID (0: skip quality evaluation)
    checkpoint_every: int = 100  # iterations between training-state checkpoints
    resume: bool = False
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    zero_snr: bool | None = None  # rescale to zero terminal SNR (None: auto, for <= 2 steps)
    # consistency distillation (Luo et al. 2023, diffusers examples/consistency_distillation)
    solver_steps: int = 50  # the teacher's DDIM solver grid (skipping-step solver)
    ema_decay: float = 0.95  # target network EMA
    huber_c: float | None = None  # pseudo-Huber c (None: 0.00054 * sqrt(d), Song & Dhariwal 2023)
    demo: bool = False  # the bundled digits are the training data and the FID reference
    stop_after: int | None = None  # stop (as a kill would) after this many iterations in total
    extra: dict[str, Any] = field(default_factory=dict)

    def iters_of_round(self, r: int, rounds: int) -> int:
        if self.round_iters is None:
            return self.iters
        if len(self.round_iters) != rounds:
            from engines.errors import InputError

            raise InputError(f"--iters lists {len(self.round_iters)} values for {rounds} rounds")
        return self.round_iters[r]

    @property
    def work_dir(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.stem + ".distill")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_key(self) -> dict[str, Any]:
        """What must match for --resume to continue a run (not out/resume/threads/stop_after)."""
        d = self.to_dict()
        for k in ("out", "resume", "threads", "stop_after", "eval_samples"):
            d.pop(k)
        return d
