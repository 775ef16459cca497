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
``int8`` codes (:mod:`.epilogue` decides when); :func:`layer_norm_quantize_kernel` is the same
idea for a LayerNorm whose output feeds both a residual and a quantize.

Families (:data:`~.host.FAMILIES`): ``amx`` (AMX-INT8 ``tdpbusd`` on 32 x 32 blocks of tiles, the rows
left over on ``vnni``; :func:`_amx_macros`), ``vnni`` (AVX-512 VNNI ``vpdpbusd`` on zmm),
``avx-vnni`` (the VEX-encoded ``vpdpbusd`` on ymm of AVX2 hosts with AVX-VNNI), ``avx2``
(``vpmaddwd`` on codes widened to 16 bits: exact, unlike ``vpmaddubsw``, whose 16-bit pair sums
saturate) and ``generic`` (plain integer multiply-adds that LLVM vectorises for any target). All
are bit-exact against an int64 reference (tests/test_tvm_kernels.py); the AMX loop nest is also
checked with emulated tile instructions on hosts without AMX (``family="amx-emulated"``).

Two facts of TVM 0.27 + LLVM 22 shape this code: ``llvm.x86.avx512.vpdpbusd.512`` takes its
operands as ``<64 x i8>`` (TVM's built-in VNNI intrinsic passes ``<16 x i32>`` and fails to build),
and a ``local`` buffer is allocated on TVM's heap workspace, which LLVM cannot keep in registers:
the accumulators are ``global``-scope buffers under 1 KiB, which TVM places on the stack, where
LLVM's SROA promotes them to registers.
"""
from __future__ import annotations

import numpy as np

from .host import FAMILIES

MR, NR = 5, 3          # register tile: 5 rows x 3 blocks of 16 columns (15 accumulators, 960 bytes)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
VPDPBUSD_YMM = "llvm.x86.avx512.vpdpbusd.256"   # VEX-encoded (AVX-VNNI) on targets with +avxvnni
# register tiles (rows, blocks of 16 columns) of the vector families; the others take MR x NR.
# 16 ymm registers: avx2 holds 4 accumulators per row x block (two partial sums per column),
# avx-vnni 2 (a block of 16 int32 is two ymm): 12 accumulators either way
TILES = {"avx2": (3, 1), "avx-vnni": (6, 1)}
PMADDWD = "llvm.x86.avx2.pmadd.wd"


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
    from tvm import tirx

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
    from tvm import tirx

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
    from tvm import tirx

    lo, hi = (0.0, 255.0) if out_dtype == "uint8" else (-128.0, 127.0)
    q = tirx.round((y * cm) * qinv) + tirx.Cast("float32", qz)
    q = tirx.min(tirx.max(q, tirx.const(lo, "float32")), tirx.const(hi, "float32"))
    return tirx.Cast(out_dtype, tirx.Cast("int32", q))


def gemm_kernel(k: int, np_: int, per_row: bool, family: str = "vnni", epilogue=None, parallel: bool = False):
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

    ``family="amx"``: blocks of 32 rows on AMX tiles (:func:`_amx_macros`), the rows left over on
    the ``vnni`` tiles; a ``K`` that is not a multiple of :data:`AMX_K` gets the ``vnni`` kernel.
    ``parallel``: the column panels (AMX: up to :data:`AMX_GROUPS` groups of column pairs) are
    tasks on TVM's thread pool (``TVM_NUM_THREADS``); without it the kernel launches no tasks,
    which costs nothing on one thread (the launches cost 4-12 % there, measured).

    ``family="amx-emulated"``: the same loop nest with each tile instruction replaced by a scalar
    TIR loop of the same meaning, and the leftover rows on ``generic`` tiles, so the AMX family's
    addressing, tiling and epilogue are tested on any host (slow: for tests only)."""
    from tvm.script import tirx as T

    if family not in FAMILIES + (AMX_EMULATED,):
        raise ValueError(f"unknown kernel family '{family}' (built: {', '.join(FAMILIES)})")
    if k % 4 or np_ % (16 * NR):
        raise ValueError(f"K={k} must be a multiple of 4 and Np={np_} of {16 * NR}")
    activation, out_dtype = epilogue if epilogue is not None else ("none", "float32")
    if activation not in ACTIVATIONS or out_dtype not in ("float32", "uint8", "int8") or (
            epilogue is not None and out_dtype == "float32"):
        raise ValueError(f"unknown epilogue {epilogue!r} (activations {', '.join(ACTIVATIONS)}; codes uint8 or int8)")
    quant = epilogue is not None
    k4, nb = k // 4, np_ // 16
    avx2 = family == "avx2"
    avx_vnni = family == "avx-vnni"
    dot_lanes = 8 if avx_vnni else 16     # int32 lanes of one vpdpbusd: ymm or zmm
    dot_intrin = VPDPBUSD_YMM if avx_vnni else VPDPBUSD
    dot_i32, dot_u8, dot_s8 = f"int32x{dot_lanes}", f"uint8x{4 * dot_lanes}", f"int8x{4 * dot_lanes}"
    mr_t, nr_t = TILES.get(family, (MR, NR))
    panels = T.parallel if parallel else T.serial   # the column-panel loops
    nr1 = 6 if nb % 6 == 0 and not avx2 else NR
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
    def tile(A, A4, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, mr, jb0, nr):
        # stack-allocated accumulators (see the module docstring for why the scope is "global")
        acc = T.decl_buffer((mr * nr * 16,), "int32", scope="global")
        av = T.decl_buffer((mr * 16,), "int32", scope="global")
        bv = T.decl_buffer((nr * 64,), "int8", scope="global")
        acc2 = T.decl_buffer((mr * nr * 32 if avx2 else 1,), "int32", scope="global")
        aw = T.decl_buffer((mr * 16 if avx2 else 1,), "int16", scope="global")
        wv = T.decl_buffer((nr * 64 if avx2 else 1,), "int16", scope="global")
        for t in T.unroll(mr * nr):
            acc[T.ramp(t * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
            if avx2:
                acc2[T.ramp(t * 32, 1, 32)] = T.broadcast(T.int32(0), 32)
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
            elif avx2:
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
        if avx2:
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

    amx_rows = _amx_macros(k, nb, family == AMX_EMULATED, finish, parallel) if amx else None

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
        B = T.match_buffer(w, (nb, k4, 64), "int8")
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
        B = T.match_buffer(w, (nb, k4, 64), "int8")
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


# AMX (Sapphire Rapids and later): eight tile registers of 16 rows x 64 bytes. ``tdpbusd`` adds
# to a 16 x 16 int32 tile the products of a 16 x 64 u8 tile (16 rows of A, 64 consecutive k) and a
# 16 x 64 s8 tile in VNNI order (16 groups of 4 k, each 16 columns x 4 bytes): exactly 16
# consecutive rows of pack_weights' [Np/16, K/4, 64] layout, 1 KiB contiguous.
AMX_M, AMX_K = 32, 64      # 2 x 2 accumulator tiles cover 32 rows x 32 columns; one tile row is 64 k
AMX_CHUNK = 8              # blocks of 32 rows per pass over the weights: 256 rows of A stay in L2
AMX_EMULATED = "amx-emulated"
AMX_BLOCK = AMX_M * 32     # int32 sums of one 32 x 32 block: one half of the scratch
AMX_INTERLEAVE_MIN_STEPS = 12   # K >= 768: the epilogue is spread over the next block (see block())
AMX_GROUPS = 16            # tasks per row chunk on the thread pool: each loads the tile configuration (~580 cycles)


def _tile_config(emulate: bool):
    """The macro that loads the one tile configuration of every AMX kernel here (``ldtilecfg``):
    palette 1, all eight tiles 16 rows x 64 bytes. With ``emulate`` it only fills the 64 bytes."""
    from tvm.script import tirx as T

    @T.macro
    def t_config():
        cfg = T.decl_buffer((64,), "uint8", scope="global")
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)                     # palette 1
        for t in T.unroll(8):
            cfg[16 + 2 * t] = T.uint8(64)       # colsb[t]: 64 bytes per row (u16, little endian)
            cfg[48 + t] = T.uint8(16)           # rows[t]
        if not emulate:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))

    return t_config


def _amx_macros(k: int, nb: int, emulate: bool, finish, parallel: bool):
    """The AMX part of :func:`gemm_kernel`: a macro over the rows ``0 .. m // 32 * 32``.

    Loop nest: chunks of :data:`AMX_CHUNK` row blocks (A's chunk stays in L2), then pairs of column
    blocks (B's 32-column panel, ``K * 32`` bytes, stays in L1/L2), then the row blocks of the
    chunk; for each 32 x 32 block, tiles tmm0..3 accumulate over ``K / 64`` steps of two A tiles
    (tmm4, tmm5) and two B tiles (tmm6, tmm7), and are stored to one half of an 8 KiB int32
    scratch in the layout ``finish`` reads; ``finish`` (the shared float/requantize epilogue)
    writes the block from there while the tiles compute the next block (see ``block``).

    The row chunks are the outer loop; inside each, the column pairs (and the odd last block) in
    ``groups`` groups, thread-pool tasks with ``parallel``, each with its own tile configuration,
    scratch and epilogue pipeline. So ``ldtilecfg`` (~580 cycles) runs once per chunk and group:
    16 times per call for 4096 rows when serial (~3 us of 0.6-1.9 ms). Putting the groups
    outermost instead, to load it once per task, made the parallel 4096x1536x384 GEMM 0.65x: every
    task then streams all of A instead of sharing the chunk in L2. Only when there is a full
    block, so the GEMV path never touches the tiles. Linux must have granted the
    process the tile state first (:func:`~.host.request_amx`), else the first tile instruction
    raises SIGILL. With ``emulate``, each tile instruction is a scalar loop over a byte array of
    eight 1 KiB tiles with the same operands (row stride in bytes, tile ids), so everything but the
    instructions themselves is checked on any host."""
    from tvm.script import tirx as T

    k4, nk = k // 4, k // AMX_K
    rps = (AMX_M + nk - 1) // nk   # epilogue rows per k step: the previous block is done when this one is
    # With few k steps, each carries many rows of epilogue stores, which the next step's tile
    # loads wait behind: MiniLM's K = 384 GEMMs (6 steps, 6 rows each) ran 10-20 % slower
    # interleaved, its K = 1536 ones 15-20 % faster, and 128 x 768 x 3072 8 % faster.
    interleave = nk >= AMX_INTERLEAVE_MIN_STEPS
    npairs = nb // 2
    groups = max(1, min(AMX_GROUPS, npairs)) if parallel else 1
    per_group = (npairs + groups - 1) // groups
    group_loop = T.parallel if parallel else T.serial

    t_config = _tile_config(emulate)

    @T.macro
    def t_zero(treg32, t):
        if emulate:
            for i in range(256):
                treg32[t * 256 + i] = 0
        else:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.uint8(t)))

    @T.macro
    def t_load(treg, t, src, offset, stride):
        # 16 rows of 64 bytes from the flat byte buffer src, row r at offset + r * stride
        if emulate:
            for r, c in T.grid(16, 64):
                treg[t * 1024 + r * 64 + c] = T.Cast("int8", src[offset + r * stride + c])
        else:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(t), T.address_of(src[offset]),
                                          T.int64(stride)))

    @T.macro
    def t_dpbusd(treg, treg32, d, a, b):
        if emulate:
            for mm, nn, kq, i in T.grid(16, 16, 16, 4):
                treg32[d * 256 + mm * 16 + nn] = treg32[d * 256 + mm * 16 + nn] + T.Cast(
                    "int32", T.Cast("uint8", treg[a * 1024 + mm * 64 + kq * 4 + i])) * T.Cast(
                    "int32", treg[b * 1024 + kq * 64 + nn * 4 + i])
        else:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.uint8(d), T.uint8(a), T.uint8(b)))

    @T.macro
    def t_store(treg32, t, dst, offset, stride):
        # 16 rows of 16 int32 to dst, row r at offset + r * stride (in int32 elements)
        if emulate:
            for r, c in T.grid(16, 16):
                dst[offset + r * stride + c] = treg32[t * 256 + r * 16 + c]
        else:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(t), T.address_of(dst[offset]),
                                          T.int64(stride * 4)))

    @T.macro
    def finish_pending(acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, r0, r1):
        # rows r0 .. r1 of the pending block's epilogue (in the scratch half other than pend[3]'s), if any
        if pend[2] == 2:
            finish(acc, (1 - pend[3]) * AMX_BLOCK + r0 * 32, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, pend[0] + r0, r1 - r0,
                   pend[1], 2)
        elif pend[2] == 1:
            finish(acc, (1 - pend[3]) * AMX_BLOCK + r0 * 16, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, pend[0] + r0, r1 - r0,
                   pend[1], 1)

    @T.macro
    def block(A1, B1, treg, treg32, acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, jb0, nr):
        # a 32 x (16 * nr) block: tile 2 * mi + ni accumulates rows 16 mi.., column block jb0 + ni.
        # With `interleave`, software-pipelined: the epilogue of the previous block (pend: its first
        # row, column block, width (0: none) and scratch half) runs a few rows per k step, between
        # this block's tile instructions. Run after the k loop (measured: 287 vs 263 us on
        # 128x768x3072), its stores to O, which miss the cache, fill the store buffer and hold up
        # the next block's tiles. Without, the block's own epilogue follows its tile stores.
        t_zero(treg32, 0)
        t_zero(treg32, 2)
        if nr == 2:
            t_zero(treg32, 1)
            t_zero(treg32, 3)
        for kc in range(nk):
            t_load(treg, 4, A1, row0 * k + kc * AMX_K, k)
            t_load(treg, 5, A1, (row0 + 16) * k + kc * AMX_K, k)
            t_load(treg, 6, B1, (jb0 * k4 + kc * 16) * 64, 64)
            if nr == 2:
                t_load(treg, 7, B1, ((jb0 + 1) * k4 + kc * 16) * 64, 64)
            t_dpbusd(treg, treg32, 0, 4, 6)
            t_dpbusd(treg, treg32, 2, 5, 6)
            if nr == 2:
                t_dpbusd(treg, treg32, 1, 4, 7)
                t_dpbusd(treg, treg32, 3, 5, 7)
            if interleave:
                # rows kc * rps .. of the previous block's epilogue, between this block's tile instructions
                finish_pending(acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, T.min(kc * rps, AMX_M),
                               T.min(kc * rps + rps, AMX_M))
        half = pend[3] * AMX_BLOCK
        t_store(treg32, 0, acc, half, nr * 16)
        t_store(treg32, 2, acc, half + 16 * nr * 16, nr * 16)
        if nr == 2:
            t_store(treg32, 1, acc, half + 16, nr * 16)
            t_store(treg32, 3, acc, half + 16 * nr * 16 + 16, nr * 16)
        if interleave:
            pend[0] = T.Cast("int32", row0)
            pend[1] = T.Cast("int32", jb0)
            pend[2] = nr
            pend[3] = 1 - pend[3]
        else:
            finish(acc, 0, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, row0, AMX_M, jb0, nr)

    @T.macro
    def amx_rows(A, B, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, m):
        A1 = T.decl_buffer((m * k,), "uint8", data=A.data)
        B1 = T.decl_buffer((nb * k4 * 64,), "int8", data=B.data)
        nblk = m // AMX_M
        if nblk > 0:
            for mc in range((nblk + AMX_CHUNK - 1) // AMX_CHUNK):
                # the column pairs (and the odd last block) in groups, one task each on TVM's thread
                # pool: tiles, their configuration and the epilogue pipeline are per thread
                for g in group_loop(groups):
                    acc = T.decl_buffer((2 * AMX_BLOCK,), "int32", scope="global")   # two 4 KiB halves
                    pend = T.decl_buffer((4,), "int32", scope="global")
                    # emulation only: the eight tiles' bytes, and the accumulator tiles 0..3 as int32
                    treg = T.decl_buffer((8 * 1024 if emulate else 1,), "int8", scope="global")
                    treg32 = T.decl_buffer((4 * 256 if emulate else 1,), "int32", scope="global")
                    t_config()
                    pend[2] = 0
                    pend[3] = 0
                    for jo in range(g * per_group, T.min(g * per_group + per_group, npairs)):
                        for io in range(T.min(AMX_CHUNK, nblk - mc * AMX_CHUNK)):
                            block(A1, B1, treg, treg32, acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O,
                                  (mc * AMX_CHUNK + io) * AMX_M, jo * 2, 2)
                    if nb % 2 == 1:
                        if g == groups - 1:
                            for io in range(T.min(AMX_CHUNK, nblk - mc * AMX_CHUNK)):
                                block(A1, B1, treg, treg32, acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O,
                                      (mc * AMX_CHUNK + io) * AMX_M, nb - 1, 1)
                    finish_pending(acc, pend, CS, SA, ZA, SW, BIAS, CM, QI, QZ, O, 0, AMX_M)
                    if not emulate:
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return amx_rows



def vnni_peak_kernel(iters: int, accumulators: int = 12):
    """A loop of ``vpdpbusd`` on registers only (no memory traffic): the host's int8 VNNI peak.
    One call does ``iters * accumulators * 128`` int8 operations."""
    from tvm.script import tirx as T

    nacc = accumulators

    @T.prim_func
    def peak(a: T.handle, b: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        A = T.match_buffer(a, (16,), "int32")
        B = T.match_buffer(b, (64,), "int8")
        O = T.match_buffer(o, (nacc * 16,), "int32")
        acc = T.decl_buffer((nacc * 16,), "int32", scope="global")
        av = T.decl_buffer((16,), "int32", scope="global")
        bv = T.decl_buffer((64,), "int8", scope="global")
        av[T.ramp(0, 1, 16)] = A.vload([0], "int32x16")
        bv[T.ramp(0, 1, 64)] = B.vload([0], "int8x64")
        for t in T.unroll(nacc):
            acc[T.ramp(t * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
        for it in range(iters):
            for t in T.unroll(nacc):
                acc[T.ramp(t * 16, 1, 16)] = T.call_llvm_pure_intrin(
                    "int32x16", VPDPBUSD, acc.vload([t * 16], "int32x16"),
                    T.reinterpret("uint8x64", av.vload([0], "int32x16")), bv.vload([0], "int8x64"))
        for t in T.unroll(nacc):
            O[T.ramp(t * 16, 1, 16)] = acc.vload([t * 16], "int32x16")

    return peak


def amx_peak_kernel(iters: int):
    """A loop of ``tdpbusd`` on tile registers only (tiles loaded once): the host's AMX-INT8 peak.
    Arguments: ``a`` u8 ``[16 * 64]``, ``b`` s8 ``[16 * 64]``, ``out`` i32 ``[4 * 256]`` (the four
    accumulator tiles). One call does ``iters * 4 * 16 * 16 * 64 * 2`` int8 operations. Needs
    :func:`~.host.request_amx` before the call, and an AMX host: never run it elsewhere."""
    from tvm.script import tirx as T

    t_config = _tile_config(False)

    @T.macro
    def intrin(name, *args):
        T.evaluate(T.call_llvm_intrin("void", name, *args))

    @T.prim_func
    def peak(a: T.handle, b: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        A = T.match_buffer(a, (1024,), "uint8")
        B = T.match_buffer(b, (1024,), "int8")
        O = T.match_buffer(o, (1024,), "int32")
        t_config()
        for t in T.unroll(4):
            intrin("llvm.x86.tilezero", T.uint8(t))
        intrin("llvm.x86.tileloadd64", T.uint8(4), T.address_of(A[0]), T.int64(64))
        intrin("llvm.x86.tileloadd64", T.uint8(5), T.address_of(A[0]), T.int64(64))
        intrin("llvm.x86.tileloadd64", T.uint8(6), T.address_of(B[0]), T.int64(64))
        intrin("llvm.x86.tileloadd64", T.uint8(7), T.address_of(B[0]), T.int64(64))
        for it in range(iters):
            intrin("llvm.x86.tdpbusd", T.uint8(0), T.uint8(4), T.uint8(6))
            intrin("llvm.x86.tdpbusd", T.uint8(1), T.uint8(4), T.uint8(7))
            intrin("llvm.x86.tdpbusd", T.uint8(2), T.uint8(5), T.uint8(6))
            intrin("llvm.x86.tdpbusd", T.uint8(3), T.uint8(5), T.uint8(7))
        for t in T.unroll(4):
            intrin("llvm.x86.tilestored64", T.uint8(t), T.address_of(O[t * 256]), T.int64(64))
        intrin("llvm.x86.tilerelease")

    return peak


# Float batch matmul (attention's Q·Kᵀ and P·V, which stay float in w8a8): register tiles of
# FMR rows x 2 vectors of 16 columns (8 zmm accumulators), the k loop inside the tile, B read
# along its rows (contiguous 16-float vectors), A broadcast one element at a time.
FMR, FNV = 4, 2
FLANES = 16


def batch_matmul_kernel():
    """The TIR ``PrimFunc`` ``C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]`` in float32, for
    ``A [batch, m, K]``, ``B [batch, K, N]``, ``C [batch, m, N]``, every dim symbolic (one kernel
    serves Q·Kᵀ and P·V at any batch and sequence). Rows outside the ``FMR``-row tiles run one at
    a time; columns outside the 32-column tiles run as scalars."""
    from tvm.script import tirx as T

    tile_n = FNV * FLANES

    @T.macro
    def tile(A, B, C, bi, row0, mr, col0, kk_n, m, nd):
        acc = T.decl_buffer((mr * FNV * FLANES,), "float32", scope="global")
        bv = T.decl_buffer((FNV * FLANES,), "float32", scope="global")
        for t in T.unroll(mr * FNV):
            acc[T.ramp(t * FLANES, 1, FLANES)] = T.broadcast(T.float32(0), FLANES)
        for kk in range(kk_n):
            for v in T.unroll(FNV):
                bv[T.ramp(v * FLANES, 1, FLANES)] = B.vload([bi, kk, col0 + v * FLANES], "float32x16")
            for ii in T.unroll(mr):
                for v in T.unroll(FNV):
                    acc[T.ramp((ii * FNV + v) * FLANES, 1, FLANES)] = (
                        acc.vload([(ii * FNV + v) * FLANES], "float32x16")
                        + T.broadcast(A[bi, row0 + ii, kk], FLANES) * bv.vload([v * FLANES], "float32x16"))
        for ii in T.unroll(mr):
            for v in T.unroll(FNV):
                C[T.ramp((bi * m + row0 + ii) * nd + col0 + v * FLANES, 1, FLANES)] = acc.vload(
                    [(ii * FNV + v) * FLANES], "float32x16")

    @T.prim_func
    def bmm(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int64()
        m = T.int64()
        kd = T.int64()
        nd = T.int64()
        A = T.match_buffer(a, (nb, m, kd), "float32")
        B = T.match_buffer(b, (nb, kd, nd), "float32")
        C = T.match_buffer(c, (nb, m, nd), "float32")
        C1 = T.decl_buffer((nb * m * nd,), "float32", data=C.data)
        for bi in range(nb):
            for jo in range(nd // tile_n):
                for io in range(m // FMR):
                    tile(A, B, C1, bi, io * FMR, FMR, jo * tile_n, kd, m, nd)
                for r in range(m % FMR):
                    tile(A, B, C1, bi, m // FMR * FMR + r, 1, jo * tile_n, kd, m, nd)
            for i in range(m):
                for j in range(nd % tile_n):
                    C[bi, i, nd // tile_n * tile_n + j] = T.float32(0)
                    for kk in range(kd):
                        C[bi, i, nd // tile_n * tile_n + j] = (C[bi, i, nd // tile_n * tile_n + j]
                                                               + A[bi, i, kk] * B[bi, kk, nd // tile_n * tile_n + j])

    return bmm


def _lane_sum(buf, n: int):
    """``buf[0] + ... + buf[n-1]`` as a balanced tree of scalar loads (a short dependency chain)."""
    terms = [buf[i] for i in range(n)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def layer_norm_quantize_kernel(d: int, residual: bool, out_dtype: str, eps: float, ndim: int = 2):
    """The TIR ``PrimFunc`` of ``y = LayerNorm(x [+ r]) * gamma + beta`` over rows of ``d`` floats
    (``d`` a multiple of 32) writing both ``y`` (float32, for the residual path) and the codes of
    ``y * cm`` (:func:`requantize_expr`, for the next Linear), so the codes come from the row while
    it is in L1 instead of a second pass over ``y``.

    Arguments: ``x`` f32 ``[*lead, d]`` (``ndim - 1`` symbolic leading dims, so the caller needs no
    reshape), ``r`` (same shape; read only when ``residual``, pass ``x`` again otherwise),
    ``gamma``, ``beta``, ``cm`` f32 ``[d]``, ``qinv`` f32 ``[1]``, ``qz`` i32 ``[1]``, then the
    outputs ``y`` f32 and ``q`` of ``out_dtype``, both ``[*lead, d]``. Mean and variance in two
    passes over the row, each with two 16-lane partial sums (two independent add chains)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if d % (2 * FLANES) or out_dtype not in ("uint8", "int8") or ndim not in (2, 3):
        raise ValueError(f"layer_norm_quantize_kernel: d={d} must be a multiple of {2 * FLANES}, codes uint8 or "
                         f"int8, rank 2 or 3 (got {ndim})")
    nv2 = d // (2 * FLANES)
    inv_d = 1.0 / d
    lead = [tirx.Var(f"n{i}", "int64") for i in range(ndim - 1)]
    rows = lead[0] if ndim == 2 else lead[0] * lead[1]

    @T.prim_func
    def ln_q(x: T.handle, r: T.handle, g: T.handle, b: T.handle, cm: T.handle, qi: T.handle, qz: T.handle,
             y: T.handle, q: T.handle):
        T.func_attr({"tir.noalias": True})
        Xn = T.match_buffer(x, (*lead, d), "float32")
        Rn = T.match_buffer(r, (*lead, d), "float32")
        G = T.match_buffer(g, (d,), "float32")
        B = T.match_buffer(b, (d,), "float32")
        CM = T.match_buffer(cm, (d,), "float32")
        QI = T.match_buffer(qi, (1,), "float32")
        QZ = T.match_buffer(qz, (1,), "int32")
        Yn = T.match_buffer(y, (*lead, d), "float32")
        Qn = T.match_buffer(q, (*lead, d), out_dtype)
        X = T.decl_buffer((rows * d,), "float32", data=Xn.data)
        R = T.decl_buffer((rows * d,), "float32", data=Rn.data)
        Y = T.decl_buffer((rows * d,), "float32", data=Yn.data)
        Q = T.decl_buffer((rows * d,), out_dtype, data=Qn.data)
        for i in range(rows):
            part = T.decl_buffer((2 * FLANES,), "float32", scope="global")
            stat = T.decl_buffer((2,), "float32", scope="global")   # mean, 1 / sqrt(var + eps)
            part[T.ramp(0, 1, 2 * FLANES)] = T.broadcast(T.float32(0), 2 * FLANES)
            for v in range(nv2):
                for h in T.unroll(2):
                    if residual:
                        Y[T.ramp(i * d + (2 * v + h) * FLANES, 1, FLANES)] = (
                            X.vload([i * d + (2 * v + h) * FLANES], "float32x16")
                            + R.vload([i * d + (2 * v + h) * FLANES], "float32x16"))
                    else:
                        Y[T.ramp(i * d + (2 * v + h) * FLANES, 1, FLANES)] = X.vload(
                            [i * d + (2 * v + h) * FLANES], "float32x16")
                    part[T.ramp(h * FLANES, 1, FLANES)] = part.vload([h * FLANES], "float32x16") + Y.vload(
                        [i * d + (2 * v + h) * FLANES], "float32x16")
            stat[0] = _lane_sum(part, 2 * FLANES) * T.float32(inv_d)
            part[T.ramp(0, 1, 2 * FLANES)] = T.broadcast(T.float32(0), 2 * FLANES)
            for v in range(nv2):
                for h in T.unroll(2):
                    part[T.ramp(h * FLANES, 1, FLANES)] = part.vload([h * FLANES], "float32x16") + (
                        Y.vload([i * d + (2 * v + h) * FLANES], "float32x16") - T.broadcast(stat[0], FLANES)) * (
                        Y.vload([i * d + (2 * v + h) * FLANES], "float32x16") - T.broadcast(stat[0], FLANES))
            stat[1] = T.float32(1) / T.sqrt(_lane_sum(part, 2 * FLANES) * T.float32(inv_d) + T.float32(eps))
            for v in range(d // FLANES):
                for j in T.vectorized(FLANES):
                    Y[i * d + v * FLANES + j] = (Y[i * d + v * FLANES + j] - stat[0]) * stat[1] * G[v * FLANES + j] \
                        + B[v * FLANES + j]
                for j in T.vectorized(FLANES):
                    Q[i * d + v * FLANES + j] = requantize_expr(Y[i * d + v * FLANES + j], CM[v * FLANES + j], QI[0],
                                                                QZ[0], out_dtype)

    return ln_q
