"""The AMX part of the int8 GEMM kernels (:func:`~.int8_gemm.gemm_kernel` with ``family="amx"``):
the tile configuration and the loop nest over blocks of 32 rows, as TIR macros.

AMX (Sapphire Rapids and later): eight tile registers of 16 rows x 64 bytes. ``tdpbusd`` adds
to a 16 x 16 int32 tile the products of a 16 x 64 u8 tile (16 rows of A, 64 consecutive k) and a
16 x 64 s8 tile in VNNI order (16 groups of 4 k, each 16 columns x 4 bytes): exactly 16
consecutive rows of pack_weights' [Np/16, K/4, 64] layout, 1 KiB contiguous.
"""
from __future__ import annotations

from tvm.script import tirx as T

AMX_M, AMX_K = 32, 64      # 2 x 2 accumulator tiles cover 32 rows x 32 columns; one tile row is 64 k
AMX_CHUNK = 8              # blocks of 32 rows per pass over the weights: 256 rows of A stay in L2
AMX_EMULATED = "amx-emulated"
AMX_BLOCK = AMX_M * 32     # int32 sums of one 32 x 32 block: one half of the scratch
AMX_INTERLEAVE_MIN_STEPS = 12   # K >= 768: the epilogue is spread over the next block (see block())
AMX_GROUPS = 16            # tasks per row chunk on the thread pool: each loads the tile configuration (~580 cycles)


def tile_config(emulate: bool):
    """The macro that loads the one tile configuration of every AMX kernel (the GEMM's, :mod:`.peak`'s)
    (``ldtilecfg``): palette 1, all eight tiles 16 rows x 64 bytes. With ``emulate`` it only fills
    the 64 bytes."""
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


def amx_macros(k: int, nb: int, emulate: bool, finish, parallel: bool):
    """The AMX part of :func:`~.int8_gemm.gemm_kernel`: a macro over the rows ``0 .. m // 32 * 32``.

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

    t_config = tile_config(emulate)

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
