"""Installed library versions: the one reader, for dd-bench's fingerprint and the export cache key.

Below both users (optimizer/bench/, optimizer/compile/) so the compile stages need nothing of dd-bench.
"""

from __future__ import annotations

import importlib.metadata


def library_versions(libs: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `libs` (absent ones left out)."""
    out = {}
    for lib in libs:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
