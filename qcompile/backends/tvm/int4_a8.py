"""int4 weights on int8 activations (``w4-g32/64/128-a8``): integer dot products in TVMScript (TIR).

The recipe quantizes the activations at run time, symmetric int8, one scale per token and per
block of ``g`` along ``K`` (the weight group): ``sa[m, g] = max(amax / 127, eps)``,
``qa = clamp(round(x * (1 / sa)), -128, 127)`` (:func:`qcompile.ops.choose_qparams`,
torchao's ``quantize_affine``). The weights are uint4 codes ``qw`` with a scale ``sw`` and an
integer zero point ``zw`` per group. Then, exactly,

    ``out[m, n] = bias[n] + sum_g sa[m, g] sw[n, g] (sum_{k in g} qa[m, k] qw[n, k] - zw[n, g] sum_{k in g} qa[m, k])``

and the inner sum is an integer the kernel computes exactly (int32) with ``u8 x s8`` dot products of
4 bytes per 32-bit lane. The codes ``qw`` (0..15) are the *unsigned* operand and ``qa`` the signed
one, so no +128 shift of the activations and no column-sum compensation is needed (only the zero
point's ``zw * sum_g qa``, made from the row's group sums). Per group, the int32 sum is turned into
float once and accumulated as ``(sa * sw) * (float(isum) - zw * asum)``: ``isum`` and ``zw * asum``
are integers below 2^24, so only the accumulation over groups rounds.

Two steps, two ``PrimFunc`` (the quantize is a small TIR step before the GEMM, not its prologue:
the GEMM then needs no workspace, whose buffers once cost the int4 kernel its register
accumulators, see docs/tvm.md):

- :func:`quantize_rows_kernel`: per row and group, amax, the scale, the codes and their sum. The
  codes are stored in the order the packed weights pair them with (below).
- :func:`int4_a8_kernel`: column panel outer, row tiles inner; per group, the codes of one 64-byte
  line (16 columns x 8 ``k``) are unpacked in registers to two byte vectors (``w & 0x0F0F0F0F`` and
  ``(w >> 4) & 0x0F0F0F0F``), each multiplied with 4 broadcast activation codes:

  - ``vnni`` (AVX-512 VNNI): ``vpdpbusd`` on zmm straight into int32;
  - ``avx2``: ``vpmaddubsw`` (u8 x s8 → pairs summed to int16) on ymm halves, summed in int16
    over 4 lines (8 pair sums of at most 2 * 15 * 128 per lane: |sum| <= 30,720, no saturation or
    overflow, since the unsigned operand is a 4-bit code), then ``vpmaddwd`` by ones into int32.

Packing: the weight-only path's (:func:`~.int4.pack_int4`, one home): lane ``c`` of line ``i`` holds
codes ``8i .. 8i+7`` of column ``c``, byte ``j`` = ``q[8i + 2j] | q[8i + 2j + 1] << 4``. So the low
nibbles carry ``k = 8i + 0, 2, 4, 6`` and the high ones ``8i + 1, 3, 5, 7``; the quantize step writes
each 8 activation codes in that order (``0 2 4 6 1 3 5 7``), and 32-bit word ``2i`` / ``2i + 1`` of
the row is the broadcast operand of the low / high nibbles.

Lowering: :class:`FuseInt4A8LinearPass` turns ``linear(dequantize(quantize(x, choose_qparams(x,
"int8", symmetric, per token, g))), dequantize(W_uint4, g), b)`` into
``qcompile_tvm::int4_a8_linear(x, packed W, ...)``; :class:`Int4A8LinearConverter` makes it two
``call_tir``.
"""
from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import torch
from tvm import relax
from tvm.script import tirx as T

from ...ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ...passes.infra import Pass, add_tensor, get_attr_tensor
from ...passes.lowering import FuseResult
from .epilogue import _OPAQUE_PATTERN as OPAQUE_PATTERN
from .errors import NotBuiltError
from .fuse import padded_bias, replace_linear
from .host import detect
from .int4 import (GROUPS, KW, LANES, call_operands, call_result, int4_linear, int4_weight_reason, pack_int4,
                   padded_n)
from .int8_gemm import PMADDUBSW, PMADDWD, VPDPBUSD

ISAS = ("vnni", "avx2")
# register tiles of the M > 1 path (rows, units of 16 (vnni) / 8 (avx2) columns), and the units of one row
TILES = {"vnni": (4, 2, 4), "avx2": (4, 1, 4)}
AVX2_LINES = 4      # lines (8 k each) summed in int16 before widening: 8 pair sums of <= 3,840 each

_EPS = float(torch.finfo(torch.float32).eps)    # choose_qparams' floor of a scale


# the order of the activation codes in each chunk of 8 ``k``: the low nibbles' ``k`` first, then
# the high nibbles' (module docstring); an input of the quantize kernel, so the layout has one home
CODE_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7], np.int32)


def permute_codes(k: int) -> np.ndarray:
    """Source ``k`` of each stored activation code of a row of ``k`` (:data:`CODE_ORDER` per chunk)."""
    return (np.arange(k) // KW * KW + CODE_ORDER[np.arange(k) % KW]).astype(np.int64)


def quantize_rows_kernel(k: int, group: int):
    """The TIR ``PrimFunc`` of the activation quantize: ``x`` f32 ``[m, K]`` and ``order`` i32
    ``[8]`` (:data:`CODE_ORDER`: the source ``k`` of each stored code in a chunk of 8) → codes i8
    ``[m, Kp]``, scales f32 ``[m, Kp/g]``, group sums of the codes f32 ``[m, Kp/g]``, where ``Kp``
    is ``K`` rounded up to the group: a short last group (K = 576, g = 128) is quantized from its
    own values, as the reference does, and its codes are followed by zeros. The reference's float steps in its order: ``amax / 127``, ``max(., eps)``,
    ``1 / scale``, ``round(x * (1 / scale))`` (half to even), clamp."""
    if k % KW or group % KW:
        raise ValueError(f"K={k} and the group {group} must be multiples of {KW}")
    ng, tail = -(-k // group), k % group    # a short last group of `tail` values: zero codes after them
    kp = ng * group

    @T.macro
    def quantize_group(X, ORD, A, SA, AS, r, gi, width):
        st = T.decl_buffer((2,), "float32", scope="global")     # amax, then 1 / scale
        acc = T.decl_buffer((1,), "int32", scope="global")
        st[0] = T.float32(0)
        for kk in range(width):
            st[0] = T.max(st[0], T.fabs(X[r, gi * group + kk]))
        SA[r, gi] = T.max(st[0] / T.float32(127), T.float32(_EPS))
        # the fence keeps LLVM's fast-math (reassoc) from folding x * (1 / s) into x / s,
        # which rounds differently at a tie (x * (1 / s) = 64.5 exactly, x / s just above)
        st[1] = T.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", T.float32(1) / SA[r, gi])
        acc[0] = 0
        for c in range(width // KW):
            for d in range(KW):     # stored position d of the chunk reads k = ORD[d]
                A[r, gi * group + c * KW + d] = T.Cast("int8", T.Cast("int32", T.min(T.max(T.round(
                    X[r, gi * group + c * KW + ORD[d]] * st[1]), T.float32(-128)), T.float32(127))))
                acc[0] = acc[0] + T.Cast("int32", A[r, gi * group + c * KW + d])
        for kk in range(group - width):
            A[r, gi * group + width + kk] = T.int8(0)
        AS[r, gi] = T.Cast("float32", acc[0])

    @T.prim_func
    def quantize_rows(x: T.handle, order: T.handle, a: T.handle, sa: T.handle, asum: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        X = T.match_buffer(x, (m, k), "float32")
        ORD = T.match_buffer(order, (KW,), "int32")
        A = T.match_buffer(a, (m, kp), "int8")
        SA = T.match_buffer(sa, (m, ng), "float32")
        AS = T.match_buffer(asum, (m, ng), "float32")
        for r in range(m):
            for gi in range(k // group):
                quantize_group(X, ORD, A, SA, AS, r, gi, group)
            if tail > 0:
                quantize_group(X, ORD, A, SA, AS, r, k // group, tail)

    return quantize_rows


def int4_a8_kernel(k: int, np_: int, group: int, isa: str = "vnni"):
    """The TIR ``PrimFunc`` of the integer GEMM/GEMV for one weight shape. Arguments: ``a`` i8
    ``[m, K]``, ``sa``, ``asum`` f32 ``[m, K/g]`` (from :func:`quantize_rows_kernel`), ``w`` u8
    ``[Np/16, K/8, 64]``, ``s``, ``z`` f32 ``[Np/16, K/g, 16]`` (:func:`~.int4.pack_int4`), ``bias``
    f32 ``[Np]``, ``out`` f32 ``[m, Np]``. ``isa``: :data:`ISAS` (module docstring)."""
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set '{isa}' (built: {', '.join(ISAS)})")
    if group not in GROUPS or k % group or np_ % LANES:
        raise ValueError(f"K={k} must be a multiple of the group {group} (one of {GROUPS}) and Np={np_} of {LANES}")
    nb, ng, gw, kw, k4 = np_ // LANES, k // group, group // KW, k // KW, k // 4
    mr_, nut_, nu1 = TILES[isa]
    vnni = isa == "vnni"
    vl = LANES if vnni else LANES // 2      # columns per unit: one zmm (vnni) or one ymm (avx2) of int32
    nu = np_ // vl
    fv, iv, wv = f"float32x{vl}", f"int32x{vl}", f"uint32x{vl}"

    def nibbles(w, h):
        """The low (``h`` = 0) or high (1) nibble of every byte of ``vl`` uint32 lanes, as bytes
        (LLVM drops the shift by 0 once the loop over ``h`` is unrolled)."""
        return T.reinterpret(f"int8x{4 * vl}", (w >> T.broadcast(T.Cast("uint32", 4 * h), vl))
                             & T.broadcast(T.uint32(0x0F0F0F0F), vl))

    def act(A32, row, line, h):
        """4 activation codes (the line's low- or high-nibble ``k``) broadcast to every lane."""
        return T.reinterpret(f"int8x{4 * vl}", T.broadcast(A32[row * k4 + line * 2 + h], vl))

    def halves(mr):
        """int32 accumulators per (row, unit): with one row on vnni, the low and high nibbles' apart
        (8 independent vpdpbusd chains instead of 4)."""
        return 2 if mr == 1 and vnni else 1

    @T.macro
    def tile(A32, SA, AS, W32, S, Z, B, O, r0, mr, u0, nut):
        # mr rows x nut units of vl columns. Stack buffers under 1 KiB that LLVM keeps in registers
        # ("global" scope: see int8_gemm.py); unit u is lanes (u * vl) % 16 .. of block (u * vl) // 16
        fac = T.decl_buffer((mr * nut * vl,), "float32", scope="global")
        iac = T.decl_buffer((halves(mr) * mr * nut * vl,), "int32", scope="global")     # the group's sums
        i16 = T.decl_buffer((1 if vnni else mr * nut * 16,), "int16", scope="global")   # avx2: 4 lines' sums
        for ri in T.unroll(mr):
            for t in T.unroll(nut):
                fac[T.ramp((ri * nut + t) * vl, 1, vl)] = B.vload([(u0 + t) * vl], fv)
        for gi in range(ng):
            for u in T.unroll(halves(mr) * mr * nut):
                iac[T.ramp(u * vl, 1, vl)] = T.broadcast(T.int32(0), vl)
            if vnni:
                for i in range(gw):
                    for t in T.unroll(nut):
                        for h in T.unroll(2):
                            for ri in T.unroll(mr):
                                iac[T.ramp(((h % halves(mr)) * mr * nut + ri * nut + t) * vl, 1, vl)] = (
                                    T.call_llvm_pure_intrin(
                                        "int32x16", VPDPBUSD,
                                        iac.vload([((h % halves(mr)) * mr * nut + ri * nut + t) * vl], iv),
                                        nibbles(W32.vload([u0 + t, gi * gw + i, 0], wv), h),
                                        act(A32, r0 + ri, gi * gw + i, h)))
            else:
                for c in range(gw // AVX2_LINES):
                    for u in T.unroll(mr * nut):
                        i16[T.ramp(u * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
                    for i in T.unroll(AVX2_LINES):
                        for t in T.unroll(nut):
                            for h in T.unroll(2):
                                for ri in T.unroll(mr):
                                    i16[T.ramp((ri * nut + t) * 16, 1, 16)] = i16.vload(
                                        [(ri * nut + t) * 16], "int16x16") + T.call_llvm_pure_intrin(
                                        "int16x16", PMADDUBSW,
                                        nibbles(W32.vload([(u0 + t) // 2, gi * gw + c * AVX2_LINES + i,
                                                           (u0 + t) % 2 * vl], wv), h),
                                        act(A32, r0 + ri, gi * gw + c * AVX2_LINES + i, h))
                    for u in T.unroll(mr * nut):
                        iac[T.ramp(u * vl, 1, vl)] = iac.vload([u * vl], iv) + T.call_llvm_pure_intrin(
                            "int32x8", PMADDWD, i16.vload([u * 16], "int16x16"), T.broadcast(T.int16(1), 16))
            for ri in T.unroll(mr):
                for t in T.unroll(nut):
                    if halves(mr) == 2:
                        fac[T.ramp((ri * nut + t) * vl, 1, vl)] = fac.vload([(ri * nut + t) * vl], fv) + (
                            S.vload([(u0 + t) * vl // LANES, gi, (u0 + t) * vl % LANES], fv)
                            * T.broadcast(SA[r0 + ri, gi], vl)) * (
                            T.Cast(fv, iac.vload([(ri * nut + t) * vl], iv)
                                   + iac.vload([(mr * nut + ri * nut + t) * vl], iv))
                            - Z.vload([(u0 + t) * vl // LANES, gi, (u0 + t) * vl % LANES], fv)
                            * T.broadcast(AS[r0 + ri, gi], vl))
                    else:
                        fac[T.ramp((ri * nut + t) * vl, 1, vl)] = fac.vload([(ri * nut + t) * vl], fv) + (
                            S.vload([(u0 + t) * vl // LANES, gi, (u0 + t) * vl % LANES], fv)
                            * T.broadcast(SA[r0 + ri, gi], vl)) * (
                            T.Cast(fv, iac.vload([(ri * nut + t) * vl], iv))
                            - Z.vload([(u0 + t) * vl // LANES, gi, (u0 + t) * vl % LANES], fv)
                            * T.broadcast(AS[r0 + ri, gi], vl))
        for ri in T.unroll(mr):
            for t in T.unroll(nut):
                O[r0 + ri, T.ramp((u0 + t) * vl, 1, vl)] = fac.vload([(ri * nut + t) * vl], fv)

    @T.prim_func
    def qgemm_int4_a8(a: T.handle, sa: T.handle, asum: T.handle, w: T.handle, s: T.handle, z: T.handle,
                      bias: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (m, k), "int8")
        SA = T.match_buffer(sa, (m, ng), "float32")
        AS = T.match_buffer(asum, (m, ng), "float32")
        W = T.match_buffer(w, (nb, kw, 4 * LANES), "uint8")
        S = T.match_buffer(s, (nb, ng, LANES), "float32")
        Z = T.match_buffer(z, (nb, ng, LANES), "float32")
        B = T.match_buffer(bias, (np_,), "float32")
        O = T.match_buffer(o, (m, np_), "float32")
        A32 = T.decl_buffer((m * k4,), "int32", data=A.data)        # 4 codes of one row as one word
        W32 = T.decl_buffer((nb, kw, LANES), "uint32", data=W.data)  # 8 codes of one column per lane
        # column panel outer, row tiles inner: the panel's codes stay in L1 for every row tile
        for jo in range(nu // nut_):
            for io in range(m // mr_):
                tile(A32, SA, AS, W32, S, Z, B, O, io * mr_, mr_, jo * nut_, nut_)
        for ju in range(nu % nut_):
            for io in range(m // mr_):
                tile(A32, SA, AS, W32, S, Z, B, O, io * mr_, mr_, nu // nut_ * nut_ + ju, 1)
        # the last m % mr rows, and M = 1 (decoding): one row, a wider column tile
        for r in range(m % mr_):
            for jo in range(nu // nu1):
                tile(A32, SA, AS, W32, S, Z, B, O, m // mr_ * mr_ + r, 1, jo * nu1, nu1)
            for ju in range(nu % nu1):
                tile(A32, SA, AS, W32, S, Z, B, O, m // mr_ * mr_ + r, 1, nu // nu1 * nu1 + ju, 1)

    return qgemm_int4_a8


def isa_for(family: str, flags) -> Optional[str]:
    """The :data:`ISAS` entry a kernel family runs with on a host with ``flags``, or None."""
    if family in ("vnni", "amx") and "avx512_vnni" in flags:
        return "vnni"
    return "avx2" if "avx2" in flags else None


# ---- the fused op, the pass that creates it, and its Relax converter --------------------------

@torch.library.custom_op("qcompile_tvm::int4_a8_linear", mutates_args=())
def int4_a8_linear(x: torch.Tensor, w_packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                   n: int, group: int) -> torch.Tensor:
    """``linear(dequantize(quantize(x)), dequantize(W_uint4, s, z, group), bias)`` with ``x``
    quantized as the recipe does (symmetric int8 per token and group), from the packed operands of
    :func:`~.int4.pack_int4`. Returns float32 ``[..., n]``."""
    sa, za = torch.ops.qcompile.choose_qparams(x, "int8", True, True, group)
    xq = torch.ops.qcompile.dequantize(torch.ops.qcompile.quantize(x, sa, za, "int8", group), sa, za, "int8", group,
                                       torch.float32)
    return int4_linear(xq, w_packed, s, z, bias, n, group)


@int4_a8_linear.register_fake
def _(x, w_packed, s, z, bias, n, group):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


INT4_A8_LINEAR = torch.ops.qcompile_tvm.int4_a8_linear.default


def _dynamic_int8_source(dqa, group: int):
    """``(x, None)`` when ``dqa`` is ``dequantize(quantize(x, s, z, "int8", g), s, z, "int8", g)``
    with ``(s, z) = choose_qparams(x, "int8", symmetric, per token, g)`` and ``g`` the weight's
    group; else ``(None, why not)``."""
    q = dqa.args[0]
    if getattr(q, "target", None) != QUANTIZE or dqa.args[3] != "int8" or q.args[3] != "int8":
        return None, f"activation format {dqa.args[3]} is not int8 codes of a quantize"
    s, z = dqa.args[1], dqa.args[2]
    if q.args[1] is not s or q.args[2] is not z or getattr(s, "target", None) != operator.getitem \
            or getattr(z, "target", None) != operator.getitem or s.args[0] is not z.args[0]:
        return None, "the activation scale is not one dynamic choose_qparams shared by quantize and dequantize"
    cq = s.args[0]
    x = q.args[0]
    if getattr(cq, "target", None) != CHOOSE_QPARAMS or cq.args[0] is not x:
        return None, "the activation scale is not a choose_qparams of the quantized tensor"
    _, fmt, symmetric, per_token, *rest = cq.args
    ga = rest[0] if rest else 0
    k = x.meta["val"].shape[-1] if isinstance(x.meta.get("val"), torch.Tensor) else None
    if not (symmetric and per_token and ga) or min(ga, k or ga) != group or min(dqa.args[4], k or ga) != group:
        return None, (f"activations quantized {'symmetric' if symmetric else 'asymmetric'}, per "
                      f"{'token' if per_token else 'tensor'}, group {ga}: the int4 x int8 kernel takes symmetric "
                      f"int8 per token and per group of the weight's {group}")
    return x, None


class FuseInt4A8LinearPass(Pass):
    """``linear(dequantize(quantize(x, choose_qparams(x, int8, symmetric, per token, g))),
    dequantize(W_uint4, s, z, "uint4", g), b)`` ⇒ ``int4_a8_linear(x, packed W, ...)``. Other
    Linears are left alone; an int4 one on quantized activations it cannot take is named in its
    result's ``skipped``."""

    name = "fuse_int4_a8_linear"

    def call(self, gm):
        fused: dict[str, str] = {}     # linear node -> the op that replaced it
        skipped: dict[str, str] = {}   # int4 linear node -> why it was not fused
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != torch.ops.aten.linear.default or len(node.args) < 2:
                continue
            dqa, dqw = node.args[0], node.args[1]
            if getattr(dqw, "target", None) != DEQUANTIZE or dqw.args[3] != "uint4" \
                    or getattr(dqa, "target", None) != DEQUANTIZE:
                continue
            reason, group = int4_weight_reason(gm, node, short_last_group=True)
            x = None
            if not reason:
                x, reason = _dynamic_int8_source(dqa, group)
            if reason:
                skipped[node.name] = reason
                continue
            q = get_attr_tensor(gm, dqw.args[0])
            n = q.shape[0]
            packed, sp, zp = pack_int4(q.numpy(), get_attr_tensor(gm, dqw.args[1]).float().numpy(),
                                       get_attr_tensor(gm, dqw.args[2]).float().numpy(), group, pad_k=True)
            base = dqw.args[0].target
            args = [x, add_tensor(gm, f"{base}_int4", torch.from_numpy(packed), node),
                    add_tensor(gm, f"{base}_int4_s", torch.from_numpy(sp), node),
                    add_tensor(gm, f"{base}_int4_z", torch.from_numpy(zp), node),
                    add_tensor(gm, f"{base}_int4_bias", padded_bias(gm, node, n, padded_n(n)), node)]
            replace_linear(gm, node, INT4_A8_LINEAR, (*args, n, group))
            fused[node.name] = INT4_A8_LINEAR.name()
        return FuseResult.of(gm, fused, skipped)


class Int4A8LinearConverter:
    """Relax converter for ``qcompile_tvm::int4_a8_linear``: a ``call_tir`` of
    :func:`quantize_rows_kernel` (one per K, group) and one of :func:`int4_a8_kernel` (one per
    K, Np, group). ``family``: the backend's integer kernel family (:data:`~.host.FAMILIES`)."""

    def __init__(self, family: str):
        self.family = family
        self.kernels: dict[tuple, object] = {}

    def _func(self, bb, key, name, make):
        if key not in self.kernels:
            # opaque to FuseOps, and "qgemm"-named so the float-kernel scheduling leaves it alone
            self.kernels[key] = bb.add_func(make().with_attr("global_symbol", name).with_attr(
                "op_pattern", OPAQUE_PATTERN), name)
        return self.kernels[key]

    def __call__(self, node, imp):
        isa = isa_for(self.family, detect().flags)
        if isa is None:
            raise NotBuiltError(f"node '{node.name}': int4 x int8 kernels need AVX2 or AVX-512 VNNI (family "
                                f"'{self.family}' on this host has neither)")
        bb = imp.block_builder
        x2, lead, (packed, s, z, bias), n, group = call_operands(node, imp)
        k = int(x2.ty.shape[1])         # the input's K; the packed weights' kp is K rounded up to the group
        kp, np_ = int(packed.ty.shape[1]) * KW, int(packed.ty.shape[0]) * LANES
        m, ng = x2.ty.shape[0], kp // group
        quant = self._func(bb, ("q", k, group), f"qgemm_int4_a8_quantize_k{k}_g{group}", lambda: quantize_rows_kernel(k, group))
        gemm = self._func(bb, (isa, kp, np_, group), f"qgemm_int4_a8_{isa}_k{kp}_n{np_}_g{group}",
                          lambda: int4_a8_kernel(kp, np_, group, isa))
        order = relax.const(CODE_ORDER, "int32")
        qa = bb.emit(relax.call_tir(quant, [x2, order], out_ty=[relax.TensorType((m, kp), "int8"),
                                                         relax.TensorType((m, ng), "float32"),
                                                         relax.TensorType((m, ng), "float32")]))
        out = bb.emit(relax.call_tir(gemm, [bb.emit(relax.TupleGetItem(qa, i)) for i in range(3)] + [packed, s, z, bias],
                                     out_ty=relax.TensorType((m, np_), "float32")))
        return call_result(bb, out, n, lead)
