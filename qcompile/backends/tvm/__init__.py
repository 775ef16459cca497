"""The tvm backend (id ``tvm``, alias ``tvm-llvm``): the converted graph imported into TVM Relax,
Linears on quantized activations fused into integer GEMM kernels written in TIR (u8 x s8 → s32,
weights packed at lowering time, zero-point compensation and float epilogue inside the kernel),
built into a shared library for an LLVM target detected from the host.

Built: int8/uint8 per-tensor, per-channel and per-token dynamic Q/DQ; kernel families ``vnni``
(AVX-512 VNNI) and ``generic`` (any LLVM target), a one-row path for M=1; dynamic batch and
sequence; ``save``/``load`` of the library; int4 weight-only Linears (``w4-g32/64/128``) through a
TIR kernel that unpacks the codes in registers (:mod:`.int4`); int4 weights on int8 activations
quantized per token and group (``w4-g32/64/128-a8``) through integer kernels (:mod:`.int4_a8`:
``vpdpbusd`` on VNNI hosts, ``vpmaddubsw`` on AVX2 ones). Not yet built (``NotBuiltError``): an AMX
family, other group-wise formats (3-bit, nf4; int4 weight-only with a group that does not divide
K), integer conv. See docs/tvm.md.

Example::

    >>> art = qcompile.lower(qmodel, backend="tvm")
    >>> out = art(input_ids, attention_mask)
    >>> art.save("out/minilm-tvm"); same = qcompile.backends.tvm.load("out/minilm-tvm")
"""
from __future__ import annotations

import time

import tvm  # noqa: F401  - a missing apache-tvm fails here, and get_backend names the extra

from ..base import Capabilities
from .host import detect
from .lower import NotBuiltError, build, import_relax, input_bounds
from .runtime import TvmArtifact, load


class TvmBackend:
    id = "tvm"
    capabilities = Capabilities(formats=frozenset({"int8", "uint8"}),
                                granularities=frozenset({"per_tensor", "per_channel", "per_token"}),
                                ops=frozenset({"linear", "conv", "embedding"}), dynamic_activations=True)

    def lower(self, qmodel, family: str = "auto", threads: int = 0) -> TvmArtifact:
        """``family``: ``auto`` (the best the host runs), ``vnni`` or ``generic``. ``threads``: the
        target's core count (0: TVM's default; set ``TVM_NUM_THREADS`` to limit the runtime)."""
        host = detect()
        if family == "auto":
            family = host.family
        if family == "vnni" and not host.has_vnni:
            raise NotBuiltError("kernel family 'vnni' needs AVX-512 VNNI (avx512_vnni), which this host lacks")
        if family not in ("vnni", "generic"):
            raise NotBuiltError(f"kernel family '{family}' is not built (built: vnni, generic; AMX is not yet built)")
        t0 = time.perf_counter()
        mod, fuse = import_relax(qmodel, family)
        t1 = time.perf_counter()
        ex, _ = build(mod, host.target(threads))
        gm = qmodel.graph_module
        meta = {"import_seconds": t1 - t0, "target": {"kind": "llvm", "mcpu": host.mcpu}, "family": family,
                "requires_flags": ["avx512_vnni"] if family == "vnni" else [],
                "fused": fuse.fused, "skipped": fuse.skipped, "epilogues": fuse.epilogues,
                "input_bounds": input_bounds(mod)}
        art = TvmArtifact(ex, qmodel.binder, getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None), meta)
        # LLVM code generation finishes when the VM loads the executable: count it as compile time
        art.compile_seconds = art.meta["compile_seconds"] = time.perf_counter() - t1
        return art


__all__ = ["TvmBackend", "TvmArtifact", "NotBuiltError", "load"]
