"""The artifact the triton backend returns: an ``nn.Module`` running the lowered graph."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...capture import flatten_inputs
from ...distributed import writes_on_rank_zero
from ...ops import QUANTIZE
from ...passes.infra import get_attr_tensor
from . import graph_ops


class TritonArtifact(nn.Module):
    """Called like the quantized model (same arguments, same output structure). Quantized Linears
    run Triton kernels; the rest of the graph is PyTorch. ``.to('cuda')`` moves its buffers (the
    packed weights); ``fused`` / ``skipped`` say which Linears run which kernel and why not."""

    backend = "triton-cuda"

    def __init__(self, graph_module: torch.fx.GraphModule, qmodel, fused: dict, skipped: dict):
        super().__init__()
        self.graph_module = graph_module
        self.fused, self.skipped = fused, skipped
        self._binder = qmodel.binder
        self._qmodel = [qmodel]  # a list: not registered as a submodule (no second copy of weights)

    def forward(self, *args, **kwargs):
        args, kwargs = self._binder.call(args, dict(kwargs))
        return self.graph_module(*args, **kwargs)

    def quantized_activations(self, *args, **kwargs) -> list:
        """``[(scale, codes)]`` of every static activation quantizer (Triton or PyTorch), in graph
        order, for :func:`qcompile.verify`."""
        gm = self.graph_module
        points = [n for n in gm.graph.nodes
                  if (n.target is graph_ops.quantize_static or n.target == QUANTIZE)
                  and get_attr_tensor(gm, n.args[1]) is not None]
        codes = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in points:
                    codes[n] = out.detach().clone()
                return out

        a, k = self._binder.call(args, dict(kwargs))
        with torch.no_grad():
            Recorder(gm).run(*flatten_inputs(gm, a, k))
        return [(float(get_attr_tensor(gm, n.args[1])), codes[n]) for n in points]

    @writes_on_rank_zero
    def save(self, path) -> Path:
        """Write the quantized model (``qcompile.load`` reads it; lowering it again rebuilds the
        same packed weights, which are a deterministic function of the codes) and ``triton.json``
        listing the kernel of each Linear."""
        # triton.json goes into the same atomic, checksummed save (not written after it)
        return Path(self._qmodel[0].save(path, extra_files={"triton.json": json.dumps(
            {"backend": self.backend, "fused": self.fused, "skipped": self.skipped}, indent=1)}))
