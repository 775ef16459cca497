"""Quantization-aware training: presets, prepare_qat graph structure, fake-quant gradients (STE and
LSQ) against finite differences, simulated BN folding numerics, train/eval behaviour, PTQ start,
convert equality, checkpoint resume, negative cases. DDP lives in test_qat_ddp.py."""
import copy
import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.errors import CalibrationError, RecipeError
from qcompile.fake_quant import FakeQuantize, GraphBatchNorm, QATConvBn, fake_quantize
from qcompile.formats import get_format
from qcompile.ops import DEQUANTIZE, QUANTIZE
from qcompile.recipe import LayerConfig, QATConfig, Recipe
from qcompile.spec import QuantSpec

from conftest import TinyCNN, randomise_bn

aten = torch.ops.aten


class DropCNN(TinyCNN):
    """TinyCNN with dropout before the classifier (train/eval must switch it)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


def _model(cls=TinyCNN):
    torch.manual_seed(0)
    return randomise_bn(cls()).eval()


def _data(n=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _recipe(preset="w4a8", **qat):
    return dataclasses.replace(Recipe.preset(preset), qat=QATConfig(**qat)).validate()


def _train(qat, x, y, steps=4, lr=1e-2):
    opt = torch.optim.SGD(qat.parameters(), lr=lr)
    qat.train()
    for i in range(steps):
        xb, yb = x[i * 8 % len(x):][:8], y[i * 8 % len(y):][:8]
        loss = F.cross_entropy(qat(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _ops(gm):
    return Counter((n.target, n.args[3]) if n.target in (QUANTIZE, DEQUANTIZE) else n.target
                   for n in gm.graph.nodes if n.op == "call_function")


# -- presets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,wfmt,afmt", [("w4a8", "int4", "uint8"), ("w4a4", "int4", "uint4"),
                                              ("w2a8", "int2", "uint8")])
def test_low_bit_presets_ptq_on_reference(preset, wfmt, afmt):
    model = _model()
    x, _ = _data()
    q = qcompile.quantize(model, preset, (x[:2],), calibration=[(x,)])
    ops = _ops(q.graph_module)
    assert ops[(DEQUANTIZE, wfmt)] == 3 and ops[(QUANTIZE, afmt)] == 3  # conv1, conv2, fc
    r = Recipe.preset(preset)
    assert r.default.weight == QuantSpec(wfmt, "per_channel", symmetric=True)
    assert Recipe.from_dict(r.to_dict()) == r
    with torch.no_grad():
        ref = model(x)
        cos = F.cosine_similarity(ref.flatten(), q(x).flatten(), 0)
    assert cos > {"w4a8": 0.95, "w4a4": 0.9, "w2a8": 0.5}[preset]
    # a preset's codes really are in range: the 4-bit activation grid has 16 levels
    acts = [n for n in q.graph_module.graph.nodes if n.target == QUANTIZE]
    assert all(n.args[3] == afmt for n in acts)


def test_recipe_qat_section_round_trips_and_names_bad_fields():
    r = _recipe(learn_scale=True, observer_steps=10, freeze_bn_steps=100)
    assert Recipe.from_dict(r.to_dict()) == r
    d = r.to_dict()
    d["qat"]["learn_scal"] = True
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(d)
    assert e.value.field == "qat.learn_scal" and "learn_scale" in str(e.value)
    with pytest.raises(RecipeError) as e:
        _recipe(learn_scale=True, observer_steps=None)
    assert e.value.field == "qat.observer_steps"
    with pytest.raises(RecipeError) as e:
        _recipe(freeze_bn_steps=-1)
    assert e.value.field == "qat.freeze_bn_steps"
    with pytest.raises(RecipeError) as e:
        _recipe(learn_zero_point=True, learn_scale=False)
    assert e.value.field == "qat.learn_zero_point"


# -- fake-quant gradients vs finite differences -------------------------------------------------------
def _surrogate(x, s, z, fmt, offset):
    """fake-quant with the rounding replaced by ``u + offset`` (offset = round(u0) - u0 frozen at the
    evaluation point): the function whose exact derivative STE/LSQ define."""
    u = x / s
    if z is None:
        return torch.clamp(u + offset, fmt.qmin, fmt.qmax) * s
    zr = torch.round(z)
    return (torch.clamp(u + offset + zr, fmt.qmin, fmt.qmax) - zr) * s


def _central(f, t, eps=1e-6):
    g = torch.zeros_like(t)
    flat = t.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = f().sum()
        flat[i] = old - eps
        lo = f().sum()
        flat[i] = old
        g.view(-1)[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("fmt_name,symmetric", [("int4", True), ("uint8", False), ("int2", True)])
def test_ste_gradient_matches_finite_differences(fmt_name, symmetric):
    fmt = get_format(fmt_name)
    torch.manual_seed(0)
    x = (torch.randn(64, dtype=torch.float64) * 2).requires_grad_()
    s = torch.tensor(0.3, dtype=torch.float64)
    z = None if symmetric else torch.tensor(3.0, dtype=torch.float64)
    y = fake_quantize(x, s, z, fmt)
    # forward: exactly the reference quantize -> dequantize
    zq = None if z is None else z.to(fmt.storage)
    ref = fmt.dequantize(fmt.quantize(x.detach().float(), s.float(), zq), s.float(), zq)
    assert torch.allclose(y.detach().float(), ref, atol=1e-6)
    y.sum().backward()
    u0 = (x.detach() / s)
    offset = torch.round(u0) - u0
    xd = x.detach().clone()
    fd = _central(lambda: _surrogate(xd, s, z, fmt, offset), xd)
    # values that round exactly onto qmin/qmax sit on the surrogate's kink: STE counts them inside
    code = torch.round(u0) + (0 if z is None else torch.round(z))
    kink = (code == fmt.qmin) | (code == fmt.qmax)
    assert torch.allclose(x.grad[~kink], fd[~kink], atol=1e-6)
    assert torch.all(x.grad[kink] == 1.0)
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and 0.0 in x.grad.tolist()  # clipped values get none


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_and_zero_point_gradients_match_finite_differences(symmetric):
    fmt = get_format("int4" if symmetric else "uint4")
    torch.manual_seed(1)
    x = (torch.randn(4, 16, dtype=torch.float64) * 1.5)
    # one scale (and zero point) per element, so each element's gradient is checked on its own
    s = (torch.tensor([[0.2], [0.3], [0.25], [0.4]], dtype=torch.float64) * torch.ones(4, 16, dtype=torch.float64))
    s.requires_grad_()
    z = None if symmetric else torch.full((4, 16), 7.2, dtype=torch.float64, requires_grad=True)
    factor = 0.125
    y = fake_quantize(x, s, z, fmt, grad_factor=factor)
    y.sum().backward()
    u0 = x / s.detach()
    offset = torch.round(u0) - u0
    code = torch.round(u0) + (0 if z is None else torch.round(z.detach()))
    inside = (code > fmt.qmin) & (code < fmt.qmax)
    clipped = (code < fmt.qmin) | (code > fmt.qmax)
    smooth = inside | clipped                      # off the kink where a code lands exactly on qmin/qmax
    assert inside.sum() > 10 and clipped.sum() > 5
    sd = s.detach().clone()
    fd_s = _central(lambda: _surrogate(x, sd, None if z is None else z.detach(), fmt, offset), sd)
    assert torch.allclose(s.grad[smooth], factor * fd_s[smooth], atol=1e-6)
    # LSQ's closed form: round(x/s) - x/s inside, the clipped code (minus z) outside
    zr = 0 if z is None else torch.round(z.detach())
    closed = torch.where(inside, offset, torch.clamp(code, fmt.qmin, fmt.qmax) - zr)
    assert torch.allclose(s.grad[smooth], factor * closed[smooth], atol=1e-9)
    if z is not None:
        # d/dz with round(z) passed straight through: -s per clipped element, 0 inside the range
        zd = z.detach().clone()

        def f():
            return (torch.clamp(x / s.detach() + offset + zd, fmt.qmin, fmt.qmax) - zd) * s.detach()
        fd_z = _central(f, zd)
        assert torch.allclose(z.grad[smooth], factor * fd_z[smooth], atol=1e-6)
        assert z.grad[clipped].abs().min() > 0 and torch.all(z.grad[inside] == 0)


def test_fake_quantize_per_group_matches_reference_ops():
    w = torch.randn(6, 40)
    spec = QuantSpec("int4", "per_group", symmetric=True, group_size=16)  # 40 = 2.5 groups
    fq = FakeQuantize(spec, ["fc"], QATConfig(), weight=w)
    assert fq.scale.shape == (6, 3)
    s, z = fq.qparams()
    ref = DEQUANTIZE(QUANTIZE(w, s, z, "int4", 16), s, z, "int4", 16, torch.float32)
    assert torch.equal(fq(w), ref)


# -- prepare_qat graph and behaviour --------------------------------------------------------------------
def test_prepare_qat_structure_and_train_eval_modes():
    model = _model(DropCNN)
    x, y = _data()
    qat = qcompile.prepare_qat(model, "w4a8", (x[:2],))
    gm = qat.graph_module
    mods = dict(gm.named_children())
    assert sum(isinstance(m, QATConvBn) for m in mods.values()) == 2            # both conv+BN fused
    assert sum(isinstance(m, FakeQuantize) and not m.is_weight for m in mods.values()) == 3
    assert isinstance(mods["wfq_fc_weight"], FakeQuantize) and mods["wfq_fc_weight"].is_weight
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.batch_norm.default not in targets and aten.dropout.default not in targets
    assert qat.training and qat.recipe.name == "w4a8"
    _train(qat, x, y, steps=1)
    qat.eval()
    with torch.no_grad():
        a, b = qat(x), qat(x)
    assert torch.equal(a, b)                   # eval: dropout off, running statistics, no observation
    qat.train()
    with torch.no_grad():
        c, d = qat(x), qat(x)
    assert not torch.equal(c, d)               # train: dropout live
    rm = gm.get_submodule("qat_conv1").bn.running_mean.clone()
    qat.eval()
    with torch.no_grad():
        qat(x * 3)
    assert torch.equal(rm, gm.get_submodule("qat_conv1").bn.running_mean)


def test_prepare_qat_never_touches_the_user_model():
    model = _model(DropCNN)
    before = copy.deepcopy(model.state_dict())
    x, y = _data()
    qat = qcompile.prepare_qat(model, "w4a8", (x[:2],))
    _train(qat, x, y, steps=3)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_qat_from_ptq_start_equals_ptq_and_convert_equals_fake_quant():
    model = _model()
    x, y = _data()
    for preset in ("w4a8", "w2a8"):
        ptq = qcompile.quantize(model, preset, (x[:2],), calibration=[(x,)])
        qat = qcompile.prepare_qat(model, preset, (x[:2],), calibration=[(x,)])
        q0 = qcompile.convert(qat.eval())
        assert _ops(q0.graph_module) == _ops(ptq.graph_module)      # the same converted graph
        with torch.no_grad():
            assert torch.equal(q0(x), ptq(x))                        # step 0 is the PTQ model
            assert torch.equal(qat(x), q0(x))                        # fake-quant eval == converted
    for cfg in (dict(), dict(learn_scale=True, observer_steps=2, learn_zero_point=True, freeze_bn_steps=3)):
        qat = qcompile.prepare_qat(model, _recipe("w4a4", **cfg), (x[:2],))
        _train(qat, x, y, steps=5)
        q = qcompile.convert(qat.eval())
        assert isinstance(q, qcompile.QuantizedModel) and q.report.folded_batch_norms == ["conv1", "conv2"]
        with torch.no_grad():
            assert torch.allclose(qat(x), q(x), atol=1e-5), cfg
        _train(qat, x, y, steps=1)  # convert worked on a copy: training goes on


def test_lsq_learns_scales_and_observer_freezes_after_warmup():
    model = _model()
    x, y = _data()
    qat = qcompile.prepare_qat(model, _recipe("w4a4", learn_scale=True, observer_steps=2), (x[:2],))
    fq = qat.graph_module.qfq_1
    assert isinstance(fq.log_scale, nn.Parameter) and fq.learned
    _train(qat, x, y, steps=2)
    lo, hi = fq.min_val.clone(), fq.max_val.clone()
    s2 = fq.scale.detach().clone()
    _train(qat, x * 4, y, steps=3)
    assert torch.equal(lo, fq.min_val) and torch.equal(hi, fq.max_val)   # frozen after 2 steps
    assert not torch.equal(s2, fq.scale.detach())                         # but the scale trains
    ste = qcompile.prepare_qat(model, "w4a4", (x[:2],))
    _train(ste, x, y, steps=1)
    hi1 = ste.graph_module.qfq_0.max_val.clone()   # the input's range (after BN, batch statistics hide x4)
    _train(ste, x * 4, y, steps=1)
    assert ste.graph_module.qfq_0.max_val > hi1                           # STE default: keeps observing


def test_per_group_and_dynamic_qat_convert():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(40, 24), nn.Linear(24, 5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(32, 40)
    y = torch.randint(0, 5, (32,))
    recipe = Recipe(name="g16", default=LayerConfig(QuantSpec("int4", "per_group", group_size=16),
                                                    QuantSpec("uint8", "per_token", symmetric=False, dynamic=True)),
                    qat=QATConfig(learn_scale=True, observer_steps=0))
    qat = qcompile.prepare_qat(model, recipe, (x[:2],))
    _train(qat, x, y, steps=3)
    q = qcompile.convert(qat.eval())
    dq = [n for n in q.graph_module.graph.nodes if n.target == DEQUANTIZE and n.args[4] == 16]
    assert len(dq) == 2 and q.graph_module.get_buffer(dq[0].args[1].target).shape == (24, 3)
    with torch.no_grad():
        assert torch.allclose(qat(x), q(x), atol=1e-5)


# -- simulated BN folding ------------------------------------------------------------------------------
def _convbn(freeze=None, fq=None):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), randomise_bn(nn.Sequential(nn.BatchNorm2d(4)))[0]
    gbn = GraphBatchNorm(nn.Parameter(bn.weight.detach().clone()), nn.Parameter(bn.bias.detach().clone()),
                         bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), 0.1, bn.eps)
    mod = QATConvBn(aten.conv2d.default, nn.Parameter(conv.weight.detach().clone()),
                    nn.Parameter(conv.bias.detach().clone()), (), gbn, fq, freeze)
    return conv, bn, mod


def test_bn_fold_train_and_eval_numerics_match_float_conv_bn():
    conv, bn, mod = _convbn()
    x = torch.randn(8, 3, 6, 6)
    bn.train()
    ref = bn(conv(x))                        # float conv -> BN with batch statistics
    out = mod.train()(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(mod.bn.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(mod.bn.running_var, bn.running_var, atol=1e-6)
    bn.eval()
    assert torch.allclose(mod.eval()(x), bn(conv(x)), atol=1e-5)   # eval: the folded conv
    # gradients reach the conv weight and gamma/beta through the fold
    mod.train()(x).square().sum().backward()
    assert mod.weight.grad.abs().sum() > 0 and mod.bn.weight.grad.abs().sum() > 0


def test_bn_freeze_switches_to_running_statistics():
    spec = QuantSpec("int4", "per_channel")
    conv, bn, mod = _convbn(freeze=2)
    mod.weight_fq = FakeQuantize(spec, ["c"], QATConfig(), weight=mod.folded()[0].detach())
    x = torch.randn(8, 3, 6, 6)
    mod.train()
    mod(x)
    mod(x)
    stats = mod.bn.running_mean.clone()
    y_train = mod(x)                            # step 3: frozen
    assert torch.equal(stats, mod.bn.running_mean)
    w, b = mod.folded()
    y_conv = F.conv2d(x, mod.weight_fq(w), b)  # exactly what convert produces
    assert torch.allclose(y_train, y_conv, atol=1e-6)
    assert torch.allclose(mod.eval()(x), y_conv, atol=1e-6)


# -- checkpoint / resume ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(learn_scale=True, observer_steps=2, freeze_bn_steps=3)])
def test_resume_from_state_dict_is_identical(cfg, tmp_path):
    model = _model()
    x, y = _data(48)
    recipe = _recipe("w4a4", **cfg)
    ref = qcompile.prepare_qat(model, recipe, (x[:2],))
    opt = torch.optim.Adam(ref.parameters(), 1e-2)

    def step(m, o, i):
        loss = F.cross_entropy(m(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
        o.zero_grad()
        loss.backward()
        o.step()

    for i in range(3):
        step(ref, opt, i)
    torch.save({"model": ref.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for i in range(3, 6):
        step(ref, opt, i)

    resumed = qcompile.prepare_qat(model, recipe, (x[:2],))
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(resumed.parameters(), 1e-2)
    opt2.load_state_dict(ckpt["opt"])
    for i in range(3, 6):
        step(resumed, opt2, i)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    q1, q2 = qcompile.convert(ref.eval()), qcompile.convert(resumed.eval())
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))


# -- negative cases ----------------------------------------------------------------------------------
def test_negative_cases():
    model = _model()
    x, _ = _data()
    with pytest.raises(NotImplementedError, match="smoothing"):
        qcompile.prepare_qat(model, "w8a8", (x[:2],))
    qat = qcompile.prepare_qat(model, "w4a8", (x[:2],))
    with pytest.raises(CalibrationError, match="conv1"):
        qcompile.convert(qat.eval())                  # activations never saw data
    with pytest.raises(CalibrationError, match="no range yet"):
        qat.eval()(x)
    fp8 = Recipe(name="fp8", default=LayerConfig(QuantSpec("fp8_e4m3", "per_channel")),
                 qat=QATConfig(learn_scale=True, observer_steps=0))
    with pytest.raises(RecipeError) as e:
        qcompile.prepare_qat(model, fp8, (x[:2],))
    assert e.value.field == "qat.learn_scale"
    with pytest.raises(RecipeError) as e:
        qcompile.prepare_qat(model, {"name": "bad", "default": {"weight": "int4"}, "qat": {"fold_bn": "yes"}}, (x[:2],))
    assert e.value.field == "qat.fold_bn"


def test_qat_converted_cnn_lowers_to_onnx_and_matches_reference():
    pytest.importorskip("onnxruntime")
    from backend_conformance import assert_matches_reference

    model = _model()
    x, y = _data(48)
    recipe = Recipe(name="w8a8-qat", default=LayerConfig(QuantSpec("int8", "per_channel"),
                                                         QuantSpec("uint8", "per_tensor", symmetric=False)),
                    qat=QATConfig(learn_scale=True, observer_steps=0, freeze_bn_steps=2))
    qat = qcompile.prepare_qat(model, recipe, (x[:2],), calibration=[(x,)])
    _train(qat, x, y, steps=3)
    q = qcompile.convert(qat.eval())
    art = qcompile.lower(q, "onnx")
    xt = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        ref = q(xt)
        assert_matches_reference(torch.as_tensor(art(xt)), ref, rel=1e-2)  # QLinearConv requantizes: 1 %
        assert torch.equal(torch.as_tensor(art(xt)).argmax(1), ref.argmax(1))



def _tiny_bert_w4a8_qat():
    """(QAT model, the float BERT, ids, mask): a one-layer BERT prepared for w4a8 QAT with learned scales."""
    transformers = pytest.importorskip("transformers")
    from qcompile.models.minilm import SentenceEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    model = SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids, mask = torch.randint(0, 100, (4, 9)), torch.ones(4, 9, dtype=torch.long)
    recipe = dataclasses.replace(Recipe.preset("w4a8"), qat=QATConfig(learn_scale=True, observer_steps=0))
    return qcompile.prepare_qat(model, recipe, (ids, mask), calibration=[(ids, mask)]), model, ids, mask


def test_tiny_bert_attention_dropout_follows_train_and_eval():
    qat, model, ids, mask = _tiny_bert_w4a8_qat()
    sdpa = [n for n in qat.graph_module.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert not sdpa  # captured with dropout_p=0.1 baked in: now a module that drops only in training
    with torch.no_grad():
        assert not torch.equal(qat.train()(ids, mask), qat(ids, mask))
        assert torch.equal(qat.eval()(ids, mask), qat(ids, mask))
    q = qcompile.convert(qat.eval())
    sdpa = [n for n in q.graph_module.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert sdpa and all(n.args[4] == 0.0 for n in sdpa)
    with torch.no_grad():
        assert torch.allclose(q(ids, mask), qat(ids, mask), atol=1e-5)
        ptq = qcompile.quantize(model, "w4a8", (ids, mask), calibration=[(ids, mask)])
        d = (q(ids, mask) - ptq(ids, mask)).abs().max()
        assert d < 1e-6, d  # untrained QAT from the PTQ start == PTQ


def test_train_with_dropout_off_keeps_quantizers_and_bn_training():
    """``qat.train(dropout=False)``: quantizers and batch-norm train, every dropout is off, so two
    forward passes agree; a plain ``train()`` makes dropout live again."""
    from qcompile.fake_quant import GraphAttention

    model = _model(DropCNN)
    x, y = _data()
    # fold_bn off: a folded conv's weight follows the running variance, which each training forward
    # updates, so only unfused batch-norm gives two identical training forwards
    qat = qcompile.prepare_qat(model, _recipe("w4a8", fold_bn=False), (x[:2],))
    gm = qat.graph_module
    assert qat.train(dropout=False) is qat and qat.training
    drops = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert drops and not any(m.training for m in drops)
    bns = [m for m in gm.modules() if isinstance(m, GraphBatchNorm)]
    assert bns and all(m.training for m in gm.modules() if isinstance(m, (FakeQuantize, GraphBatchNorm)))
    rm = bns[0].running_mean.clone()
    with torch.no_grad():
        a, b = qat(x), qat(x)
    assert torch.equal(a, b)                                                  # dropout off
    assert not torch.equal(rm, bns[0].running_mean)                           # BN still trains
    with torch.no_grad():
        e = qat.eval()(x)
    assert not torch.allclose(a, e, atol=1e-3)                                # batch statistics, not running
    # the output is the float-dropout-free training forward: same as dropping nothing in train()
    drop_p = drops[0].p
    drops[0].p = 0.0
    with torch.no_grad():
        ref = qat.train()(x)
    drops[0].p = drop_p
    with torch.no_grad():
        assert torch.equal(qat.train(dropout=False)(x), ref)
        c, d = qat.train()(x), qat(x)
    assert not torch.equal(c, d)                                              # plain train(): dropout live again
    assert not qat.train(False, dropout=False).training and not any(m.training for m in gm.modules())

    # BERT: nn.Dropout after each block and attention's dropout_p (GraphAttention); learned scales
    qat, _, ids, mask = _tiny_bert_w4a8_qat()
    attn = [m for m in qat.graph_module.modules() if isinstance(m, GraphAttention)]
    assert attn and any(isinstance(m, nn.Dropout) for m in qat.graph_module.modules())
    qat.train(dropout=False)
    assert not any(m.training for m in attn)
    out = qat(ids, mask)
    out.sum().backward()                                                      # quantizers still learn
    assert all(fq.log_scale.grad is not None for fq in qat.fake_quantizers().values() if fq.learned)
    with torch.no_grad():
        assert torch.equal(qat(ids, mask), out.detach())
        assert torch.allclose(out.detach(), qat.eval()(ids, mask), atol=1e-6)  # no BN: same as eval
        assert not torch.equal(qat.train()(ids, mask), qat(ids, mask))


def test_fold_bn_off_keeps_batch_norm_float_after_the_quantized_conv():
    model = _model()
    x, y = _data()
    qat = qcompile.prepare_qat(model, _recipe("w4a8", fold_bn=False), (x[:2],))
    assert not any(isinstance(m, QATConvBn) for m in qat.modules())
    assert sum(isinstance(m, GraphBatchNorm) for m in qat.modules()) == 2
    _train(qat, x, y, steps=3)
    q = qcompile.convert(qat.eval())
    ops = _ops(q.graph_module)
    assert ops[aten.batch_norm.default] == 2 and ops[(DEQUANTIZE, "int4")] == 3
    assert q.report.folded_batch_norms == []
    with torch.no_grad():
        assert torch.allclose(qat(x), q(x), atol=1e-5)


def test_learned_per_tensor_qparams_have_a_dim_and_old_scalar_state_dicts_load():
    """FSDP2 shards no 0-d parameter: a per-tensor learned scale / zero point is stored as ``[1]``
    and used 0-d; a state dict saved when they were 0-d loads into the new layout."""
    model = _model()
    x, y = _data()
    qat = qcompile.prepare_qat(model, _recipe("w4a4", learn_scale=True, observer_steps=2, learn_zero_point=True),
                               (x[:2],))
    _train(qat, x, y, steps=2)
    fq = qat.graph_module.qfq_1
    assert fq.log_scale.shape == (1,) and fq.scale.shape == () and fq.qparams()[0].shape == ()
    old = {k: (v.reshape(()) if k.endswith(("log_scale", "zero_point")) and v.numel() == 1 and v.dim() == 1 else v)
           for k, v in qat.state_dict().items()}
    assert any(k.endswith("log_scale") and v.dim() == 0 for k, v in old.items())
    fresh = qcompile.prepare_qat(model, _recipe("w4a4", learn_scale=True, observer_steps=2, learn_zero_point=True),
                                 (x[:2],))
    fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), qat.eval()(x))
    with pytest.raises(RuntimeError, match="size mismatch"):   # anything else of another shape still fails
        fresh.load_state_dict({**old, "graph_module.qfq_1.log_scale": torch.zeros(2)})

