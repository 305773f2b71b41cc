"""dd-distill on the bundled digits teacher: progressive (the demo student), consistency, a smaller
student and a 1-step student, with FID / paired PSNR per round and wall time.

    python benchmarks/distill_demo.py                          # all modes
    python benchmarks/distill_demo.py --modes progressive      # just the demo student
    python benchmarks/distill_demo.py --collect                # summarize finished runs only

The progressive 4-step run writes optimizer/demo/student/student.ckpt (the student dd-compile
--demo ships), its report.json and samples.png (teacher-64 / teacher-4 / student-4 rows); the other
modes write to out/distill_demo/. A summary goes to optimizer/demo/student/modes.json.
Timings on a shared CPU are noisy: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.checkpoint import load_checkpoint  # noqa: E402
from optimizer.distill import DistillConfig, run_distillation  # noqa: E402
from optimizer.distill.cli import DEMO_TEACHER  # noqa: E402

DEMO_OUT = ROOT / "optimizer" / "demo" / "student"
MODES = {
    # name: (out path, DistillConfig overrides): the settings behind the figures in modes.json
    "progressive": (
        DEMO_OUT / "student.ckpt",
        {"iters": 800, "eval_samples": 1000},  # dd-distill --demo's defaults
    ),
    "consistency": (
        ROOT / "out/distill_demo/consistency/student.ckpt",
        {"method": "consistency", "iters": 400, "eval_samples": 500},
    ),
    "width0.5": (
        ROOT / "out/distill_demo/width0.5_kd800/student.ckpt",
        {"width": 0.5, "kd_iters": 800, "round_iters": (50, 50, 100, 150), "iters": 150, "eval_samples": 500},
    ),
    # the 1-step student: 6 rounds from 64 steps (measured on an H200: benchmarks/results/)
    "steps1": (ROOT / "out/distill_demo/steps1/student.ckpt", {"steps": 1, "iters": 800}),
}


def summarize(name: str, record: dict, seconds: float) -> dict:
    last = record["rounds"][-1]
    q = record.get("quality", {})
    return {
        "mode": name,
        "method": record["method"],
        "steps": record["steps"],
        "student_parameters": record["student_parameters"],
        "teacher_parameters": record["teacher_parameters"],
        "fid_student": last.get("fid_student"),
        "fid_teacher_ddim_same_steps": last.get("fid_teacher_ddim"),
        "fid_teacher_reference": q.get("teacher_reference", {}).get("fid"),
        "fid_ratio_to_teacher_reference": (
            round(last["fid_student"] / q["teacher_reference"]["fid"], 3) if "fid_student" in last else None
        ),
        "psnr_student_vs_teacher_db": last.get("psnr_student_vs_teacher_db"),
        "training_seconds": record["seconds"],
        "wall_seconds": round(seconds, 1),
        "rounds": [
            {
                k: r.get(k)
                for k in (
                    "round",
                    "student_steps",
                    "fid_student",
                    "fid_teacher_ddim",
                    "psnr_student_vs_teacher_db",
                    "seconds",
                )
            }
            for r in record["rounds"]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--teacher", default=str(DEMO_TEACHER))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--collect",
        action="store_true",
        help="do not train: summarize the checkpoints earlier runs wrote",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary_path = DEMO_OUT / "modes.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.modes.split(","):
        out, over = MODES[name]
        cfg = DistillConfig(teacher=args.teacher, out=str(out), demo=True, threads=args.threads, **over)
        if args.collect:
            if not out.exists():
                continue
            record = load_checkpoint(out, weights=False).distillation
            summary[name] = summarize(name, record, record.get("wall_seconds_this_run", 0.0))
        else:
            t0 = time.perf_counter()
            res = run_distillation(cfg)
            summary[name] = summarize(name, res.record, time.perf_counter() - t0)
        if name == "progressive":  # the shipped demo student: its report and sample grid
            work = cfg.work_dir
            shutil.copyfile(work / "report.json", DEMO_OUT / "report.json")
            last = max(work.glob("round*_samples.png"), key=lambda p: int(p.stem[5:-8]))
            shutil.copyfile(last, DEMO_OUT / "samples.png")
            shutil.copyfile(work / "losses.png", DEMO_OUT / "losses.png")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        s = summary[name]
        print(
            f"{name:12s} {s['steps']} steps  FID {s['fid_student']}  (teacher DDIM same steps "
            f"{s['fid_teacher_ddim_same_steps']}, teacher ref {s['fid_teacher_reference']})  "
            f"PSNR {s['psnr_student_vs_teacher_db']} dB  {s['wall_seconds']} s"
        )


if __name__ == "__main__":
    main()
