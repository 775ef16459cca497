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

from ..base import Capabilities
from .lower import OPSET, export_onnx
from .runtime import OnnxArtifact, read_onnx


class OnnxBackend:
    id = "onnx"
    capabilities = Capabilities(formats=frozenset({"int8", "uint8", "int4", "uint4"}),
                                granularities=frozenset({"per_tensor", "per_channel", "per_token", "per_group", "per_token_group"}),
                                ops=frozenset({"linear", "conv", "embedding"}), dynamic_activations=True,
                                quantized_outputs=frozenset({"conv"}))

    def lower(self, qmodel, opset: int = OPSET, threads: int = 0, target: str = "onnxruntime",
              nbits_accuracy_level: int = 0, keep_metadata: bool = False,
              concatenate_shared: bool = False, int8_weights: str = "auto") -> OnnxArtifact:
        """``target``: ``"onnxruntime"`` (contrib kernels where faster) or ``"qdq"`` (standard
        ONNX only); ``threads``: onnxruntime intra-op threads (0: its default); ``int8_weights``:
        ``"auto"`` writes int8 weights as uint8 (+128) on x86 hosts without VNNI, where onnxruntime's
        u8 x s8 kernels saturate (:mod:`.weights`); the other options: see
        :func:`~qcompile.backends.onnx.lower.export_onnx`."""
        data, names = export_onnx(qmodel, opset, target, nbits_accuracy_level, keep_metadata, concatenate_shared,
                                  int8_weights)
        return OnnxArtifact(data, names, qmodel, threads)


__all__ = ["OnnxBackend", "OnnxArtifact", "read_onnx"]
