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
from ..base import Capabilities
from . import graph_ops
from .lower import FuseTritonKernelsPass, QuantizeActivationsPass, lower_graph
from .runtime import TritonArtifact


class TritonBackend:
    id = "triton-cuda"
    capabilities = Capabilities(formats=frozenset({"int8", "uint8", "int4", "uint4", "nf4", "fp8_e4m3", "fp8_e5m2"}),
                                granularities=frozenset({"per_tensor", "per_channel", "per_token", "per_group"}),
                                ops=frozenset({"linear"}), dynamic_activations=True)

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
