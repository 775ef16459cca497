"""Float zero points (``QuantSpec.zero_point_dtype``): ``x = s (q - z) = s q + m`` with a float ``z``
(the minimum ``m = -s z``), the form llama.cpp's Q4_1 and K-quants store. The integer zero point
cannot express a float minimum: weights on a Q4_1 grid are recovered exactly only by the float form
(the negative control). Covers the format numerics, validation, convert (stored bytes, double
quantization), GPTQ on that grid, and the backends that must refuse it by name."""
import dataclasses

import pytest
import torch
from torch import nn

import qcompile
from qcompile.algorithms.common import fake_quantize
from qcompile.algorithms.gptq import gptq_quantize
from qcompile.errors import BackendError, RecipeError
from qcompile.formats import get_format
from qcompile.observers import weight_qparams
from qcompile.ops import DEQUANTIZE
from qcompile.recipe import LayerConfig, Recipe, WeightAlgorithmConfig
from qcompile.spec import QuantSpec


def _q4_1_weight(n=16, k=64, g=32, seed=0):
    """A weight sitting exactly on a Q4_1 grid: per group of ``g`` a float scale and a float minimum,
    every group using codes 0 and 15 (so min-max recovers its scale and minimum)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // g, g), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    d = torch.rand(n, k // g, 1, generator=gen) * 0.01 + 0.002
    m = -torch.rand(n, k // g, 1, generator=gen) * 0.1 + 0.02     # some groups entirely positive
    return (codes.float() * d + m).reshape(n, k)


def _spec(zero_point_dtype, scale_dtype="float32", group=32):
    return QuantSpec("uint4", "per_group", symmetric=False, group_size=group, scale_dtype=scale_dtype,
                     zero_point_dtype=zero_point_dtype)


def test_float_zero_point_recovers_a_q4_1_grid_that_the_integer_one_cannot():
    w = _q4_1_weight()
    err = {}
    for zd in ("code", "float32", "float16"):
        spec = _spec(zd)
        s, z = weight_qparams(w, spec)
        assert z.dtype == {"code": torch.uint8, "float32": torch.float32, "float16": torch.float16}[zd]
        err[zd] = float((fake_quantize(w, spec, s, z) - w).abs().max())
    step = float(w.abs().max()) / 2 ** 20
    assert err["float32"] < step                   # exact, up to float32 rounding
    assert err["float16"] < 0.05 * 0.002           # z rounded to float16: a small fraction of a step
    assert err["code"] > 100 * err["float32"]      # an integer zero point shifts the grid: lost


def test_float_zero_point_format_numerics():
    fmt = get_format("uint4")
    lo, hi = torch.tensor([0.5, -2.0]), torch.tensor([2.0, -0.5])    # ranges that exclude 0
    s, z = fmt.choose_qparams(lo, hi, False, float_zero_point=True)
    assert z.is_floating_point()
    torch.testing.assert_close(fmt.dequantize(torch.zeros(2, dtype=torch.uint8), s, z), lo)
    torch.testing.assert_close(fmt.dequantize(torch.full((2,), 15, dtype=torch.uint8), s, z), hi)
    # the integer zero point widens each range to include 0: a coarser step
    s_int, _ = fmt.choose_qparams(lo, hi, False)
    assert (s_int > 1.3 * s).all()
    with pytest.raises(RecipeError, match="zero_point_dtype"):
        get_format("nf4").choose_qparams(lo, hi, False, float_zero_point=True)


@pytest.mark.parametrize("spec, match", [
    (QuantSpec("uint4", "per_group", group_size=32, symmetric=True, zero_point_dtype="float16"), "asymmetric"),
    (QuantSpec("nf4", "per_group", group_size=32, zero_point_dtype="float16"), "integer"),
    (QuantSpec("uint8", "per_token", symmetric=False, dynamic=True, zero_point_dtype="float32"), "zero_point_dtype"),
    (QuantSpec("uint4", "per_channel", symmetric=False, zero_point_dtype="int8"), "per_group"),
    (QuantSpec("uint4", "per_group", group_size=32, symmetric=False, zero_point_dtype="fp16"), "did you mean"),
])
def test_zero_point_dtype_validation_names_the_field(spec, match):
    with pytest.raises(RecipeError, match=match) as e:
        spec.validate("default.weight")
    assert e.value.field == "default.weight.zero_point_dtype"


def test_recipe_round_trip_keeps_the_zero_point_dtype():
    r = Recipe(name="m", default=LayerConfig(_spec("int8", "int8")))
    d = r.to_dict()
    assert d["default"]["weight"]["zero_point_dtype"] == "int8"
    assert Recipe.from_dict(d) == r
    assert "zero_point_dtype" not in Recipe(name="c", default=LayerConfig(_spec("code"))).to_dict()["default"]["weight"]


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 256, bias=False), nn.Linear(256, 64, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(_q4_1_weight(256, 64, seed=1))
            self.b.weight.copy_(_q4_1_weight(64, 256, seed=2))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _data(n=4):
    return [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(n)]


def _rel(model, q, data):
    with torch.no_grad():
        num = sum(float((model(x) - q(x)).pow(2).sum()) for (x,) in data)
        den = sum(float(model(x).pow(2).sum()) for (x,) in data)
    return num / den


@pytest.mark.parametrize("zero_point_dtype, extra_bits", [("float16", 16 / 32), ("int8", 8 / 32)])
def test_convert_stores_float_zero_points_and_counts_their_bytes(zero_point_dtype, extra_bits):
    """uint4 g32, int8 scales: 4 + 8/32 bits, plus the zero points (float16: 16 bits per group; int8
    double-quantized: 8 bits per group and a float32 block scale per 256) — and on Q4_1 weights the
    float zero point's output error is far below the integer one's at the same bits (int8)."""
    model = _Two().eval()
    data = _data()
    quant = {}
    for zd in (zero_point_dtype, "code"):
        r = Recipe(name=zd, default=LayerConfig(_spec(zd, "int8")))
        quant[zd] = qcompile.quantize(model, r, data[0], calibration=data)
    q = quant[zero_point_dtype]
    gm = q.graph_module
    dqs = [n for n in gm.graph.nodes if n.target == DEQUANTIZE and n.args[3] == "uint4"]
    assert len(dqs) == 2
    for dq in dqs:
        z = dq.args[2]
        if zero_point_dtype == "float16":
            assert getattr(gm, z.target).dtype == torch.float16
        else:   # rebuilt in the graph from int8 codes
            while z.target != DEQUANTIZE:
                z = z.args[0]
            assert getattr(gm, z.args[0].target).dtype == torch.int8
    bits = sum(8 * row.weight_bytes_quantized for row in q.report.layers if row.weight_bytes_float)
    numel = sum(row.weight_bytes_float // 4 for row in q.report.layers if row.weight_bytes_float)
    assert 4 + 8 / 32 + extra_bits <= bits / numel < 4 + 8 / 32 + extra_bits + 0.01
    assert _rel(model, q, data) < 0.2 * _rel(model, quant["code"], data)


def test_gptq_with_float_zero_points_solves_on_their_grid():
    """GPTQ with double-quantized scales and zero points: less output error than round-to-nearest
    on the same grid, and the solved weight is the converted graph's weight bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(256, 64, generator=gen)
    w = torch.randn(16, 64, generator=gen) * 0.05
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    spec = _spec("int8", "int8")
    w_q, s, z, _ = gptq_quantize(w, h, spec, block_size=16)
    assert z.is_floating_point()
    err = lambda a: float((x @ (w - a).t()).pow(2).mean())   # noqa: E731
    assert err(w_q) < 0.6 * err(fake_quantize(w, spec, s, z))
    assert torch.equal(fake_quantize(w_q, spec, s, z), w_q)
    assert not torch.equal(fake_quantize(w_q, dataclasses.replace(spec, zero_point_dtype="float32"), s, z), w_q)


def test_gptq_preset_with_float_zero_points_end_to_end():
    model = _Two().eval()
    data = _data()
    r = Recipe(name="m", default=LayerConfig(_spec("int8", "int8")), weight_algorithm=WeightAlgorithmConfig("gptq"),
               calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(model, r, data[0], calibration=data)
    assert [e["method"] for e in q.report.weight_algorithm] == ["gptq", "gptq"]
    assert _rel(model, q, data) < 1e-3


def test_onnx_lowering_refuses_a_float_zero_point_by_name():
    pytest.importorskip("onnx")
    model = _Two().eval()
    data = _data(2)
    q = qcompile.quantize(model, Recipe(name="m", default=LayerConfig(_spec("float16"))), data[0], calibration=data)
    with pytest.raises(BackendError, match="float zero point.*zero_point_dtype: float16"):
        qcompile.lower(q, backend="onnx")


def test_tvm_lowering_refuses_a_float_zero_point_by_name():
    pytest.importorskip("tvm")
    model = _Two().eval()
    data = _data(2)
    spec = QuantSpec("uint8", "per_channel", symmetric=False, zero_point_dtype="float32")
    q = qcompile.quantize(model, Recipe(name="m", default=LayerConfig(spec)), data[0], calibration=data)
    with pytest.raises(BackendError, match="float zero point.*zero_point_dtype: float32"):
        qcompile.lower(q, backend="tvm")


@pytest.mark.parametrize("zero_point_dtype", ["float16", "int8"])
def test_float_zero_points_save_and_load_bit_exact(tmp_path, zero_point_dtype):
    """The artifact stores them (float16 as float16; int8 as codes, block scales and offset) and
    the loaded model gives the same outputs; the int8 form costs what uint8 code zero points cost
    plus its float32 block scales (one per 256 zero points) and offset."""
    model = _Two().eval()
    data = _data(2)
    from qcompile.artifact import stored_nbytes

    q = {zd: qcompile.quantize(model, Recipe(name=zd, default=LayerConfig(_spec(zd, "int8"))), data[0],
                               calibration=data) for zd in (zero_point_dtype, "code")}
    q[zero_point_dtype].save(tmp_path / "a")
    loaded = qcompile.load(tmp_path / "a")
    x = data[1][0]
    assert torch.equal(loaded(x), q[zero_point_dtype](x))
    extra = stored_nbytes(q[zero_point_dtype].graph_module) - stored_nbytes(q["code"].graph_module)
    groups = 256 * 64 // 32 + 64 * 256 // 32           # 512 per layer: 2 blocks of 256 each
    assert extra == (groups if zero_point_dtype == "float16" else 2 * (2 * 4 + 4))
