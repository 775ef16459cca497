"""Observers on data whose answer is known, and weight_qparams."""
import dataclasses
import functools

import pytest
import torch

import qcompile
from qcompile import CalibrationError, QuantSpec
from qcompile.formats import FORMATS, get_format
from qcompile.observers import (OBSERVER_CLASSES, ChannelAbsMaxObserver, HistogramObserver, make_observer,
                                weight_qparams)
from qcompile.spec import OBSERVERS

OBSERVER_NAMES = list(OBSERVER_CLASSES)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _laplace(n, g, b=1.0):
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-b * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _qmse(fmt, x, s, z):
    return float(((fmt.dequantize(fmt.quantize(x, s, z), s, z) - x) ** 2).mean())


def _observe(spec, batches, layers=("layer",)):
    o = make_observer(spec, list(layers))
    for b in batches:
        out = o(b)
        assert out is b                      # observers are the identity on the data
    return o


def test_every_observer_name_is_registered():
    assert set(OBSERVER_CLASSES) == set(OBSERVERS)
    for name in OBSERVERS:
        assert isinstance(make_observer(QuantSpec("int8", observer=name)), OBSERVER_CLASSES[name])


# -- minmax / moving average -------------------------------------------------------------------
@pytest.mark.parametrize("fmt,sym", [("int8", True), ("uint8", False), ("int4", True), ("fp8_e4m3", True)])
def test_minmax_exact_range(fmt, sym):
    g = _gen(0)
    batches = [torch.randn(4, 16, generator=g) * 2 + 0.5, torch.randn(3, 16, generator=g) * 5,
               torch.randn(2, 16, generator=g)]
    o = _observe(QuantSpec(fmt, symmetric=sym), batches)
    every = torch.cat([b.flatten() for b in batches])
    lo, hi = o.range()
    assert lo.item() == every.min().item() and hi.item() == every.max().item()
    s, z = o.qparams()
    s_ref, z_ref = get_format(fmt).choose_qparams(every.min(), every.max(), sym)
    assert torch.equal(s, s_ref)
    assert (z is None) == (z_ref is None) and (z is None or torch.equal(z, z_ref))
    # min-max clips nothing: everything seen round-trips within half a step
    f = get_format(fmt)
    err = (f.dequantize(f.quantize(every, s, z), s, z) - every).abs()
    assert (err <= f.error_bound(every, s) * 1.001).all()


def test_moving_average_lies_between_batches():
    a = torch.linspace(-1.0, 1.0, 100)
    b = torch.linspace(-3.0, 5.0, 100)
    o = _observe(QuantSpec("uint8", symmetric=False, observer="moving_average"), [a])
    assert o.range()[0].item() == -1.0 and o.range()[1].item() == 1.0     # first batch: its own range
    o(b)
    lo, hi = (v.item() for v in o.range())
    assert -3.0 < lo < -1.0 and 1.0 < hi < 5.0
    assert lo == pytest.approx(-1.0 + 0.01 * (-3.0 + 1.0)) and hi == pytest.approx(1.0 + 0.01 * (5.0 - 1.0))
    # momentum from observer_args; still strictly between the batches
    o = _observe(QuantSpec("uint8", symmetric=False, observer="moving_average",
                           observer_args={"momentum": 0.5}), [a, b])
    lo, hi = (v.item() for v in o.range())
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(3.0)
    # one odd batch moves it much less than min-max would
    odd = torch.tensor([100.0, -100.0])
    o = _observe(QuantSpec("int8", observer="moving_average"), [a] * 5 + [odd] + [a] * 5)
    assert o.range()[1].item() < 5.0 and o.range()[0].item() > -5.0


# -- percentile ----------------------------------------------------------------------------------
def test_percentile_clips_single_huge_outlier():
    g = _gen(1)
    x = torch.randn(200_000, generator=g)
    x[12345] = 1e4                                      # one huge outlier
    o = _observe(QuantSpec("int8", observer="percentile"), x.split(50_000))
    lo, hi = (v.item() for v in o.range())
    assert hi < 10.0 and lo > -10.0                     # far below the outlier
    # (the 2048 bins span the outlier too, so the clip points are only known to a bin or so)
    bin_width = (x.max() - x.min()).item() / HistogramObserver.BINS
    assert hi == pytest.approx(torch.quantile(x[::2], 1 - 1e-4).item(), abs=2 * bin_width)
    s, _ = o.qparams()
    assert s.item() < 1e4 / 127 / 100                   # the scale ignores the outlier


def test_percentile_matches_quantiles():
    x = torch.randn(200_000, generator=_gen(11))
    bin_width = (x.max() - x.min()).item() / HistogramObserver.BINS
    ranges = {}
    for p in (1e-4, 1e-2):
        o = _observe(QuantSpec("int8", observer="percentile", observer_args={"p": p}), x.split(50_000))
        lo, hi = (v.item() for v in o.range())
        assert lo == pytest.approx(torch.quantile(x[::2], p).item(), abs=2 * bin_width + 0.05)
        assert hi == pytest.approx(torch.quantile(x[::2], 1 - p).item(), abs=2 * bin_width + 0.05)
        ranges[p] = (lo, hi)
    assert ranges[1e-2][1] < ranges[1e-4][1] and ranges[1e-2][0] > ranges[1e-4][0]   # larger p clips more
    assert ranges[1e-2][1] == pytest.approx(2.326, abs=0.05)


# -- mse / histogram (KL) ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _heavy_tailed():
    """Laplace(0, 1), 400k samples, plus two outliers at ±30: clipping the range pays off in MSE."""
    x = _laplace(400_000, _gen(2))
    x[:2] = torch.tensor([30.0, -30.0])
    return x


HEAVY_CASES = [
    pytest.param(obs, fmt, sym, id=f"{obs}-{fmt}")
    for obs in ("mse", "histogram")
    for fmt, sym in (("int8", True), ("uint8", False), ("int4", True), ("uint4", False))
]


@pytest.mark.parametrize("obs,fmt,sym", HEAVY_CASES)
def test_clipping_observers_beat_minmax_on_heavy_tails(obs, fmt, sym):
    x = _heavy_tailed()
    f = get_format(fmt)
    o = _observe(QuantSpec(fmt, symmetric=sym, observer=obs), x.split(100_000))
    mm = _observe(QuantSpec(fmt, symmetric=sym, observer="minmax"), x.split(100_000))
    lo, hi = (v.item() for v in o.range())
    mlo, mhi = (v.item() for v in mm.range())
    assert mlo <= lo <= 0.0 <= hi <= mhi
    assert hi - lo < 0.8 * (mhi - mlo)                  # a clearly smaller range than min-max
    err, err_mm = _qmse(f, x, *o.qparams()), _qmse(f, x, *mm.qparams())
    assert err < err_mm, f"{obs}: quantization MSE {err:.4g} not below min-max's {err_mm:.4g}"


def test_histogram_observer_does_not_clip_a_gaussian():
    x = torch.randn(200_000, generator=_gen(3))
    o = _observe(QuantSpec("int8", observer="histogram"), [x])
    lo, hi = (v.item() for v in o.range())
    clipped = ((x < lo) | (x > hi)).float().mean().item()
    assert clipped < 0.01, f"KL range [{lo:.3f}, {hi:.3f}] clips {clipped:.1%} of N(0, 1) data"


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nf4"])
def test_mse_observer_non_int_formats_fall_back_to_minmax(fmt):
    x = _heavy_tailed()[:100_000]
    o = _observe(QuantSpec(fmt, observer="mse"), [x])
    assert o.range()[0].item() == x.min().item() and o.range()[1].item() == x.max().item()
    s, z = o.qparams()
    assert z is None and torch.isfinite(s)


# -- streaming histogram -------------------------------------------------------------------------
def test_streaming_histogram_range_grows_and_mass_is_conserved():
    g = _gen(4)
    a = torch.rand(1000, generator=g)                   # [0, 1)
    b = torch.rand(3000, generator=g) * 10 - 5          # [-5, 5): wider on both sides
    c = torch.rand(500, generator=g) * 2 + 20           # [20, 22): grows again, far to the right
    d = torch.rand(700, generator=g) * 0.5              # narrower: no re-binning
    o = make_observer(QuantSpec("uint8", symmetric=False, observer="percentile", observer_args={"p": 0.1}))
    o(a)
    assert o.hist.sum().item() == 1000
    o(b)
    assert o.hist.sum().item() == 4000
    assert o.min_val.item() == b.min().item() and o.max_val.item() == b.max().item()
    every = torch.cat([a, b])
    width = (o.max_val - o.min_val).item() / o.BINS
    ref = torch.histc(every, o.BINS, o.min_val.item(), o.max_val.item()).double()
    # the re-binned counts sit where the data is (at most a bin away): compare the CDFs
    assert (torch.cumsum(o.hist, 0) - torch.cumsum(ref, 0)).abs().max().item() <= 0.01 * 4000
    lo, hi = (v.item() for v in o.range())
    assert lo == pytest.approx(torch.quantile(every, 0.1).item(), abs=2 * width)
    assert hi == pytest.approx(torch.quantile(every, 0.9).item(), abs=2 * width)
    before = o.hist.clone()
    o(c)
    o(d)
    assert o.hist.sum().item() == 5200
    assert o.min_val.item() == b.min().item() and o.max_val.item() == c.max().item()
    assert o.hist.sum().item() - 700 == pytest.approx(before.sum().item() + 500)
    every = torch.cat([a, b, c, d])
    lo, hi = (v.item() for v in o.range())
    width = (o.max_val - o.min_val).item() / o.BINS
    assert lo == pytest.approx(torch.quantile(every, 0.1).item(), abs=3 * width)
    assert hi == pytest.approx(torch.quantile(every, 0.9).item(), abs=3 * width)


def test_streaming_histogram_constant_first_batch():
    o = make_observer(QuantSpec("int8", observer="histogram"))
    o(torch.full((100,), 2.0))
    o(torch.tensor([-1.0, 3.0]))
    assert o.hist.sum().item() == 102
    assert o.min_val.item() == -1.0 and o.max_val.item() == 3.0
    s, _ = o.qparams()
    assert torch.isfinite(s) and s > 0


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("obs", OBSERVER_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_raise_naming_layer(obs, bad):
    o = make_observer(QuantSpec("int8", observer=obs), ["encoder.layer.3.output.dense", "pooler.dense"])
    o(torch.randn(4, 8))
    x = torch.randn(4, 8)
    x[2, 5] = bad
    with pytest.raises(CalibrationError) as e:
        o(x)
    msg = str(e.value)
    assert "encoder.layer.3.output.dense" in msg and "pooler.dense" in msg
    assert ("NaN" if bad != bad else "Inf") in msg
    assert isinstance(e.value, qcompile.QCompileError)


def test_channel_absmax_observer_nan_names_layer():
    o = ChannelAbsMaxObserver(["blocks.0.mlp.fc1"])
    with pytest.raises(CalibrationError, match=r"blocks\.0\.mlp\.fc1"):
        o(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("obs", OBSERVER_NAMES)
def test_observer_without_data_raises(obs):
    o = make_observer(QuantSpec("uint8", symmetric=False, observer=obs), ["decoder.head"])
    with pytest.raises(CalibrationError, match=r"decoder\.head") as e:
        o.qparams()
    assert "no data" in str(e.value)
    o(torch.empty(0, 8))                                 # an empty batch is still no data
    with pytest.raises(CalibrationError):
        o.qparams()


# -- weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,sym", [("int8", True), ("uint8", False), ("int4", True), ("uint4", False),
                                     ("fp8_e4m3", True), ("nf4", True)])
def test_weight_qparams_shapes(fmt, sym):
    g = _gen(5)
    lin = torch.randn(16, 40, generator=g)
    conv = torch.randn(12, 3, 3, 3, generator=g)
    big = torch.randn(8, 576, generator=g)
    cases = [
        (lin, QuantSpec(fmt, "per_tensor", sym), 0, ()),
        (lin, QuantSpec(fmt, "per_channel", sym), 0, (16, 1)),
        (conv, QuantSpec(fmt, "per_tensor", sym), 0, ()),
        (conv, QuantSpec(fmt, "per_channel", sym), 0, (12, 1, 1, 1)),
        (conv, QuantSpec(fmt, "per_channel", sym), 1, (1, 3, 1, 1)),   # e.g. ConvTranspose
        (lin, QuantSpec(fmt, "per_group", sym, group_size=8), 0, (16, 5)),
        (big, QuantSpec(fmt, "per_group", sym, group_size=128), 0, (8, 5)),   # 576 = 4.5 x 128
    ]
    f = get_format(fmt)
    for w, spec, axis, shape in cases:
        spec.validate("w")
        s, z = weight_qparams(w, spec, channel_axis=axis)
        assert s.shape == shape, (spec, axis)
        assert s.dtype == torch.float32 and (s > 0).all()
        if z is not None:
            assert z.shape == shape and z.dtype == f.storage
        gs = spec.group_size or 0
        q = torch.ops.qcompile.quantize(w, s, z, fmt, gs)
        wh = torch.ops.qcompile.dequantize(q, s, z, fmt, gs, torch.float32)
        full = s if gs == 0 else s.repeat_interleave(gs, -1)[:, :w.shape[1]]
        assert ((wh - w).abs() <= f.error_bound(w, full) * 1.001).all(), (spec, axis)


def test_weight_qparams_per_group_matches_min_max_of_each_group():
    w = torch.randn(8, 576, generator=_gen(6))
    w[:, 512:] *= 40                                      # the short last group has its own range
    for sym in (True, False):
        spec = QuantSpec("uint4", "per_group", symmetric=sym, group_size=128)
        s, z = weight_qparams(w, spec)
        chunks = torch.split(w, 128, -1)
        lo = torch.stack([c.amin(-1) for c in chunks], -1)
        hi = torch.stack([c.amax(-1) for c in chunks], -1)
        s_ref, z_ref = get_format("uint4").choose_qparams(lo, hi, sym)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_weight_qparams_per_group_needs_2d():
    with pytest.raises(ValueError, match="2-D"):
        weight_qparams(torch.randn(4, 4, 3, 3), QuantSpec("int4", "per_group", group_size=4))


def _recon(w, spec, axis=0):
    s, z = weight_qparams(w, spec, channel_axis=axis)
    gs = spec.group_size or 0
    q = torch.ops.qcompile.quantize(w, s, z, spec.format, gs)
    wh = torch.ops.qcompile.dequantize(q, s, z, spec.format, gs, torch.float32)
    return (wh - w) ** 2


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", "per_channel"),
    QuantSpec("uint8", "per_tensor", symmetric=False),
    QuantSpec("int4", "per_tensor"),
    QuantSpec("int4", "per_channel"),
    QuantSpec("uint4", "per_channel", symmetric=False),
    QuantSpec("uint4", "per_group", symmetric=False, group_size=128),
    QuantSpec("int4", "per_group", group_size=64),
    QuantSpec("int2", "per_channel"),
    QuantSpec("fp8_e4m3", "per_channel"),
    QuantSpec("nf4", "per_group", group_size=64),
], ids=lambda s: f"{s.format}-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_mse_weight_scales_not_worse_than_minmax(spec):
    w = _laplace(32 * 576, _gen(7)).reshape(32, 576)      # < 32768 elements: no intra-op threads
    err_mm = _recon(w, spec)
    err_mse = _recon(w, dataclasses.replace(spec, observer="mse"))
    # never worse, row by row (min-max is one of the candidates) and in total
    rows = (lambda e: e.sum(1)) if spec.granularity != "per_tensor" else (lambda e: e.sum().reshape(1))
    assert (rows(err_mse) <= rows(err_mm) * (1 + 1e-6)).all()
    assert err_mse.sum() <= err_mm.sum()
    if FORMATS[spec.format].bits <= 4:
        assert err_mse.sum() < 0.95 * err_mm.sum()         # and clearly better at low bit widths


def test_mse_weight_scales_conv():
    w = _laplace(16 * 8 * 9, _gen(8)).reshape(16, 8, 3, 3)
    spec = QuantSpec("int4", "per_channel")
    s, _ = weight_qparams(w, dataclasses.replace(spec, observer="mse"))
    assert s.shape == (16, 1, 1, 1)
    e_mm = _recon(w, spec).sum((1, 2, 3))
    e_mse = _recon(w, dataclasses.replace(spec, observer="mse")).sum((1, 2, 3))
    assert (e_mse <= e_mm * (1 + 1e-6)).all() and e_mse.sum() < e_mm.sum()
