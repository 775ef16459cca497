"""Integer GEMM kernels side by side, one thread, one process: qcompile's TVM kernel (the family
the host selects, fused float epilogue included) vs onnxruntime ``MatMulInteger`` (u8 x s8 → s32,
a one-node model) vs ``torch._int_mm`` (s8 x s8 → s32), at M=128 K=768 N=3072 and M=1; on AMX
hosts also the ``vnni`` family's kernel (row ``tvm_vnni``); and register-only loops of
``vpdpbusd`` and ``tdpbusd``, the host's measured VNNI and AMX peaks.

``extra_info`` holds ``gops`` (2*M*K*N / median), ``ratio_vs_ort`` (onnxruntime median / this
median: > 1 is faster) and, for the TVM rows, ``pct_of_peak`` (of the peak of the family the row
ran). Run::

    TVM_NUM_THREADS=1 python -m pytest benchmarks/test_tvm_gemm.py --benchmark-only
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

tvm = pytest.importorskip("tvm")
from qcompile.backends.tvm import int8_gemm, pipeline  # noqa: E402
from qcompile.backends.tvm.host import compile_kernel, detect, request_amx  # noqa: E402
from qcompile.backends.tvm.peak import amx_peak_kernel, vnni_peak_kernel  # noqa: E402

K, N = 768, 3072
PEAK_ITERS, PEAK_ACC = 20000, 12
HOST = detect()


def _data(m):
    rng = np.random.default_rng(m)
    return rng.integers(0, 256, (m, K)).astype(np.uint8), rng.integers(-128, 128, (N, K)).astype(np.int8)


def _tvm_gemm(m, family=HOST.family):
    a, w = _data(m)
    np_ = int8_gemm.padded_n(N)
    if family == "amx":
        request_amx()
    mod = compile_kernel(int8_gemm.gemm_kernel(K, np_, False, family))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in (
        a, int8_gemm.weights_for_family(int8_gemm.pack_weights(w), family), np.zeros(np_, np.int32),
        np.ones(1, np.float32), np.zeros(1, np.int32),
        np.ones(np_, np.float32), np.zeros(np_, np.float32), np.zeros((m, np_), np.float32))]
    f = mod["main"]
    return lambda: f(*args), lambda: args[-1].numpy()


def _ort_matmul_integer(m):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a, w = _data(m)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mmi",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, N])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"A": a}
    out = {}

    def run():
        out["y"] = sess.run(None, feed)[0]
    return run, lambda: out["y"]


def _torch_int_mm(m):
    a, w = _data(m)
    at = torch.from_numpy((a.astype(np.int16) - 128).astype(np.int8))  # s8 x s8: the same work
    bt = torch.from_numpy(np.ascontiguousarray(w.T))
    torch._int_mm(at, bt)  # raises for shapes it does not take
    return lambda: torch._int_mm(at, bt), None


IMPLS = {"tvm": _tvm_gemm, "tvm_vnni": lambda m: _tvm_gemm(m, "vnni"), "onnxruntime": _ort_matmul_integer,
         "torch_int_mm": _torch_int_mm}
ROWS = ("onnxruntime", "tvm", *(("tvm_vnni",) if HOST.family == "amx" else ()), "torch_int_mm")
CASES = [(m, impl) for m in (128, 1) for impl in ROWS]


@pytest.mark.parametrize("m,impl", CASES, ids=[f"m{m}-{i}" for m, i in CASES])
def test_gemm(benchmark, session_cache, m, impl):
    torch.set_num_threads(1)
    try:
        run, result = IMPLS[impl](m)
    except RuntimeError as e:
        pytest.skip(f"{impl} does not run M={m}: {str(e).splitlines()[0]}")
    benchmark.group = f"gemm-m{m}-k{K}-n{N}"
    rounds = 50 if m == 128 else 2000
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=5, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("gemm", m, impl)] = median
    if result is not None:
        session_cache[("gemm-out", m, impl)] = result()
    info = {"gops": round(2 * m * K * N / median / 1e9, 1), "threads": 1, "host_family": HOST.family, "mcpu": HOST.mcpu}
    ort = session_cache.get(("gemm", m, "onnxruntime"))
    if ort and impl != "onnxruntime":
        info["ratio_vs_ort"] = round(ort / median, 3)
    family = "vnni" if impl == "tvm_vnni" else HOST.family
    peak = session_cache.get(f"{family}_peak_gops")
    if impl.startswith("tvm") and peak:
        info["pct_of_peak"] = round(100 * info["gops"] / peak, 1)
        info["family"] = family
    benchmark.extra_info.update(info)
    if impl.startswith("tvm") and ("gemm-out", m, "onnxruntime") in session_cache and HOST.has_vnni:
        # (only where onnxruntime is exact: on AVX2 hosts its u8 x s8 kernel saturates 16-bit pair sums)
        # identity epilogue: the float output is the int32 product, and both must agree exactly
        assert np.array_equal(session_cache[("gemm-out", m, impl)][:, :N],
                              session_cache[("gemm-out", m, "onnxruntime")].astype(np.float32))


AMX_PEAK_ITERS = 20000


def _amx_peak():
    request_amx()
    mod = compile_kernel(amx_peak_kernel(AMX_PEAK_ITERS))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ones(1024, np.uint8), dev), tvm.runtime.tensor(np.ones(1024, np.int8), dev),
            tvm.runtime.tensor(np.zeros(1024, np.int32), dev)]
    return mod, args, AMX_PEAK_ITERS * 4 * 16 * 16 * 64 * 2


def _vnni_peak():
    mod = compile_kernel(vnni_peak_kernel(PEAK_ITERS, PEAK_ACC))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ones(16, np.int32), dev), tvm.runtime.tensor(np.ones(64, np.int8), dev),
            tvm.runtime.tensor(np.zeros(PEAK_ACC * 16, np.int32), dev)]
    return mod, args, PEAK_ITERS * PEAK_ACC * 128


PEAKS = {"vnni": _vnni_peak, "amx": _amx_peak}


@pytest.fixture(scope="module", autouse=True)
def family_peaks(session_cache):
    """The register-only loops, timed before the GEMMs so their rows can cite them."""
    for family in [f for f, ok in (("vnni", HOST.has_vnni), ("amx", HOST.family == "amx")) if ok]:
        mod, args, ops = PEAKS[family]()
        t = min(mod.mod.time_evaluator("main", tvm.cpu(), number=5, repeat=5)(*args).results)
        session_cache[f"{family}_peak_gops"] = ops / t / 1e9


@pytest.mark.parametrize("family", ["vnni", "amx"])
def test_peak(benchmark, family):
    """The peak loop itself as a row: ``gops`` is the host's int8 ceiling on one core for the family."""
    if family == "vnni" and not HOST.has_vnni or family == "amx" and HOST.family != "amx":
        pytest.skip(f"this host has no {'avx512_vnni' if family == 'vnni' else 'AMX-INT8 tiles'}")
    mod, args, ops = PEAKS[family]()
    f = mod["main"]
    benchmark.group = f"{family}-peak"
    benchmark.pedantic(lambda: f(*args), rounds=30, warmup_rounds=3, iterations=1)
    f(*args)
    # vnni: u8 (1,0,0,0) . s8 (1,1,1,1) = 1 per step; amx: 64 ones . 64 ones = 64 per step, every lane
    assert (args[2].numpy() == (PEAK_ITERS if family == "vnni" else 64 * AMX_PEAK_ITERS)).all()
    benchmark.extra_info["gops"] = round(ops / benchmark.stats.stats.median / 1e9, 1)


# Float batch matmul of attention at MiniLM batch 32, sequence 128 (12 heads x 32): Q·Kᵀ and P·V.
# qcompile's register-tiled kernel vs what qcompile ran before: TVM's matmul on symbolic shapes
# (as the model's are) with the reduction outside the last spatial loop, left to LLVM, built
# without fast-math flags; vs torch.bmm.
BMM = {"qk": (384, 128, 32, 128), "pv": (384, 128, 128, 32)}


def _bmm_data(shape):
    b, m, k, n = shape
    rng = np.random.default_rng(k)
    return rng.standard_normal((b, m, k)).astype(np.float32), rng.standard_normal((b, k, n)).astype(np.float32)


def _bmm_tvm(shape, kernel):
    from tvm import s_tir, te

    x, y = _bmm_data(shape)
    if kernel == "fbmm":
        func = pipeline.batch_matmul_kernel()
    else:  # TVM's te matmul with the reduction moved outside the last spatial loop
        b, m, k, n = (te.var(v, "int64") for v in "bmkn")
        A, B = te.placeholder((b, m, k), name="A"), te.placeholder((b, k, n), name="B")
        r = te.reduce_axis((0, k), name="k")
        C = te.compute((b, m, n), lambda i, p, q: te.sum(A[i, p, r] * B[i, r, q], axis=r), name="matmul")
        sch = s_tir.Schedule(te.create_prim_func([A, B, C]))
        blk = sch.get_sblock("matmul")
        loops = sch.get_loops(blk)
        sch.reorder(loops[-1], loops[-2])
        sch.decompose_reduction(blk, loops[-1])
        func = sch.mod["main"]
    mod = compile_kernel(func, target=HOST.target(fast_math=kernel == "fbmm"))
    args = [tvm.runtime.tensor(v) for v in (x, y, np.zeros((shape[0], shape[1], shape[3]), np.float32))]
    f = mod["main"]
    return lambda: f(*args), lambda: args[-1].numpy()


def _bmm_torch(shape):
    x, y = (torch.from_numpy(v) for v in _bmm_data(shape))
    out = {}

    def run():
        out["y"] = torch.bmm(x, y)
    return run, lambda: out["y"].numpy()


BMM_IMPLS = {"fbmm": lambda s: _bmm_tvm(s, "fbmm"), "tvm_loop": lambda s: _bmm_tvm(s, "loop"), "torch_bmm": _bmm_torch}
BMM_CASES = [(name, impl) for name in BMM for impl in ("torch_bmm", "tvm_loop", "fbmm")]


@pytest.mark.parametrize("name,impl", BMM_CASES, ids=[f"{n}-{i}" for n, i in BMM_CASES])
def test_float_bmm(benchmark, session_cache, name, impl):
    torch.set_num_threads(1)
    shape = BMM[name]
    run, result = BMM_IMPLS[impl](shape)
    benchmark.group = f"float-bmm-{name}-{'x'.join(map(str, shape))}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    x, y = _bmm_data(shape)
    np.testing.assert_allclose(result(), x @ y, rtol=1e-4, atol=1e-4)
    median = benchmark.stats.stats.median
    session_cache[("bmm", name, impl)] = median
    b, m, k, n = shape
    info = {"gflops": round(2 * b * m * k * n / median / 1e9, 1), "threads": 1}
    other = session_cache.get(("bmm", name, "tvm_loop"))
    if other and impl == "fbmm":
        info["ratio_vs_tvm_loop"] = round(other / median, 3)
    other = session_cache.get(("bmm", name, "torch_bmm"))
    if other and impl != "torch_bmm":
        info["ratio_vs_torch"] = round(other / median, 3)
    benchmark.extra_info.update(info)
