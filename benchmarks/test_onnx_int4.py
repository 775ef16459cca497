"""Int4 through the onnx backend (``com.microsoft::MatMulNBits``) vs the float ONNX of the same layer:
one Linear 768 -> 3072, M = 1 (a decode step) and M = 128, one thread, side by side.

Rows: ``float-onnx`` (MatMul on fp32 weights); ``w4-g64`` (weight-only, accuracy level 0: activations
stay float, the recipe's numerics); ``w4-g{32,64,128}-a8`` (the presets whose activations are int8 per
token and K-block, which onnxruntime computes inside the kernel at accuracy level 4; each matches its
own reference model). Two timings per row: pytest-benchmark's (the row alone, its weights hot in cache)
and ``interleaved`` (the rows taking turns call by call, so each call finds the others' weights in
cache, as a layer does inside a model). ``extra_info``: ``speedup_vs_float_onnx`` (alone),
``interleaved_speedup_vs_float_onnx``, ``max_rel_err_vs_reference`` (vs the row's own qcompile
reference model) and ``max_rel_err_vs_float``; the M = 1 numbers also go to
``benchmarks/results/onnx_int4.json`` with the load average.

Run::

    python -m pytest benchmarks/test_onnx_int4.py --benchmark-only --benchmark-group-by=group
"""
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qcompile

ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra: pip install 'qcompile[onnx]'")

K, N = 768, 3072
RECIPES = {"w4-g64": "w4-g64", "w4-g32-a8": "w4-g32-a8", "w4-g64-a8": "w4-g64-a8", "w4-g128-a8": "w4-g128-a8"}
IMPLS = ["float-onnx", *RECIPES]
RESULTS = Path(__file__).parent / "results" / "onnx_int4.json"
INTERLEAVED_ROUNDS = {1: 300, 128: 20}


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def _recipe(name):
    return dataclasses.replace(qcompile.Recipe.preset(name), calibration=qcompile.CalibrationConfig(progress=False))


@pytest.fixture(scope="module")
def sessions():
    """{impl: (reference model, onnx artifact)}, and the interleaved medians."""
    torch.manual_seed(0)
    model = _Layer().eval()
    calib = [(torch.randn(4, K),) for _ in range(2)]
    float_recipe = dataclasses.replace(_recipe("w4-g64"), default=None, embedding=None, name="float")
    models = {"float-onnx": qcompile.quantize(model, float_recipe, calib[0], calibration=calib, report_samples=1)}
    for impl, preset in RECIPES.items():
        models[impl] = qcompile.quantize(model, _recipe(preset), calib[0], calibration=calib, report_samples=1)
    arts = {impl: (q, qcompile.lower(q, backend="onnx", threads=1)) for impl, q in models.items()}
    return {"arts": arts, "model": model, "interleaved": _interleaved(arts)}


def _interleaved(arts):
    """Median µs per row, the rows taking turns call by call (order rotated every round)."""
    out = {}
    names = list(arts)
    for m, rounds in INTERLEAVED_ROUNDS.items():
        feed = np.random.default_rng(1).standard_normal((m, K)).astype(np.float32)
        times = {n: [] for n in names}
        for r in range(rounds + 5):
            for n in names[r % len(names):] + names[:r % len(names)]:
                art = arts[n][1]
                f = {art.input_names[0]: feed}
                t = time.perf_counter()
                art.session.run(None, f)
                if r >= 5:  # the first rounds warm up
                    times[n].append(time.perf_counter() - t)
        out.update({(m, n): 1e6 * float(np.median(ts)) for n, ts in times.items()})
    return out


@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("impl", IMPLS)
def test_int4_linear_latency(benchmark, sessions, session_cache, impl, m):
    q, art = sessions["arts"][impl]
    x = torch.randn(m, K)
    feed = {art.input_names[0]: x.numpy()}
    benchmark.group = f"onnx-int4-linear-{K}x{N}-m{m}"
    benchmark.pedantic(lambda: art.session.run(None, feed), rounds=300 if m == 1 else 50, warmup_rounds=10,
                       iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("int4", m, impl)] = median
    out = torch.from_numpy(np.asarray(art.session.run(None, feed)[0]))
    with torch.no_grad():
        ref, flt = q(x), sessions["model"](x)
    inter = sessions["interleaved"]
    row = {"impl": impl, "m": m, "k": K, "n": N, "alone_median_us": round(1e6 * median, 1),
           "interleaved_median_us": round(inter[(m, impl)], 1),
           "max_rel_err_vs_reference": float((out - ref).abs().max() / ref.abs().max()),
           "max_rel_err_vs_float": float((out - flt).abs().max() / flt.abs().max())}
    if impl != "float-onnx":
        row["interleaved_speedup_vs_float_onnx"] = round(inter[(m, "float-onnx")] / inter[(m, impl)], 3)
        base = session_cache.get(("int4", m, "float-onnx"))
        if base:
            row["speedup_vs_float_onnx"] = round(base / median, 3)
    benchmark.extra_info.update(row)
    _record(row)
    assert row["max_rel_err_vs_reference"] < 1e-4  # each row computes its own reference model


def _record(row):
    """Append this row to the results file (one run: the file is rewritten when its first row comes)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if data.get("pid") != os.getpid():
        data = {"pid": os.getpid(), "onnxruntime": ort.__version__, "rows": []}
    data["load_average"] = [round(v, 2) for v in os.getloadavg()]
    data["rows"].append(row)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
