"""The hidden states between decoder blocks of the layer-by-layer runner (:mod:`qcompile.blockwise`)
kept on disk when they exceed its memory budget (``max_memory="8GB"``).

A spilled set of hidden states is a safetensors file (``hidden.<i>`` per calibration item, the same
layout as the run's resume file) written item by item as the block produces its outputs, and read
item by item (:class:`SpilledHidden`): only the block's float32 working copies stay resident, never a
second copy of all hidden states in the activation dtype. The bytes on disk are those of the tensors
in memory, so a spilled run gives the same codes as one that keeps everything in memory. The file
of the block being written is ``.hidden-next.safetensors`` in the output directory; once the block's
artifact is saved it replaces the resume file (atomically), and the last one is removed with it.

Imports only :mod:`qcompile.errors` (and torch, safetensors).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from .errors import InputError

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def parse_bytes(value: Union[int, str], field: str = "max_memory") -> int:
    """Bytes in ``value``: an int, or a string like ``"8GB"``, ``"512MiB"``, ``"1.5 GiB"`` (GB = 10⁹,
    GiB = 2³⁰). Raises :class:`InputError` naming ``field`` when it is not a positive size.

    Example::

        >>> parse_bytes("8GB")
        8000000000
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{field}={value!r}: expected a number of bytes or a string such as '8GB' or '512MiB'")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise InputError(f"{field}={value!r}: expected a size such as '8GB' or '512MiB' (units: "
                             f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InputError(f"{field}={value!r}: the memory budget must be positive")
    return n


def nbytes(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of ``tensors`` stored as ``dtype``."""
    return sum(t.numel() for t in tensors) * torch.empty((), dtype=dtype).element_size()


class SpilledHidden(Sequence):
    """The hidden states in the safetensors file ``path``, read one item at a time (each access
    opens the file and copies the item out, so no page of it stays mapped)."""

    def __init__(self, path: Path, count: int):
        self.path, self.count = Path(path), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"hidden.{i % self.count}")

    def moved(self, path: Path) -> "SpilledHidden":
        """The same hidden states after their file was renamed to ``path``."""
        return SpilledHidden(path, self.count)


def write_hidden(path: Path, shapes: Sequence[tuple], dtype: torch.dtype, produce: Callable[[int], torch.Tensor],
                 metadata: dict) -> SpilledHidden:
    """Write ``produce(i)`` (cast to ``dtype``; shape ``shapes[i]``) for each item into the
    safetensors file ``path``, one item in memory at a time; the header is written first, from
    the shapes. Returns the file as a :class:`SpilledHidden`."""
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for i, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel()) * size
        header[f"hidden.{i}"] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i, shape in enumerate(shapes):
            t = produce(i).detach().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise InputError(f"layer-by-layer spill: item {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())
    return SpilledHidden(path, len(shapes))
