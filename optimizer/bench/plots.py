"""PNG plots of a bench: latency vs batch size per variant, and speedup over the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.fileio import atomic_path


def _series(bench: dict[str, Any], phase: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for v in bench["variants"]:
        pts = sorted(
            (x["batch"], x[key])
            for x in v.get("results", [])
            if x["phase"] == phase and x.get(key) is not None
        )
        if pts:
            out[v["name"]] = ([b for b, _ in pts], [y for _, y in pts])
    return out


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_latency(bench: dict[str, Any], path: str | Path) -> Path:
    """Per-call and end-to-end p50 latency vs batch size (log-log), p10..p90 as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase, title in zip(axes, ("call", "e2e"), ("per call", "end to end"), strict=True):
        for name, (bs, p50) in _series(bench, phase, "p50_ms").items():
            row = next(v for v in bench["variants"] if v["name"] == name)
            xs = [x for x in row["results"] if x["phase"] == phase and x.get("p50_ms") is not None]
            xs.sort(key=lambda x: x["batch"])
            lo = [x["p50_ms"] - (x["p10_ms"] if x["p10_ms"] is not None else x["p50_ms"]) for x in xs]
            hi = [(x["p90_ms"] if x["p90_ms"] is not None else x["p50_ms"]) - x["p50_ms"] for x in xs]
            style = "--" if row["role"] == "baseline" else "-"
            ax.errorbar(bs, p50, yerr=[lo, hi], fmt="o" + style, capsize=3, label=name, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({b for bs, _ in _series(bench, phase, "p50_ms").values() for b in bs})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{title} - {bench['target']['name']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    path = _save(fig, Path(path))
    plt.close(fig)
    return path


def plot_speedup(bench: dict[str, Any], path: str | Path) -> Path:
    """Speedup over the eager fp32 teacher (teacher p50 / variant p50), grouped by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase, title in zip(axes, ("call", "e2e"), ("per call", "end to end"), strict=True):
        series = {  # the reference row itself is 1.0 by definition: the black line
            k: v
            for k, v in _series(bench, phase, "speedup_vs_teacher").items()
            if k != "teacher/torch-eager/fp32"
        }
        batches = sorted({b for bs, _ in series.values() for b in bs})
        width = 0.8 / max(len(series), 1)
        for i, (name, (bs, sp)) in enumerate(series.items()):
            xs = [batches.index(b) + (i - (len(series) - 1) / 2) * width for b in bs]
            bars = ax.bar(xs, sp, width=width, label=name)
            ax.bar_label(bars, labels=[f"{y:.3g}x" for y in sp], fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over torch eager fp32 teacher")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{title} - {bench['target']['name']}", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
