"""Which kernel configuration runs a given shape: M buckets (decode M <= 16, medium, prefill) and a
small table of block configurations per kernel family and device kind.

On a GPU the first candidate of a bucket runs unless the artifact was lowered with
``autotune=True``: then every candidate is timed once per (family, bucket, N, K, dtype) with
``triton.testing.do_bench`` and the fastest is cached for the process. Under ``TRITON_INTERPRET=1``
one configuration with large blocks runs (the interpreter's cost is per program, so fewer, larger
programs are faster) and nothing is tuned.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

BUCKETS = (("decode", 16), ("medium", 256), ("prefill", None))


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``block_m == 1`` selects the GEMV path of the weight-only kernel;
    ``split_k > 1`` splits the reduction over that many programs (small M: more programs than
    output tiles)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def bucket(m: int) -> str:
    """The M bucket of ``m`` rows: ``decode`` (<= 16), ``medium`` (<= 256) or ``prefill``."""
    for name, top in BUCKETS:
        if top is None or m <= top:
            return name
    raise AssertionError("unreachable")


K = KernelConfig
# family -> bucket -> candidates (the first is the default). split_k 0 means "choose from the grid":
# enough programs to fill the GPU at small M.
CUDA_TABLE: dict[str, dict[str, list[KernelConfig]]] = {
    "weight_only": {
        "decode": [K(16, 64, 128, 0, 4, 3), K(16, 128, 64, 0, 4, 4), K(16, 32, 256, 0, 4, 3), K(16, 64, 64, 0, 2, 4)],
        "medium": [K(64, 64, 64, 1, 4, 3), K(64, 128, 64, 1, 4, 3), K(32, 64, 128, 1, 4, 3), K(128, 64, 64, 1, 8, 3)],
        "prefill": [K(128, 128, 64, 1, 8, 3), K(128, 256, 64, 1, 8, 3), K(64, 128, 64, 1, 4, 4)],
    },
    "w8a8": {
        "decode": [K(16, 64, 128, 1, 4, 3), K(16, 128, 128, 1, 4, 4), K(32, 64, 256, 1, 4, 3)],
        "medium": [K(64, 128, 128, 1, 4, 3), K(128, 128, 64, 1, 8, 3)],
        "prefill": [K(128, 256, 128, 1, 8, 3), K(128, 128, 128, 1, 8, 4), K(256, 128, 128, 1, 8, 3)],
    },
    "quantize": {b: [K(4, 1, 0, 1, 4, 1)] for b in ("decode", "medium", "prefill")},
}
INTERPRETER_TABLE: dict[str, KernelConfig] = {
    "weight_only": K(64, 64, 128),
    "w8a8": K(64, 64, 128),
    "quantize": K(64, 1, 0),
}
_SM_COUNT_TARGET = 2 * 132  # two programs per H100 SM: enough to hide the latency of a weight stream
_tuned: dict = {}


def _pow2_at_most(x: int) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def fit(cfg: KernelConfig, m: int, n: int, k: int, group: int, interpret: bool) -> KernelConfig:
    """Adapt ``cfg`` to the shape: blocks no larger than needed, ``block_k`` dividing the group
    size (so one K block reads one scale per column), ``block_m == 1`` for a single row, and a
    split-K factor that fills the device at small M."""
    next_pow2 = lambda v: 1 << max(v - 1, 0).bit_length()  # noqa: E731
    floor = 1 if interpret else 16   # tl.dot needs 16 x 16 tiles on a GPU
    bk = min(cfg.block_k, max(floor, next_pow2(k)))
    if group:
        bk = min(bk, _pow2_at_most(group & -group))  # largest power of two dividing the group
    bn = min(cfg.block_n, max(floor, next_pow2(n)))
    bm = 1 if m == 1 else min(cfg.block_m, max(floor, next_pow2(m)))
    split = cfg.split_k
    if split == 0:
        tiles = -(-n // bn) * -(-m // bm)
        split = 1 if interpret else max(1, min(_SM_COUNT_TARGET // max(tiles, 1), k // (bk * 4)))
    return replace(cfg, block_m=bm, block_n=bn, block_k=bk, split_k=max(1, split))


def pick(family: str, m: int, n: int, k: int, group: int, interpret: bool, autotune: bool,
         run: Callable[[KernelConfig], object], key_extra=(), dot_only: bool = False) -> KernelConfig:
    """:func:`choose` for a kernel wrapper: ``run(cfg)`` launches it, timed when ``autotune`` is on
    (GPU only). ``dot_only``: the kernel has no GEMV path, so M = 1 keeps a ``tl.dot`` tile."""
    bench = None
    if autotune and not interpret:
        from triton.testing import do_bench

        bench = lambda c: do_bench(lambda: run(c))  # noqa: E731
    cfg = choose(family, m, n, k, group, interpret, bench, key_extra)
    if dot_only and cfg.block_m == 1:
        cfg = replace(cfg, block_m=2 if interpret else 16)
    return cfg


def choose(family: str, m: int, n: int, k: int, group: int, interpret: bool,
           bench: Optional[Callable[[KernelConfig], float]] = None, key_extra=()) -> KernelConfig:
    """The configuration to run ``family`` at ``[m, k] x [k, n]``. ``bench`` (GPU only) times one
    candidate in ms; with it the fastest candidate is chosen once and cached."""
    if interpret:
        return fit(INTERPRETER_TABLE[family], m, n, k, group, interpret)
    b = bucket(m)
    table = CUDA_TABLE[family][b]
    if bench is None:
        return fit(table[0], m, n, k, group, interpret)
    key = (family, b, n, k, group, *key_extra)
    if key not in _tuned:  # the table entry is cached, and fitted again to each M of the bucket
        _tuned[key] = min(table, key=lambda c: bench(fit(c, m, n, k, group, interpret)))
    return fit(_tuned[key], m, n, k, group, interpret)
