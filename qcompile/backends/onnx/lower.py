"""Lower a converted qcompile model to an ONNX file with standard QuantizeLinear/DequantizeLinear.

Steps: copy the Q/DQ graph → :class:`TransposeLinearWeightsPass` (so a weight's DequantizeLinear
feeds MatMul directly, the pattern onnxruntime's QDQ fusion looks for, instead of DQ → Transpose
→ MatMul) → ``torch.export`` → ``torch.onnx.export(dynamo=True)`` with :mod:`.translate` for the
qcompile ops → ``onnx.checker``."""
from __future__ import annotations

import copy
import io

import torch

from ...errors import BackendError
from ...ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ...passes.infra import Pass, PassManager, PassResult, add_tensor, get_attr_tensor, prune_unused_tensors
from . import translate

aten = torch.ops.aten
OPSET = 21  # blocked Q/DQ and 4-bit types need 21; plain int8 Q/DQ runs on every opset >= 13


class TransposeLinearWeightsPass(Pass):
    """``linear(x, dequantize(Wq[N,K], s[N,1]), b)`` ⇒ ``matmul(x, dequantize(Wq^T[K,N], s^T[1,N])) + b``."""

    name = "transpose_linear_weights"

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.target != aten.linear.default:
                continue
            dq = node.args[1]
            if getattr(dq, "target", None) != DEQUANTIZE or dq.args[4] != 0 or len(dq.users) != 1:
                continue
            q, s, z = (get_attr_tensor(gm, a) for a in dq.args[:3])
            if q is None or s is None or q.dim() != 2:
                continue
            args = [add_tensor(gm, f"{dq.args[0].target}_t", q.t().contiguous(), dq)]
            args.append(add_tensor(gm, f"{dq.args[1].target}_t", s.t().contiguous() if s.dim() == 2 else s, dq))
            args.append(None if z is None else add_tensor(gm, f"{dq.args[2].target}_t",
                                                          z.t().contiguous() if z.dim() == 2 else z, dq))
            with gm.graph.inserting_before(node):
                new_dq = gm.graph.call_function(DEQUANTIZE, (*args, *dq.args[3:]))
                out = gm.graph.call_function(aten.matmul.default, (node.args[0], new_dq))
                if len(node.args) > 2 and node.args[2] is not None:
                    out = gm.graph.call_function(aten.add.Tensor, (out, node.args[2]))
            new_dq.meta, out.meta = dict(dq.meta), dict(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)


def export_onnx(qmodel, opset: int = OPSET) -> tuple[bytes, list[str]]:
    """(ONNX model bytes, input names) for a :class:`~qcompile.model.QuantizedModel`."""
    if qmodel._example is None:
        raise BackendError("this model has no capture examples (it was loaded from disk): lowering a loaded "
                           "model to onnx is not yet built; lower the model returned by quantize()")
    gm = copy.deepcopy(qmodel.graph_module)
    PassManager([TransposeLinearWeightsPass()])(gm)
    prune_unused_tensors(gm)
    args, kwargs, dynamic_shapes = qmodel._example
    ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
    table = {QUANTIZE: translate.quantize, DEQUANTIZE: translate.dequantize, CHOOSE_QPARAMS: translate.choose_qparams}
    try:
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=opset,
                                    verbose=False, optimize=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the node that failed when torch names it
        root = e
        while root.__cause__ is not None and not isinstance(root, BackendError):
            root = root.__cause__
        if isinstance(root, BackendError):
            raise root from e
        raise BackendError(f"torch.onnx.export failed: {str(e).splitlines()[0][:400]}") from e
    buf = io.BytesIO()
    program.save(buf)
    data = buf.getvalue()
    import onnx

    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    return data, [i.name for i in model.graph.input]
