"""Integer conv2d on the tvm backend (qcompile/backends/tvm/conv.py): FuseInt8ConvPass's graph
structure, the op's PyTorch implementation against a float64 conv on dequantized values, the TIR
im2col against the PyTorch one, lowered CNNs against the reference backend (padding, stride 2,
dilation, odd and changing spatial sizes, Cin*KH*KW not a multiple of 4, int8 and uint8, static and
dynamic activations), the digits CNN through qcompile.verify, and the convs that must not fuse."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import qcompile
from backend_conformance import _quantize, assert_matches_reference
from conftest import randomise_bn
from qcompile.presets import INT8_WEIGHT
from qcompile.recipe import LayerConfig, Recipe
from qcompile.spec import QuantSpec

pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm.conv import (INT8_CONV2D, FuseInt8ConvPass, im2col_codes, im2col_kernel,  # noqa: E402
                                        int8_conv2d, pack_conv_weights)
from qcompile.backends.tvm.host import compile_kernel, detect  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import qat_digits  # noqa: E402

aten = torch.ops.aten


def _recipe(name: str, act: QuantSpec, weight: QuantSpec = INT8_WEIGHT) -> Recipe:
    return Recipe(name=name, default=LayerConfig(weight, act))


STATIC_S8 = _recipe("s8-static", QuantSpec("int8", "per_tensor", symmetric=True))   # no zero point, +128 shift
DYNAMIC_U8 = _recipe("u8-dynamic", QuantSpec("uint8", "per_tensor", symmetric=False, dynamic=True))  # run-time zp


class OddCNN(nn.Module):
    """Convs the kernels must get right: stride 2 with padding on odd sizes (K = 27), a 3x5 kernel
    (K = 120), dilation 2 with padding 2 (K = 108), then a depthwise conv (not fused) and a global
    pool, so the spatial size stays dynamic."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, (3, 5), padding=(1, 2))
        self.conv3 = nn.Conv2d(12, 10, 3, padding=2, dilation=2, bias=False)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.dw(torch.relu(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


_QUANTIZED: dict = {}   # recipe name -> quantized OddCNN, shared by the tests (they only read it)


def _odd_cnn_and_inputs(recipe):
    """(the quantized OddCNN, a generator for test inputs)."""
    if recipe.name not in _QUANTIZED:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(3, 3, 11, 9, generator=g),) for _ in range(3)]
        # other image sizes are tested: ask for dynamic H and W (qcompile's default keeps them static)
        _QUANTIZED[recipe.name] = _quantize(randomise_bn(OddCNN()).eval(), recipe, batches,
                                            dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}})
    return _QUANTIZED[recipe.name], torch.Generator().manual_seed(4)


def _conv_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.conv2d.default, INT8_CONV2D)]


def test_pass_fuses_the_convs_and_keeps_the_reference_numerics():
    q, g = _odd_cnn_and_inputs(STATIC_S8)
    gm = copy.deepcopy(q.graph_module)
    result = FuseInt8ConvPass()(gm)
    assert result.modified
    targets = [n.target for n in _conv_nodes(gm)]
    assert targets == [INT8_CONV2D] * 3 + [aten.conv2d.default], targets
    assert result.fused == dict.fromkeys(["conv2d", "conv2d_1", "conv2d_2"], "qcompile_tvm::int8_conv2d")
    assert result.skipped == {"conv2d_3": "groups=10 (grouped or depthwise conv) has no integer kernel (only groups=1)"}
    fused = [n for n in gm.graph.nodes if n.target == INT8_CONV2D]
    packed = [getattr(gm, n.args[3].target) for n in fused]
    # K = 27, 120, 108 padded to multiples of 4 (28, 120, 108); Cout padded to 48
    assert [tuple(w.shape) for w in packed] == [(3, 7, 64), (3, 30, 64), (3, 27, 64)]
    assert [n.args[8:12] for n in fused] == [([3, 3], [2, 2], [1, 1], [1, 1]), ([3, 5], [1, 1], [1, 2], [1, 1]),
                                             ([3, 3], [1, 1], [2, 2], [2, 2])]
    with torch.no_grad():
        for x in (torch.randn(2, 3, 11, 9, generator=g), torch.randn(1, 3, 7, 13, generator=g)):
            assert_matches_reference(gm(x), q.graph_module(x), rel=1e-2)


@pytest.mark.parametrize("a_format,zero", [("uint8", 37), ("int8", None)])
@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 5), (1, 1), (1, 2), (1, 1)),
                                      ((3, 3), (1, 2), (2, 1), (2, 1))])
def test_op_matches_a_float64_conv_on_dequantized_values(a_format, zero, geometry):
    kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(0)
    lo, hi = (0, 256) if a_format == "uint8" else (-128, 128)
    a = torch.randint(lo, hi, (2, 5, 9, 11), generator=g).to(torch.uint8 if a_format == "uint8" else torch.int8)
    w = torch.randint(-127, 128, (7, 5, *kernel), generator=g).to(torch.int8)
    sa, sw, bias = torch.tensor(0.02), torch.rand(7, 1, 1, 1, generator=g) * 0.01 + 1e-3, torch.randn(7, generator=g)
    za = None if zero is None else torch.tensor(zero, dtype=torch.uint8)
    packed, colsum, swp = pack_conv_weights(w, sw)
    bp = torch.zeros(swp.shape)   # padded like fuse.padded_bias
    bp[:7] = bias
    out = int8_conv2d(a, sa, za, packed, colsum, swp, bp, 7, list(kernel), list(stride), list(padding),
                      list(dilation), a_format)
    xa = (a.double() - (0 if zero is None else zero)) * sa.double()
    ref = torch.nn.functional.conv2d(xa, w.double() * sw.double(), bias.double(), stride, padding, dilation)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # exact integer products: only the float32 epilogue rounds (a few ulps of the output)
    assert (out.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_im2col_kernel_is_bit_exact_against_pytorch():
    import tvm

    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (2, 3, 10, 7), generator=g).to(torch.int8)
    kernel, stride, padding, dilation = [3, 2], [2, 1], [2, 1], [2, 3]
    ref, za = im2col_codes(a, torch.tensor(-5, dtype=torch.int8), kernel, stride, padding, dilation, "int8")
    assert int(za) == 123 and ref.shape[1] == 20   # K = 18 padded to 20
    lib = compile_kernel(im2col_kernel(3, *kernel, stride, padding, dilation, "int8"))
    oh, ow = (10 + 4 - 2 * 2 - 1) // 2 + 1, (7 + 2 - 3 * 1 - 1) // 1 + 1
    out = tvm.runtime.tensor(np.zeros((2, oh, ow, 20), np.uint8))
    lib["main"](tvm.runtime.tensor(a.permute(0, 2, 3, 1).contiguous().numpy()), tvm.runtime.tensor(za.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()).reshape(-1, 20), ref)


@pytest.mark.parametrize("recipe", [STATIC_S8, DYNAMIC_U8], ids=["static-int8", "dynamic-uint8"])
def test_lowered_cnn_matches_reference(recipe):
    q, g = _odd_cnn_and_inputs(recipe)
    art = qcompile.lower(q, backend="tvm")
    assert {"conv2d", "conv2d_1", "conv2d_2"} <= set(art.meta["fused"])
    assert "depthwise" in art.meta["skipped"]["conv2d_3"]   # runs as a float conv on dequantized weights
    with torch.no_grad():
        for shape in [(3, 3, 11, 9), (2, 3, 7, 13), (1, 3, 16, 16)]:   # odd and even, other than the example
            x = torch.randn(*shape, generator=g)
            # conv outputs are quantized again: a float-rounding tie can move a code by one step
            assert_matches_reference(art(x), q(x), rel=1e-2)
    inputs = [(torch.randn(2, 3, 11, 9, generator=g),), (torch.randn(4, 3, 9, 9, generator=g),)]
    parity = qcompile.verify(art, q, inputs)
    assert parity.passed, str(parity)


def test_lowered_cnn_on_the_avx2_family_matches_reference():
    """The convs' GEMMs on the ``avx2`` kernel, whose weights the converter splits from the packed
    constant: same fusions, the reference's numerics."""
    if "avx2" not in detect().flags:
        pytest.skip("kernel family 'avx2' needs the CPU feature avx2, which this host lacks")
    q, g = _odd_cnn_and_inputs(STATIC_S8)
    art = qcompile.lower(q, backend="tvm", family="avx2")
    assert art.family == "avx2" and {"conv2d", "conv2d_1", "conv2d_2"} <= set(art.meta["fused"])
    with torch.no_grad():
        for shape in [(3, 3, 11, 9), (1, 3, 16, 16)]:
            x = torch.randn(*shape, generator=g)
            assert_matches_reference(art(x), q(x), rel=1e-2)


def test_digits_cnn_lowered_with_integer_convs_passes_verify():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn (the 'dev' extra)")
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = qat_digits.load_data()
    model = qat_digits.train(qat_digits.DigitsCNN(), x_tr, y_tr, epochs=1, lr=3e-3)   # real weights, quickly
    q = _quantize(model, "w8a8", [(x_tr[i:i + 256],) for i in range(0, 768, 256)])
    art = qcompile.lower(q, backend="tvm")
    assert art.meta["fused"] == ["linear", "conv2d", "conv2d_1"] and art.meta["skipped"] == {}
    parity = qcompile.verify(art, q, [(x_te[:128],), (x_te[128:],)])
    assert parity.passed, str(parity)
    assert qat_digits.accuracy(lambda t: art(t), x_te, y_te) == qat_digits.accuracy(q, x_te, y_te)


class _Convs(nn.Module):
    """A conv1d and a transposed conv next to a plain conv2d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(4, 4, 2, stride=2)

    def forward(self, x):
        y = self.c1(x.flatten(2)).reshape(x.shape)
        return self.t2(self.c2(y))


@pytest.mark.parametrize("recipe,model,expected", [
    ("w8a8-dynamic", OddCNN, "activation scale is per_token: an im2col row mixes rows of the input"),
    (_recipe("asym-w", QuantSpec("uint8", "per_tensor", symmetric=False),
             QuantSpec("int8", "per_channel", symmetric=False)),
     OddCNN, "asymmetric weights (a weight zero point) are not fused"),
    ("w8", OddCNN, "the input is not dequantized (weight-only or float layer)"),
    ("w8a8", _Convs, "conv1d has no integer kernel (only conv2d is built)"),
])
def test_convs_that_do_not_fuse_say_why(recipe, model, expected):
    torch.manual_seed(0)
    shape = (2, 3, 11, 9) if model is OddCNN else (2, 4, 6, 6)
    q = _quantize(model().eval(), recipe, [(torch.randn(*shape),) for _ in range(2)])
    gm = copy.deepcopy(q.graph_module)
    result = FuseInt8ConvPass()(gm)
    assert any(reason.startswith(expected) for reason in result.skipped.values()), result.skipped
    if model is _Convs:
        assert list(result.fused) == ["conv2d"], result.skipped
        assert any("transposed" in reason for reason in result.skipped.values()), result.skipped
    else:
        assert not result.fused
