"""The tvm backend (id ``tvm``, alias ``tvm-llvm``): the converted graph imported into TVM Relax,
Linears on quantized activations fused into integer GEMM kernels written in TIR (u8 x s8 → s32,
weights packed at lowering time, zero-point compensation and float epilogue inside the kernel),
built into a shared library for an LLVM target detected from the host.

Built: int8/uint8 per-tensor, per-channel and per-token dynamic Q/DQ; kernel families ``amx``
(AMX-INT8 tiles), ``vnni`` (AVX-512 VNNI), ``avx2`` (exact 16-bit multiply-adds) and ``generic``
(any LLVM target), chosen from the host's flags, a one-row path for M=1; dynamic batch and
sequence; ``save``/``load`` of the library; int4 weight-only Linears (``w4-g32/64/128``) through a
TIR kernel that unpacks the codes in registers (:mod:`.int4`); int4 weights on int8 activations
quantized per token and group (``w4-g32/64/128-a8``) through integer kernels (:mod:`.int4_a8`:
``vpdpbusd`` on VNNI hosts, ``vpmaddubsw`` on AVX2 ones); integer conv2d (``groups=1``, per-tensor
activations) as a TIR im2col of the codes + the integer GEMM (:mod:`.conv`); models loaded with
``qcompile.load`` (re-exported from the saved shapes and dynamic-dim ranges,
``QuantizedModel.export_example``). Not yet built (``NotBuiltError``): other group-wise formats
(3-bit, nf4; int4 weight-only with a group that does not divide K); grouped/depthwise, 1-D/3-D and
transposed convs run float on dequantized weights. A save without capture examples (an older
qcompile) cannot be re-exported: ``BackendError``. See docs/tvm.md.

Example::

    >>> art = qcompile.lower(qmodel, backend="tvm")
    >>> out = art(input_ids, attention_mask)
    >>> art.save("out/minilm-tvm"); same = qcompile.backends.tvm.load("out/minilm-tvm")

Modules, lowest first; each imports only modules above it (``tvm`` itself at module level: the
backend registry imports this package only when the tvm backend is asked for):

1. ``errors`` — :class:`NotBuiltError`.
2. ``host`` — the CPU's flags, the kernel families it runs, the LLVM target, ``compile_kernel``.
3. ``amx`` — the AMX tile configuration and loop nest (TIR macros) of the int8 GEMM.
4. ``int8_gemm`` — the int8 GEMM kernel families, weight packing, the epilogue expressions (amx, host).
5. ``peak`` — register-only peak loops, for benchmarks (amx, int8_gemm).
6. ``fuse`` — ``int8_linear`` and the pass that fuses int8 Linears (int8_gemm).
7. ``epilogue`` — GEMM epilogue and LayerNorm+quantize fusion, their kernel (fuse, int8_gemm).
8. ``conv`` — int8 conv2d as im2col + the GEMM (fuse, int8_gemm).
9. ``int4`` — int4 weight-only kernel, op, pass, converter (fuse).
10. ``int4_a8`` — int4 weights on int8 activations (errors, host, int8_gemm, fuse, epilogue, int4).
11. ``attention`` — the fused float attention kernel and its Relax rewrite.
12. ``pipeline`` — the Relax pipeline and the float batch-matmul kernel (attention).
13. ``lower`` — the graph to Relax and the build (errors, int8_gemm, fuse, epilogue, conv, int4,
    int4_a8, pipeline).
14. ``runtime`` — :class:`TvmArtifact`, ``load`` (host).
15. this ``__init__`` — :class:`TvmBackend` (errors, host, lower, runtime).
"""
from __future__ import annotations

import time

import tvm  # noqa: F401  - a missing apache-tvm fails here, and get_backend names the extra

from ...errors import BackendError
from ..base import STATIC_DYNAMIC, Capabilities
from .errors import NotBuiltError
from .host import FAMILY_FLAGS, build_threads, detect, request_amx
from .lower import build, import_relax, input_bounds
from .runtime import TvmArtifact, load


class TvmBackend:
    id = "tvm"
    # int8/uint8 Q/DQ import as Relax ops (the GEMMs fuse them); uint4 weights per group and int8
    # activations per token and group exist only inside the int4 kernels (FuseInt4LinearPass,
    # FuseInt4A8LinearPass: groups of int4.GROUPS dividing K), checked after those passes
    capabilities = Capabilities(
        weights={"int8": {"per_tensor", "per_channel"}, "uint8": {"per_tensor", "per_channel"},
                 "uint4": {"per_group"}},
        activations={"int8": STATIC_DYNAMIC | {"dynamic per_token_group"}, "uint8": STATIC_DYNAMIC},
        kernel_only={("weight", "uint4", "per_group"), ("activation", "int8", "dynamic per_token_group")},
        ops={"linear", "conv", "embedding"}, error=NotBuiltError,
        timing_missing="latency budgets on tvm: per-layer kernel timing of the TVM lowering (time_evaluator per "
                       "fused kernel) is not built; use backend='onnx'")

    def lower(self, qmodel, family: str = "auto", threads: int = 0) -> TvmArtifact:
        """``family``: ``auto`` (the best the host runs), ``amx``, ``vnni``, ``avx-vnni``, ``avx2`` or ``generic``
        (``amx-emulated``: the AMX loop nest with scalar stand-ins for the tile instructions, to
        test it on hosts without AMX; slow). ``threads``: the thread count the artifact is built
        for (0: ``TVM_NUM_THREADS`` when set, else the host's cores). Above 1, the integer GEMMs
        and the fused attention run as tasks on TVM's thread pool (``TVM_NUM_THREADS`` limits it
        at run time); at 1 they launch no tasks, which is faster on one thread."""
        host = detect()
        asked = family
        if family == "auto":
            family = host.family
        if family not in FAMILY_FLAGS:
            raise NotBuiltError(f"kernel family '{family}' is not built (built: {', '.join(FAMILY_FLAGS)})")
        missing = [f for f in FAMILY_FLAGS[family] if f not in host.flags]
        if missing:
            raise NotBuiltError(f"kernel family '{family}' needs the CPU features {', '.join(missing)}, which this "
                                "host lacks")
        note = None
        if family == "amx" and not request_amx():
            note = "Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
            if asked != "auto":
                raise BackendError(f"kernel family 'amx': {note}; lower with family='vnni'")
            family = "vnni"
        t0 = time.perf_counter()
        parallel = build_threads(threads) > 1
        mod, fusions = import_relax(qmodel, family, parallel)
        t1 = time.perf_counter()
        ex, _ = build(mod, host.target(threads), parallel)
        gm = qmodel.graph_module
        meta = {"import_seconds": t1 - t0, "target": {"kind": "llvm", "mcpu": host.mcpu, "mattr": list(host.mattr)},
                "family": family, "parallel": parallel,
                "requires_flags": list(FAMILY_FLAGS[family]), "family_note": note,
                "fused": fusions.fused, "skipped": fusions.skipped, "epilogues": fusions.epilogues,
                "input_bounds": input_bounds(mod)}
        art = TvmArtifact(ex, qmodel.binder, getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None), meta)
        # LLVM code generation finishes when the VM loads the executable: count it as compile time
        art.compile_seconds = art.meta["compile_seconds"] = time.perf_counter() - t1
        return art


__all__ = ["TvmBackend", "TvmArtifact", "NotBuiltError", "load"]
