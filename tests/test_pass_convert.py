import pytest
import torch

from qcompile import CalibrationError, LayerConfig, QuantSpec, Recipe
from qcompile.calibration import run_calibration
from qcompile.capture import capture
from qcompile.ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from qcompile.passes import AnnotatePass, ConvertPass, InsertObserversPass
from qcompile.passes.annotate import annotated_nodes

from conftest import cosine

W8 = QuantSpec("int8", "per_channel")
A8 = QuantSpec("uint8", "per_tensor", symmetric=False)
A8_DYN = QuantSpec("uint8", "per_token", symmetric=False, dynamic=True)
W4G = QuantSpec("uint4", "per_group", symmetric=False, group_size=16)


def _observed(model, batch, recipe):
    gm = capture(model, batch).graph_module
    AnnotatePass(recipe)(gm)
    InsertObserversPass()(gm)
    return gm


def test_observers_are_shared_per_edge(tiny_block):
    model, batches = tiny_block
    gm = _observed(model, batches[0], Recipe(default=LayerConfig(W8, A8), embedding=LayerConfig(W8)))
    observers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("qobs")]
    # h -> q/k/v share one; x -> up, u -> down, x' -> head one each
    assert len(observers) == 4
    qkv = {n.args[0] for n, a in annotated_nodes(gm) if a.layer in ("q", "k", "v")}
    assert len(qkv) == 1 and gm.get_submodule(next(iter(qkv)).target).layers == ["q", "k", "v"]


def test_static_convert_structure_and_numerics(tiny_block):
    model, batches = tiny_block
    gm = _observed(model, batches[0], Recipe(default=LayerConfig(W8, A8), embedding=LayerConfig(W8)))
    run_calibration(lambda b: gm(*b), batches, progress=False)
    assert ConvertPass()(gm).modified
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("qobs")]
    for node, ann in annotated_nodes(gm):
        w = node.args[ann.weight_arg]
        assert w.target == DEQUANTIZE and w.args[3] == "int8"
        assert getattr(gm, w.args[0].target).dtype == torch.int8
        if ann.op == "linear":
            x = node.args[0]
            assert x.target == DEQUANTIZE and x.args[0].target == QUANTIZE and x.args[3] == "uint8"
    quantize_nodes = [n for n in gm.graph.nodes if n.target == QUANTIZE]
    assert len(quantize_nodes) == 4  # one per activation edge, shared by its readers
    with torch.no_grad():
        for b in batches:
            assert cosine(gm(*b), model(*b)) > 0.995


def test_dynamic_and_group_convert(tiny_block):
    model, batches = tiny_block
    gm = _observed(model, batches[0], Recipe(default=LayerConfig(W4G, A8_DYN)))
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("qobs")]
    ConvertPass()(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(CHOOSE_QPARAMS) == 4
    dq = [n for n in gm.graph.nodes if n.target == DEQUANTIZE and n.args[3] == "uint4"]
    assert dq and all(n.args[4] == 16 for n in dq)
    scale = getattr(gm, dq[0].args[1].target)
    assert scale.shape[-1] == 2  # 32 input features in groups of 16
    with torch.no_grad():
        for b in batches:
            assert cosine(gm(*b), model(*b)) > 0.98


def test_per_token_group_convert_matches_blockwise_int8_math(tiny_block):
    """per_token_group (w4-g*-a8): choose_qparams with the group, one symmetric int8 scale per token and
    K-block (amax / 127), and the Linear computes on exactly those dequantized blocks."""
    model, batches = tiny_block
    act = QuantSpec("int8", "per_token_group", group_size=16, dynamic=True)
    gm = _observed(model, batches[0], Recipe(default=LayerConfig(W4G, act)))
    ConvertPass()(gm)
    cq = [n for n in gm.graph.nodes if n.target == CHOOSE_QPARAMS]
    assert len(cq) == 4 and all(n.args[1:] == ("int8", True, True, 16) for n in cq)
    aq = [n for n in gm.graph.nodes if n.target == QUANTIZE and n.args[3] == "int8"]
    assert len(aq) == 4 and all(n.args[4] == 16 for n in aq)
    x = torch.randn(2, 5, 40)   # 40 = 16 + 16 + a short group of 8
    s, z = CHOOSE_QPARAMS(x, "int8", True, True, 16)
    assert s.shape == (2, 5, 3) and not z.any()
    for i, sl in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        blk = x[..., sl]
        torch.testing.assert_close(s[..., i], blk.abs().amax(-1) / 127)
        codes = QUANTIZE(x, s, z, "int8", 16)[..., sl]
        torch.testing.assert_close(codes.float(), torch.round(blk / s[..., i:i + 1]), atol=1, rtol=0)
    with torch.no_grad():
        for b in batches:
            assert cosine(gm(*b), model(*b)) > 0.98


def test_per_token_group_needs_per_token():
    with pytest.raises(ValueError, match="per_token"):
        CHOOSE_QPARAMS(torch.randn(2, 32), "int8", True, False, 16)


def test_convert_before_calibration_is_an_error(tiny_block):
    model, batches = tiny_block
    gm = _observed(model, batches[0], Recipe(default=LayerConfig(W8, A8)))
    with pytest.raises(CalibrationError) as e:
        ConvertPass()(gm)
    assert "q, k, v" in str(e.value) and "calibrate" in str(e.value)
