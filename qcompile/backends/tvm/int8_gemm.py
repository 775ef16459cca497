"""Integer GEMM kernels written in TVMScript (TIR), one family per instruction set.

Every kernel computes ``out[m, n] = f32(acc - za[row] * colsum[n]) * (sa[row] * sw[n]) + bias[n]``
with ``acc = sum_k a_u8[m, k] * w_s8[n, k]`` (exact, int32): u8 activations times s8 weights, the
zero point of the activations removed afterwards through the weights' column sums, and the
float epilogue fused into the same loop nest, so the int32 accumulators never reach memory.

Weights are packed once, at lowering time, to ``[N/16, K/4, 64]`` (:func:`pack_weights`): for one
block of 16 output columns and 4 consecutive ``k``, the 64 bytes one ``vpdpbusd`` takes, so each
micro-kernel step loads whole cache lines. The loop nest is the same for every family:

- a register tile of ``MR x NR`` blocks of 16 columns (``MR=5, NR=3``: 15 zmm accumulators) over
  ``m // MR`` row tiles, column-panel outer so one weight panel stays in L2 for every row tile;
- the ``m % MR`` remaining rows (and ``m == 1``: the GEMV path) one row at a time with a wider
  column tile (``NR1`` blocks), since a single row has no reuse of the weights to exploit.

With ``epilogue=`` the kernel goes on to an activation and a static quantize and stores ``uint8`` /
``int8`` codes (:mod:`.epilogue` decides when); :func:`~.epilogue.layer_norm_quantize_kernel` is
the same idea for a LayerNorm whose output feeds both a residual and a quantize, and inlines
:func:`requantize_expr` from here.

Families (:data:`~.host.FAMILIES`): ``amx`` (AMX-INT8 ``tdpbusd`` on 32 x 32 blocks of tiles, the rows
left over on ``vnni``; :mod:`.amx`), ``vnni`` (AVX-512 VNNI ``vpdpbusd`` on zmm),
``avx-vnni`` (the VEX-encoded ``vpdpbusd`` on ymm of AVX2 hosts with AVX-VNNI), ``avx2``
(``vpmaddubsw`` on weights split once, at lowering, into ``16·hi + lo`` with both parts in -8..8
(:func:`split_weights`), so its 16-bit pair sums never saturate and 8 steps of them add up in 16
bits before ``vpmaddwd`` widens them; ``vpmaddubsw`` on whole s8 weights saturates, as
onnxruntime's AVX2 kernels do) and ``generic`` (plain integer multiply-adds that LLVM vectorises
for any target). The ``avx2`` kernel it replaced (``vpmaddwd`` on codes widened to 16 bits) is
kept as ``avx2-wide``, the baseline of benchmarks/tvm_avx2_ab.py; no host chooses it. All
are bit-exact against an int64 reference (tests/test_tvm_int8_gemm.py); the AMX loop nest is also
checked with emulated tile instructions on hosts without AMX (``family="amx-emulated"``).

Two facts of TVM 0.27 + LLVM 22 shape this code: ``llvm.x86.avx512.vpdpbusd.512`` takes its
operands as ``<64 x i8>`` (TVM's built-in VNNI intrinsic passes ``<16 x i32>`` and fails to build),
and a ``local`` buffer is allocated on TVM's heap workspace, which LLVM cannot keep in registers:
the accumulators are ``global``-scope buffers under 1 KiB, which TVM places on the stack, where
LLVM's SROA promotes them to registers.
"""
from __future__ import annotations

import functools

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from ...errors import BackendError
from .amx import AMX_EMULATED, AMX_K, AMX_M, amx_macros
from .host import FAMILIES

# the avx2 kernel before the split weights (vpmaddwd on codes widened to 16 bits, the ordinary
# packing): not a host family; kept as the baseline the avx2 benchmark and tests compare against
AVX2_WIDE = "avx2-wide"
MR, NR = 5, 3          # register tile: 5 rows x 3 blocks of 16 columns (15 accumulators, 960 bytes)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
VPDPBUSD_YMM = "llvm.x86.avx512.vpdpbusd.256"   # VEX-encoded (AVX-VNNI) on targets with +avxvnni
# register tiles (rows, blocks of 16 columns) of the vector families; the others take MR x NR.
# 16 ymm registers: avx2-wide holds 4 accumulators per row x block (two partial sums per column),
# avx-vnni 2 (a block of 16 int32 is two ymm): 12 accumulators either way; avx2 6 (4 of 16-bit sums,
# lo and hi per half, 2 of int32) on 2 rows x 1 block (3 rows measured slower, 4 and 6 spilled)
TILES = {"avx2": (2, 1), AVX2_WIDE: (3, 1), "avx-vnni": (6, 1)}
# blocks of 16 columns of the one-row (GEMV) tile, per family; the others take 6 when they divide Np, else NR
TILES1 = {"avx2": 1, AVX2_WIDE: 3}
PMADDWD = "llvm.x86.avx2.pmadd.wd"
PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"
# avx2: steps of 4 k whose 16-bit pair sums are added up before vpmaddwd widens them (split_weights'
# bound: 8 steps x 4,080 = 32,640 <= 32,767)
AVX2_STEPS = 8


def padded_n(n: int) -> int:
    """Columns after packing: a multiple of ``16 * NR`` (the padding columns have zero weights)."""
    step = 16 * NR
    return (n + step - 1) // step * step


def pack_weights(w: np.ndarray) -> np.ndarray:
    """int8 weights ``[N, K]`` → ``[Np/16, K/4, 64]``: for each block of 16 columns and each group
    of 4 ``k``, the 16 x 4 bytes in ``vpdpbusd`` order (column-major inside the group)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    np_ = padded_n(n)
    wp = np.zeros((np_, k), np.int8)
    wp[:n] = w
    return np.ascontiguousarray(wp.reshape(np_ // 16, 16, k // 4, 4).transpose(0, 2, 1, 3).reshape(np_ // 16, k // 4, 64))


def unpack_weights(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_weights` (with the padding columns): ``[Np, K]``."""
    nb, k4, _ = packed.shape
    return packed.reshape(nb, k4, 16, 4).transpose(0, 2, 1, 3).reshape(nb * 16, k4 * 4)


def split_weights(packed: np.ndarray) -> np.ndarray:
    """The ``avx2`` family's weights: packed int8 ``[Np/16, K/4, 64]`` (:func:`pack_weights`) →
    ``[Np/16, K/4, 128]``, each 64-byte group followed by the same layout split as
    ``w = 16 * hi + lo`` with ``lo = ((w + 8) mod 16) - 8`` in -8..7 (bytes 0..63) and ``hi`` in
    -8..8 (bytes 64..127). With either part as ``vpmaddubsw``'s signed operand and u8 codes as the
    other, a 16-bit pair sum is at most 2 * 255 * 8 = 4,080 in magnitude, so 8 of them
    (:data:`AVX2_STEPS`) add up without saturating or wrapping: 32,640 <= 32,767 (the plain
    split, ``lo`` in 0..15, allows only 4: 2 * 255 * 15 = 7,650)."""
    w = packed.astype(np.int16)
    lo = ((w + 8) & 15) - 8
    hi = (w - lo) >> 4      # exact: w - lo is a multiple of 16 in -128..128
    return np.ascontiguousarray(np.concatenate([lo, hi], axis=-1).astype(np.int8))


def kernel_weights(family: str) -> int:
    """Bytes per packed group of 16 columns x 4 ``k`` that ``family``'s kernel reads: 128 for
    ``avx2`` (:func:`split_weights`), 64 (:func:`pack_weights`) for the others."""
    return 128 if family == "avx2" else 64


def weights_for_family(packed: np.ndarray, family: str) -> np.ndarray:
    """The weight operand of ``family``'s kernel from the packed weights (:func:`pack_weights`):
    their :func:`split_weights` for ``avx2``, the same array for the other families."""
    return split_weights(packed) if family == "avx2" else packed


def family_weights(packed, values, family: str):
    """The kernel's weight operand in Relax, made once, at lowering (the converters of
    ``int8_linear`` and ``int8_conv2d``): ``packed``, the importer's expression of the packed
    weights the fusion passes put in the graph, for most families; for ``avx2`` a constant of
    :func:`weights_for_family` of ``values``, their tensor (None: not a constant of the graph)."""
    if family != "avx2":
        return packed
    if values is None:
        raise BackendError("kernel family 'avx2' splits the packed weights at lowering and needs them as a "
                           "constant of the graph")
    return relax.const(weights_for_family(np.asarray(values), family), "int8")


# TVM's fast_erf (topi, the polynomial pipeline.rewrite_float_ops gives GELU): erf(x) ~ x * P(x²) / Q(x²)
# on x clamped to [-4, 4]; the coefficients as topi writes them, highest degree first
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)
ACTIVATIONS = ("none", "relu", "gelu")


def fast_erf_expr(x):
    """``topi.fast_erf`` of one float32 ``PrimExpr``, the same operations in the same order, so a
    kernel that inlines it rounds exactly as the ``fast_erf`` TE kernel does."""
    def c(v):
        return tirx.const(v, "float32")

    x = tirx.max(tirx.min(x, c(4.0)), c(-4.0))
    x2 = x * x
    p = x2 * c(_ERF_ALPHA[0]) + c(_ERF_ALPHA[1])
    for a in _ERF_ALPHA[2:]:
        p = x2 * p + c(a)
    p = x * p
    q = x2 * c(_ERF_BETA[0]) + c(_ERF_BETA[1])
    for b in _ERF_BETA[2:]:
        q = x2 * q + c(b)
    return p / q


def activation_expr(activation: str, y):
    """``y`` through ``activation`` (:data:`ACTIVATIONS`); GELU is the erf form written as
    pipeline._gelu_te writes it, ``y * (0.5 + erf(y * sqrt(1/2)) * 0.5)``."""
    if activation == "none":
        return y
    if activation == "relu":
        return tirx.max(y, tirx.const(0.0, "float32"))
    if activation == "gelu":
        half = tirx.const(0.5, "float32")
        return y * (half + fast_erf_expr(y * tirx.const(0.5 ** 0.5, "float32")) * half)
    raise ValueError(f"unknown activation '{activation}' (built: {', '.join(ACTIVATIONS)})")


def requantize_expr(y, cm, qinv, qz, out_dtype: str):
    """Codes of ``y * cm`` as qcompile.ops.quantize computes them: ``clamp(round(x * (1 / scale)) + zp)``,
    round half to even (``llvm.nearbyint``); ``qinv`` is ``1 / scale`` computed in float32 as the
    reference computes it. The float → int32 → 8-bit cast keeps LLVM on vector instructions."""
    lo, hi = (0.0, 255.0) if out_dtype == "uint8" else (-128.0, 127.0)
    q = tirx.round((y * cm) * qinv) + tirx.Cast("float32", qz)
    q = tirx.min(tirx.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
    return tirx.Cast(out_dtype, tirx.Cast("int32", q))


@functools.lru_cache(maxsize=None)   # parsing TVMScript takes seconds; a PrimFunc is immutable
def gemm_kernel(k: int, np_: int, per_row: bool, family: str = "vnni", epilogue=None, parallel: bool = False,
                avx2_steps: int = AVX2_STEPS):
    """The TIR ``PrimFunc`` for one weight shape.

    Arguments, in order: ``a`` u8 ``[m, K]`` (``m`` symbolic), ``w`` packed int8 ``[Np/16, K/4, 64]``,
    ``colsum`` i32 ``[Np]``, ``sa`` f32 and ``za`` i32 (``[m]`` when ``per_row``, else ``[1]``),
    ``sw`` f32 ``[Np]``, ``bias`` f32 ``[Np]``, ``out`` f32 ``[m, Np]``.

    ``epilogue=(activation, out_dtype)`` (activation in :data:`ACTIVATIONS`, ``out_dtype``
    ``"uint8"``/``"int8"``): the float result goes on, in registers, through the activation, a
    per-column multiply and a static per-tensor quantize (:func:`requantize_expr`), and the kernel
    stores codes. Three arguments come before ``out``: ``cm`` f32 ``[Np]`` (the per-column factor,
    ones when there is none: SmoothQuant's inverse smoothing scale of the next Linear), ``qinv``
    f32 ``[1]`` (``1 / scale``) and ``qz`` i32 ``[1]`` (the zero point); ``out`` is ``[m, Np]`` of
    ``out_dtype``.

    ``family="amx"``: blocks of 32 rows on AMX tiles (:func:`~.amx.amx_macros`), the rows left over on
    the ``vnni`` tiles; a ``K`` that is not a multiple of :data:`~.amx.AMX_K` gets the ``vnni`` kernel.
    ``parallel``: the column panels (AMX: up to :data:`~.amx.AMX_GROUPS` groups of column pairs) are
    tasks on TVM's thread pool (``TVM_NUM_THREADS``); without it the kernel launches no tasks,
    which costs nothing on one thread (the launches cost 4-12 % there, measured).

    ``family="amx-emulated"``: the same loop nest with each tile instruction replaced by a scalar
    TIR loop of the same meaning, and the leftover rows on ``generic`` tiles, so the AMX family's
    addressing, tiling and epilogue are tested on any host (slow: for tests only).

    ``avx2_steps``: how many steps of 16-bit pair sums the ``avx2`` family adds up before widening
    (an argument, so the per-process cache tells kernels built with other values apart; only a test
    of the overflow bound passes more than :data:`AVX2_STEPS`)."""
    if family not in FAMILIES + (AMX_EMULATED, AVX2_WIDE):
        raise ValueError(f"unknown kernel family '{family}' (built: {', '.join(FAMILIES)})")
    if k % 4 or np_ % (16 * NR):
        raise ValueError(f"K={k} must be a multiple of 4 and Np={np_} of {16 * NR}")
    activation, out_dtype = epilogue if epilogue is not None else ("none", "float32")
    if activation not in ACTIVATIONS or out_dtype not in ("float32", "uint8", "int8") or (
            epilogue is not None and out_dtype == "float32"):
        raise ValueError(f"unknown epilogue {epilogue!r} (activations {', '.join(ACTIVATIONS)}; codes uint8 or int8)")
    quant = epilogue is not None
    k4, nb = k // 4, np_ // 16
    avx2 = family == "avx2"         # vpmaddubsw on split weights
    wide = family == AVX2_WIDE      # vpmaddwd on widened codes
    avx_vnni = family == "avx-vnni"
    dot_lanes = 8 if avx_vnni else 16     # int32 lanes of one vpdpbusd: ymm or zmm
    dot_intrin = VPDPBUSD_YMM if avx_vnni else VPDPBUSD
    dot_i32, dot_u8, dot_s8 = f"int32x{dot_lanes}", f"uint8x{4 * dot_lanes}", f"int8x{4 * dot_lanes}"
    mr_t, nr_t = TILES.get(family, (MR, NR))
    panels = T.parallel if parallel else T.serial   # the column-panel loops
    nr1 = TILES1.get(family, 6 if nb % 6 == 0 else NR)
    wbytes = kernel_weights(family)
    amx = family in ("amx", AMX_EMULATED) and k % AMX_K == 0
    vnni = family in ("vnni", "amx")   # the emulated AMX family runs its leftover rows on generic tiles

    def value(acc_sum, zc, sc, bias, cm, QI_, QZ_):
        # what the epilogue stores for one int32 sum: y = (sum - za * colsum) * (sa * sw) + bias,
        # or y's codes through the activation, the per-column factor cm and the static quantize
        y = T.Cast("float32", acc_sum - zc) * sc + bias
        return requantize_expr(activation_expr(activation, y), cm, QI_, QZ_, out_dtype) if quant else y

    @T.macro
    def finish(acc, off, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, mr, jb0, nr):
        # the epilogue of an mr x (nr blocks of 16) tile whose int32 sums are acc[off + (ii * nr + jb) * 16 + j].
        # Column block by column block: with per-tensor activation parameters, za * colsum and
        # sa * sw are the same for every row, so they are computed once per block (LLVM does not
        # hoist them past the stores to O), in the same arithmetic, so the results do not change.
        for jb in range(nr):
            zc = T.decl_buffer((16,), "int32", scope="global")
            sc = T.decl_buffer((16,), "float32", scope="global")
            bc = T.decl_buffer((16,), "float32", scope="global")
            for j in T.vectorized(16):
                if not per_row:
                    zc[j] = ZA[0] * CS[(jb0 + jb) * 16 + j]
                    sc[j] = SA[0] * SW[(jb0 + jb) * 16 + j]
                bc[j] = BIAS[(jb0 + jb) * 16 + j]
            for ii in range(mr):
                for j in T.vectorized(16):
                    if per_row:
                        O[row0 + ii, (jb0 + jb) * 16 + j] = value(
                            acc[off + (ii * nr + jb) * 16 + j], ZA[row0 + ii] * CS[(jb0 + jb) * 16 + j],
                            SA[row0 + ii] * SW[(jb0 + jb) * 16 + j], bc[j], CM[(jb0 + jb) * 16 + j], QI[0], QZ[0])
                    else:
                        O[row0 + ii, (jb0 + jb) * 16 + j] = value(
                            acc[off + (ii * nr + jb) * 16 + j], zc[j], sc[j], bc[j], CM[(jb0 + jb) * 16 + j], QI[0], QZ[0])

    @T.macro
    def split_steps(A4, B, acc, s16, row0, mr, jb0, nr, kk0, steps):
        # avx2: `steps` (<= avx2_steps) groups of 4 k. Per 8 columns (a half of a block: 32 bytes of
        # the lo or hi part, 8 columns x 4 k) and row, vpmaddubsw of the row's 4 codes broadcast
        # (u8) with the part (s8) gives 16 pair sums, (column, k pair), added up in 16 bits (no
        # saturation: split_weights' bound); then vpmaddwd by 1 (lo) and by 16 (hi) adds each
        # column's two pairs into its int32 sum, in column order
        for u in T.unroll(mr * nr * 4):
            s16[T.ramp(u * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
        for t in T.unroll(steps):
            for jb in T.unroll(nr):
                for h in T.unroll(2):
                    for part in T.unroll(2):
                        for ii in T.unroll(mr):
                            s16[T.ramp((((ii * nr + jb) * 2 + h) * 2 + part) * 16, 1, 16)] = s16.vload(
                                [(((ii * nr + jb) * 2 + h) * 2 + part) * 16], "int16x16") + T.call_llvm_pure_intrin(
                                "int16x16", PMADDUBSW,
                                T.reinterpret("int8x32", T.broadcast(A4[(row0 + ii) * k4 + kk0 + t], 8)),
                                B.vload([jb0 + jb, kk0 + t, part * 64 + h * 32], "int8x32"))
        for ii in T.unroll(mr):
            for jb in T.unroll(nr):
                for h in T.unroll(2):
                    acc[T.ramp((ii * nr + jb) * 16 + h * 8, 1, 8)] = acc.vload([(ii * nr + jb) * 16 + h * 8], "int32x8") + (
                        T.call_llvm_pure_intrin("int32x8", PMADDWD, s16.vload([((ii * nr + jb) * 2 + h) * 32], "int16x16"),
                                                T.broadcast(T.int16(1), 16))
                        + T.call_llvm_pure_intrin("int32x8", PMADDWD,
                                                  s16.vload([((ii * nr + jb) * 2 + h) * 32 + 16], "int16x16"),
                                                  T.broadcast(T.int16(16), 16)))

    @T.macro
    def tile(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, mr, jb0, nr):
        # stack-allocated accumulators (see the module docstring for why the scope is "global")
        acc = T.decl_buffer((mr * nr * 16,), "int32", scope="global")
        av = T.decl_buffer((mr * 16,), "int32", scope="global")
        bv = T.decl_buffer((nr * 64,), "int8", scope="global")
        acc2 = T.decl_buffer((mr * nr * 32 if wide else 1,), "int32", scope="global")
        aw = T.decl_buffer((mr * 16 if wide else 1,), "int16", scope="global")
        wv = T.decl_buffer((nr * 64 if wide else 1,), "int16", scope="global")
        # avx2: 16-bit pair sums per (row, block, half of 8 columns, lo / hi part)
        s16 = T.decl_buffer((mr * nr * 64 if avx2 else 1,), "int16", scope="global")
        for t in T.unroll(mr * nr):
            acc[T.ramp(t * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
            if wide:
                acc2[T.ramp(t * 32, 1, 32)] = T.broadcast(T.int32(0), 32)
        if avx2:
            for c in range(k4 // avx2_steps):
                split_steps(A4, B, acc, s16, row0, mr, jb0, nr, c * avx2_steps, avx2_steps)
            if k4 % avx2_steps != 0:
                split_steps(A4, B, acc, s16, row0, mr, jb0, nr, k4 // avx2_steps * avx2_steps, k4 % avx2_steps)
        else:
            for kk in range(k4):
                if vnni or avx_vnni:
                    # vpdpbusd: on zmm one instruction takes a whole packed group (16 columns x 4 k);
                    # on ymm (AVX-VNNI) each half of it, 8 columns, into the block's sums j = 8h .. 8h + 7
                    for jb in T.unroll(nr):
                        bv[T.ramp(jb * 64, 1, 64)] = B.vload([jb0 + jb, kk, 0], "int8x64")
                    for ii in T.unroll(mr):
                        av[T.ramp(ii * 16, 1, dot_lanes)] = T.broadcast(A4[(row0 + ii) * k4 + kk], dot_lanes)
                    for ii in T.unroll(mr):
                        for jb in T.unroll(nr):
                            for h in T.unroll(16 // dot_lanes):
                                acc[T.ramp((ii * nr + jb) * 16 + h * dot_lanes, 1, dot_lanes)] = T.call_llvm_pure_intrin(
                                    dot_i32, dot_intrin, acc.vload([(ii * nr + jb) * 16 + h * dot_lanes], dot_i32),
                                    T.reinterpret(dot_u8, av.vload([ii * 16], dot_i32)),
                                    bv.vload([jb * 64 + h * 4 * dot_lanes], dot_s8))
                elif wide:
                    # exact u8 x s8 without VNNI: both sides widened to 16 bits, vpmaddwd adds a pair of
                    # products into each int32 lane (vpmaddubsw would saturate 16-bit pair sums). 16 bytes
                    # of a packed group are 4 columns x 4 k: lane 2c + p holds column c's k-pair p, so the
                    # activation vector is the 4 codes widened and repeated; the pair lanes add up after the loop.
                    # (Widening A and B to int16 copies once, outside the loop, measured no faster.)
                    for jb in T.unroll(nr):
                        for h in T.unroll(4):
                            wv[T.ramp((jb * 4 + h) * 16, 1, 16)] = T.Cast(
                                "int16x16", B.vload([jb0 + jb, kk, h * 16], "int8x16"))
                    for ii in T.unroll(mr):
                        aw[T.ramp(ii * 16, 1, 16)] = T.reinterpret("int16x16", T.broadcast(T.reinterpret(
                            "int64", T.Cast("int16x4", A.vload([row0 + ii, kk * 4], "uint8x4"))), 4))
                    for ii in T.unroll(mr):
                        for jb in T.unroll(nr):
                            for h in T.unroll(4):
                                acc2[T.ramp(((ii * nr + jb) * 4 + h) * 8, 1, 8)] = acc2.vload(
                                    [((ii * nr + jb) * 4 + h) * 8], "int32x8") + T.call_llvm_pure_intrin(
                                    "int32x8", PMADDWD, aw.vload([ii * 16], "int16x16"),
                                    wv.vload([(jb * 4 + h) * 16], "int16x16"))
                else:
                    for ii in T.unroll(mr):
                        for jb in T.unroll(nr):
                            for q in T.unroll(4):
                                for j in T.vectorized(16):
                                    acc[(ii * nr + jb) * 16 + j] = acc[(ii * nr + jb) * 16 + j] + T.Cast(
                                        "int32", A[row0 + ii, kk * 4 + q]) * T.Cast("int32", B[jb0 + jb, kk, j * 4 + q])
        if wide:
            for t in T.unroll(mr * nr):
                for j in T.vectorized(16):
                    acc[t * 16 + j] = acc2[t * 32 + j * 2] + acc2[t * 32 + j * 2 + 1]
        finish(acc, 0, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, mr, jb0, nr)

    @T.macro
    def rows(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row_start, m):
        # rows row_start .. m on the vector tiles: MR-row tiles, then one row at a time; the column
        # panels are tasks on TVM's thread pool (TVM_NUM_THREADS)
        for jo in panels(nb // nr_t):
            for io in range((m - row_start) // mr_t):
                tile(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row_start + io * mr_t, mr_t, jo * nr_t, nr_t)
        for r in range((m - row_start) % mr_t):
            for jo in panels(nb // nr1):
                tile(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row_start + (m - row_start) // mr_t * mr_t + r, 1,
                     jo * nr1, nr1)

    amx_rows = amx_macros(k, nb, family == AMX_EMULATED, finish, parallel) if amx else None

    @T.macro
    def body(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, m):
        if amx:
            amx_rows(A, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, m)
            rows(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, m // AMX_M * AMX_M, m)
        else:
            rows(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, 0, m)

    @T.prim_func
    def gemm(a: T.handle, w: T.handle, cs: T.handle, sa: T.handle, za: T.handle, sw: T.handle,
             bias: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        ms = T.int64()
        A = T.match_buffer(a, (m, k), "uint8")
        B = T.match_buffer(w, (nb, k4, wbytes), "int8")
        CS = T.match_buffer(cs, (np_,), "int32")
        SA = T.match_buffer(sa, (ms,), "float32")
        ZA = T.match_buffer(za, (ms,), "int32")
        SW = T.match_buffer(sw, (np_,), "float32")
        BIAS = T.match_buffer(bias, (np_,), "float32")
        O = T.match_buffer(o, (m, np_), "float32")
        A4 = T.decl_buffer((m * k4,), "int32", data=A.data)  # 4 codes of one row as one int32
        body(A, A4, B, CS, SA, ZA, SW, BIAS, SW, SW, CS, O, m)

    @T.prim_func
    def gemm_q(a: T.handle, w: T.handle, cs: T.handle, sa: T.handle, za: T.handle, sw: T.handle,
               bias: T.handle, cm: T.handle, qi: T.handle, qz: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        ms = T.int64()
        A = T.match_buffer(a, (m, k), "uint8")
        B = T.match_buffer(w, (nb, k4, wbytes), "int8")
        CS = T.match_buffer(cs, (np_,), "int32")
        SA = T.match_buffer(sa, (ms,), "float32")
        ZA = T.match_buffer(za, (ms,), "int32")
        SW = T.match_buffer(sw, (np_,), "float32")
        BIAS = T.match_buffer(bias, (np_,), "float32")
        CM = T.match_buffer(cm, (np_,), "float32")
        QI = T.match_buffer(qi, (1,), "float32")
        QZ = T.match_buffer(qz, (1,), "int32")
        O = T.match_buffer(o, (m, np_), out_dtype)
        A4 = T.decl_buffer((m * k4,), "int32", data=A.data)  # 4 codes of one row as one int32
        body(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, m)

    return gemm_q if quant else gemm
