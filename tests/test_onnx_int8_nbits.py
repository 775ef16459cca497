"""8-bit weights through onnxruntime's MatMulNBits at accuracy level 4 (int8 activations in blocks
of K): the ``w8-g*-a8`` presets, whose reference computes the kernel's numerics, and int8
weight-only Linears when level 4 is asked for (MLAS's only fast 8-bit path: at levels 0/1 it
dequantizes the whole weight on every call)."""
import pytest
import torch

import qcompile

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(192, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return _TwoLinears().eval(), torch.randn(3, 192)


def _nbits(art):
    model = onnx.load_from_string(art.model_bytes)
    return [{a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
            for n in model.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("group", [32, 64])
def test_w8_a8_lowers_to_8bit_matmulnbits_level4_matching_the_reference(model_and_input, group):
    model, x = model_and_input
    q = qcompile.quantize(model, f"w8-g{group}-a8", (x,), calibration=[(x,)])
    art = qcompile.lower(q, "onnx", threads=1)
    assert [(a["bits"], a["block_size"], a["accuracy_level"]) for a in _nbits(art)] == [(8, group, 4)] * 2
    reference, got = q(x), art(x)
    # the reference quantizes the activations as MLAS does: equal up to float summation order
    assert torch.allclose(got, reference, atol=1e-5), float((got - reference).abs().max())
    assert (reference - model(x)).abs().max() > 1e-4     # and it is not the float model


def test_int8_weight_only_uses_8bit_matmulnbits_only_when_level4_is_asked(model_and_input):
    model, x = model_and_input
    q = qcompile.quantize(model, "w8", (x,), calibration=[(x,)])
    exact = qcompile.lower(q, "onnx", threads=1)
    assert _nbits(exact) == []                            # level 0: the recipe's float activations
    assert torch.allclose(exact(x), q(x), atol=1e-5)
    fast = qcompile.lower(q, "onnx", threads=1, nbits_accuracy_level=4)
    # per-channel int8 weights: blocks that divide K (192 -> 64, 128 -> 128), each with the row's scale
    assert [(a["bits"], a["block_size"], a["accuracy_level"]) for a in _nbits(fast)] == [(8, 64, 4), (8, 128, 4)]
    err = (fast(x) - q(x)).abs().max()
    assert 0 < err < 0.02 * q(x).abs().max()               # int8 activations: close, not equal


def test_int8_nbits_packing_round_trips():
    from qcompile.backends.onnx.contrib import pack_nbits, unpack_nbits

    codes = torch.randint(0, 256, (5, 96), dtype=torch.int32)
    scales = torch.rand(5, 3)
    zero = torch.randint(0, 256, (5, 3), dtype=torch.int32)
    packed = pack_nbits(codes, 32, bits=8)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    w = unpack_nbits(packed, scales, zero.to(torch.uint8), 96, 5, 8, 32)
    expected = (codes.float().reshape(5, 3, 32) - zero[..., None]) * scales[..., None]
    assert torch.equal(w, expected.reshape(5, 96))
    with pytest.raises(NotImplementedError, match="4 and 8"):
        pack_nbits(codes, 32, bits=3)


def test_activation_blocks_other_than_the_weight_groups_are_refused(model_and_input):
    # negative: int8 weights in groups of 32 with activation blocks of 64 are no MatMulNBits
    from qcompile.recipe import LayerConfig, Recipe
    from qcompile.spec import QuantSpec

    model, x = model_and_input
    recipe = Recipe(name="w8-g32-a8-mismatch", default=LayerConfig(
        QuantSpec("int8", "per_group", symmetric=True, group_size=32),
        QuantSpec("int8", "per_token_group", symmetric=True, group_size=64, dynamic=True)))
    q = qcompile.quantize(model, recipe, (x,), calibration=[(x,)])
    with pytest.raises(NotImplementedError, match="MatMulNBits"):
        qcompile.lower(q, "onnx", threads=1)
