"""Read a .safetensors file into numpy, without torch or the safetensors package (LoRA files at run
time). The format: 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets; "__metadata__": str -> str), then the raw little-endian tensors. Everything the header
claims is checked against the file before a byte is used; nothing is unpickled."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from engines.errors import InputError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
MAX_HEADER = 100 << 20


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(float32 tensors by name, the header's __metadata__); bf16 widened exactly to float32."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_HEADER, len(raw) - 8):
        raise InputError(f"{path}: not a safetensors file (header length {n} past the file)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    body = memoryview(raw)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, t in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES:
            dtype = t.get("dtype") if isinstance(t, dict) else None
            raise InputError(f"{where}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        shape, offs = t.get("shape"), t.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InputError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise InputError(f"{where}: data_offsets {offs!r} is not [begin, end]")
        dt = np.dtype(_DTYPES[t["dtype"]]).newbyteorder("<")
        begin, end = offs
        if not 0 <= begin <= end <= len(body) or end - begin != dt.itemsize * int(np.prod(shape)):
            raise InputError(f"{where}: data_offsets {offs} do not hold {t['dtype']} {shape} in the file")
        a = np.frombuffer(body[begin:end], dtype=dt).reshape(shape)
        if t["dtype"] == "BF16":  # the top half of a float32's bits
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(np.float32)
    return out, {str(k): v for k, v in meta.items()}


def write_safetensors(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """float32 tensors (tests and benchmarks write LoRA files with it)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
