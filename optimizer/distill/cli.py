"""dd-distill: the command line of optimizer.distill (console script dd-distill).

dd-distill TEACHER_DIR -o student.ckpt --steps 4                  # progressive (default)
dd-distill TEACHER_DIR -o student.ckpt --steps 4 --method consistency
dd-distill TEACHER_DIR -o student.ckpt --steps 4 --width 0.5      # smaller student too
dd-distill --demo -o student.ckpt                                  # the bundled digits teacher
torchrun --nproc_per_node 8 -m optimizer.distill TEACHER_DIR -o student.ckpt
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from engines.cli_errors import GuardedCommand

DEMO_TEACHER = Path(__file__).resolve().parent.parent / "demo" / "teacher"


@click.command(
    cls=GuardedCommand,
    prog="dd-distill",
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.argument("teacher_dir", required=False, type=click.Path(path_type=str))
@click.option(
    "-o",
    "--out",
    required=True,
    help="student.ckpt to write (state and report go to <stem>.distill/ beside it)",
)
@click.option(
    "--demo",
    is_flag=True,
    help="distill the bundled digits teacher, trained on the digits, with FID against them (one thread)",
)
@click.option("--method", type=click.Choice(["progressive", "consistency"]), default="progressive")
@click.option("--steps", type=click.IntRange(1), default=4, help="the student's sampling steps")
@click.option(
    "--teacher-steps",
    type=click.IntRange(2),
    default=None,
    help="progressive: start from the teacher's DDIM at steps*2^k [default: near its reference]",
)
@click.option(
    "--iters",
    default=None,
    help="iterations per round, or one per round (e.g. 150,200,300,400); consistency: in total "
    "[500; --demo: 800, what the 1.25x FID bar needed, benchmarks/results/h200_2026-11-26]",
)
@click.option("--batch-size", type=int, default=128, help="global batch, split across DDP ranks")
@click.option(
    "--lr",
    type=click.FloatRange(0, 1e3, min_open=True),
    default=1e-4,
    help="Adam lr, annealed linearly to 0 per round",
)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option(
    "--width",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    help="< 1: smaller student (channel multiplier)",
)
@click.option(
    "--layers-per-block", type=click.IntRange(1), default=None, help="smaller student: layers per block"
)
@click.option(
    "--kd-iters", type=click.IntRange(0), default=0, help="smaller student: KD iterations [0: --iters]"
)
@click.option(
    "--data",
    type=click.Path(path_type=str),
    default=None,
    help="folder of images or .npy array [default: data-free, the teacher's own samples]",
)
@click.option(
    "--cond",
    type=click.Path(path_type=str),
    default=None,
    help="conditional teachers: .npz with encoder_hidden_states [N, tokens, dim] and/or "
    "class_labels [N], one row per --data image (data-free: used in turn)",
)
@click.option("--data-free-samples", type=click.IntRange(2), default=2048)
@click.option(
    "--eval-samples", type=click.IntRange(0), default=1000, help="samples per FID (0: no evaluation)"
)
@click.option(
    "--checkpoint-every", type=click.IntRange(1), default=100, help="iterations between training checkpoints"
)
@click.option("--resume", is_flag=True, help="continue from <stem>.distill/state.safetensors")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads [--demo: 1]")
@click.option(
    "--zero-snr/--no-zero-snr",
    default=None,
    help="rescale to zero terminal SNR [default: where <= 2 steps and the schedule needs it]",
)
@click.option(
    "--solver-steps", type=click.IntRange(1), default=50, help="consistency: the teacher's DDIM solver grid"
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    teacher_dir: str | None,
    out: str,
    demo: bool,
    method: str,
    steps: int,
    teacher_steps: int | None,
    iters: str | None,
    batch_size: int,
    lr: float,
    seed: int,
    width: float,
    layers_per_block: int | None,
    kd_iters: int,
    data: str | None,
    cond: str | None,
    data_free_samples: int,
    eval_samples: int,
    checkpoint_every: int,
    resume: bool,
    threads: int | None,
    zero_snr: bool | None,
    solver_steps: int,
    verbose: bool,
) -> None:
    """Distill TEACHER_DIR (a diffusers save_pretrained folder) into a few-step student.ckpt.

    Exit code: 0 done, 1 training diverged, 2 bad input or a missing backend, 3 stopped early
    (continue with --resume), 4 an internal error (a bug).
    """
    from optimizer.distill.config import DistillConfig

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if demo:
        teacher_dir = teacher_dir or str(DEMO_TEACHER)
        threads = threads or 1
        iters = iters or "800"
    iters = iters or "500"
    if teacher_dir is None:
        raise click.UsageError("give TEACHER_DIR or --demo")
    try:
        per_round = [int(v) for v in iters.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{iters!r}: expected an integer or a comma list", param_hint="--iters"
        ) from None
    if min(per_round) < 1:
        raise click.BadParameter(f"{iters!r}: iterations must be >= 1", param_hint="--iters")
    for opt, value in (("--data", data), ("--cond", cond)):
        if value and Path(value).is_file() and Path(value).stat().st_size == 0:
            raise click.BadParameter(f"{value}: empty file", param_hint=opt)
    if teacher_steps is not None and method == "progressive":
        k = teacher_steps // steps
        if teacher_steps % steps or k < 2 or k & (k - 1):
            raise click.BadParameter(
                f"{teacher_steps} is not steps * 2^k with k >= 1 (--steps {steps}: "
                f"{', '.join(str(steps * 2**i) for i in range(1, 5))}, ...)",
                param_hint="--teacher-steps",
            )
    cfg = DistillConfig(
        teacher=teacher_dir,
        out=out,
        method=method,
        steps=steps,
        teacher_steps=teacher_steps,
        iters=per_round[-1],
        round_iters=tuple(per_round) if len(per_round) > 1 else None,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        width=width,
        layers_per_block=layers_per_block,
        kd_iters=kd_iters,
        data=data,
        cond=cond,
        data_free_samples=data_free_samples,
        eval_samples=eval_samples,
        checkpoint_every=checkpoint_every,
        resume=resume,
        threads=threads,
        zero_snr=zero_snr,
        solver_steps=solver_steps,
        demo=demo,
    )
    from optimizer.distill.run import distill

    # errors -> one line and an exit code (engines/cli_errors.py; StopRequested -> 3)
    distill(cfg)


if __name__ == "__main__":
    main()
