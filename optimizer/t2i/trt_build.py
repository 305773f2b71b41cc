"""Stage `build` for pipelines (--backend tensorrt): one strongly typed TensorRT engine per
component graph, through the pixel flow's builder (optimizer/compile/build.py).

Each engine's optimization profile is its component's own IO spec: the text encoder over batch B,
the UNet over B..2B under CFG (both halves in one call) and the latent size range, the VAE decoder
over B and the latent/pixel range. The precision is the graph's (FP16 types, explicit Q/DQ), so
the graph ONNX Runtime validated is the graph compiled here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from engines.iospec import IOSpec
from engines.lora import Slots, rank_profiles
from optimizer.compile.build import EngineResult, build_engine
from optimizer.compile.trt_profiles import TrtBuildConfig

log = logging.getLogger(__name__)


def build_component_engines(
    root: Path,
    graphs: dict[tuple[str, str], Path],
    specs: dict[str, IOSpec],
    config: TrtBuildConfig,
    lora: dict[tuple[str, str], Slots] | None = None,
) -> dict[tuple[str, str], EngineResult]:
    """(component, precision) -> its engine in root/engines/<component>.<precision>.<target>.plan.
    A graph with LoRA inputs (`lora`) gets their rank range in every profile (engines/lora.py's
    rank_profiles): adapters are fed, never refitted, so a swap leaves no residue and int8 engines
    take them too."""
    cfg = replace(config, batch_sizes=None)  # each component's batch range is its own spec's
    out: dict[tuple[str, str], EngineResult] = {}
    for (kind, p), path in sorted(graphs.items()):
        log.info("build %s %s engine", kind, p)
        slots = (lora or {}).get((kind, p))
        extra = rank_profiles(slots) if slots else None
        out[(kind, p)] = build_engine(
            path, specs[kind], root / "engines", cfg, precision=p, stem=kind, extra_profiles=extra
        )
    return out


def engine_artifact(kind: str, res: EngineResult) -> dict[str, Any]:
    """`Manifest.add` keywords: named by component ("engine/unet/int8/<target>"), the component
    recorded beside the engine's target, profiles and flags."""
    kw = res.to_manifest()
    kw["name"] = f"engine/{kind}/{res.precision}/{res.target.key}"
    kw["extra"] = {**kw["extra"], "component": kind}
    return kw
