"""The onnx backend (id ``onnx``): the converted Q/DQ graph as an ONNX file run by onnxruntime's CPU
execution provider.

Two targets. ``onnxruntime`` (default) emits onnxruntime's fused contrib kernels where they are
faster: static int8 Linears as ``com.microsoft::MatMulIntegerToFloat`` (bias in the epilogue),
4-bit group-wise weight-only Linears as ``com.microsoft::MatMulNBits``. ``qdq`` emits standard
ONNX QuantizeLinear/DequantizeLinear only (per-tensor, per-axis, per-token as explicit math), for
other runtimes. Both gather int8 embedding rows before dequantizing, keep batch/sequence axes
dynamic and pass ``onnx.checker``. On x86 hosts without VNNI, int8 weights on uint8 activations
are written as uint8 with zero point + 128 (the same values), because onnxruntime's u8 x s8 kernels
saturate there (:mod:`.weights`; ``lower(..., int8_weights=...)`` overrides)."""
from __future__ import annotations

from typing import Optional

from ..base import STATIC_DYNAMIC, WEIGHT_GRANULARITIES, Capabilities
from .lower import OPSET, export_onnx
from .translate import DYNAMIC_FORMATS, STANDARD_FORMATS
from .runtime import OnnxArtifact, read_onnx


class OnnxBackend:
    id = "onnx"
    # from translate.py's tables: weights in every standard Q/DQ format (sub-byte ones as
    # INT4/UINT4), per tensor, axis or block; activations quantized at run time only in formats
    # with an ONNX integer type (4-/2-bit ones per tensor, static); int8 per token and group only
    # inside MatMulNBits (accuracy level 4, target onnxruntime: lower.py's _check_no_grouped_dynamic
    # names what did not fuse, with the target)
    capabilities = Capabilities(
        weights={fmt: WEIGHT_GRANULARITIES for fmt in STANDARD_FORMATS},
        activations={**{fmt: {"static per_tensor"} for fmt in STANDARD_FORMATS},
                     **{fmt: STATIC_DYNAMIC for fmt in DYNAMIC_FORMATS},
                     "int8": STATIC_DYNAMIC | {"dynamic per_token_group"}},
        kernel_only={("activation", "int8", "dynamic per_token_group")},
        ops={"linear", "conv", "embedding"}, quantized_outputs={"conv"},
        timing="qcompile.backends.onnx.timing")

    def lower(self, qmodel, opset: int = OPSET, threads: int = 0, target: str = "onnxruntime",
              nbits_accuracy_level: int = 0, keep_metadata: bool = False,
              concatenate_shared: bool = False, int8_weights: str = "auto",
              budget_s: Optional[float] = None) -> OnnxArtifact:
        """``target``: ``"onnxruntime"`` (contrib kernels where faster) or ``"qdq"`` (standard
        ONNX only); ``threads``: onnxruntime intra-op threads (0: its default); ``int8_weights``:
        ``"auto"`` writes int8 weights as uint8 (+128) on x86 hosts without VNNI, where onnxruntime's
        u8 x s8 kernels saturate (:mod:`.weights`); the other options: see
        :func:`~qcompile.backends.onnx.lower.export_onnx`."""
        data, names = export_onnx(qmodel, opset, target, nbits_accuracy_level, keep_metadata, concatenate_shared,
                                  int8_weights, budget_s)
        return OnnxArtifact(data, names, qmodel, threads)


__all__ = ["OnnxBackend", "OnnxArtifact", "read_onnx"]
