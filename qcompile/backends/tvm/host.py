"""What the host CPU can run: its flags, the LLVM ``mcpu`` to compile for, the integer kernel
families it runs and the best of them (machines differ from day to day: never assume one
processor), and the LLVM target every kernel and model of the backend is compiled for."""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import tvm

from ...cpu import cpu_info

# LLVM fast-math flags the tvm backend's target carries (why these: pipeline.py's docstring)
FAST_MATH_FLAGS = {"fast-math-reassoc": True, "fast-math-contract": True, "fast-math-nsz": True}


@dataclass(frozen=True)
class Host:
    """``flags``: /proc/cpuinfo flags; ``mcpu``: LLVM CPU name; ``family``: integer kernel family;
    ``mattr``: LLVM features added to ``mcpu`` (``+avxvnni`` on AVX2 hosts that have AVX-VNNI)."""

    vendor: str
    flags: frozenset
    mcpu: str
    family: str
    mattr: tuple = ()

    @property
    def has_vnni(self) -> bool:
        return "avx512_vnni" in self.flags

    @property
    def has_amx(self) -> bool:
        return "amx_int8" in self.flags and "amx_tile" in self.flags

    def target(self, threads: int = 0, fast_math: bool = True):
        """The TVM LLVM target for this host (dict form: TVM 0.27 rejects target strings);
        ``fast_math``: with :data:`FAST_MATH_FLAGS` (float reassociation, FMA)."""
        spec = {"kind": "llvm", "mcpu": self.mcpu, **(FAST_MATH_FLAGS if fast_math else {})}
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        if threads:
            spec["num-cores"] = threads
        return tvm.target.Target(spec)


def choose_mcpu(vendor: str, flags: frozenset) -> str:
    """The LLVM CPU whose features match ``flags`` (a conservative named CPU, never ``native``,
    so a library compiled here says what it needs)."""
    if "amx_int8" in flags:
        return "sapphirerapids"
    if "avx512_vnni" in flags:
        return "znver4" if vendor == "AuthenticAMD" else "icelake-server"
    if "avx512f" in flags:
        return "skylake-avx512"
    if "avx2" in flags:
        return "x86-64-v3"
    return "x86-64"


def choose_mattr(mcpu: str, flags: frozenset) -> tuple:
    """Features ``mcpu`` lacks that the flags have and a kernel family uses: AVX-VNNI on AVX2
    hosts (Intel client cores from Alder Lake, no AVX-512), for the ``avx-vnni`` family."""
    return ("+avxvnni",) if mcpu == "x86-64-v3" and "avx_vnni" in flags else ()


# the built integer kernel families (int8_gemm.gemm_kernel), fastest first: choose_family takes the first
# one the host runs
FAMILIES = ("amx", "vnni", "avx-vnni", "avx2", "generic")
# the CPU flags each kernel family's instructions need (the amx family runs its leftover rows on vnni)
FAMILY_FLAGS = {"amx": ("amx_tile", "amx_int8", "avx512_vnni"), "vnni": ("avx512_vnni",), "avx-vnni": ("avx_vnni", "avx2"),
                "avx2": ("avx2",), "generic": (), "amx-emulated": (),
                # the avx2 kernel before split weights (int8_gemm.AVX2_WIDE): a baseline, never chosen
                "avx2-wide": ("avx2",)}


def runnable_families() -> list:
    """The built integer kernel families this host can run (its flags, and for ``amx`` the tile
    state granted): compiling a family's instructions for a host without them aborts the process."""
    flags = detect().flags
    return [f for f, need in FAMILY_FLAGS.items()
            if all(x in flags for x in need) and (f != "amx" or request_amx())]


def choose_family(flags: frozenset) -> str:
    """The fastest built kernel family the flags allow."""
    return next(f for f in FAMILIES if all(x in flags for x in FAMILY_FLAGS[f]))


def build_threads(threads: int = 0) -> int:
    """The thread count an artifact is built for: ``threads`` when given, else ``TVM_NUM_THREADS``
    when set (the limit TVM's thread pool takes at run time), else the cores this process may use."""
    if threads > 0:
        return threads
    env = os.environ.get("TVM_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``), once; True when granted. Without it the first tile instruction kills
    the process with SIGILL, and TVM's runtime does not ask. Only for x86-64 Linux hosts with AMX."""
    if platform.system() != "Linux" or "amx_tile" not in detect().flags:
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@lru_cache(maxsize=1)
def detect() -> Host:
    """This machine's :class:`Host`."""
    info = cpu_info()
    if not info.x86:
        return Host("", frozenset(), "generic", "generic")
    mcpu = choose_mcpu(info.vendor, info.flags)
    return Host(info.vendor, info.flags, mcpu, choose_family(info.flags), choose_mattr(mcpu, info.flags))


def compile_kernel(func, target=None):
    """Build one kernel ``PrimFunc`` on its own (tests, benchmarks): a module whose ``main``
    takes ``tvm.runtime.tensor`` arguments. ``target``: the host's by default.

    Example::

        >>> mod = compile_kernel(int8_gemm.gemm_kernel(64, 48, False, "generic"))
        >>> mod["main"](a, w, colsum, sa, za, sw, bias, out)   # tvm.runtime.tensor arguments
    """
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target or detect().target())
