"""The triton backend under Triton's CPU interpreter: kernel parity against torch references
(small shapes, large blocks), the lowering's graph structure and negative cases, and the shared
conformance suite. No GPU is used here; docs/triton.md says what was not measured."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process


import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the triton backend needs the 'triton' extra: pip install 'qcompile[triton]'")

import qcompile  # noqa: E402
from backend_conformance import BackendConformance, _quantize, assert_matches_reference  # noqa: E402
from conftest import TinyBlock  # noqa: E402
from qcompile.backends.triton import graph_ops  # noqa: E402
from qcompile.backends.triton.activation_quant import quantize_per_token, quantize_static  # noqa: E402
from qcompile.backends.triton.select import KernelConfig, bucket, choose  # noqa: E402
from qcompile.backends.triton.w8a8 import pack_int8_weight, w8a8_linear  # noqa: E402
from qcompile.backends.triton.weight_only import pack_weight, weight_only_linear  # noqa: E402
from qcompile.errors import BackendError  # noqa: E402
from qcompile.formats import get_format  # noqa: E402

if not graph_ops.INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set in this process", allow_module_level=True)

Q, DQ, CQ = torch.ops.qcompile.quantize, torch.ops.qcompile.dequantize, torch.ops.qcompile.choose_qparams


def _quantized_weight(fmt, group, symmetric, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    f = get_format(fmt)
    if group:
        groups = -(-k // group)
        wp = torch.nn.functional.pad(w, (0, groups * group - k)).reshape(n, groups, group)
        # the zero padding of the short last group stays inside [min, max] because min <= 0 <= max
        lo, hi = wp.amin(-1), wp.amax(-1)
    else:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s, z = f.choose_qparams(lo, hi, symmetric)
    q = Q(w, s, z, fmt, group)
    return q, s, z, DQ(q, s, z, fmt, group, torch.float32)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# K = 200 is not a multiple of 32/64/128: every grouped case has a short last group
@pytest.mark.parametrize("fmt,symmetric", [("uint4", False), ("int4", True), ("int4", False), ("int8", True),
                                           ("uint8", False), ("nf4", True), ("fp8_e4m3", True)])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("m", [1, 6])
def test_weight_only_matches_torch(fmt, symmetric, group, m):
    n, k = 40, 200
    q, s, z, w_hat = _quantized_weight(fmt, group, symmetric, n, k)
    x, b = torch.randn(2, m, k), torch.randn(n)
    y = weight_only_linear(x, pack_weight(q, s, z, fmt, group), b, interpret=True)
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    assert _rel(y, torch.nn.functional.linear(x, w_hat, b)) < 1e-5


@pytest.mark.parametrize("cfg", [KernelConfig(1, 16, 32, split_k=3), KernelConfig(16, 32, 64, split_k=2),
                                 KernelConfig(4, 16, 16, split_k=1)])
def test_weight_only_split_k_and_small_blocks(cfg):
    n, k, m = 24, 200, 1 if cfg.block_m == 1 else 5
    q, s, z, w_hat = _quantized_weight("uint4", 64, False, n, k)
    x = torch.randn(m, k)
    y = weight_only_linear(x, pack_weight(q, s, z, "uint4", 64), None, config=cfg, interpret=True)
    assert _rel(y, x @ w_hat.t()) < 1e-5


def test_weight_only_half_precision_activations():
    q, s, z, w_hat = _quantized_weight("uint4", 32, False, 32, 64)
    x = torch.randn(3, 64)
    for dt in (torch.float16, torch.bfloat16):
        y = weight_only_linear(x.to(dt), pack_weight(q, s, z, "uint4", 32), None, interpret=True)
        assert y.dtype == dt and _rel(y, x @ w_hat.t()) < 2e-2


def test_int4_packs_two_codes_per_byte():
    q, s, z, _ = _quantized_weight("uint4", 32, False, 8, 63)
    p = pack_weight(q, s, z, "uint4", 32)
    assert p.codes.dtype == torch.uint8 and p.codes.shape == (32, 8)   # ceil(63 / 2) rows, N columns
    assert torch.equal((p.codes[5] & 0xF).to(torch.uint8), q[:, 10]) and torch.equal(p.codes[5] >> 4, q[:, 11])


def test_pack_rejects_what_the_kernel_does_not_read():
    q, s, z, _ = _quantized_weight("int8", 0, True, 8, 16)
    with pytest.raises(ValueError, match="int2"):
        pack_weight(q, s, z, "int2", 0)
    with pytest.raises(ValueError, match="symmetric"):
        pack_int8_weight(q, s, torch.ones_like(s, dtype=torch.int8))


@pytest.mark.parametrize("fmt,symmetric", [("uint8", False), ("int8", True), ("int8", False)])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("m", [1, 7])
def test_w8a8_and_activation_quant_match_torch(fmt, symmetric, dynamic, m):
    n, k = 40, 100
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(2, m, k, generator=g) * 3 + 0.5, torch.randn(n, generator=g)
    ws = w.abs().amax(1, keepdim=True) / 127
    wq = Q(w, ws, None, "int8", 0)
    if dynamic:
        s, z = CQ(x, fmt, symmetric, True)
        codes, s2, z2 = quantize_per_token(x, fmt, symmetric, interpret=True)
        assert torch.equal(s2, s) and torch.equal(z2, z)
    else:
        s, z = get_format(fmt).choose_qparams(x.min(), x.max(), symmetric)
        codes, s2, z2 = quantize_static(x, s, z, fmt, interpret=True), s, z
    ref_codes = Q(x, s, z, fmt, 0)
    assert codes.dtype == ref_codes.dtype and torch.equal(codes, ref_codes)
    y = w8a8_linear(codes, s2, z2, pack_int8_weight(wq, ws, None), b, interpret=True)
    ref = torch.nn.functional.linear(DQ(ref_codes, s, z, fmt, 0, torch.float32), DQ(wq, ws, None, "int8", 0, torch.float32), b)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("m", [1, 7])
def test_fp8_gemm_matches_torch(per_token, m):
    from qcompile.backends.triton.fp8 import fp8_linear, pack_fp8_weight

    n, k = 40, 100
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(2, m, k, generator=g), torch.randn(n, generator=g)
    ws = w.abs().amax(1, keepdim=True) / 448
    wq = Q(w, ws, None, "fp8_e4m3", 0)
    s = x.abs().amax(-1, keepdim=True) / 448 if per_token else x.abs().max() / 448
    codes = Q(x, s, None, "fp8_e4m3", 0)
    y = fp8_linear(codes, s, pack_fp8_weight(wq, ws), b, interpret=True)
    ref = torch.nn.functional.linear(DQ(codes, s, None, "fp8_e4m3", 0, torch.float32),
                                     DQ(wq, ws, None, "fp8_e4m3", 0, torch.float32), b)
    assert y.shape == (2, m, n) and _rel(y, ref) < 1e-5


def test_activation_quant_rounds_half_to_even_like_torch():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0]])
    s, z = torch.tensor(1.0), torch.tensor(3, dtype=torch.uint8)
    assert quantize_static(x, s, z, "uint8", interpret=True).tolist() == Q(x, s, z, "uint8", 0).tolist() \
        == [[3, 5, 5, 3, 1, 1, 255, 0]]


def test_kernel_selection_buckets_and_group_alignment():
    assert [bucket(m) for m in (1, 16, 17, 256, 257, 4096)] == ["decode", "decode", "medium", "medium", "prefill", "prefill"]
    gpu = choose("weight_only", 1, 4096, 4096, 128, interpret=False)
    assert gpu.block_m == 1 and gpu.split_k > 1 and 128 % gpu.block_k == 0   # GEMV, split-K at decode
    assert choose("weight_only", 16, 4096, 4096, 128, False).block_m == 16
    assert choose("weight_only", 4096, 4096, 4096, 128, False).block_m == 128
    assert choose("weight_only", 64, 4096, 4096, 48, False).block_k == 16      # divides the group of 48
    assert choose("weight_only", 64, 32, 64, 64, True) == KernelConfig(64, 32, 64)   # interpreter: whole matrix


def test_tuned_choice_is_cached_per_bucket_and_refitted_to_each_m():
    """With a timer (GPU autotuning), each bucket's candidates are timed once per shape; the winner is
    fitted again to every M of the bucket (M = 1 keeps the GEMV path, M = 8 a 16-row tile)."""
    timed = []

    def timer(cfg):  # prefers narrow N blocks: deterministic, and not the table's first entry
        timed.append(cfg)
        return cfg.block_n

    a = choose("weight_only", 1, 4096, 4096, 128, False, timer, key_extra=("test",))
    b = choose("weight_only", 8, 4096, 4096, 128, False, timer, key_extra=("test",))
    assert len(timed) == 4 and a.block_n == b.block_n == 32
    assert a.block_m == 1 and b.block_m == 16


def _block_model(recipe):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(3)]
    return _quantize(TinyBlock().eval(), recipe, batches), batches


@pytest.mark.parametrize("recipe,kernel,n_quant", [("w8a8", "w8a8 (uint8 activations)", 4),
                                                   ("w8a8-dynamic", "w8a8 (uint8 activations)", 4),
                                                   ("w4-g64", "weight-only uint4 g64", 0),
                                                   ("w8", "weight-only int8 per-channel", 0)])
def test_lowering_replaces_every_linear(recipe, kernel, n_quant):
    q, batches = _block_model(recipe)
    art = qcompile.lower(q, backend="triton")
    assert isinstance(art, torch.nn.Module) and art.backend == "triton-cuda"
    nodes = list(art.graph_module.graph.nodes)
    assert not any(n.target == torch.ops.aten.linear.default for n in nodes)
    assert set(art.fused.values()) == {kernel} and len(art.fused) == 6 and not art.skipped
    quant_ops = [n for n in nodes if n.target in (graph_ops.quantize_static, graph_ops.quantize_per_token)]
    assert len(quant_ops) == n_quant
    assert not any(n.target == torch.ops.qcompile.choose_qparams.default for n in nodes)
    # the user's model is untouched and the copy has no float or unpacked weight codes left for Linears
    assert sum(n.target == torch.ops.aten.linear.default for n in q.graph_module.graph.nodes) == 6
    with torch.no_grad():
        assert_matches_reference(art(*batches[1]), q(*batches[1]))


def test_w4_group128_with_short_last_group_runs_through_the_kernel():
    """K = 200 with groups of 128: one full group and a short one of 72."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).eval()
    batches = [(torch.randn(2, 3, 200),), (torch.randn(1, 1, 200),), (torch.randn(1, 5, 200),)]
    q = _quantize(model, "w4-g128", batches)
    art = qcompile.lower(q, backend="triton")
    assert len(art.fused) == 2
    with torch.no_grad():
        for (x,) in batches[1:]:  # M = 1 (GEMV) and M = 5
            assert_matches_reference(art(x), q(x))


def _mlp_quantized(weight, activation=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    recipe = qcompile.Recipe(name="custom", default=qcompile.LayerConfig(weight=weight, activation=activation),
                             calibration=qcompile.CalibrationConfig(progress=False))
    xs = [(torch.randn(3, 32),), (torch.randn(5, 32),)]
    return qcompile.quantize(model, recipe, xs[0], calibration=xs, report_samples=1), xs


@pytest.mark.parametrize("act", [None, qcompile.QuantSpec("fp8_e4m3", "per_tensor", symmetric=True)])
def test_fp8_weights_and_fp8_gemm(act):
    q, xs = _mlp_quantized(qcompile.QuantSpec("fp8_e4m3", "per_channel", symmetric=True), act)
    art = qcompile.lower(q, backend="triton")
    kernel = "weight-only fp8_e4m3 per-channel" if act is None else "fp8 gemm (fp8_e4m3 activations)"
    assert set(art.fused.values()) == {kernel} and len(art.fused) == 2
    with torch.no_grad():
        for x in xs:
            assert_matches_reference(art(*x), q(*x))
    if act is not None:  # the fp8 activation codes are PyTorch's own cast: identical
        parity = qcompile.verify(art, q, xs)
        assert parity.passed and parity.max_steps == 0 and len(parity.points) == 2


def test_unsupported_formats_stay_in_pytorch_with_a_reason():
    q, xs = _mlp_quantized(qcompile.QuantSpec("int2", "per_channel", symmetric=True))
    art = qcompile.lower(q, backend="triton")
    assert not art.fused and all("int2" in r for r in art.skipped.values())
    with torch.no_grad():
        assert_matches_reference(art(*xs[1]), q(*xs[1]))


def test_cuda_tensors_are_refused_under_the_interpreter():
    q, _ = _block_model("w8")
    with pytest.raises(BackendError, match="CPU tensors"):
        qcompile.lower(q, backend="triton", device="cuda")


class TestTritonBackend(BackendConformance):
    backend = "triton"


_NO_DEVICE_SCRIPT = r"""
import sys, dataclasses, torch
sys.path.insert(0, "tests")
import qcompile
from qcompile.errors import BackendError
from backend_conformance import _quantize
model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
q = _quantize(model, "w8", [(torch.randn(2, 16),)])
try:
    qcompile.lower(q, backend="triton")
except BackendError as e:
    print("NO_GPU:", e)
sys.modules["triton"] = None   # as if the extra were not installed
for mod in [m for m in sys.modules if m.startswith("qcompile.backends.triton")]:
    del sys.modules[mod]
try:
    qcompile.lower(q, backend="triton-cuda")
except BackendError as e:
    print("NO_TRITON:", e)
"""


def test_clear_errors_without_a_gpu_or_without_triton():
    """A fresh process without TRITON_INTERPRET and without a GPU (this machine), then without triton."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-device error cannot happen here")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _NO_DEVICE_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith("NO_"))
    assert "needs a CUDA GPU" in lines["NO_GPU"] and "TRITON_INTERPRET=1" in lines["NO_GPU"]
    assert "qcompile[triton]" in lines["NO_TRITON"]


def test_gpu_benchmark_script_runs_under_the_interpreter():
    """benchmarks/gpu/bench_linear.py cannot be timed here; its code path (packing, every kernel row,
    the correctness column) runs on tiny shapes so a GPU session does not find a broken script."""
    import importlib.util
    import time

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu", "bench_linear.py")
    spec = importlib.util.spec_from_file_location("bench_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert "TRITON_INTERPRET" in bench.no_gpu_reason()

    def once(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    rows = bench.run(ms=[1, 3], shapes=[(256, 32)], device="cpu", timer=once, copy_bytes=1 << 16)
    kernels = {r["kernel"] for r in rows}
    assert {"cublas-fp16", "w4a16-g128", "w8a16", "nf4-g64", "w8a8-dyn"} <= kernels
    assert not [r for r in rows if "error" in r]
    assert all(r["max_rel_err"] < 2e-2 for r in rows if r.get("max_rel_err") is not None)
