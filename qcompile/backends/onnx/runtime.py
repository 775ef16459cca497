"""Run an exported ONNX model in onnxruntime with the PyTorch model's call signature."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ...capture import flatten_inputs


def session_options(threads: int = 0):
    """The onnxruntime session options every qcompile session uses (artifacts and the per-layer
    latency sessions of :mod:`.timing` alike, so both time the same kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime fuses int8 weight-only DQ -> MatMul into MatMulNBits and by default quantizes
    # its activations to int8 there (accuracy level 4): a different model than the recipe's.
    # Level 1 keeps them float, as the recipe says.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


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
        opts = session_options(threads)
        self._options, self._debug = opts, {}
        self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    def __call__(self, *args, **kwargs):
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, self._feed(args, kwargs))]
        spec = getattr(self._gm, "_out_spec", None)
        return pytree.tree_unflatten(outs, spec) if spec is not None else tuple(outs)

    def _feed(self, args, kwargs) -> dict:
        args, kwargs = self._binder.call(args, dict(kwargs))
        flat = [t for t in flatten_inputs(self._gm, args, kwargs) if isinstance(t, torch.Tensor)]
        return {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, flat)}

    supports_forced_codes = True

    def quantized_activations(self, *args, forced=None, **kwargs) -> list:
        """``[(scale, codes)]`` of every static QuantizeLinear, in graph order (for
        :func:`qcompile.verify`). Runs a second session whose outputs include those codes.

        ``forced``: codes to feed *downstream* of each quantizer instead of the ones this session
        computes (teacher forcing): every layer then starts from the same codes as the reference,
        so a rounding flip in one layer does not propagate into the next one's comparison."""
        key = forced is not None
        if key not in self._debug:
            self._debug[key] = _expose_quantizers(self.model_bytes, self._options, forced=key)
        session, points = self._debug[key]
        feed = self._feed(args, kwargs)
        if forced is not None:
            if len(forced) != len(points):
                raise ValueError(f"{len(forced)} forced code tensors for {len(points)} quantizers")
            feed.update({f"{name}__forced": c.detach().cpu().numpy() for (name, _), c in zip(points, forced)})
        outs = session.run([name for name, _ in points], feed)
        return [(scale, torch.from_numpy(np.asarray(o))) for (_, scale), o in zip(points, outs)]

    def save(self, path) -> Path:
        """Write the ``.onnx`` file (weights inside it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.model_bytes)
        os.replace(tmp, path)
        return path


def _expose_quantizers(model_bytes: bytes, options, forced: bool = False):
    """(a session that also returns every static QuantizeLinear's codes, [(output name, scale)]).
    ``forced``: the quantizers' consumers read a new graph input ``<codes>__forced`` instead."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    points = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in consts:
            continue
        scale = numpy_helper.to_array(consts[node.input[1]])
        if scale.size != 1:
            continue
        zp_type = consts[node.input[2]].data_type if len(node.input) > 2 and node.input[2] in consts \
            else onnx.TensorProto.UINT8
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], zp_type, None))
        points.append((node.output[0], float(scale.reshape(()))))
        if forced:
            name = f"{node.output[0]}__forced"
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, zp_type, None))
            for other in model.graph.node:
                for i, inp in enumerate(other.input):
                    if inp == node.output[0]:
                        other.input[i] = name
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, points
