"""The format table and the canonical ops, driven by the registry: every row of ``FORMATS`` gets
every test, so a new format is tested as soon as it is added."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  - registers torch.ops.qcompile.*
from qcompile import QuantSpec, RecipeError
from qcompile.formats import FORMATS, NF4_CODEBOOK, get_format

NAMES = list(FORMATS)
INT_NAMES = [n for n, f in FORMATS.items() if f.kind == "int"]
FLOAT_NAMES = [n for n, f in FORMATS.items() if f.kind == "float"]
SYMMETRIC_ONLY = [n for n, f in FORMATS.items() if not f.supports_asymmetric]


def _sym_cases():
    cases = []
    for name, fmt in FORMATS.items():
        for sym in ((True, False) if fmt.supports_asymmetric else (True,)):
            cases.append(pytest.param(name, sym, id=f"{name}-{'sym' if sym else 'asym'}"))
    return cases


SYM_CASES = _sym_cases()

# The unsigned symmetric scale (amax / 127.5) puts max|x| exactly on the rounding tie 127.5, where
# float32 rounding of x/scale adds ~1 ulp of x: error_bound carries a slack relative to |x| for it.


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(shape, seed):
    """Random data with a spread of magnitudes and signs (some rows positive-only)."""
    g = _gen(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g).mul(4).add(0.1)
    if shape[0] > 2:
        x[1] = x[1].abs()        # a positive-only row
        x[2] = -x[2].abs()       # a negative-only row
    return x


def _minmax_groups(x, group_size):
    chunks = torch.split(x, group_size, -1)
    lo = torch.stack([c.amin(-1) for c in chunks], -1)
    hi = torch.stack([c.amax(-1) for c in chunks], -1)
    return lo, hi


def _expand_groups(s, group_size, k):
    return s.repeat_interleave(group_size, -1)[..., :k]


def _check_codes(fmt, q):
    assert q.dtype == fmt.storage
    qf = q.float()
    assert torch.isfinite(qf).all()
    assert qf.min() >= fmt.qmin and qf.max() <= fmt.qmax


def _check_round_trip(fmt, x, xh, scale_full):
    assert xh.dtype == torch.float32 and xh.shape == x.shape
    err = (xh - x).abs()
    bound = fmt.error_bound(x, scale_full).expand_as(x)
    worst = int(torch.argmax(err - bound))
    ok = bool((err <= bound).all())
    assert ok, (f"{fmt.name}: error {err.flatten()[worst].item():.8g} > bound {bound.flatten()[worst].item():.8g} "
                f"(x {err.flatten()[worst].item() / bound.flatten()[worst].item():.7f} the bound) "
                f"at x={x.flatten()[worst].item():.8g}")


# -- the table itself --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_format_record_is_consistent(name):
    fmt = FORMATS[name]
    assert fmt.name == name and get_format(name) is fmt
    assert fmt.qmin < fmt.qmax and fmt.bits in (2, 3, 4, 5, 6, 8)
    assert fmt.kind in ("int", "float", "codebook")
    if fmt.kind == "int":
        assert fmt.qmax - fmt.qmin + 1 == 2 ** fmt.bits
        assert fmt.qmin == int(fmt.qmin) and fmt.qmax == int(fmt.qmax)
    if fmt.kind == "codebook":
        assert len(fmt.codebook) == fmt.qmax - fmt.qmin + 1 == 2 ** fmt.bits
    if fmt.kind == "float":
        assert fmt.qmax == torch.finfo(fmt.storage).max and fmt.qmin == -fmt.qmax


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_round_trip_per_tensor(name, sym):
    fmt = FORMATS[name]
    x = _data((64, 96), seed=1)
    s, z = fmt.choose_qparams(x.min(), x.max(), sym)
    assert s.shape == () and (z is None or z.shape == ())
    q = fmt.quantize(x, s, z)
    _check_codes(fmt, q)
    _check_round_trip(fmt, x, fmt.dequantize(q, s, z), s)


@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_round_trip_per_channel(name, sym):
    fmt = FORMATS[name]
    x = _data((64, 96), seed=2)
    s, z = fmt.choose_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), sym)
    assert s.shape == (64, 1)
    q = fmt.quantize(x, s, z)
    _check_codes(fmt, q)
    _check_round_trip(fmt, x, fmt.dequantize(q, s, z), s)


@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_round_trip_per_channel_conv_weight(name, sym):
    fmt = FORMATS[name]
    w = _data((8, 3, 3, 3), seed=3)
    flat = w.reshape(8, -1)
    s, z = fmt.choose_qparams(flat.amin(1), flat.amax(1), sym)
    s = s.reshape(8, 1, 1, 1)
    z = None if z is None else z.reshape(8, 1, 1, 1)
    q = torch.ops.qcompile.quantize(w, s, z, name, 0)
    _check_codes(fmt, q)
    _check_round_trip(fmt, w, torch.ops.qcompile.dequantize(q, s, z, name, 0, torch.float32), s)


@pytest.mark.parametrize("name,sym", SYM_CASES)
@pytest.mark.parametrize("k,group", [(512, 128), (576, 128), (100, 32)])
def test_round_trip_per_group(name, sym, k, group):
    fmt = FORMATS[name]
    x = _data((16, k), seed=4 + k)
    lo, hi = _minmax_groups(x, group)
    s, z = fmt.choose_qparams(lo, hi, sym)
    assert s.shape == (16, math.ceil(k / group))
    q = torch.ops.qcompile.quantize(x, s, z, name, group)
    assert q.shape == x.shape
    _check_codes(fmt, q)
    xh = torch.ops.qcompile.dequantize(q, s, z, name, group, torch.float32)
    _check_round_trip(fmt, x, xh, _expand_groups(s, group, k))


@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_per_group_last_partial_group_is_quantized(name, sym):
    """K = 576 = 4.5 x 128: the last 64 columns form their own (short) group with their own scale."""
    fmt = FORMATS[name]
    k, group = 576, 128
    x = _data((8, k), seed=5)
    x[:, 512:] *= 50.0                      # the tail has a much wider range than the rest
    lo, hi = _minmax_groups(x, group)
    s, z = fmt.choose_qparams(lo, hi, sym)
    assert s.shape == (8, 5)
    q = torch.ops.qcompile.quantize(x, s, z, name, group)
    xh = torch.ops.qcompile.dequantize(q, s, z, name, group, torch.float32)
    assert q.shape == x.shape and xh.shape == x.shape
    # the tail's codes are exactly those of quantizing the tail alone with the last group's scale
    s_last = s[:, -1:]
    z_last = None if z is None else z[:, -1:]
    tail = x[:, 512:].contiguous()
    q_tail = fmt.quantize(tail, s_last, z_last)
    assert torch.equal(q[:, 512:], q_tail)
    assert torch.equal(xh[:, 512:], fmt.dequantize(q_tail, s_last, z_last))
    # ... and it is reconstructed, not dropped (zeros) nor quantized with a neighbour's scale
    assert xh[:, 512:].abs().amax() > 0.5 * x[:, 512:].abs().amax()
    err = (xh[:, 512:] - tail).abs()
    bound = fmt.error_bound(tail, s_last)
    assert (err <= bound).all()


@pytest.mark.parametrize("name", NAMES)
def test_exact_zero_maps_to_zero_symmetric(name):
    fmt = FORMATS[name]
    x = _data((16, 64), seed=6)
    x[:, ::5] = 0.0
    x[3] = 0.0                                        # an all-zero channel
    for lo, hi, gs in [(x.min(), x.max(), 0), (x.amin(1, keepdim=True), x.amax(1, keepdim=True), 0),
                       (*_minmax_groups(x, 16), 16)]:
        s, z = fmt.choose_qparams(lo, hi, True)
        assert torch.isfinite(s).all() and (s > 0).all()
        q = torch.ops.qcompile.quantize(x, s, z, name, gs)
        xh = torch.ops.qcompile.dequantize(q, s, z, name, gs, torch.float32)
        assert (xh[x == 0] == 0).all(), f"{name}: 0 does not round-trip exactly"


@pytest.mark.parametrize("name", INT_NAMES)
def test_exact_zero_maps_to_zero_asymmetric(name):
    fmt = FORMATS[name]
    x = _data((16, 64), seed=7) + 0.3
    x[:, ::7] = 0.0
    s, z = fmt.choose_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), False)
    xh = fmt.dequantize(fmt.quantize(x, s, z), s, z)
    assert (xh[x == 0] == 0).all()


def test_unsigned_symmetric_extremes_within_error_bound():
    """Each row's max|x| lands on the rounding tie at code 127.5 and still meets the bound."""
    fmt = FORMATS["uint8"]
    amax = torch.linspace(0.5, 20.0, 256)
    x = torch.stack([amax, -amax, amax / 3], 1)
    s, z = fmt.choose_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), True)
    _check_round_trip(fmt, x, fmt.dequantize(fmt.quantize(x, s, z), s, z), s)


@pytest.mark.parametrize("name", INT_NAMES)
def test_symmetric_scale_covers_range_without_clipping_beyond_half_step(name):
    fmt = FORMATS[name]
    x = torch.tensor([[-3.0, 1.0, 0.5], [0.25, 2.0, -0.125]])
    s, z = fmt.choose_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), True)
    xh = fmt.dequantize(fmt.quantize(x, s, z), s, z)
    assert ((xh - x).abs() <= s * 0.5001).all()


# -- storage -----------------------------------------------------------------------------------
def _random_codes(fmt, shape, g):
    if fmt.kind == "float":
        return (torch.randn(shape, generator=g) * fmt.qmax / 8).clamp(fmt.qmin, fmt.qmax).to(fmt.storage)
    return torch.randint(int(fmt.qmin), int(fmt.qmax) + 1, shape, generator=g).to(fmt.storage)


def _bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (1001,), (3, 5, 7), (64, 576)])
def test_pack_unpack_bit_exact(name, shape):
    fmt = FORMATS[name]
    q = _random_codes(fmt, shape, _gen(8))
    packed = fmt.pack(q)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == fmt.packed_nbytes(q.numel()) == math.ceil(q.numel() * fmt.bits / 8)
    out = fmt.unpack(packed, q.shape)
    assert _bits_equal(out, q)


@pytest.mark.parametrize("name", NAMES)
def test_pack_covers_every_code_and_non_contiguous(name):
    fmt = FORMATS[name]
    if fmt.kind == "float":
        codes = torch.arange(256, dtype=torch.uint8).view(fmt.storage)
        codes = codes[~torch.isnan(codes.float())]
    else:
        codes = torch.arange(int(fmt.qmin), int(fmt.qmax) + 1).to(fmt.storage)
    assert _bits_equal(fmt.unpack(fmt.pack(codes), codes.shape), codes)
    q = _random_codes(fmt, (6, 10), _gen(9)).t()            # non-contiguous
    assert not q.is_contiguous()
    assert _bits_equal(fmt.unpack(fmt.pack(q), q.shape), q.contiguous())


@pytest.mark.parametrize("name", NAMES)
def test_packed_size_ratio(name):
    fmt = FORMATS[name]
    n = 4096
    q = _random_codes(fmt, (n,), _gen(10))
    expected = n * fmt.bits // 8
    assert fmt.packed_nbytes(n) == expected == fmt.pack(q).numel()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), dims=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_pack_unpack_property(name, dims, seed):
    fmt = FORMATS[name]
    q = _random_codes(fmt, tuple(dims), _gen(seed))
    packed = fmt.pack(q)
    assert packed.numel() == fmt.packed_nbytes(q.numel())
    assert _bits_equal(fmt.unpack(packed, q.shape), q)


# -- format specifics --------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_fp8_saturates_at_max(name):
    fmt = FORMATS[name]
    fmax = torch.finfo(fmt.storage).max
    x = torch.tensor([1e9, -1e9, 2 * fmax, -1.01 * fmax, float("inf"), float("-inf"), fmax, 3.0])
    one = torch.tensor(1.0)
    for q in (fmt.quantize(x, one, None), torch.ops.qcompile.quantize(x, one, None, name, 0)):
        assert q.dtype == fmt.storage
        qf = q.float()
        assert torch.isfinite(qf).all(), f"{name} produced inf/nan: {qf}"
        assert qf.tolist() == [fmax, -fmax, fmax, -fmax, fmax, -fmax, fmax, 3.0]
    # values beyond the calibrated range clamp to ±max * scale
    s, _ = fmt.choose_qparams(torch.tensor(-2.0), torch.tensor(2.0), True)
    y = fmt.dequantize(fmt.quantize(torch.tensor([10.0, -10.0, 2.0]), s, None), s, None)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, torch.tensor([2.0, -2.0, 2.0]), rtol=1e-6)


def test_nf4_codebook():
    fmt = FORMATS["nf4"]
    book = torch.tensor(fmt.codebook)
    assert fmt.codebook == NF4_CODEBOOK
    assert book.numel() == 16
    assert (book[1:] > book[:-1]).all()
    assert book.min() == -1.0 and book.max() == 1.0
    assert (book == 0).sum() == 1
    # every code book value (times a scale) is reproduced exactly
    s = torch.tensor(0.37)
    q = fmt.quantize(book * s, s, None)
    assert q.tolist() == list(range(16))
    assert torch.equal(fmt.dequantize(q, s, None), book * s)


def test_get_format_unknown_suggests():
    with pytest.raises(RecipeError) as e:
        get_format("int9")
    assert e.value.field == "format"
    assert "int9" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(RecipeError) as e:
        get_format("fp8_e4m2", field="default.weight.format")
    assert e.value.field == "default.weight.format"
    assert "fp8_e4m3" in str(e.value) or "fp8_e5m2" in str(e.value)
    with pytest.raises(RecipeError, match="valid values"):
        get_format("qqqqqqqqqqqq")


@pytest.mark.parametrize("name", SYMMETRIC_ONLY)
def test_asymmetric_rejected_for_symmetric_only_formats(name):
    fmt = FORMATS[name]
    with pytest.raises(RecipeError, match="symmetric"):
        fmt.choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), False)
    with pytest.raises(RecipeError) as e:
        QuantSpec(name, symmetric=False).validate("default.weight")
    assert e.value.field == "default.weight.symmetric"
    with pytest.raises(RecipeError):
        torch.ops.qcompile.choose_qparams(torch.randn(2, 4), name, False, True)


def test_unknown_format_in_op_raises():
    with pytest.raises(RecipeError):
        torch.ops.qcompile.quantize(torch.randn(4), torch.tensor(0.1), None, "int9", 0)


# -- ops -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_ops_match_format_methods(name, sym):
    fmt = FORMATS[name]
    x = _data((12, 40), seed=11)
    for lo, hi in [(x.min(), x.max()), (x.amin(1, keepdim=True), x.amax(1, keepdim=True))]:
        s, z = fmt.choose_qparams(lo, hi, sym)
        q_op = torch.ops.qcompile.quantize(x, s, z, name, 0)
        q_ref = fmt.quantize(x, s, z)
        assert _bits_equal(q_op, q_ref)
        for dtype in (torch.float32, torch.bfloat16):
            d_op = torch.ops.qcompile.dequantize(q_op, s, z, name, 0, dtype)
            assert d_op.dtype == dtype
            assert torch.equal(d_op, fmt.dequantize(q_ref, s, z, dtype))


@pytest.mark.parametrize("name,sym", SYM_CASES)
def test_choose_qparams_op(name, sym):
    fmt = FORMATS[name]
    x = _data((2, 5, 16), seed=12)
    s, z = torch.ops.qcompile.choose_qparams(x, name, sym, True)
    assert s.shape == (2, 5, 1) and z.shape == (2, 5, 1)
    assert s.dtype == torch.float32 and z.dtype == fmt.storage
    s_ref, z_ref = fmt.choose_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), sym)
    assert torch.equal(s, s_ref)
    if z_ref is not None:
        assert torch.equal(z, z_ref)
    else:
        assert (z.float() == 0).all()
    s2, z2 = torch.ops.qcompile.choose_qparams(x[0], name, sym, True)      # 2-D input
    assert s2.shape == (5, 1) and z2.shape == (5, 1)
    s3, z3 = torch.ops.qcompile.choose_qparams(x, name, sym, False)       # per tensor
    assert s3.shape == () and z3.shape == ()
    # the per-token qparams quantize each token within the bound
    zq = z if z_ref is not None else None
    q = torch.ops.qcompile.quantize(x, s, zq, name, 0)
    xh = torch.ops.qcompile.dequantize(q, s, zq, name, 0, torch.float32)
    err = (xh - x).abs()
    assert (err <= fmt.error_bound(x, s) + 1e-4 * s).all()


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "fp8_e4m3", "nf4"])
def test_opcheck(name):
    fmt = FORMATS[name]
    x = _data((2, 5, 24), seed=13)
    sym = not fmt.supports_asymmetric or name == "int4"
    s, z = torch.ops.qcompile.choose_qparams(x, name, sym, True)
    zp = z if (not sym or (fmt.kind == "int" and not fmt.signed)) else None
    torch.library.opcheck(torch.ops.qcompile.choose_qparams.default, (x, name, sym, True))
    torch.library.opcheck(torch.ops.qcompile.quantize.default, (x, s, zp, name, 0))
    q = torch.ops.qcompile.quantize(x, s, zp, name, 0)
    # opcheck's own schema check compares inputs with allclose, which has no fp8 kernel on CPU
    deq_utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    if fmt.kind != "float":
        deq_utils = ("test_schema", "test_autograd_registration") + deq_utils
    torch.library.opcheck(torch.ops.qcompile.dequantize.default, (q, s, zp, name, 0, torch.float32),
                          test_utils=deq_utils)
    lo, hi = _minmax_groups(x, 16)   # 24 = 16 + 8: a short last group
    sg, zg = fmt.choose_qparams(lo, hi, sym)
    torch.library.opcheck(torch.ops.qcompile.quantize.default, (x, sg, zg, name, 16))
    qg = torch.ops.qcompile.quantize(x, sg, zg, name, 16)
    torch.library.opcheck(torch.ops.qcompile.dequantize.default, (qg, sg, zg, name, 16, torch.float32),
                          test_utils=deq_utils)


class _DynamicQDQ(torch.nn.Module):
    """Per-token dynamic activations and a statically quantized, group-wise weight (K = 576)."""

    def __init__(self):
        super().__init__()
        g = _gen(14)
        w = torch.randn(16, 576, generator=g)
        lo, hi = _minmax_groups(w, 128)
        s, z = FORMATS["uint4"].choose_qparams(lo, hi, False)
        self.register_buffer("wq", torch.ops.qcompile.quantize(w, s, z, "uint4", 128))
        self.register_buffer("ws", s)
        self.register_buffer("wz", z)

    def forward(self, x):
        s, z = torch.ops.qcompile.choose_qparams(x, "uint8", False, True)
        xq = torch.ops.qcompile.quantize(x, s, z, "uint8", 0)
        xd = torch.ops.qcompile.dequantize(xq, s, z, "uint8", 0, torch.float32)
        w = torch.ops.qcompile.dequantize(self.wq, self.ws, self.wz, "uint4", 128, torch.float32)
        return xd @ w.t()


def test_ops_under_export():
    m = _DynamicQDQ().eval()
    x = torch.randn(2, 3, 576, generator=_gen(15))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.qcompile.quantize.default in targets
    assert torch.ops.qcompile.dequantize.default in targets
    assert torch.ops.qcompile.choose_qparams.default in targets
    assert any("qcompile.quantize" in str(t) for t in targets)
    # the fake impl's shapes/dtypes agree with the real run
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.qcompile.quantize.default:
            assert n.meta["val"].dtype == torch.uint8
        if n.op == "call_function" and n.target is torch.ops.qcompile.choose_qparams.default:
            s_val, z_val = n.meta["val"]
            assert s_val.shape[-1] == 1 and s_val.dim() == 3 and z_val.dtype == torch.uint8
    out = ep.module()(x)
    assert torch.equal(out, m(x))
    x5 = torch.randn(5, 3, 576, generator=_gen(16))      # another batch size
    assert torch.equal(ep.module()(x5), m(x5))


@pytest.mark.parametrize("groups", [4, 6])
def test_group_count_mismatch_raises(groups):
    x = torch.randn(4, 576)
    s = torch.rand(4, groups) + 0.01
    with pytest.raises(ValueError, match="groups"):
        torch.ops.qcompile.quantize(x, s, None, "int4", 128)
    q = torch.zeros(4, 576, dtype=torch.int8)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.qcompile.dequantize(q, s, None, "int4", 128, torch.float32)


def test_group_count_mismatch_rejected_at_export():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.rand(4, 4) + 0.01)   # 576 / 128 needs 5 groups

        def forward(self, x):
            return torch.ops.qcompile.quantize(x, self.s, None, "int4", 128)

    with pytest.raises(Exception, match="groups"):
        torch.export.export(Bad(), (torch.randn(4, 576),))


# -- float16 scales (QuantSpec.scale_dtype) --------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].bits < 8 or FORMATS[n].kind != "float"])
@pytest.mark.parametrize("sym", [True, False])
def test_float16_scales_round_trip_and_count_two_bytes(name, sym):
    from qcompile.measure import weight_bytes  # noqa: F401 - the size accounting used by the report
    from qcompile.observers import weight_qparams
    from qcompile.spec import QuantSpec

    fmt = FORMATS[name]
    if not sym and not fmt.supports_asymmetric:
        pytest.skip("symmetric-only format")
    w = torch.randn(8, 100, generator=_gen(21)) * 0.03
    s32 = QuantSpec(name, "per_group", symmetric=sym, group_size=32)
    s16 = QuantSpec(name, "per_group", symmetric=sym, group_size=32, scale_dtype="float16")
    scale, zp = weight_qparams(w, s16, 0)
    assert scale.dtype == torch.float16 and scale.shape == (8, 4)
    ref, _ = weight_qparams(w, s32, 0)
    assert (scale.float() >= ref * (1 - 1e-7)).all()          # rounded up: the range stays covered
    q = torch.ops.qcompile.quantize(w, scale, zp, name, 32)
    w_hat = torch.ops.qcompile.dequantize(q, scale, zp, name, 32, torch.float32)
    step = scale.float().repeat_interleave(32, 1)[:, :100]
    assert ((w - w_hat).abs() <= fmt.error_bound(w, step) * 1.01 + 1e-12).all()
    assert scale.nbytes == 2 * scale.numel()


def test_scale_dtype_validated_and_round_trips():
    from qcompile.errors import RecipeError
    from qcompile.recipe import LayerConfig, Recipe
    from qcompile.spec import QuantSpec

    spec = QuantSpec("uint4", "per_group", symmetric=False, group_size=64, scale_dtype="float16")
    r = Recipe(default=LayerConfig(spec))
    assert Recipe.from_dict(r.to_dict()) == r
    assert "scale_dtype" not in QuantSpec("int8").to_dict()       # default stays out of recipe files
    with pytest.raises(RecipeError, match="scale_dtype.*did you mean 'float16'"):
        QuantSpec("int4", scale_dtype="float61").validate("default.weight")


# -- NF4 with double-quantized scales (scale_dtype: int8) ------------------------------------------
def test_nf4_double_quantization_sizes_and_numerics():
    from qcompile.formats import double_quantize_scales

    g = _gen(31)
    scale = torch.rand(576, 9, generator=g) * 0.02 + 0.001        # 576 rows, 9 groups of 64
    codes, block_scales, offset = double_quantize_scales(scale)
    assert codes.dtype == torch.int8 and codes.shape == (576 * 9,)
    assert block_scales.shape == (-(-576 * 9 // 256),) and offset.dim() == 0
    rebuilt = torch.ops.qcompile.dequantize(codes, block_scales, None, "int8", 256, torch.float32) + offset
    assert (rebuilt.reshape(576, 9) - scale).abs().max() <= block_scales.max() / 2 * 1.001
    # bits per weight of NF4 g64: 4 (codes) + 8/64 (int8 scales) + 32/(64*256) (block scales)
    n_weights = 576 * 576
    bits = 4 * n_weights + 8 * codes.numel() + 32 * block_scales.numel() + 32
    assert abs(bits / n_weights - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01
    assert abs(bits / n_weights - 4.127) < 0.01                   # QLoRA's 4.127 bits per parameter


def test_nf4_double_quant_end_to_end_is_smaller_and_close():
    from qcompile.recipe import LayerConfig, Recipe
    from qcompile.spec import QuantSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 256), torch.nn.ReLU(), torch.nn.Linear(256, 96)).eval()
    x = torch.randn(4, 576)
    out = {}
    for dt in ("float32", "int8"):
        r = Recipe(default=LayerConfig(QuantSpec("nf4", "per_group", group_size=64, scale_dtype=dt)))
        q = qcompile.quantize(model, r, (x,), calibration=[(x,)])
        out[dt] = (q, q.report.linear_weight_bytes_after)
    n = 576 * 256 + 256 * 96
    assert out["int8"][1] < out["float32"][1]
    assert abs(out["int8"][1] * 8 / n - 4.127) < 0.02             # real stored bytes, scales included
    assert abs(out["float32"][1] * 8 / n - 4.5) < 0.01
    with torch.no_grad():
        ref, a, b = model(x), out["float32"][0](x), out["int8"][0](x)
    assert (a - b).abs().max() < 0.05 * ref.abs().max()             # double quantization costs little
    gm = out["int8"][0].graph_module
    assert any(n.target == torch.ops.aten.clamp_min.default for n in gm.graph.nodes)


def test_double_quant_needs_per_group():
    from qcompile.errors import RecipeError
    from qcompile.spec import QuantSpec

    with pytest.raises(RecipeError, match="need per_group"):
        QuantSpec("nf4", "per_channel", scale_dtype="int8").validate("default.weight")


# -- FP8: NaN handling and per-row scales ---------------------------------------------------------
@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_fp8_nan_propagates_and_per_row_scales(name):
    fmt = FORMATS[name]
    x = torch.tensor([[1.0, float("nan"), -2.0], [0.5, 0.25, 4.0]])
    q = torch.ops.qcompile.quantize(x, torch.tensor(1.0), None, name, 0)
    y = torch.ops.qcompile.dequantize(q, torch.tensor(1.0), None, name, 0, torch.float32)
    assert torch.isnan(y[0, 1]) and torch.isfinite(y[[0, 0, 1, 1, 1], [0, 2, 0, 1, 2]]).all()
    # per row (per_channel on a Linear weight): each row's max maps to the format's max
    from qcompile.observers import weight_qparams
    from qcompile.spec import QuantSpec

    w = torch.randn(4, 64, generator=_gen(41)) * torch.tensor([[1e-3], [1.0], [30.0], [1e3]])
    s, z = weight_qparams(w, QuantSpec(name, "per_channel"), 0)
    assert s.shape == (4, 1) and z is None
    w_hat = torch.ops.qcompile.dequantize(torch.ops.qcompile.quantize(w, s, None, name, 0), s, None, name, 0,
                                          torch.float32)
    rel = ((w - w_hat).abs() / w.abs().amax(1, keepdim=True)).max()
    assert rel < 2.0 ** -fmt.mantissa_bits                         # same relative error on every row
