"""The onnx backend (id ``onnx``): the converted Q/DQ graph as standard ONNX
QuantizeLinear/DequantizeLinear, run by onnxruntime's CPU execution provider.

Built so far: int8/uint8 per-tensor and per-channel Q/DQ, dynamic per-token activation scales,
dynamic batch/sequence axes, ``onnx.checker``-valid files, a runner called like the model.
Not yet built: int4 weight-only as ``com.microsoft::MatMulNBits``, int8 embeddings as DQ → Gather
checks, onnxruntime transformer fusions, per-layer parity (issue 4)."""
from __future__ import annotations

from ..base import Capabilities
from .lower import OPSET, export_onnx
from .runtime import OnnxArtifact


class OnnxBackend:
    id = "onnx"
    capabilities = Capabilities(formats=frozenset({"int8", "uint8"}),
                                granularities=frozenset({"per_tensor", "per_channel", "per_token"}),
                                ops=frozenset({"linear", "conv", "embedding"}), dynamic_activations=True)

    def lower(self, qmodel, opset: int = OPSET, threads: int = 0) -> OnnxArtifact:
        data, names = export_onnx(qmodel, opset)
        return OnnxArtifact(data, names, qmodel, threads)


__all__ = ["OnnxBackend", "OnnxArtifact"]
