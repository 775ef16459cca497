"""Property tests of the format table: every row of ``FORMATS`` round-trips arbitrary float32
tensors through the canonical ops (``choose_qparams`` → ``quantize`` → ``dequantize``) within
``Format.error_bound``, or raises :class:`QuantizationError` exactly where ``Format.nonfinite`` says
it does. The data mixes the hard cases on purpose: empty tensors, one element, ±Inf, NaN, float32
denormals, all-equal values, magnitudes from 1e-38 to ``MAX_ABS`` and above.

Bounded and derandomized (``settings(derandomize=True)``): the same examples every run, no database.
"""
import math

import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  - registers torch.ops.qcompile.*
from qcompile.errors import QuantizationError
from qcompile.formats import FORMATS, MAX_ABS

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

_SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 1e-30, 1.0, -1.0, 3.0e37, -3.0e37, float(MAX_ABS),
            -float(MAX_ABS)]
_NONFINITE = [float("nan"), float("inf"), float("-inf")]
# magnitudes from denormal to beyond MAX_ABS (the latter must raise, never return Inf)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
_value = st.one_of(_finite, st.sampled_from(_SPECIAL), st.sampled_from(_NONFINITE))


@st.composite
def _tensors(draw):
    """A float32 tensor of 0..40 elements in up to 3 dims, of one of several shapes of data."""
    kind = draw(st.sampled_from(["any", "all_equal", "scaled_normal", "finite"]))
    n = draw(st.integers(0, 40))
    if kind == "all_equal":
        values = [draw(_value)] * n
    elif kind == "scaled_normal":   # realistic data at a random magnitude (tiny, denormal, huge)
        exponent = draw(st.integers(-149, 130))
        seed = draw(st.integers(0, 2 ** 16))
        g = torch.Generator().manual_seed(seed)
        values = (torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** exponent).float().tolist()
    elif kind == "finite":
        values = draw(st.lists(_finite, min_size=n, max_size=n))
    else:
        values = draw(st.lists(_value, min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float32)
    if n and n % 2 == 0 and draw(st.booleans()):
        x = x.reshape(2, n // 2)
    return x


def _formats():
    return st.sampled_from([(name, sym) for name, fmt in FORMATS.items()
                            for sym in ((True, False) if fmt.supports_asymmetric else (True,))])


def _range_is_scalable(x):
    """The documented domain of choose_qparams (Format.nonfinite): finite, |x| <= MAX_ABS."""
    return bool(torch.isfinite(x).all()) and (x.numel() == 0 or float(x.abs().max()) <= MAX_ABS)


@SETTINGS
@given(fmt_sym=_formats(), x=_tensors())
@example(fmt_sym=("int8", True), x=torch.empty(0))
@example(fmt_sym=("uint8", False), x=torch.tensor([2.5]))
@example(fmt_sym=("uint3", True), x=torch.tensor([3e38, -3e38, 1.0]))
@example(fmt_sym=("int8", False), x=torch.tensor([1.0, float("nan")]))
@example(fmt_sym=("fp8_e4m3", True), x=torch.tensor([1e-40, -3e-42, 1e-45]))
def test_round_trip_within_bound_or_named_error(fmt_sym, x):
    """Per-tensor qparams from the tensor itself, then quantize / dequantize with the ops."""
    name, sym = fmt_sym
    fmt = FORMATS[name]
    note(f"format={name} symmetric={sym} x={x.tolist()}")
    if not _range_is_scalable(x):
        try:
            torch.ops.qcompile.choose_qparams(x, name, sym, False)
        except QuantizationError as e:
            assert f"format '{name}'" in str(e)
            return
        raise AssertionError(f"{name}: a range with NaN/Inf/|x| > MAX_ABS was given a scale")
    s, z = torch.ops.qcompile.choose_qparams(x, name, sym, False)
    assert s.shape == () and torch.isfinite(s) and s > 0
    zp = z if (not sym or (fmt.kind == "int" and not fmt.signed)) else None
    q = torch.ops.qcompile.quantize(x, s, zp, name, 0)
    assert q.dtype == fmt.storage and q.shape == x.shape
    qf = q.float()
    assert bool(torch.isfinite(qf).all()) and (q.numel() == 0 or (qf.min() >= fmt.qmin and qf.max() <= fmt.qmax))
    xh = torch.ops.qcompile.dequantize(q, s, zp, name, 0, torch.float32)
    assert xh.shape == x.shape and bool(torch.isfinite(xh).all()), f"{name}: round trip gave {xh.tolist()}"
    err = (xh - x).abs()
    bound = fmt.error_bound(x, s)
    assert bool((err <= bound).all()), f"{name}: error {err.max().item():.6g} > bound at x={x.tolist()}"
    if x.numel():
        # all-equal and zero data still round-trip; 0 itself is exact when symmetric
        assert bool((xh[x == 0] == 0).all()) or not sym


@SETTINGS
@given(fmt_sym=_formats(), x=_tensors(), seed=st.integers(0, 2 ** 16))
def test_per_token_round_trip_within_bound_or_named_error(fmt_sym, x, seed):
    """Per-token (last dim reduced) dynamic qparams: the same contract, one scale per row."""
    name, sym = fmt_sym
    fmt = FORMATS[name]
    x = x.reshape(1, -1) if x.dim() == 1 else x
    note(f"format={name} symmetric={sym} x={x.tolist()}")
    if x.shape[-1] == 0:
        return  # no rows to reduce
    if not _range_is_scalable(x):
        try:
            torch.ops.qcompile.choose_qparams(x, name, sym, True)
        except QuantizationError:
            return
        raise AssertionError(f"{name}: a row with NaN/Inf/|x| > MAX_ABS was given a scale")
    s, z = torch.ops.qcompile.choose_qparams(x, name, sym, True)
    zp = z if (not sym or (fmt.kind == "int" and not fmt.signed)) else None
    xh = torch.ops.qcompile.dequantize(torch.ops.qcompile.quantize(x, s, zp, name, 0), s, zp, name, 0, torch.float32)
    assert bool(torch.isfinite(xh).all())
    assert bool(((xh - x).abs() <= fmt.error_bound(x, s)).all())


@SETTINGS
@given(name=st.sampled_from(list(FORMATS)), values=st.lists(st.sampled_from(_NONFINITE + [1.0, -2.0]), min_size=1,
                                                              max_size=8),
       scale=st.floats(2.0 ** -20, 1024.0, width=32))
def test_nonfinite_values_with_a_finite_scale(name, values, scale):
    """Format.nonfinite: ±Inf saturates everywhere; NaN stays NaN in FP8 and raises elsewhere."""
    fmt = FORMATS[name]
    x = torch.tensor(values)
    s = torch.tensor(scale)
    z = torch.full((), (fmt.qmin + fmt.qmax + 1) // 2).to(fmt.storage) if fmt.kind == "int" and not fmt.signed else None
    nan = torch.isnan(x)
    if nan.any() and fmt.kind != "float":
        try:
            torch.ops.qcompile.quantize(x, s, z, name, 0)
        except QuantizationError as e:
            assert f"format '{name}'" in str(e) and "NaN" in str(e)
            return
        raise AssertionError(f"{name}: NaN quantized to a code")
    xh = torch.ops.qcompile.dequantize(torch.ops.qcompile.quantize(x, s, z, name, 0), s, z, name, 0, torch.float32)
    assert bool(torch.isnan(xh[nan]).all())
    inf = torch.isinf(x)
    assert bool(torch.isfinite(xh[inf]).all()), f"{name}: ±Inf did not saturate: {xh.tolist()}"
    if inf.any():
        top = xh[x == math.inf]
        bottom = xh[x == -math.inf]
        assert bool((top >= xh[~nan].max()).all()) and bool((bottom <= xh[~nan].min()).all())


@SETTINGS
@given(fmt_sym=_formats(), rows=st.integers(1, 4), k=st.integers(1, 40), group=st.sampled_from([1, 3, 8, 32]),
       exponent=st.integers(-140, 120), seed=st.integers(0, 2 ** 16), equal=st.booleans())
def test_per_group_round_trip(fmt_sym, rows, k, group, exponent, seed, equal):
    """Group-wise weight qparams (the last group may be short) at any magnitude."""
    from qcompile import QuantSpec
    from qcompile.observers import weight_qparams

    name, sym = fmt_sym
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, k, generator=g, dtype=torch.float64) * 2.0 ** exponent).float()
    if equal:
        w = torch.full_like(w, w[0, 0].item())
    note(f"format={name} symmetric={sym} shape={(rows, k)} group={group} 2^{exponent}")
    s, z = weight_qparams(w, QuantSpec(name, "per_group", sym, group), 0)
    assert s.shape == (rows, -(-k // group)) and bool(torch.isfinite(s).all())
    q = torch.ops.qcompile.quantize(w, s, z, name, group)
    wh = torch.ops.qcompile.dequantize(q, s, z, name, group, torch.float32)
    full = s.repeat_interleave(group, -1)[:, :k]
    assert bool(((wh - w).abs() <= fmt.error_bound(w, full)).all())


def test_weight_with_nan_names_the_layer():
    """A NaN weight is a QuantizationError naming the layer, not NaN codes (found by the suite)."""
    import dataclasses

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    r = dataclasses.replace(qcompile.resolve_recipe("w8"), calibration=qcompile.CalibrationConfig(progress=False))
    try:
        qcompile.quantize(model, r, (torch.randn(3, 4),))
    except QuantizationError as e:
        assert "'2'" in str(e) and "NaN" in str(e)
    else:
        raise AssertionError("a NaN weight was quantized")
