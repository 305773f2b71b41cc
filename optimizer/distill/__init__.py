"""dd-distill: a few-step student from a diffusers teacher (progressive or consistency
distillation, optionally into a smaller BK-SDM-style student), written as student.ckpt.

    from optimizer.distill import DistillConfig, distill
    distill(DistillConfig(teacher="teacher/", out="student.ckpt", steps=4))
"""

from optimizer.distill.config import DistillConfig
from optimizer.distill.run import DistillResult, distill, run_distillation

__all__ = ["DistillConfig", "DistillResult", "distill", "run_distillation"]
