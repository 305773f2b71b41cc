"""Which family a SOURCE (or --demo) belongs to: one dispatch, read before any work."""

from __future__ import annotations

import json
from pathlib import Path

from optimizer.families.table import FAMILIES, Family, family_of_pipeline


def family_of(source: Path | None, demo: str | None = None) -> Family:
    """`--demo t2i|pixel`, else a pipeline folder (the family of its model_index.json class; an
    unknown or unreadable one is the SD flow's to refuse by name) or a text-to-image student.ckpt
    ("sd"), else the one-network denoiser flow, whose loader names what is wrong with anything else."""
    if demo is not None:
        return FAMILIES["sd" if demo == "t2i" else "denoiser"]
    from optimizer.t2i.source import is_t2i_source

    if source is None or not is_t2i_source(Path(source)):
        return FAMILIES["denoiser"]
    index = Path(source) / "model_index.json"
    if Path(source).is_dir():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            cls = None
        return family_of_pipeline(cls) or FAMILIES["sd"]
    return FAMILIES["sd"]
