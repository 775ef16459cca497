"""Reading safetensors files without trusting them: the header is checked against the file's size
before any tensor is allocated, so a corrupted header cannot make the loader allocate more than the
file holds. No pickle anywhere.

Imports torch, safetensors and :mod:`qcompile.errors` only.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Union

import torch

from .errors import ArtifactError

# safetensors' own reader refuses headers above 100 MB; a header that size would already describe
# millions of tensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype name -> torch dtype (the itemsize comes from torch)
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against its size: the 8-byte header length
    (bounded by :data:`MAX_HEADER_BYTES` and the file), the header JSON, and for every tensor a
    known dtype, a shape whose element count × item size equals its byte range, and byte ranges
    that tile the data exactly. Only then are tensors allocated (by safetensors, no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"'{path}' is truncated: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise ArtifactError(f"'{path}': the safetensors header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte "
                                f"limit (header too large): the file is corrupted")
        if 8 + n > size:
            raise ArtifactError(f"'{path}' is truncated: its safetensors header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{path}': the safetensors header is corrupted (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"'{path}': the safetensors header is corrupted (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise ArtifactError(f"'{path}': tensor '{name}' has an unknown dtype {entry.get('dtype')!r}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ArtifactError(f"'{path}': tensor '{name}' has an unreadable shape {shape!r} or byte range {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ArtifactError(f"'{path}': tensor '{name}' of shape {shape} and dtype {entry['dtype']} needs {nbytes} "
                                f"bytes but spans {end - begin} (shape mismatch)")
        if end > data_len:
            raise ArtifactError(f"'{path}' is truncated: tensor '{name}' ends at byte {end} of data, the file holds "
                                f"{data_len}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ArtifactError(f"'{path}': tensor '{name}' starts at byte {begin}, expected {pos} (overlapping or "
                                f"missing data): the file is corrupted")
        pos = end
    if pos != data_len:
        raise ArtifactError(f"'{path}': {data_len - pos} bytes after the last tensor: the file is corrupted")
    return load_file(str(path))


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
