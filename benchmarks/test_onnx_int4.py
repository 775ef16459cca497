"""Int4 weight-only through the onnx backend (``com.microsoft::MatMulNBits``) vs the float ONNX of
the same layer: one Linear 768 -> 3072, M = 1 (a decode step) and M = 128, one thread, side by side.

Rows: ``float-onnx`` (MatMul on fp32 weights), ``int4-g64`` (accuracy level 0: activations stay
float, the reference's numerics) and ``int4-g64-acc4`` (onnxruntime quantizes activations to int8
inside the kernel: faster, a different model, opt-in). ``extra_info["speedup_vs_float_onnx"]``.

Run::

    python -m pytest benchmarks/test_onnx_int4.py --benchmark-only --benchmark-group-by=group
"""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import qcompile

ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra: pip install 'qcompile[onnx]'")

K, N = 768, 3072
IMPLS = ["float-onnx", "int4-g64", "int4-g64-acc4"]


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module")
def sessions():
    torch.manual_seed(0)
    model = _Layer().eval()
    calib = [(torch.randn(4, K),) for _ in range(2)]
    recipe = dataclasses.replace(qcompile.Recipe.preset("w4-g64"), calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(model, recipe, calib[0], calibration=calib, report_samples=1)
    fq = qcompile.quantize(model, dataclasses.replace(recipe, default=None, embedding=None, name="float"),
                           calib[0], calibration=calib, report_samples=1)
    arts = {"float-onnx": qcompile.lower(fq, backend="onnx", threads=1),
            "int4-g64": qcompile.lower(q, backend="onnx", threads=1),
            "int4-g64-acc4": qcompile.lower(q, backend="onnx", threads=1, nbits_accuracy_level=4)}
    return q, arts


@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("impl", IMPLS)
def test_int4_linear_latency(benchmark, sessions, session_cache, impl, m):
    q, arts = sessions
    art = arts[impl]
    x = torch.randn(m, K)
    feed = {art.input_names[0]: x.numpy()}
    benchmark.group = f"onnx-int4-linear-{K}x{N}-m{m}"
    benchmark.pedantic(lambda: art.session.run(None, feed), rounds=200 if m == 1 else 50, warmup_rounds=10, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("int4", m, impl)] = median
    out = torch.from_numpy(np.asarray(art.session.run(None, feed)[0]))
    with torch.no_grad():
        ref = q(x)
    benchmark.extra_info.update({"impl": impl, "m": m, "k": K, "n": N,
                                 "max_rel_err_vs_reference": float((out - ref).abs().max() / ref.abs().max())})
    base = session_cache.get(("int4", m, "float-onnx"))
    if base and impl != "float-onnx":
        benchmark.extra_info["speedup_vs_float_onnx"] = round(base / median, 3)
