"""`dd-bench merge`: several bench JSONs (one per target) -> one Markdown comparison.

Rows: variants; columns: targets; a cell is p50 ms, images/s and speedup over that target's own
teacher. The best variant per target (lowest p50) is bold, and named again in a last row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.errors import InputError
from optimizer.bench.schema import load_bench, result


def _targets(benches: list[dict[str, Any]], paths: list[Path]) -> list[str]:
    """Column names: each target's name, made unique with its file name when two collide."""
    names = [b["target"]["name"] for b in benches]
    return [f"{n} ({p.stem})" if names.count(n) > 1 else n for n, p in zip(names, paths, strict=True)]


def merge(paths: list[str | Path], *, phase: str = "e2e", batch_sizes: list[int] | None = None) -> str:
    """Markdown: one table per batch size measured on every target (or those asked for)."""
    if len(paths) < 1:
        raise InputError("merge needs at least one bench JSON")
    ps = [Path(p) for p in paths]
    benches = [load_bench(p) for p in ps]
    cols = _targets(benches, ps)
    common = set.intersection(
        *({x["batch"] for v in b["variants"] for x in v["results"] if x["phase"] == phase} for b in benches)
    )
    if batch_sizes:
        missing = sorted(set(batch_sizes) - common)
        if missing:
            raise InputError(
                f"batch size(s) {missing} not measured ({phase}) on every target; "
                f"common: {sorted(common) or 'none'}"
            )
        common = set(batch_sizes)
    if not common:
        raise InputError(
            f"no batch size was measured ({phase}) on every target: " + ", ".join(f"{p}" for p in ps)
        )
    variants: list[str] = []
    for b in benches:
        for v in b["variants"]:
            if v["name"] not in variants:
                variants.append(v["name"])
    title = "end to end (noise -> sample)" if phase == "e2e" else "per call (one model evaluation)"
    out = [
        f"# dd-bench: {len(benches)} target(s), {title}",
        "",
        "Cell: p50 latency, images/s, speedup over that target's eager fp32 PyTorch teacher. "
        "**Bold**: fastest variant on that target. (est.): steps x per-call, not run end to end.",
        "",
    ]
    for b, col, p in zip(benches, cols, ps, strict=True):
        fp = b["target"]["fingerprint"]
        gpu = ", ".join(g["name"] for g in fp.get("gpus", [])) or "no GPU"
        out.append(
            f"- **{col}**: `{p}`; {fp['cpu']['model']}, {b['config'].get('threads')} threads, "
            f"{gpu}; {b['created']}"
        )
    for batch in sorted(common):
        best: list[str | None] = []
        for b in benches:
            cands = [
                (r["p50_ms"], v["name"])
                for v in b["variants"]
                if (r := result(v, phase, batch)) and r.get("p50_ms") and r.get("method") == "measured"
            ]
            best.append(min(cands)[1] if cands else None)
        out += [
            "",
            f"## batch {batch}",
            "",
            "| variant | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name in variants:
            cells = []
            for b, win in zip(benches, best, strict=True):
                v = next((v for v in b["variants"] if v["name"] == name), None)
                r = result(v, phase, batch) if v else None
                if v is None:
                    cells.append("")
                elif v.get("skipped") or r is None or r.get("skipped"):
                    cells.append("skipped")
                else:
                    sp = r.get("speedup_vs_teacher")
                    cell = (
                        f"{r['p50_ms']:.2f} ms"
                        + (" (est.)" if r.get("method") == "estimated" else "")
                        + f", {r.get('images_per_s', 0):.3g} img/s"
                        + (f", {sp:.2f}x" if sp else "")
                    )
                    cells.append(f"**{cell}**" if win == name else cell)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("| **best** | " + " | ".join(f"**{w}**" if w else "-" for w in best) + " |")
    return "\n".join(out) + "\n"
