"""report.md and samples.png of a text-to-image run (report.json is the report dict itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines.fileio import atomic_path


def samples_png(rows: dict[str, np.ndarray], path: Path) -> None:
    """One row per source (uint8 NHWC images), labelled."""
    from PIL import Image, ImageDraw

    rows = {k: v for k, v in rows.items() if len(v)}
    n = max(len(v) for v in rows.values())
    h, w = next(iter(rows.values())).shape[1:3]
    scale = max(1, 64 // max(h, w))
    label_w = 140
    canvas = Image.new("RGB", (label_w + n * w * scale, len(rows) * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(rows.items()):
        draw.text((4, r * h * scale + 4), name, fill="black")
        for i, im in enumerate(imgs):
            tile = Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + i * w * scale, r * h * scale))
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


def _f(v: Any, fmt: str = ".3g") -> str:
    return format(v, fmt) if isinstance(v, int | float) else str(v)


def markdown(rep: dict[str, Any]) -> str:
    from optimizer.t2i.speed import table

    s = rep["student"]
    lines = [
        "# dd-compile text-to-image report",
        "",
        f"- student: `{s['path']}` ({s['pipeline_class']}, {s['scheduler']}, {s['steps']} steps, "
        f"guidance {s['guidance']} at {s['guidance_scale']})",
        f"- teacher: `{rep['teacher']['path']}` ({rep['teacher']['reference_steps']} steps, guidance "
        f"{rep['teacher']['guidance_scale']})",
        f"- size: {rep['size'][0]}x{rep['size'][1]}; passed: **{rep['passed']}**; "
        f"recommended: **{rep.get('recommended')}**; {rep['seconds']:.0f} s",
        "",
        "## Components per deployment mix",
        "",
    ]
    # one column per component the family has (text encoders, UNet or transformer, VAE parts)
    names = list(dict.fromkeys(k for v in rep["variants"] for k in v["components"]))
    lines += [
        f"| mix | {' | '.join(names)} | sample PSNR (dB) | img2img / inpaint PSNR (dB) | passed |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for v in rep["variants"]:
        c = v["components"]
        cells = " | ".join(c[n]["precision"] if n in c else "-" for n in names)
        tp = (v.get("task_parity") or {}).values()
        tasks = " / ".join("not validated" if "skipped" in t else _f(t["psnr_db"], ".1f") for t in tp) or "-"
        lines.append(
            f"| {v['mix']} | {cells} | {_f(v['sample_parity']['psnr_db'], '.1f')} "
            f"(bar {v['sample_parity']['bar']}) | {tasks} | {v['passed']} |"
        )
    lines += ["", "Why each component's precision:", ""]
    for v in rep["variants"]:
        for k, c in v["components"].items():
            lines.append(f"- {v['mix']} / {k}: {c['precision']}: {c['why']}")
    lines += ["", "## Call parity (torch module vs graph, student trajectory inputs)", ""]
    lines += [
        "| component.precision | calls | rel. L2 | max abs | bar | passed |",
        "|---|---|---|---|---|---|",
    ]
    for k, c in rep["call_parity"].items():
        lines.append(
            f"| {k} | {c['calls']} | {_f(c['rel_l2'], '.2e')} | {_f(c['max_abs'], '.2e')} | {c['bar']} | "
            f"{c['passed']} |"
        )
    lo = rep.get("lora")
    if lo:
        layers = ", ".join(f"{k} {n}" for k, n in lo["layers"].items())
        lines += [
            "",
            f"## LoRA inputs (rank <= {lo['rank']} per layer; layers: {layers})",
            "",
            f"Checked with a synthetic adapter (rank {lo['check']['rank']}, update "
            f"{lo['check']['update']:g} of each layer's weight norm, read from a diffusers-named file) "
            "against the torch modules with it merged.",
            "",
            "| graph or mix | rel. L2 / PSNR (dB) | bar | passed |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {_f(c['rel_l2'], '.2e')} | {c['bar']} | {c['passed']} |"
            for k, c in lo["call_parity"].items()
        ]
        lines += [
            f"| {k} images | {_f(c['psnr_db'], '.1f')} | {c['bar']} | {c['passed']} |"
            for k, c in lo["sample_parity"].items()
        ]
    d = rep.get("distribution")
    if d:
        lines += ["", "## Distribution (student vs teacher, same prompts and latents)", ""]
        for k in (
            "n",
            "feature_space",
            "fid_student",
            "fid_teacher",
            "adherence_student",
            "adherence_teacher",
            "clip_score_student",
            "clip_score_teacher",
            "paired_psnr_db",
        ):
            if d.get(k) is not None:
                lines.append(f"- {k}: {d[k]}")
    t = rep.get("timings")
    if t:
        rows = table(t)
        lines += ["", "## Speed (median ms, side by side in one process)", ""]
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "---|" * len(rows[0]))
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    for n in rep.get("notes", []):
        lines.append(f"\nnote: {n}")
    for f in rep.get("failures", []):
        lines.append(f"\nFAILED: {f}")
    return "\n".join(lines) + "\n"
