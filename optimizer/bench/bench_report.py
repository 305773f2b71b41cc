"""Bench JSON -> terminal table and Markdown (the JSON is the record; these are views of it)."""

from __future__ import annotations

from typing import Any

PHASE_TITLE = {
    "call": "Per call (one model evaluation)",
    "e2e": "End to end (noise -> sample; pipelines: prompts -> images)",
}


def _fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def rows(bench: dict[str, Any], phase: str) -> list[list[str]]:
    """One row per (variant, batch): the cells shared by the terminal and Markdown tables."""
    best = bench.get("best", {}).get(phase, {})
    out = []
    for v in bench["variants"]:
        if v.get("skipped"):
            continue
        mem = (v.get("memory") or {}).get("peak_rss_mb") or {}
        dev = (v.get("memory") or {}).get("device_peak_mb") or {}
        for x in v["results"]:
            if x["phase"] != phase:
                continue
            if x.get("skipped"):
                out.append([v["name"], str(x["batch"]), "skipped: " + x["skipped"]] + [""] * 9)
                continue
            est = x.get("method") == "estimated"
            mark = " *" if best.get(str(x["batch"])) == v["name"] else ""
            out.append(
                [
                    v["name"] + mark,
                    str(x["batch"]),
                    str(x.get("steps", 1)),
                    _fmt(x["p50_ms"]) + (" (est.)" if est else ""),
                    _fmt(x["p90_ms"]),
                    _fmt(x["p99_ms"]),
                    _fmt(x["spread"], ".1%"),
                    f"{x['n']}" + ("" if x.get("stable") or est else " !"),
                    _fmt(x.get("images_per_s"), ".3g"),
                    _fmt(x.get("speedup_vs_teacher"), ".2f") + ("x" if x.get("speedup_vs_teacher") else ""),
                    _fmt(x.get("fraction_of_peak"), ".1%"),
                    _fmt(mem.get(str(x["batch"])), ".0f")
                    + (f" / {_fmt(dev.get(str(x['batch'])), '.0f')}" if dev else ""),
                ]
            )
    return out


HEADER = [
    "variant",
    "batch",
    "steps",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "spread",
    "n",
    "img/s",
    "vs teacher",
    "of peak",
    "host MiB",
]


def terminal_table(bench: dict[str, Any]) -> str:
    lines = [f"dd-bench on {bench['target']['name']} ({bench['config']['threads']} threads)"]
    for phase in ("call", "e2e"):
        r = rows(bench, phase)
        if not r:
            continue
        widths = [max(len(h), *(len(c[i]) for c in r)) for i, h in enumerate(HEADER)]
        lines += [
            "",
            PHASE_TITLE[phase],
            "  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in r]
    lines += _threads_lines(bench)
    lines += ["", *_footnotes(bench)]
    return "\n".join(lines)


def _threads_lines(bench: dict[str, Any], markdown: bool = False) -> list[str]:
    """The threads grid (optimizer/threads_grid.py): a table, the verdicts, the pick."""
    from optimizer.threads_grid import table_rows

    s = bench.get("threads")
    if not s:
        return []
    r = table_rows(s)
    unit = "One whole generation" if s.get("unit") == "generation" else "Per call"
    title = f"{unit} at threads {s['grid']} ({s['cores']} cores; ~ = median not stable)"
    if markdown:
        out = ["", f"## {title}", "", "| " + " | ".join(r[0]) + " |", "|" + "---|" * len(r[0])]
        out += ["| " + " | ".join(c) + " |" for c in r[1:]]
    else:
        widths = [max(len(c[i]) for c in r) for i in range(len(r[0]))]
        out = ["", title]
        for i, c in enumerate(r):
            out.append("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
    out.append("")
    out += [("- " if markdown else "") + v["verdict"] for v in s["verdicts"].values()]
    rec = s.get("recommendation")
    out.append(("- " if markdown else "") + f"serves best: {rec['summary'] if rec else 'no stable point'}")
    return out


def _footnotes(bench: dict[str, Any]) -> list[str]:
    notes = [
        "* fastest at that batch size.  ! median not yet stable when the time budget ended.",
        "spread = (p90 - p10) / p50.  vs teacher = teacher/torch-eager/fp32 p50 / this p50 "
        "(e2e: teacher at its reference steps).",
    ]
    if any(x.get("method") == "estimated" for v in bench["variants"] for x in v["results"]):
        notes.append("(est.) = steps x per-call p50: one end-to-end run would not fit the time budget.")
    for v in bench["variants"]:
        if v.get("skipped"):
            notes.append(f"skipped {v['name']}: {v['skipped']}")
    return notes


def to_markdown(bench: dict[str, Any]) -> str:
    fp, cfg = bench["target"]["fingerprint"], bench["config"]
    isa = [k for k, on in fp["cpu"]["isa"].items() if on]
    gpus = (
        "; ".join(
            f"{g['name']} (sm {g['compute_capability']}, driver {g.get('driver', '?')}, CUDA {g.get('cuda')})"
            for g in fp["gpus"]
        )
        or "none"
    )
    libs = ", ".join(f"{k} {v}" for k, v in fp["libraries"].items())
    src, peak, flops = bench["source"], bench["peak"], bench["flops"]
    teacher = src.get("teacher") or {}
    out = [
        f"# dd-bench: {bench['target']['name']}",
        "",
        f"- created {bench['created']}; manifest `{src['manifest']}` (sha256 {src['manifest_sha256'][:12]})",
        f"- CPU: {fp['cpu']['model']}, {fp['cpu']['usable_cores']} usable cores, "
        f"{cfg['threads']} threads used; ISA: {', '.join(isa) or 'none of the listed'}",
        f"- GPU: {gpus}",
        f"- libraries: {libs}",
        f"- student: {src['schedule']['kind']} sampler, {src['schedule']['steps']} steps; teacher: "
        + (f"{teacher['reference_steps']} reference steps" if teacher else "not benched"),
        f"- FLOPs per image per call: student {_fmt(flops.get('student'), ',')}, teacher "
        f"{_fmt(flops.get('teacher'), ',')} ({flops.get('method')})",
        f"- matmul peak: fp32 {_fmt(peak.get('fp32_gflops'), '.1f')} GFLOP/s"
        + (f", fp16 {peak['fp16_gflops']:.1f} GFLOP/s" if peak.get("fp16_gflops") else "")
        + f" ({peak.get('method')})",
        f"- budget {cfg['seconds']:g} s of timing; warm-up {cfg['warmup']} calls; "
        "interleaved rounds "
        f"until the median moves < {cfg['rel_tol']:.0%} per round",
    ]
    for phase in ("call", "e2e"):
        r = rows(bench, phase)
        if not r:
            continue
        out += [
            "",
            f"## {PHASE_TITLE[phase]}",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in r]
    out += _threads_lines(bench, markdown=True)
    mem_methods = {(v.get("memory") or {}).get("method") for v in bench["variants"] if v.get("memory")}
    out += ["", "## Notes", ""] + [f"- {n}" for n in _footnotes(bench)]
    out += [f"- host MiB = peak RSS; memory method: {m}" for m in sorted(filter(None, mem_methods))]
    return "\n".join(out) + "\n"
