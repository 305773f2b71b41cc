"""Which family a SOURCE (or --demo) belongs to: one dispatch, read before any work."""

from __future__ import annotations

from pathlib import Path

from optimizer.families.table import FAMILIES, Family


def family_of(source: Path | None, demo: str | None = None) -> Family:
    """`--demo t2i|pixel`, else a pipeline folder or text-to-image student.ckpt ("sd"), else the
    one-network denoiser flow, whose loader names what is wrong with anything else."""
    if demo is not None:
        return FAMILIES["sd" if demo == "t2i" else "denoiser"]
    from optimizer.t2i.source import is_t2i_source

    return FAMILIES["sd" if source is not None and is_t2i_source(Path(source)) else "denoiser"]
