"""The triton backend (id ``triton-cuda``, alias ``triton``): quantized Linears of the converted
graph run as Triton kernels (weight-only int4/int8/NF4 GEMM/GEMV, W8A8 integer GEMM, fused
activation quantization), everything else as PyTorch, in an ``nn.Module`` called like the model.

On a CUDA machine the kernels compile for the GPU (move the artifact and inputs with
``.to('cuda')``, or lower with ``device='cuda'``). Without a GPU, ``TRITON_INTERPRET=1`` set before
triton is imported runs the same kernels on CPU tensors in Triton's interpreter (slow: for tests).
See docs/triton.md."""
from __future__ import annotations

import torch

from ...errors import BackendError
from ..base import WEIGHT_GRANULARITIES, Capabilities
from . import graph_ops
from .activation_quant import ACTIVATION_FORMATS
from .fp8 import FP8_FORMATS
from .lower import FuseTritonKernelsPass, QuantizeActivationsPass, lower_graph
from .runtime import TritonArtifact
from .weight_only import WEIGHT_FORMATS


class TritonBackend:
    id = "triton-cuda"
    # what its kernel tables take; everything else stays PyTorch, named in the artifact's skipped.
    # Weights: the weight-only GEMM's formats (W8A8 and the FP8 GEMM take subsets of them).
    # Activations: the quantize kernels' formats (static per tensor, dynamic per token; W8A8 reads
    # their codes) and FP8 static per tensor (the FP8 GEMM, on per-channel fp8 weights, compute
    # capability 8.9+; a dynamic scale comes with choose_qparams' zero point, which it does not take).
    capabilities = Capabilities(
        weights={fmt: WEIGHT_GRANULARITIES for fmt in WEIGHT_FORMATS},
        activations={**{fmt: {"static per_tensor", "dynamic per_token"} for fmt in ACTIVATION_FORMATS},
                     **{fmt: {"static per_tensor"} for fmt in FP8_FORMATS}},
        ops={"linear"}, fallback="pytorch",
        timing_missing="latency budgets on triton-cuda: per-layer kernel timing on a GPU is not built; "
                       "use backend='onnx'")

    def lower(self, qmodel, device=None, autotune: bool = False) -> TritonArtifact:
        """``device``: where the artifact's buffers go (default: ``cuda`` on a GPU, ``cpu`` under
        the interpreter). ``autotune``: time the configuration table's candidates once per shape
        bucket on the GPU and keep the fastest (ignored under the interpreter)."""
        if graph_ops.INTERPRET:
            device = torch.device(device or "cpu")
            if device.type != "cpu":
                raise BackendError(f"TRITON_INTERPRET=1 runs Triton kernels on CPU tensors; device '{device}' "
                                   "needs a GPU run without the interpreter")
        else:
            if not torch.cuda.is_available():
                raise BackendError("backend 'triton-cuda' needs a CUDA GPU and none is available (torch "
                                   f"{torch.__version__}, cuda: {torch.version.cuda}); to run its kernels on the CPU "
                                   "for testing set TRITON_INTERPRET=1 before triton is imported")
            device = torch.device(device or "cuda")
        fp8_gemm = graph_ops.INTERPRET or torch.cuda.get_device_capability(device) >= (8, 9)
        gm, fuse, _ = lower_graph(qmodel.graph_module, fp8_gemm, bool(autotune))
        return TritonArtifact(gm, qmodel, fuse.fused, fuse.skipped).to(device)


__all__ = ["TritonBackend", "TritonArtifact", "FuseTritonKernelsPass", "QuantizeActivationsPass"]
