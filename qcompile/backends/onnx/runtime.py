"""Run an exported ONNX model in onnxruntime with the PyTorch model's call signature."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ...capture import flatten_inputs


class OnnxArtifact:
    """Callable like the quantized model (torch tensors in, torch tensors out, same structure).

    ``threads``: onnxruntime intra-op threads (1 for benchmarks: see docs/benchmarks.md)."""

    backend = "onnx"

    def __init__(self, model_bytes: bytes, input_names: list[str], qmodel, threads: int = 0):
        import onnxruntime as ort

        self.model_bytes = model_bytes
        self.input_names = input_names
        self._binder = qmodel.binder
        self._gm = qmodel.graph_module
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime fuses int8 weight-only DQ -> MatMul into MatMulNBits and by default quantizes
        # its activations to int8 there (accuracy level 4): a different model than the recipe's.
        # Level 1 keeps them float, as the recipe says.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    def __call__(self, *args, **kwargs):
        args, kwargs = self._binder.call(args, dict(kwargs))
        flat = [t for t in flatten_inputs(self._gm, args, kwargs) if isinstance(t, torch.Tensor)]
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, flat)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        spec = getattr(self._gm, "_out_spec", None)
        return pytree.tree_unflatten(outs, spec) if spec is not None else tuple(outs)

    def save(self, path) -> Path:
        """Write the ``.onnx`` file (weights inside it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.model_bytes)
        os.replace(tmp, path)
        return path
