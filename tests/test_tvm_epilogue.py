"""The integer GEMM's requantizing epilogue (int8_gemm.gemm_kernel(epilogue=...)) and the pass that
uses it (qcompile/backends/tvm/epilogue.py): kernel codes against a float64 reference (equal but
for one step on exact rounding ties, counted and bounded), graph structure, negative cases (a
second consumer, a dynamic quantizer, a non-constant multiply), and end to end ``qcompile.verify``."""
import copy
import math

import numpy as np
import pytest
import torch

import qcompile
from backend_conformance import _quantize, assert_matches_reference
from conftest import TinyBlock

tvm = pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import int8_gemm  # noqa: E402
from qcompile.backends.tvm.epilogue import INT8_LINEAR_Q, FuseEpiloguePass, layer_norm_quantize_kernel  # noqa: E402
from qcompile.backends.tvm.fuse import INT8_LINEAR, FuseInt8LinearPass  # noqa: E402
from qcompile.backends.tvm.host import FAMILIES, compile_kernel, detect, runnable_families  # noqa: E402
from qcompile.backends.tvm.lower import import_relax  # noqa: E402
from qcompile.ops import QUANTIZE  # noqa: E402

HOST = detect()
# a tie tolerance in quantization steps: float32 rounding of the GEMM epilogue (and fast_erf's
# 3.7e-7 error) moves the pre-rounding value by ~1e-4 step at most on these magnitudes
TIE = 2e-3


def _families():
    return [f for f in runnable_families() if f in FAMILIES]


def _reference_codes(acc, za, cs, sa, sw, bias, cm, scale, zp, activation, out_dtype):
    """float64 codes and the pre-rounding values ``y * cm / scale`` (torch's erf GELU, exact)."""
    y = (acc - za.reshape(-1, 1) * cs).astype(np.float64) * (sa.reshape(-1, 1) * sw.astype(np.float64)) + bias
    if activation == "gelu":
        y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    elif activation == "relu":
        y = np.maximum(y, 0)
    t = y * cm / scale
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)
    return np.clip(np.round(t) + zp, lo, hi), t


@pytest.mark.parametrize("family", _families())
@pytest.mark.parametrize("m,k,n", [(10, 64, 48), (7, 32, 40), (1, 128, 96), (13, 256, 100)])
@pytest.mark.parametrize("epilogue", [("gelu", "uint8"), ("relu", "int8"), ("none", "uint8"), ("none", "int8")])
def test_requantizing_kernel_matches_float64_reference(family, m, k, n, epilogue):
    activation, out_dtype = epilogue
    rng = np.random.default_rng(m * 100 + k + n)
    np_ = int8_gemm.padded_n(n)
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, False, family, epilogue))
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    wfull = np.zeros((np_, k), np.int64)
    wfull[:n] = w
    acc = a.astype(np.int64) @ wfull.T
    cs = wfull.sum(1).astype(np.int32)
    sa, za = np.array([0.02], np.float32), np.array([rng.integers(0, 256)], np.int32)
    sw = (rng.random(np_) * 2e-3).astype(np.float32)
    bias = rng.standard_normal(np_).astype(np.float32)
    bias[n:] = 0   # padded like fuse.padded_bias
    cm = np.ones(np_, np.float32)
    cm[:n] = rng.uniform(0.5, 2.0, n)   # SmoothQuant's per-channel factor
    # a scale that puts the values over the whole code range, with some clamped at both ends
    zp = 128 if out_dtype == "uint8" else 0
    _, unscaled = _reference_codes(acc[:, :n], za, cs[:n], sa, sw[:n], bias[:n], cm[:n], 1.0, zp, activation,
                                   out_dtype)
    scale = np.float32(np.abs(unscaled).max() / 150)
    qinv = np.float32(1.0) / scale
    out = np.zeros((m, np_), out_dtype)
    args = [a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), cs, sa, za, sw, bias, cm, np.array([qinv]), np.array([zp], np.int32), out]
    t = [tvm.runtime.tensor(x, tvm.cpu()) for x in args]
    mod["main"](*t)
    got = t[-1].numpy()[:, :n].astype(np.int64)
    ref, pre = _reference_codes(acc[:, :n], za, cs[:n], sa, sw[:n], bias[:n], cm[:n], float(scale), zp,
                                activation, out_dtype)
    diff = np.abs(got - ref)
    assert diff.max() <= 1
    ties = np.abs(np.abs(pre - np.floor(pre)) - 0.5) < TIE
    assert not (diff[~ties]).any(), f"{int((diff[~ties] > 0).sum())} codes differ away from a rounding tie"
    assert (diff > 0).sum() <= max(1, ties.sum()), "more differences than near-tie values"
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)
    assert ((got == hi) | (got == lo)).any() and len(np.unique(got)) > 20   # the code range, clamping included
    # padding columns: y = 0 there, so their codes are the zero point (sliced off by the converter)
    assert (t[-1].numpy()[:, n:] == zp).all()


def test_requantizing_kernel_rounds_half_to_even_and_rejects_bad_epilogues():
    family = _families()[0]
    k, np_ = 4, 48
    mod = compile_kernel(int8_gemm.gemm_kernel(k, np_, False, family, ("none", "uint8")))
    # row i: acc = i, y = i * 0.5: every half step 0, 0.5, 1, 1.5, ... (ties at the odd rows)
    a = np.zeros((12, 4), np.uint8)
    a[:, 0] = np.arange(12)
    w = np.ones((np_, k), np.int8)
    acc = a.astype(np.int64).sum(1, keepdims=True) * np.ones((1, np_), np.int64)
    args = [a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), np.full(np_, 4, np.int32), np.array([0.5], np.float32),
            np.array([0], np.int32), np.ones(np_, np.float32), np.zeros(np_, np.float32), np.ones(np_, np.float32),
            np.array([1.0], np.float32), np.array([0], np.int32), np.zeros((12, np_), np.uint8)]
    t = [tvm.runtime.tensor(x, tvm.cpu()) for x in args]
    mod["main"](*t)
    expect = torch.round(torch.from_numpy(acc * 0.5)).numpy()   # torch.round: half to even, like the reference
    assert np.array_equal(t[-1].numpy(), expect.astype(np.uint8))
    assert (acc * 0.5 % 1 == 0.5).any()
    with pytest.raises(ValueError, match="unknown epilogue"):
        int8_gemm.gemm_kernel(64, 48, False, family, ("swish", "uint8"))
    with pytest.raises(ValueError, match="unknown epilogue"):
        int8_gemm.gemm_kernel(64, 48, False, family, ("gelu", "float32"))


class MLP(torch.nn.Module):
    """Linear → activation → Linear with a residual; ``share``: the activation output also feeds
    a second consumer (the negative case)."""

    def __init__(self, act="gelu", share=False, d=32, ff=96):
        super().__init__()
        self.inp, self.up, self.down = torch.nn.Linear(d, d), torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)
        self.act, self.share = act, share

    def forward(self, x):
        h = self.up(self.inp(x))
        h = torch.nn.functional.gelu(h) if self.act == "gelu" else torch.relu(h)
        out = x + self.down(h)
        return out + h.mean(-1, keepdim=True) if self.share else out


def _mlp(recipe="w8a8", **kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 7, 32, generator=g),) for _ in range(3)]
    return _quantize(MLP(**kw).eval(), recipe, batches), batches


def _fused(q):
    gm = copy.deepcopy(q.graph_module)
    FuseInt8LinearPass()(gm)
    return gm, FuseEpiloguePass()(gm)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_pass_fuses_activation_multiply_and_quantize(act):
    q, batches = _mlp(act=act)
    gm, result = _fused(q)
    assert result.modified and set(result.fused.values()) == {"qcompile_tvm::int8_linear_q"}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # inp → quantize (plain) and up → act → mul(smooth) → quantize fuse; down's output stays float
    assert targets.count(INT8_LINEAR_Q) == 2 and targets.count(INT8_LINEAR) == 1
    assert targets.count(QUANTIZE) == 1 and torch.ops.aten.gelu.default not in targets   # the input's only
    assert torch.ops.aten.relu.default not in targets
    up = next(n for n in gm.graph.nodes if n.target == INT8_LINEAR_Q and n.args[9] != "none")
    assert up.args[9] == act and up.args[13] == "uint8"
    assert not torch.equal(getattr(gm, up.args[10].target), torch.ones_like(getattr(gm, up.args[10].target)))
    assert list(result.skipped.values()) == ["followed by 'add', not a quantize"]   # down: a float output
    with torch.no_grad():   # the fused op's PyTorch implementation: the reference's codes
        for (x,) in batches:
            assert_matches_reference(gm(x), q.graph_module(x))


def test_second_consumer_dynamic_quantizer_and_variable_multiply_are_not_fused():
    q, _ = _mlp(share=True)
    gm, result = _fused(q)
    assert [n.args[9] for n in gm.graph.nodes if n.target == INT8_LINEAR_Q] == ["none"]   # inp → quantize only
    assert "the gelu output has 2 consumers" in result.skipped.values()
    q, _ = _mlp("w8a8-dynamic")
    gm, result = _fused(q)
    assert not result.modified and INT8_LINEAR_Q not in [n.target for n in gm.graph.nodes]
    assert any("the quantize is dynamic" in r for r in result.skipped.values()), result.skipped
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(3)]
    q = _quantize(TinyBlock().eval(), "w8a8", batches)   # gelu → mul by a computed linspace → quantize
    gm, result = _fused(q)
    assert torch.ops.aten.gelu.default in [n.target for n in gm.graph.nodes]
    assert any("not a multiply by a constant per-column vector" in r for r in result.skipped.values()), result.skipped


def test_built_module_has_no_gelu_kernel_and_verifies():
    q, batches = _mlp()
    mod, fusions = import_relax(q, HOST.family)
    assert len(fusions.epilogues) == 2
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.endswith("_gelu_uint8") for n in names) and any(n.endswith("_none_uint8") for n in names)
    script = mod.script()
    assert "R.nn.gelu" not in script
    assert script.count("R.round(") == 1   # the model input's quantize; the two others are in the kernels
    art = qcompile.lower(q, backend="tvm")
    assert art.meta["epilogues"] == fusions.epilogues
    assert qcompile.verify(art, q, batches).passed
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert_matches_reference(art(x), q(x))


def test_signed_activations_relu_without_smoothing_verify():
    # int8 symmetric static activations (codes shifted by +128 for vpdpbusd downstream), no
    # SmoothQuant multiply: the plain int8_linear → relu → quantize chain, int8 codes out
    from qcompile.presets import INT8_WEIGHT
    from qcompile.recipe import LayerConfig, Recipe
    from qcompile.spec import QuantSpec

    recipe = Recipe(name="w8a8-s8", default=LayerConfig(INT8_WEIGHT, QuantSpec("int8", "per_tensor", symmetric=True)))
    q, batches = _mlp(recipe, act="relu")
    gm, _ = _fused(q)
    fused = [n for n in gm.graph.nodes if n.target == INT8_LINEAR_Q]
    assert [(n.args[9], n.args[13]) for n in fused] == [("none", "int8"), ("relu", "int8")]
    cm = getattr(gm, fused[1].args[10].target)
    assert torch.equal(cm, torch.ones_like(cm))   # no multiply between the activation and the quantize
    art = qcompile.lower(q, backend="tvm")
    assert qcompile.verify(art, q, batches).passed


@pytest.mark.parametrize("residual,ndim", [(True, 3), (False, 2)])
def test_layer_norm_quantize_kernel_matches_torch(residual, ndim):
    d, rows = 64, 35
    mod = compile_kernel(layer_norm_quantize_kernel(d, residual, "uint8", 1e-12, ndim))
    lead = (5, 7) if ndim == 3 else (rows,)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((rows, d)) * 3 + 1).astype(np.float32)
    r = rng.standard_normal((rows, d)).astype(np.float32)
    g, b = (rng.random(d) + 0.5).astype(np.float32), (rng.standard_normal(d) * 0.1).astype(np.float32)
    cm = rng.uniform(0.5, 2, d).astype(np.float32)
    qinv = np.float32(1) / np.float32(0.02)
    args = [x, r if residual else x, g, b, cm, np.array([qinv]), np.array([120], np.int32),
            np.zeros((rows, d), np.float32), np.zeros((rows, d), np.uint8)]
    t = [tvm.runtime.tensor(a.reshape(*lead, d) if a.ndim == 2 else a, tvm.cpu()) for a in args]
    mod["main"](*t)
    y_out, q_out = t[7].numpy().reshape(rows, d), t[8].numpy().reshape(rows, d)
    x64 = torch.from_numpy(x + r if residual else x).double()
    y = torch.nn.functional.layer_norm(x64, (d,), torch.from_numpy(g).double(), torch.from_numpy(b).double(), 1e-12)
    np.testing.assert_allclose(y_out, y.numpy(), rtol=1e-5, atol=1e-5)
    pre = (y * torch.from_numpy(cm).double() * float(qinv)).numpy()
    ref = np.clip(np.round(pre) + 120, 0, 255)
    got = q_out.astype(np.int64)
    diff = np.abs(got - ref)
    ties = np.abs(np.abs(pre - np.floor(pre)) - 0.5) < TIE
    assert diff.max() <= 1 and not diff[~ties].any()
    assert (got == 255).any() and (got == 0).any() and len(np.unique(got)) > 100
    with pytest.raises(ValueError, match="multiple of 32"):
        layer_norm_quantize_kernel(48, True, "uint8", 1e-5)


class NormMLP(torch.nn.Module):
    """Linear, residual add → LayerNorm, whose output feeds a residual and the next Linear's quantize."""

    def __init__(self, d=32, ff=64):
        super().__init__()
        self.inp, self.ln = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x):
        y = self.ln(self.inp(x) + x)
        return y + self.down(torch.nn.functional.gelu(self.up(y)))


def _norm_mlp(recipe="w8a8"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 7, 32, generator=g) * 2,) for _ in range(3)]
    return _quantize(NormMLP().eval(), recipe, batches), batches


def test_norm_pass_fuses_residual_layer_norm_and_quantize_and_verifies():
    from qcompile.backends.tvm.epilogue import LAYER_NORM_Q, FuseNormQuantizePass

    q, batches = _norm_mlp()
    gm = copy.deepcopy(q.graph_module)
    result = FuseNormQuantizePass()(gm)
    assert result.modified and list(result.fused.values()) == ["qcompile_tvm::layer_norm_q"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert LAYER_NORM_Q in targets and torch.ops.aten.layer_norm.default not in targets
    fused = next(n for n in gm.graph.nodes if n.target == LAYER_NORM_Q)
    assert fused.args[1] is not None                                  # the residual add is inside
    assert sorted(u.args[1] for u in fused.users) == [0, 1]           # float row and codes both read
    with torch.no_grad():
        for (x,) in batches:
            assert_matches_reference(gm(x), q.graph_module(x))
    mod, _ = import_relax(q, HOST.family)
    assert any(n.startswith("lnq_d32_res_uint8") for n in (gv.name_hint for gv in mod.get_global_vars()))
    assert "R.nn.layer_norm" not in mod.script()
    art = qcompile.lower(q, backend="tvm")
    assert qcompile.verify(art, q, batches).passed
    # negative: a dynamic quantizer reads the LayerNorm output
    q, _ = _norm_mlp("w8a8-dynamic")
    gm = copy.deepcopy(q.graph_module)
    result = FuseNormQuantizePass()(gm)
    assert not result.modified and "the quantize is dynamic" in next(iter(result.skipped.values()))
