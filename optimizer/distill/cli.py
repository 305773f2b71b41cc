"""dd-distill: the command line of optimizer.distill (console script dd-distill).

dd-distill TEACHER_DIR -o student.ckpt --steps 4                  # progressive (default)
dd-distill TEACHER_DIR -o student.ckpt --steps 4 --method consistency
dd-distill TEACHER_DIR -o student.ckpt --steps 4 --width 0.5      # smaller student too
dd-distill --demo -o student.ckpt                                  # the bundled digits teacher
dd-distill TEACHER_PIPE -o student.ckpt --steps 4 --method guided-progressive --guidance 2:8
dd-distill TEACHER_PIPE -o student/ --steps 4 --method lcm     # a diffusers pipeline folder instead
dd-distill TEACHER_PIPE -o student/ --steps 4 --method lcm --lora-rank 16 --prompts prompts.txt
dd-distill --demo t2i -o student/                                  # the bundled text-to-image teacher
torchrun --nproc_per_node 8 -m optimizer.distill TEACHER_DIR -o student.ckpt
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from engines.cli_errors import GuardedCommand

log = logging.getLogger("dd-distill")
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
    is_flag=False,
    flag_value="pixel",
    default=None,
    type=click.Choice(["pixel", "t2i"]),
    help="distill a bundled teacher: the digits (--demo or --demo pixel; one thread, FID against "
    "the digits) or the text-to-image demo (--demo t2i; adherence and FID by its judge)",
)
@click.option(
    "--method",
    type=click.Choice(["progressive", "consistency", "guided-progressive", "lcm"]),
    default=None,
    help="pixel teachers: progressive | consistency [progressive]; text-to-image teachers: "
    "guided-progressive | lcm [guided-progressive]",
)
@click.option(
    "--guidance",
    default="2:8",
    help="text-to-image: the guidance scales (diffusers' s; w = s - 1) the student learns, "
    "LO:HI or one value",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(1),
    default=None,
    help="text-to-image, --method lcm: LCM-LoRA adapters of this rank",
)
@click.option(
    "--prompts",
    type=click.Path(path_type=str),
    default=None,
    help="text-to-image, data-free: one prompt per line; the teacher samples the training latents",
)
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
    demo: str | None,
    method: str | None,
    guidance: str,
    lora_rank: int | None,
    prompts: str | None,
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
    from optimizer.distill.t2i_cli import DEMO_T2I_TEACHER, is_pipeline_folder

    if demo == "t2i" or (teacher_dir and is_pipeline_folder(teacher_dir)):
        params = dict(click.get_current_context().params, teacher_dir=teacher_dir or str(DEMO_T2I_TEACHER))
        _text_to_image(params)
        return
    method = method or "progressive"
    if method not in ("progressive", "consistency"):
        raise click.BadParameter(f"{method} is for text-to-image pipeline folders", param_hint="--method")
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
        demo=bool(demo),
    )
    from optimizer.distill.run import distill

    # errors -> one line and an exit code (engines/cli_errors.py; StopRequested -> 3)
    distill(cfg)


def _reference_guidance(teacher: Path) -> float | None:
    import json

    try:
        return float(json.loads((teacher / "teacher.json").read_text())["reference_guidance_scale"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _text_to_image(p: dict) -> None:
    """A diffusers pipeline folder (model_index.json) -> a guidance-distilled student pipeline.
    `p`: dd-distill's parsed options."""
    from optimizer.distill.guided import parse_guidance_range
    from optimizer.distill.t2i import T2IDistillConfig
    from optimizer.distill.t2i_cli import T2IRun, run_t2i

    method = p["method"] or "guided-progressive"
    if method not in ("guided-progressive", "lcm"):
        raise click.BadParameter(
            f"{method} is for pixel-space teachers (unet/ + scheduler/)", param_hint="--method"
        )
    try:
        per_round = [int(v) for v in (p["iters"] or "400").split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{p['iters']!r}: expected an integer or a comma list", param_hint="--iters"
        ) from None
    demo = p["demo"] == "t2i"
    from optimizer.distill.progressive import default_teacher_steps

    guidance = parse_guidance_range(p["guidance"])
    cfg = T2IDistillConfig(
        method=method,
        steps=p["steps"],
        guidance=guidance,
        # judged at the teacher's own reference guidance where it records one, else mid-range
        eval_guidance=_reference_guidance(Path(p["teacher_dir"])) or sum(guidance) / 2,
        # guided-progressive: the stage-1 student's steps, halved per round (steps * 2^k near 32)
        start_steps=p["teacher_steps"] or default_teacher_steps(32, p["steps"]),
        # --iters STAGE1,ROUND or one value: rounds of that many, stage 1 twice as long
        stage1_iters=per_round[0] if len(per_round) > 1 else 2 * per_round[-1],
        round_iters=per_round[-1],
        lcm_iters=per_round[-1] if p["iters"] else 2000,
        solver_steps=p["solver_steps"],
        # the pixel default (128) is for 8x8 digits; latent batches of 64 trained the demo teacher
        batch=min(p["batch_size"], 64),
        lr=p["lr"],
        lora_rank=p["lora_rank"] or 0,
        seed=p["seed"],
        threads=p["threads"] or 1,
        checkpoint_every=p["checkpoint_every"],
        resume=p["resume"],
    )
    run = T2IRun(
        Path(p["teacher_dir"]),
        Path(p["out"]),
        cfg,
        prompts=Path(p["prompts"]) if p["prompts"] else None,
        data=Path(p["data"]) if p["data"] else None,
        data_free_samples=p["data_free_samples"],
        evaluate=min(p["eval_samples"], 300) if demo else 0,
        demo=demo,
    )
    quality = run_t2i(run).get("quality") or {}
    for k in ("student", "teacher_reference", "teacher_at_student_steps"):
        if k in quality:
            log.info("%s: adherence %s, FID %.2f", k, quality[k]["adherence"], quality[k]["fid"])


if __name__ == "__main__":
    main()
