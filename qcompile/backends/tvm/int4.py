"""int4 weight-only GEMM/GEMV in TVMScript (TIR), with the codes unpacked in registers.

Computes ``y = x @ dequant(W4)^T + b``, ``dequant(W4)[n, k] = (q[n, k] - z[g, n]) * s[g, n]`` for
uint4 codes ``q`` with a scale and zero point per group of ``g`` along ``k``. The float weight
matrix never exists in memory. Two paths in one kernel, chosen on the row count ``m``:

- ``m >= MMIN`` (GEMM): per panel of 32 columns, the codes are dequantized once into a float32
  ``[K, 32]`` buffer (L2-resident), then an ``IMR``-row x 2-vector FMA register tile runs over every
  row tile (like ``pipeline.batch_matmul_kernel``): the unpacking cost is paid once per panel, not
  once per row, and the FMA tile runs near the host's fp32 peak.
- ``m < MMIN`` (GEMV): four rows at a time (the codes unpacked and converted once for the four),
  then a pair, then one row, the zero point folded out per group,
  ``y[n] = b[n] + sum_g s[g, n] * (sum_{k in g} x[k] q[n, k] - z[g, n] sum_{k in g} x[k])``, 1 (four
  rows), ``G2`` (two rows) or ``G1`` (one row) blocks of 16 columns at once with separate
  accumulators for the low nibbles and the bytes (8 independent FMA chains). With four rows the
  loop is FMA-bound, as fast per row as the GEMM path's tile. Each 32-bit
  lane holds 8 codes of one column (no byte shuffles to widen them). A byte ``d = lo + 16 hi``
  needs no shift for its high nibble: ``x_e lo + x_o hi = (x_e - x_o/16) lo + (x_o/16) d``
  (``x_o/16`` exact: a power of two). And the bytes need no shift either: the prefixes
  ``w & 0xFF``, ``w & 0xFFFF``, ``w & 0xFFFFFF`` (exact in float32: 24 bits) and the top byte
  ``w >> 24`` carry the four bytes: with per-byte coefficients ``c_j``,
  ``sum_j c_j d_j = sum_p a_p prefix_p`` for the telescoped ``a_0 = c_0 - c_1/256``,
  ``a_1 = c_1/256 - c_2/65536``, ``a_2 = c_2/65536``, ``a_3 = c_3`` (likewise for the low nibbles,
  with the masks ``0x0F``, ``0x0F0F``, ``0x0F0F0F`` and ``(w >> 24) & 0x0F``). The coefficient rows are
  made once per row; the cross terms they cancel are 256x smaller than the terms they keep, so the
  rounding stays that of a float32 dot product. Per 16 x 8 codes: one shift, seven masks, eight
  converts, eight FMAs.

Packing (:func:`pack_int4`, once, at lowering): codes ``[N, K]`` (0..15) → uint8 ``[Np/16, K/8, 64]``,
byte ``[nb, i, 4c + j]`` = ``q[nb*16 + c, 8i + 2j] | q[nb*16 + c, 8i + 2j + 1] << 4``: read as 16
little-endian uint32 lanes, lane ``c`` holds codes ``8i .. 8i+7`` of column ``nb*16 + c`` (byte ``j``
at bits ``8j``); one 64-byte line per 8 ``k`` of a block of 16 columns, contiguous along ``k`` so
each block streams once. Scales and zero points are stored ``[Np/16, K/g, 16]`` float32 alongside.
Padding columns have zero scale.

Lowering: :class:`FuseInt4LinearPass` turns ``linear(x_float, dequantize(W_uint4 per group), b)``
into ``qcompile_tvm::int4_linear`` (PyTorch implementation included, so the pass is tested on its
own) with the weights packed here; :class:`Int4LinearConverter` makes it a ``call_tir`` of the kernel.
An int4 Linear the pass cannot take is named in its result's ``skipped`` and left as it was
(``check_kernels_took`` then raises ``NotBuiltError`` naming it and that reason: uint4 per group is
declared for the kernels only, and the Relax dequantize has no uint4 path).
"""
from __future__ import annotations

import numpy as np
import torch
from tvm import relax, tirx
from tvm.script import tirx as T

from ...ops import DEQUANTIZE
from ...passes.infra import Pass, add_tensor, get_attr_tensor
from ...passes.lowering import FuseResult
from .fuse import padded_bias, replace_linear, variable_bias

LANES = 16      # columns per block: one zmm of float32
KW = 8          # codes of one column per 32-bit lane
GROUPS = (32, 64, 128)
IMR, PNV = 6, 2     # GEMM register tile: 6 rows x 2 vectors of 16 columns (12 zmm accumulators)
G1 = 4              # GEMV column tile: 4 blocks of 16 columns, 8 independent accumulator chains
G2 = 2              # GEMV column tile for a pair of rows (8 chains as well; 4 rows: one block)
MMIN = 32           # rows from which the GEMM path runs (measured: even with the 4-row GEMV at 32-64)


def padded_n(n: int) -> int:
    """Columns after packing: a multiple of :data:`LANES`."""
    return (n + LANES - 1) // LANES * LANES


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, pad_k: bool = False):
    """(packed codes ``[Np/16, Kp/8, 64]`` uint8, scales, zeros ``[Np/16, Kp/g, 16]`` float32).

    ``q``: uint4 codes ``[N, K]`` in 0..15; ``scale``/``zero``: ``[N, ceil(K/g)]``. ``group`` must
    divide ``K`` (``Kp = K``; every built group is a multiple of 8, so ``K`` is too), unless
    ``pad_k``: then ``K`` (a multiple of 8) is padded with zero codes to ``Kp``, a multiple of the
    group (a short last group, as the reference quantizes it; the int8-activation kernels pad the
    activations with zero codes too, so the padding adds nothing)."""
    n, k = q.shape
    if group not in GROUPS:
        raise ValueError(f"group size {group} has no int4 kernel (built: {GROUPS})")
    if k % group and not (pad_k and k % KW == 0):
        raise ValueError(f"group size {group} does not divide K={k}")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("uint4 codes must lie in 0..15")
    np_, ng = padded_n(n), -(-k // group)
    k = ng * group
    qp = np.zeros((np_, k), np.uint8)
    qp[:n, :q.shape[1]] = q
    byte = (qp[:, 0::2] | (qp[:, 1::2] << 4)).astype(np.uint8)              # [Np, K/2]
    packed = np.ascontiguousarray(byte.reshape(np_ // LANES, LANES, k // KW, 4).transpose(0, 2, 1, 3)
                                  .reshape(np_ // LANES, k // KW, 4 * LANES))
    s = np.zeros((np_, ng), np.float32)
    z = np.zeros((np_, ng), np.float32)
    s[:n], z[:n] = scale.reshape(n, ng), zero.reshape(n, ng)
    lay = lambda t: np.ascontiguousarray(t.reshape(np_ // LANES, LANES, ng).transpose(0, 2, 1))  # noqa: E731
    return packed, lay(s), lay(z)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of the code packing of :func:`pack_int4`: ``[Np, K]`` uint8 codes."""
    nb, k8, _ = packed.shape
    byte = packed.reshape(nb, k8, LANES, 4).transpose(0, 2, 1, 3).reshape(nb * LANES, k8 * 4)
    out = np.empty((nb * LANES, k8 * KW), np.uint8)
    out[:, 0::2], out[:, 1::2] = byte & 15, byte >> 4
    return out


def int4_kernel(k: int, np_: int, group: int, mmin: int = MMIN):
    """The TIR ``PrimFunc`` for one weight shape: arguments ``x`` f32 ``[m, K]`` (``m`` symbolic),
    ``w`` u8 ``[Np/16, K/8, 64]``, ``s``, ``z`` f32 ``[Np/16, K/g, 16]``, ``bias`` f32 ``[Np]``,
    ``out`` f32 ``[m, Np]``. The GEMM path for ``m >= MMIN`` rows, the GEMV path below (module
    docstring)."""
    if group not in GROUPS or k % group or np_ % LANES:
        raise ValueError(f"K={k} must be a multiple of the group {group} (one of {GROUPS}) and Np={np_} of {LANES}")
    nb, ng, gw, kw, k2 = np_ // LANES, k // group, group // KW, k // KW, k // 2
    f16, u16 = "float32x16", "uint32x16"
    pw = PNV * LANES
    rs = k + ng         # the GEMV path's workspace per row

    def bits(w, shift, mask):
        """``(w >> shift) & mask`` on 16 uint32 lanes, as float32 (exact: below 2^24). LLVM drops a
        zero shift and a mask the shift already implies (the top byte, the top nibble)."""
        return T.Cast(f16, (w >> T.broadcast(T.Cast("uint32", shift), LANES)) & T.broadcast(T.Cast("uint32", mask), LANES))

    def prefix(j):
        """Mask of bytes 0..j of a lane for j < 3 (exact in float32: 24 bits), the top byte for j = 3."""
        return T.if_then_else(j < 3, T.shift_left(T.int64(1), T.Cast("int64", 8 * j + 8)) - 1, T.int64(255))

    @T.macro
    def gemv_rows(X, WS, r0, rr):
        # WS[ri * rs ...], for row r0 + ri: the telescoped coefficients of the low-nibble and byte
        # prefixes (K/2 each, from x_e - x_o/16 and x_o/16; module docstring), then the group sums of x
        for ri in range(rr):
            for gi in range(ng):
                WS[ri * rs + k + gi] = T.float32(0)
                for kk in range(group):
                    WS[ri * rs + k + gi] = WS[ri * rs + k + gi] + X[r0 + ri, gi * group + kk]
            for kk in range(k2):
                WS[ri * rs + k2 + kk] = X[r0 + ri, kk * 2 + 1] * T.float32(0.0625)     # exact: a power of two
                WS[ri * rs + kk] = X[r0 + ri, kk * 2] - WS[ri * rs + k2 + kk]
            for h in range(2):      # telescoping, in place
                for i in range(kw):
                    WS[ri * rs + h * k2 + i * 4] = (WS[ri * rs + h * k2 + i * 4]
                                                    - WS[ri * rs + h * k2 + i * 4 + 1] * T.float32(1 / 256))
                    WS[ri * rs + h * k2 + i * 4 + 1] = (WS[ri * rs + h * k2 + i * 4 + 1] * T.float32(1 / 256)
                                                        - WS[ri * rs + h * k2 + i * 4 + 2] * T.float32(1 / 65536))
                    WS[ri * rs + h * k2 + i * 4 + 2] = WS[ri * rs + h * k2 + i * 4 + 2] * T.float32(1 / 65536)

    @T.macro
    def gemv_tile(WS, W32, S, Z, B, O, r0, rr, jb0, nbt):
        # rr rows x nbt blocks; the codes are unpacked and converted once for the rr rows.
        # stack buffers under 1 KiB ("global" scope, see int8_gemm.py why) that LLVM keeps in registers
        acc = T.decl_buffer((rr * nbt * LANES,), "float32", scope="global")
        ga = T.decl_buffer((2 * rr * nbt * LANES,), "float32", scope="global")
        for ri in T.unroll(rr):
            for t in T.unroll(nbt):
                acc[T.ramp((ri * nbt + t) * LANES, 1, LANES)] = B.vload([(jb0 + t) * LANES], f16)
        for gi in range(ng):
            for t in T.unroll(2 * rr * nbt):
                ga[T.ramp(t * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for i in range(gw):
                for j in T.unroll(4):
                    for ri in T.unroll(rr):
                        for t in T.unroll(nbt):
                            # prefixes of the lane (module docstring): bytes 0..j (the top byte on its
                            # own) and their low nibbles, telescoped by the coefficients of the row
                            ga[T.ramp(2 * (ri * nbt + t) * LANES, 1, LANES)] = ga.vload(
                                [2 * (ri * nbt + t) * LANES], f16) + T.broadcast(
                                WS[ri * rs + (gi * gw + i) * 4 + j], LANES) * bits(
                                W32.vload([jb0 + t, gi * gw + i, 0], u16), j // 3 * 24, prefix(j) & 0x0F0F0F)
                            ga[T.ramp((2 * (ri * nbt + t) + 1) * LANES, 1, LANES)] = ga.vload(
                                [(2 * (ri * nbt + t) + 1) * LANES], f16) + T.broadcast(
                                WS[ri * rs + k2 + (gi * gw + i) * 4 + j], LANES) * bits(
                                W32.vload([jb0 + t, gi * gw + i, 0], u16), j // 3 * 24, prefix(j))
            for ri in T.unroll(rr):
                for t in T.unroll(nbt):
                    acc[T.ramp((ri * nbt + t) * LANES, 1, LANES)] = acc.vload(
                        [(ri * nbt + t) * LANES], f16) + S.vload([jb0 + t, gi, 0], f16) * (
                        ga.vload([2 * (ri * nbt + t) * LANES], f16) + ga.vload([(2 * (ri * nbt + t) + 1) * LANES], f16)
                        - Z.vload([jb0 + t, gi, 0], f16) * T.broadcast(WS[ri * rs + k + gi], LANES))
        for ri in T.unroll(rr):
            for t in T.unroll(nbt):
                O[r0 + ri, T.ramp((jb0 + t) * LANES, 1, LANES)] = acc.vload([(ri * nbt + t) * LANES], f16)

    @T.macro
    def dequant_panel(W32, S, Z, WB, jb0, nv):
        # (q - z) * s in the reference's order of operations, row k of the panel at WB[k * 32 ...]
        for gi in range(ng):
            for v in T.unroll(nv):
                for i in range(gw):
                    for h in T.unroll(KW):
                        WB[T.ramp((gi * group + i * KW + h) * pw + v * LANES, 1, LANES)] = (
                            bits(W32.vload([jb0 + v, gi * gw + i, 0], u16), 4 * h, 15)
                            - Z.vload([jb0 + v, gi, 0], f16)) * S.vload([jb0 + v, gi, 0], f16)

    @T.macro
    def fma_tile(X, WB, B, O, row0, mr, jb0, nv):
        acc = T.decl_buffer((mr * nv * LANES,), "float32", scope="global")
        for ii in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((ii * nv + v) * LANES, 1, LANES)] = B.vload([(jb0 + v) * LANES], f16)
        for kk in range(k):
            for ii in T.unroll(mr):
                for v in T.unroll(nv):
                    acc[T.ramp((ii * nv + v) * LANES, 1, LANES)] = acc.vload([(ii * nv + v) * LANES], f16) + T.broadcast(
                        X[row0 + ii, kk], LANES) * WB.vload([kk * pw + v * LANES], f16)
        for ii in T.unroll(mr):
            for v in T.unroll(nv):
                O[row0 + ii, T.ramp((jb0 + v) * LANES, 1, LANES)] = acc.vload([(ii * nv + v) * LANES], f16)

    @T.macro
    def panel(X, W32, S, Z, B, O, WB, m, jb0, nv):
        dequant_panel(W32, S, Z, WB, jb0, nv)
        for io in range(m // IMR):
            fma_tile(X, WB, B, O, io * IMR, IMR, jb0, nv)
        # the last m % IMR rows: pairs (4 accumulator chains cover the FMA latency), then one row
        for r2 in range(m % IMR // 2):
            fma_tile(X, WB, B, O, m // IMR * IMR + r2 * 2, 2, jb0, nv)
        for _ in range(m % 2):      # IMR is even: the odd row is the last one
            fma_tile(X, WB, B, O, m - 1, 1, jb0, nv)

    @T.prim_func
    def qgemm_int4(x: T.handle, w: T.handle, s: T.handle, z: T.handle, bias: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        X = T.match_buffer(x, (m, k), "float32")
        W = T.match_buffer(w, (nb, kw, 4 * LANES), "uint8")
        S = T.match_buffer(s, (nb, ng, LANES), "float32")
        Z = T.match_buffer(z, (nb, ng, LANES), "float32")
        B = T.match_buffer(bias, (np_,), "float32")
        O = T.match_buffer(o, (m, np_), "float32")
        W32 = T.decl_buffer((nb, kw, LANES), "uint32", data=W.data)   # 8 codes of one column per lane
        # One workspace for every memory buffer (TVM's heap workspace, L2-resident): the GEMM path's
        # dequantized panel [K, 32], or the GEMV path's telescoped coefficient rows and group sums
        # of x for up to four rows (gemv_rows). One buffer live through the whole kernel, because StorageRewrite
        # otherwise merges the small register buffers into a larger heap buffer whose lifetime does
        # not overlap theirs, and LLVM can then no longer keep the accumulators in registers.
        WS = T.decl_buffer((max(k * pw, 4 * rs),), "float32", scope="global")
        if m >= mmin:
            for jo in range(nb // PNV):
                panel(X, W32, S, Z, B, O, WS, m, jo * PNV, PNV)
            for _ in range(nb % PNV):     # an odd last block (PNV = 2): a panel of one vector
                panel(X, W32, S, Z, B, O, WS, m, nb // PNV * PNV, 1)
        else:
            for r4 in range(m // 4):     # quads of rows: the unpacking shared by four rows
                gemv_rows(X, WS, r4 * 4, 4)
                for jb in range(nb):
                    gemv_tile(WS, W32, S, Z, B, O, r4 * 4, 4, jb, 1)
            for _ in range(m % 4 // 2):     # a pair of rows
                gemv_rows(X, WS, m // 4 * 4, 2)
                for jo in range(nb // G2):
                    gemv_tile(WS, W32, S, Z, B, O, m // 4 * 4, 2, jo * G2, G2)
                for jb in range(nb % G2):
                    gemv_tile(WS, W32, S, Z, B, O, m // 4 * 4, 2, nb // G2 * G2 + jb, 1)
            for _ in range(m % 2):
                gemv_rows(X, WS, m - 1, 1)
                for jo in range(nb // G1):
                    gemv_tile(WS, W32, S, Z, B, O, m - 1, 1, jo * G1, G1)
                for jb in range(nb % G1):
                    gemv_tile(WS, W32, S, Z, B, O, m - 1, 1, nb // G1 * G1 + jb, 1)

    return qgemm_int4


# ---- the fused op, the pass that creates it, and its Relax converter --------------------------


@torch.library.custom_op("qcompile_tvm::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                n: int, group: int) -> torch.Tensor:
    """``linear(x, dequantize(W_uint4, s, z, group), bias)`` from the packed operands of
    :func:`pack_int4` (``bias`` padded to Np). Returns float32 ``[..., n]``."""
    q = torch.from_numpy(unpack_int4(w_packed.numpy())).float()                       # [Np, K]
    lay = lambda t: t.permute(0, 2, 1).reshape(q.shape[0], -1).repeat_interleave(group, 1)  # noqa: E731
    w = (q - lay(z)) * lay(s)
    return torch.nn.functional.linear(x.float(), w[:n, :x.shape[-1]], bias[:n])   # K may be padded


@int4_linear.register_fake
def _(x, w_packed, s, z, bias, n, group):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


INT4_LINEAR = torch.ops.qcompile_tvm.int4_linear.default


def int4_weight_reason(gm, node, short_last_group: bool = False) -> tuple[str | None, int]:
    """(why the uint4 weight of Linear ``node`` has no int4 kernel, or None; its group size). A
    group wider than K is one group of K (how convert writes it). Shared by the weight-only and
    the int8-activation passes; ``short_last_group``: a group that does not divide K is taken
    when K is a multiple of 8 (``pack_int4(..., pad_k=True)``)."""
    dqw = node.args[1]
    q, s = get_attr_tensor(gm, dqw.args[0]), get_attr_tensor(gm, dqw.args[1])
    z = get_attr_tensor(gm, dqw.args[2]) if dqw.args[2] is not None else None
    if q is None or s is None or z is None or q.dim() != 2:
        return "int4 weight codes, scale or zero point are not constant 2-D tensors", 0
    k = q.shape[1]
    group = min(dqw.args[4], k)
    if group not in GROUPS:
        return f"int4 group size {group} has no TVM kernel (built: {GROUPS})", group
    if k % group and not (short_last_group and k % KW == 0):
        return f"int4 group size {group} does not divide K={k}" + (
            f" and K is not a multiple of {KW}" if short_last_group else ""), group
    if s.shape != (q.shape[0], -(-k // group)) or z.shape != s.shape:
        return f"int4 scale/zero point of shape {tuple(s.shape)} are not per group", group
    return variable_bias(gm, node), group


class FuseInt4LinearPass(Pass):
    """``linear(x_float, dequantize(W_uint4, s, z, "uint4", g), b)`` ⇒ ``int4_linear(x, packed W, ...)``.
    Linears on other weights are left alone; an int4 one it cannot take is named in its result's ``skipped``."""

    name = "fuse_int4_linear"

    def _why_not(self, gm, node) -> str | None:
        if getattr(node.args[0], "target", None) == DEQUANTIZE:
            return "int4 weights on quantized activations are FuseInt4A8LinearPass's (int4_a8.py)"
        return int4_weight_reason(gm, node)[0]

    def call(self, gm):
        fused: dict[str, str] = {}     # linear node -> the op that replaced it
        skipped: dict[str, str] = {}   # int4 linear node -> why it was not fused
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != torch.ops.aten.linear.default or len(node.args) < 2:
                continue
            dqw = node.args[1]
            if getattr(dqw, "target", None) != DEQUANTIZE or dqw.args[3] != "uint4":
                continue
            reason = self._why_not(gm, node)
            if reason:
                skipped[node.name] = reason
                continue
            q = get_attr_tensor(gm, dqw.args[0])
            n = q.shape[0]
            group = min(dqw.args[4], q.shape[1])
            packed, sp, zp = pack_int4(q.numpy(), get_attr_tensor(gm, dqw.args[1]).float().numpy(),
                                       get_attr_tensor(gm, dqw.args[2]).float().numpy(), group)
            bias = padded_bias(gm, node, n, padded_n(n))
            base = dqw.args[0].target
            args = [node.args[0], add_tensor(gm, f"{base}_int4", torch.from_numpy(packed), node),
                    add_tensor(gm, f"{base}_int4_s", torch.from_numpy(sp), node),
                    add_tensor(gm, f"{base}_int4_z", torch.from_numpy(zp), node),
                    add_tensor(gm, f"{base}_int4_bias", bias, node)]
            replace_linear(gm, node, INT4_LINEAR, (*args, n, group))
            fused[node.name] = INT4_LINEAR.name()
        return FuseResult.of(gm, fused, skipped)


class Int4LinearConverter:
    """Relax converter for ``qcompile_tvm::int4_linear``: a ``call_tir`` of :func:`int4_kernel`,
    one ``PrimFunc`` per (K, Np, group)."""

    def __init__(self):
        self.kernels: dict[tuple, object] = {}

    def __call__(self, node, imp):
        bb = imp.block_builder
        x2, lead, (packed, s, z, bias), n, group = call_operands(node, imp)
        k, np_ = int(packed.ty.shape[1]) * KW, int(packed.ty.shape[0]) * LANES
        key = (k, np_, group)
        if key not in self.kernels:
            name = f"qgemm_int4_k{k}_n{np_}_g{group}"
            self.kernels[key] = bb.add_func(int4_kernel(k, np_, group).with_attr("global_symbol", name), name)
        out = bb.emit(relax.call_tir(self.kernels[key], [x2, packed, s, z, bias],
                                     out_ty=relax.TensorType((x2.ty.shape[0], np_), "float32")))
        return call_result(bb, out, n, lead)


def call_operands(node, imp):
    """For a converter of ``int4_linear`` / ``int4_a8_linear`` (args ``x, packed, s, z, bias, n,
    group``): ``x`` as float32 rows ``[m, K]`` (``K`` its own, which a padded weight exceeds), its
    leading dims, the four packed operands, ``n`` and ``group``."""
    op, bb = relax.op, imp.block_builder
    x = imp.env[node.args[0]]
    packed = imp.env[node.args[1]]
    val = node.args[0].meta.get("val")
    k = int(val.shape[-1]) if isinstance(val, torch.Tensor) else int(packed.ty.shape[1]) * KW
    if x.ty.shape is None:  # the importer lost the shape: name its dims
        dims = [tirx.Var(f"{node.name}_d{i}", "int64") for i in range(x.ty.ndim - 1)]
        x = bb.match_cast(x, relax.TensorType([*dims, k], x.ty.dtype))
    lead = list(x.ty.shape.values[:-1])
    x2 = bb.emit(op.reshape(bb.emit(op.astype(x, "float32")), (-1, k)))
    return x2, lead, [imp.env[a] for a in node.args[1:5]], node.args[5], node.args[6]


def call_result(bb, out, n: int, lead):
    """A kernel's ``[m, Np]`` output without its padding columns, reshaped to ``[*lead, n]``."""
    if int(out.ty.shape[1]) != n:
        out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
    return bb.emit(relax.op.reshape(out, (*lead, n)))
