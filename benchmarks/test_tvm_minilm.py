"""MiniLM (all-MiniLM-L6-v2) w8a8 end to end on the tvm backend, side by side in one process,
one thread: the TVM artifact vs onnxruntime running qcompile's ONNX export of the same model vs
PyTorch float eager, batch 1 and 32 x sequence 128 (the inputs of benchmarks/test_minilm.py).

``extra_info``: ``ratio_vs_float`` and ``ratio_vs_onnx`` (their median / this median: > 1 is
faster), ``cosine_vs_reference`` (TVM vs the reference backend), ``compile_seconds``; on the TVM
rows also ``interleaved``: onnxruntime and TVM called alternately (ROUNDS rounds each), their
medians and ``ratio_vs_onnx``, which load from other processes affects alike. Run::

    TVM_NUM_THREADS=1 python -m pytest benchmarks/test_tvm_minilm.py --benchmark-only
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile.report import cosine  # noqa: E402
from test_minilm import ROUNDS, SEQUENCE, _fixed_inputs  # noqa: E402

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def w8a8(minilm, session_cache):
    from test_minilm import _calibration_batches, _quantize

    if "w8a8" not in session_cache:
        session_cache["w8a8"] = _quantize(minilm, _calibration_batches(minilm))
    return session_cache["w8a8"]


@pytest.fixture(scope="module")
def artifacts(w8a8):
    pytest.importorskip("onnxruntime")
    return {"tvm": qcompile.lower(w8a8, backend="tvm"), "onnx": qcompile.lower(w8a8, backend="onnx", threads=1)}


def _interleaved(artifacts, ids, mask, rounds: int) -> dict:
    """onnxruntime and TVM called one after the other, ``rounds`` times: medians in ms and their ratio."""
    import statistics
    import time

    times = {"onnx": [], "tvm": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for impl, spent in times.items():
                t0 = time.perf_counter()
                artifacts[impl](ids, mask)
                spent.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"onnx_ms": round(med["onnx"] * 1e3, 2), "tvm_ms": round(med["tvm"] * 1e3, 2),
            "ratio_vs_onnx": round(med["onnx"] / med["tvm"], 3)}


CASES = [(b, impl) for b in (1, 32) for impl in ("float", "onnx", "tvm")]


@pytest.mark.parametrize("batch,impl", CASES, ids=[f"b{b}-s{SEQUENCE}-{i}" for b, i in CASES])
def test_minilm_tvm(benchmark, minilm, w8a8, artifacts, session_cache, batch, impl):
    torch.set_num_threads(1)
    ids, mask = _fixed_inputs(minilm, batch)
    model = minilm.model if impl == "float" else artifacts[impl]
    benchmark.group = f"minilm-tvm-b{batch}-s{SEQUENCE}"

    def run():
        with torch.inference_mode():
            return model(ids, mask)

    rounds, warmup = ROUNDS[batch]
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("tvm-bench", batch, impl)] = median
    info = {"batch": batch, "sequence": SEQUENCE, "threads": 1}
    for peer in ("float", "onnx"):
        other = session_cache.get(("tvm-bench", batch, peer))
        if other and peer != impl:
            info[f"ratio_vs_{peer}"] = round(other / median, 3)
    if impl == "tvm":
        info["interleaved"] = _interleaved(artifacts, ids, mask, rounds)
        with torch.inference_mode():
            info["cosine_vs_reference"] = cosine(w8a8(ids, mask), out)
        info["compile_seconds"] = round(artifacts["tvm"].compile_seconds, 1)
        info["family"] = artifacts["tvm"].family
    benchmark.extra_info.update(info)
    if impl == "tvm":
        assert info["cosine_vs_reference"] > 0.999
