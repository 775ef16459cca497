"""Why the onnx backend writes int8 weights as uint8 (+128) on x86 hosts without VNNI: onnxruntime's
``MatMulIntegerToFloat`` (what qcompile emits for a static w8a8 Linear) with full-range uint8
activations, int8 weights (u8 x s8: ``vpmaddubsw`` saturates 16-bit sums unless the CPU has VNNI)
against the same weights as uint8 with zero point 128 (u8 x u8: exact), side by side in one process,
one thread. ``extra_info``: the weight type, the host's choice (``qcompile.backends.onnx.weights``),
the fraction of outputs off by more than half a product step against the exact integer product, the
largest error in products (``a_scale * b_scale``), and ``interleaved_u8u8_vs_u8s8`` (the two sessions
taking turns call by call; > 1: u8 x u8 slower).

Run::

    python -m pytest benchmarks/test_onnx_int8_weights.py --benchmark-only --benchmark-group-by=group
"""
import os
import statistics
import time

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra: pip install 'qcompile[onnx]'")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qcompile.backends.onnx.weights import choose_int8_weights  # noqa: E402
from qcompile.cpu import cpu_info  # noqa: E402

K, N = 768, 3072
SHAPES = [1, 128]
A_SCALE, A_ZERO, B_SCALE = 0.02, 3, 0.01


def _model(b):
    zero = np.full(N, 0 if b.dtype == np.int8 else 128, dtype=b.dtype)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(zero, "b_zero"),
             numpy_helper.from_array(np.array(A_SCALE, np.float32), "a_scale"),
             numpy_helper.from_array(np.full(N, B_SCALE, np.float32), "b_scale"),
             numpy_helper.from_array(np.array(A_ZERO, np.uint8), "a_zero")]
    node = helper.make_node("MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero", "b_zero"], ["Y"],
                            domain="com.microsoft")
    graph = helper.make_graph([node], "mitf", [helper.make_tensor_value_info("A", TensorProto.UINT8, ["m", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)  # full range, -128 included
    sessions = {"int8": _model(b), "uint8": _model((b.astype(np.int16) + 128).astype(np.uint8))}
    feeds = {m: {"A": rng.integers(0, 256, (m, K), dtype=np.uint8)} for m in SHAPES}
    interleaved = {}
    for m, feed in feeds.items():  # the two sessions taking turns: a load change hits both alike
        times = {w: [] for w in sessions}
        for _ in range(3):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(200 if m == 1 else 40):
            for w, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[w].append(time.perf_counter() - t)
        interleaved[m] = {w: statistics.median(t) for w, t in times.items()}
    return b, sessions, feeds, interleaved


@pytest.mark.parametrize("m", SHAPES, ids=[f"m{m}" for m in SHAPES])
@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_matmul_integer_to_float(benchmark, setup, m, weights):
    b, sessions, feeds, interleaved = setup
    a = feeds[m]["A"]
    exact = (a.astype(np.int64) - A_ZERO) @ b.astype(np.int64)  # in products of a_scale * b_scale
    err = np.abs(sessions[weights].run(None, feeds[m])[0].astype(np.float64) / (A_SCALE * B_SCALE) - exact)
    benchmark.group = f"matmul-integer-to-float-m{m}-k{K}-n{N}"
    benchmark.pedantic(lambda: sessions[weights].run(None, feeds[m]), rounds=300 if m == 1 else 30,
                       warmup_rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "weights": weights, "host_choice": choose_int8_weights(cpu_info())[0], "onnxruntime": ort.__version__,
        "wrong_fraction": float((err > 0.5).mean()), "max_error_products": float(err.max()),
        "gop_per_s": 2 * m * K * N / median / 1e9, "load_average": os.getloadavg()[0],
        "interleaved_ms": 1e3 * interleaved[m][weights],
        "interleaved_u8u8_vs_u8s8": interleaved[m]["uint8"] / interleaved[m]["int8"]})
    if weights == "uint8" or choose_int8_weights(cpu_info())[0] == "int8":
        assert err.max() < 0.5, "the kernel qcompile picks for this host must be exact"
