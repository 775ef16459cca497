"""The host CPU as Linux describes it: one reader of ``/proc/cpuinfo`` for every part of qcompile
that picks kernels, file formats or cache keys by processor (the machines differ from day to day:
never assume one processor; see docs/tvm.md and docs/onnx.md).

Example::

    >>> info = cpu_info()
    >>> "avx512_vnni" in info.flags
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache

X86_MACHINES = frozenset({"x86_64", "AMD64"})


@dataclass(frozen=True)
class CpuInfo:
    """``machine``: ``platform.machine()``; ``vendor``/``model``: ``vendor_id``/``model name`` of the
    first processor; ``flags``: its feature flags (empty where /proc/cpuinfo has none)."""

    machine: str
    vendor: str
    model: str
    flags: frozenset

    @property
    def x86(self) -> bool:
        return self.machine in X86_MACHINES


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (the first processor's block)."""
    vendor, model, flags = "", "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "model name" and not model:
            model = value.strip()
        elif key == "flags":
            flags = frozenset(value.split())
            break
    return CpuInfo(machine, vendor, model, flags)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())
