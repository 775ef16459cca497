"""Register-only loops of the int8 dot-product instructions: the host's VNNI, AMX-INT8 and AVX2
``vpmaddubsw`` peaks,
the ceiling benchmarks/test_tvm_gemm.py reports each GEMM against (never part of a model)."""
from __future__ import annotations

from tvm.script import tirx as T

from .amx import tile_config
from .int8_gemm import PMADDUBSW, VPDPBUSD


def vnni_peak_kernel(iters: int, accumulators: int = 12):
    """A loop of ``vpdpbusd`` on registers only (no memory traffic): the host's int8 VNNI peak.
    One call does ``iters * accumulators * 128`` int8 operations."""
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


def pmaddubsw_peak_kernel(iters: int, accumulators: int = 12):
    """A loop of ``vpmaddubsw`` on ymm registers only: the AVX2 host's int8 multiply peak, counted
    as 32 multiply-adds (64 operations) per instruction, as a saturating u8 x s8 kernel would use it.
    Each register is fed back as the next unsigned operand (a constant operand pair would be
    hoisted out of the loop). One call does ``iters * accumulators * 64`` operations; the exact
    ``avx2`` GEMM needs 4.5 of these instructions' slots per 64 multiply-adds (int8_gemm.split_weights),
    so its ceiling is 2 / 4.5 of this figure."""
    nacc = accumulators

    @T.prim_func
    def peak(a: T.handle, b: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        A = T.match_buffer(a, (32,), "int8")
        B = T.match_buffer(b, (32,), "int8")
        O = T.match_buffer(o, (nacc * 16,), "int16")
        acc = T.decl_buffer((nacc * 16,), "int16", scope="global")
        bv = T.decl_buffer((32,), "int8", scope="global")
        bv[T.ramp(0, 1, 32)] = B.vload([0], "int8x32")
        for t in T.unroll(nacc):
            acc[T.ramp(t * 16, 1, 16)] = T.reinterpret("int16x16", A.vload([0], "int8x32"))
        for it in range(iters):
            for t in T.unroll(nacc):
                acc[T.ramp(t * 16, 1, 16)] = T.call_llvm_pure_intrin(
                    "int16x16", PMADDUBSW, T.reinterpret("int8x32", acc.vload([t * 16], "int16x16")), bv.vload([0], "int8x32"))
        for t in T.unroll(nacc):
            O[T.ramp(t * 16, 1, 16)] = acc.vload([t * 16], "int16x16")

    return peak


def amx_peak_kernel(iters: int):
    """A loop of ``tdpbusd`` on tile registers only (tiles loaded once): the host's AMX-INT8 peak.
    Arguments: ``a`` u8 ``[16 * 64]``, ``b`` s8 ``[16 * 64]``, ``out`` i32 ``[4 * 256]`` (the four
    accumulator tiles). One call does ``iters * 4 * 16 * 16 * 64 * 2`` int8 operations. Needs
    :func:`~.host.request_amx` before the call, and an AMX host: never run it elsewhere."""
    t_config = tile_config(False)

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
