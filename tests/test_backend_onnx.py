import pytest
import torch

import qcompile
from backend_conformance import BackendConformance, _quantize
from conftest import TinyBlock

pytest.importorskip("onnxruntime", reason="the onnx backend needs the 'onnx' extra: pip install 'qcompile[onnx]'")
onnx = pytest.importorskip("onnx")


class TestOnnxBackend(BackendConformance):
    backend = "onnx"


def test_exported_graph_is_standard_qdq_with_dq_feeding_matmul():
    torch.manual_seed(0)
    batches = [(torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)) for _ in range(3)]
    art = qcompile.lower(_quantize(TinyBlock().eval(), "w8a8", batches), backend="onnx")
    model = onnx.load_from_string(art.model_bytes)
    onnx.checker.check_model(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weight_dq = [producers.get(n.input[1]) for n in matmuls]
    # every Linear's weight comes straight from a per-axis DequantizeLinear (no Transpose between)
    linear_dq = [d for d in weight_dq if d is not None and d.op_type == "DequantizeLinear"]
    assert len(linear_dq) == 6
    assert all(any(a.name == "axis" and a.i == 1 for a in d.attribute) for d in linear_dq)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 4  # one per activation edge
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims)  # batch and sequence stay dynamic


def test_unsupported_format_names_the_format():
    batches = [(torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long))]
    q = _quantize(TinyBlock().eval(), "w4-g64", batches)
    with pytest.raises(qcompile.BackendError, match="format 'uint4'"):
        qcompile.lower(q, backend="onnx")
