"""int4 weight-only GEMM/GEMV in TVMScript (TIR), with the codes unpacked in registers.

Computes ``y[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] * q[n, k] - z[g, n] * sum_{k in g} x[m, k]) + b[n]``
— ``x @ dequant(W4)^T + b`` with the zero point folded out of the inner loop, so the float weight
matrix never exists in memory: the K loop loads one byte (two uint4 codes) per column, splits it
with a mask and a shift, converts and multiplies-adds 16 columns at a time (one zmm on AVX-512,
two ymm on AVX2: LLVM vectorises the 16-lane loop for the target).

Packing (:func:`pack_int4`, once, at lowering): codes ``[N, K]`` (0..15) → uint8 ``[Np/16, K/2, 16]``,
byte ``[nb, j, c]`` = ``q[nb*16 + c, 2j] | q[nb*16 + c, 2j + 1] << 4``: one 16-byte row per pair of
``k`` for a block of 16 columns, contiguous along ``k`` so a GEMV streams each block once. Scales and
zero points are stored ``[Np/16, K/g, 16]`` float32 alongside. Padding columns have zero scale.

Status: the kernel and its packing are built and tested (tests/test_tvm_int4.py); the fuse pass and
the lowering hook that would call it from a converted model are not built yet (docs/tvm.md).
"""
from __future__ import annotations

import numpy as np

LANES = 16      # columns per block: one zmm of float32
GROUPS = (32, 64, 128)


def padded_n(n: int) -> int:
    """Columns after packing: a multiple of :data:`LANES`."""
    return (n + LANES - 1) // LANES * LANES


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int):
    """(packed codes ``[Np/16, K/2, 16]`` uint8, scales, zeros ``[Np/16, K/g, 16]`` float32).

    ``q``: uint4 codes ``[N, K]`` in 0..15; ``scale``/``zero``: ``[N, K/g]``. ``K`` must be even and
    ``group`` must divide it."""
    n, k = q.shape
    if group not in GROUPS:
        raise ValueError(f"group size {group} has no int4 kernel (built: {GROUPS})")
    if k % group:
        raise ValueError(f"group size {group} does not divide K={k}")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("uint4 codes must lie in 0..15")
    np_, ng = padded_n(n), k // group
    qp = np.zeros((np_, k), np.uint8)
    qp[:n] = q
    byte = (qp[:, 0::2] | (qp[:, 1::2] << 4)).astype(np.uint8)              # [Np, K/2]
    packed = np.ascontiguousarray(byte.reshape(np_ // LANES, LANES, k // 2).transpose(0, 2, 1))
    s = np.zeros((np_, ng), np.float32)
    z = np.zeros((np_, ng), np.float32)
    s[:n], z[:n] = scale.reshape(n, ng), zero.reshape(n, ng)
    lay = lambda t: np.ascontiguousarray(t.reshape(np_ // LANES, LANES, ng).transpose(0, 2, 1))  # noqa: E731
    return packed, lay(s), lay(z)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of the code packing of :func:`pack_int4`: ``[Np, K]`` uint8 codes."""
    nb, k2, _ = packed.shape
    byte = packed.transpose(0, 2, 1).reshape(nb * LANES, k2)
    out = np.empty((nb * LANES, k2 * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = byte & 15, byte >> 4
    return out


def int4_kernel(k: int, np_: int, group: int):
    """The TIR ``PrimFunc`` for one weight shape: arguments ``x`` f32 ``[m, K]`` (``m`` symbolic),
    ``w`` u8 ``[Np/16, K/2, 16]``, ``s``, ``z`` f32 ``[Np/16, K/g, 16]``, ``bias`` f32 ``[Np]``,
    ``out`` f32 ``[m, Np]``. One row at a time (the GEMV path is the whole kernel; M > 1 repeats it,
    correct but without weight reuse across rows)."""
    from tvm.script import tirx as T

    if group not in GROUPS or k % group or np_ % LANES:
        raise ValueError(f"K={k} must be a multiple of the group {group} (one of {GROUPS}) and Np={np_} of {LANES}")
    nb, ng, g2 = np_ // LANES, k // group, group // 2

    @T.prim_func
    def gemv(x: T.handle, w: T.handle, s: T.handle, z: T.handle, bias: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        X = T.match_buffer(x, (m, k), "float32")
        W = T.match_buffer(w, (nb, k // 2, LANES), "uint8")
        S = T.match_buffer(s, (nb, ng, LANES), "float32")
        Z = T.match_buffer(z, (nb, ng, LANES), "float32")
        B = T.match_buffer(bias, (np_,), "float32")
        O = T.match_buffer(o, (m, np_), "float32")
        # stack buffers under 1 KiB ("global" scope, see kernels.py why) that LLVM keeps in registers
        xs = T.decl_buffer((ng,), "float32", scope="global")
        for r in range(m):
            for gi in range(ng):
                xs[gi] = T.float32(0)
                for kk in range(group):
                    xs[gi] = xs[gi] + X[r, gi * group + kk]
            for jb in range(nb):
                acc = T.decl_buffer((LANES,), "float32", scope="global")
                gacc = T.decl_buffer((LANES,), "float32", scope="global")
                for c in T.vectorized(LANES):
                    acc[c] = B[jb * LANES + c]
                for gi in range(ng):
                    for c in T.vectorized(LANES):
                        gacc[c] = T.float32(0)
                    for kk in range(g2):
                        for c in T.vectorized(LANES):
                            gacc[c] = gacc[c] + X[r, gi * group + kk * 2] * T.Cast(
                                "float32", W[jb, gi * g2 + kk, c] & T.uint8(15)) + X[r, gi * group + kk * 2 + 1] * T.Cast(
                                "float32", W[jb, gi * g2 + kk, c] >> T.uint8(4))
                    for c in T.vectorized(LANES):
                        acc[c] = acc[c] + S[jb, gi, c] * (gacc[c] - Z[jb, gi, c] * xs[gi])
                for c in T.vectorized(LANES):
                    O[r, jb * LANES + c] = acc[c]

    return gemv

