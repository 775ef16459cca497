"""int4 weight-only Linear side by side, one thread, one process: qcompile's TIR int4 kernel
(qcompile/backends/tvm/int4.py, codes unpacked in registers) vs torch float ``F.linear`` on the
dequantized fp32 weight vs onnxruntime ``com.microsoft::MatMulNBits`` (accuracy level 0, float
activations: the like-for-like peer, a one-node model built with onnx.helper), at K=768 N=3072,
M in {1, 128}, g in {32, 64, 128}. The three are timed interleaved (round-robin) in
``test_int4_interleaved``, whose ``extra_info`` holds the medians and the ratios
(``vs_float`` = float median / TVM median, ``vs_ort`` = MatMulNBits median / TVM median: > 1 is faster)
and the load average.

``test_int4_a8_interleaved``: the int4 x int8 kernels (qcompile/backends/tvm/int4_a8.py, ``w4-g*-a8``:
the activation quantize kernel and the integer GEMM/GEMV, called as the lowered model calls them)
vs ``MatMulNBits`` at ``accuracy_level=4`` (the same numerics: int8 activations per token and
block) on the same layer, with the weight-only kernel alongside (``vs_ort`` = MatMulNBits level 4
median / TVM a8 median). Run::

    TVM_NUM_THREADS=1 python -m pytest benchmarks/test_tvm_int4.py --benchmark-only -s
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from qcompile.backends.tvm import int4, int4_a8  # noqa: E402
from qcompile.backends.tvm.host import compile_kernel, detect  # noqa: E402

K, N = 768, 3072


def _ort_session(q, s, z, g, m, accuracy_level=0):
    nblk = K // g
    blob = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(N, nblk, g // 2)
    zq = z.astype(np.uint8)
    if nblk % 2:
        zq = np.concatenate([zq, np.zeros((N, 1), np.uint8)], 1)
    zp = (zq[:, 0::2] | (zq[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=g, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "mm4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, N])],
        [onnx.numpy_helper.from_array(blob, "w"), onnx.numpy_helper.from_array(s.reshape(-1).astype(np.float32), "s"),
         onnx.numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _layer(m, g):
    """Random uint4 codes, scales, integer zero points and an input ``[m, K]``."""
    rng = np.random.default_rng(g + m)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    s = (rng.random((N, K // g)) * 0.01 + 1e-3).astype(np.float32)
    z = rng.integers(0, 16, (N, K // g)).astype(np.float32)
    return q, s, z, rng.standard_normal((m, K)).astype(np.float32)


def _setup(m, g):
    q, s, z, x = _layer(m, g)
    packed, sp, zp = int4.pack_int4(q, s, z, g)
    f = compile_kernel(int4.int4_kernel(K, N, g))["main"]
    targs = [tvm.runtime.tensor(a) for a in (x, packed, sp, zp, np.zeros(N, np.float32))]
    tout = tvm.runtime.tensor(np.zeros((m, N), np.float32))
    w = torch.from_numpy((q.astype(np.float32) - np.repeat(z, g, 1)) * np.repeat(s, g, 1))
    xt = torch.from_numpy(x)
    sess = _ort_session(q, s, z, g, m)
    impls = {"tvm_int4": lambda: f(*targs, tout),
             "torch_float": lambda: torch.nn.functional.linear(xt, w),
             "ort_matmulnbits_l0": lambda: sess.run(None, {"x": x})}
    ref = torch.nn.functional.linear(xt.double(), w.double()).numpy()
    impls["tvm_int4"]()
    got = {"tvm_int4": tout.numpy(), "ort_matmulnbits_l0": impls["ort_matmulnbits_l0"]()[0]}
    for name, y in got.items():   # a benchmark of a wrong kernel is worth nothing
        assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max(), name
    return impls


def _interleave(impls, rounds):
    """Median seconds of each callable, called round-robin ``rounds`` times."""
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 128])
def test_int4_interleaved(benchmark, m, g):
    torch.set_num_threads(1)
    impls = _setup(m, g)
    med = _interleave(impls, 200 if m == 1 else 60)
    info = {f"{k}_us": round(v * 1e6, 1) for k, v in med.items()}
    info["vs_float"] = round(med["torch_float"] / med["tvm_int4"], 2)
    info["vs_ort"] = round(med["ort_matmulnbits_l0"] / med["tvm_int4"], 2)
    info["loadavg"] = os.getloadavg()[0]
    benchmark.extra_info.update(info)
    print(f"\nM={m} g={g}: {info}")
    benchmark.pedantic(impls["tvm_int4"], rounds=5, iterations=1)


def _setup_a8(m, g):
    isa = int4_a8.isa_for(detect().family, detect().flags)
    if isa is None:
        pytest.skip("the int4 x int8 kernels need avx2 or avx512_vnni")
    q, s, z, x = _layer(m, g)
    packed, sp, zp = (tvm.runtime.tensor(a) for a in int4.pack_int4(q, s, z, g))
    fq = compile_kernel(int4_a8.quantize_rows_kernel(K, g))["main"]
    fk = compile_kernel(int4_a8.int4_a8_kernel(K, N, g, isa))["main"]
    f4 = compile_kernel(int4.int4_kernel(K, N, g))["main"]
    tx, order, bias = tvm.runtime.tensor(x), tvm.runtime.tensor(int4_a8.CODE_ORDER), tvm.runtime.tensor(np.zeros(N, np.float32))
    a, sa, asum = (tvm.runtime.tensor(np.zeros(shape, dt)) for shape, dt in
                   (((m, K), np.int8), ((m, K // g), np.float32), ((m, K // g), np.float32)))
    out, out4 = tvm.runtime.tensor(np.zeros((m, N), np.float32)), tvm.runtime.tensor(np.zeros((m, N), np.float32))

    def a8():
        fq(tx, order, a, sa, asum)
        fk(a, sa, asum, packed, sp, zp, bias, out)

    sess = _ort_session(q, s, z, g, m, accuracy_level=4)
    impls = {f"tvm_int4_a8_{isa}": a8, "ort_matmulnbits_l4": lambda: sess.run(None, {"x": x}),
             "tvm_int4": lambda: f4(tx, packed, sp, zp, bias, out4)}
    # the reference: x through the recipe's activation quantize, times the dequantized weight, float64
    xt = torch.from_numpy(x)
    sa_ref, za_ref = torch.ops.qcompile.choose_qparams(xt, "int8", True, True, g)
    xq = torch.ops.qcompile.dequantize(torch.ops.qcompile.quantize(xt, sa_ref, za_ref, "int8", g), sa_ref, za_ref,
                                       "int8", g, torch.float32)
    w = torch.from_numpy((q.astype(np.float64) - np.repeat(z, g, 1)) * np.repeat(s, g, 1))
    ref = (xq.double() @ w.T).numpy()
    a8()
    assert np.abs(out.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()     # a benchmark of a wrong kernel ...
    y = impls["ort_matmulnbits_l4"]()[0]    # MLAS rounds its own way (blocked float sums): same model, looser
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max(), np.abs(y - ref).max() / np.abs(ref).max()
    return isa, impls


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 128])
def test_int4_a8_interleaved(benchmark, m, g):
    torch.set_num_threads(1)
    isa, impls = _setup_a8(m, g)
    med = _interleave(impls, 200 if m == 1 else 60)
    ours = med[f"tvm_int4_a8_{isa}"]
    info = {f"{k}_us": round(v * 1e6, 1) for k, v in med.items()}
    info["vs_ort"] = round(med["ort_matmulnbits_l4"] / ours, 2)
    info["vs_weight_only"] = round(med["tvm_int4"] / ours, 2)
    info["loadavg"] = os.getloadavg()[0]
    benchmark.extra_info.update(info)
    print(f"\nM={m} g={g} a8: {info}")
    benchmark.pedantic(impls[f"tvm_int4_a8_{isa}"], rounds=5, iterations=1)
