"""MiniLM (all-MiniLM-L6-v2) w8a8 end to end on the tvm backend, side by side in one process,
one thread: the TVM artifact vs its peers — onnxruntime running qcompile's ONNX export of the same
model, torchao's PT2E x86 int8 path compiled by inductor (``benchmarks/peers.py``) — and PyTorch
float eager, batch 1 and 32 x sequence 128 (the inputs of benchmarks/test_minilm.py).

``extra_info``: ``ratio_vs_<peer>`` (the peer's median / this median: > 1 is faster),
``cosine_vs_reference`` (TVM vs the reference backend, on the timed batch), ``compile_seconds``;
on the TVM rows also ``quality``: the reference backend, onnxruntime (qcompile's export) and TVM
each compared by ``qcompile.eval.embedding_quality`` on 600 held-out docstrings and 300 retrieval
pairs, against the float model and against the reference (mean/min cosine, neighbour agreement,
recall@1), so "embedding quality equal to the reference's" is measured on real data; and
``interleaved``: float, onnxruntime, torchao and TVM called in turn (ROUNDS rounds each), their
medians and TVM's ratio to each, which load from other processes affects alike. Run::

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


@pytest.fixture(scope="module")
def quality(minilm, w8a8, artifacts):
    """{"<impl>_vs_<base>": embedding_quality dict} on held-out docstrings, for the reference
    backend, onnxruntime and TVM against the float model, and onnxruntime and TVM against the
    reference (the numbers behind "TVM's embeddings are as good as the reference's")."""
    from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality

    def encoder(model):
        def enc(texts):
            with torch.inference_mode():
                return model(*minilm.encode_batch(texts))
        return enc

    torch.set_num_threads(1)
    sentences, pairs = docstring_sentences("evaluation", limit=600), docstring_pairs("evaluation", limit=300)
    enc = {"float": encoder(minilm.model), "reference": encoder(w8a8), "onnx": encoder(artifacts["onnx"]),
           "tvm": encoder(artifacts["tvm"])}
    cases = [("reference", "float"), ("onnx", "float"), ("tvm", "float"), ("onnx", "reference"),
             ("tvm", "reference")]
    return {f"{test}_vs_{base}": {k: round(float(v), 5) for k, v in
                                  embedding_quality(enc[base], enc[test], sentences, pairs).items()}
            for test, base in cases}


def _interleaved(models: dict, ids, mask, rounds: int) -> dict:
    """Every model called in turn, ``rounds`` times: medians in ms and TVM's ratio to each."""
    import statistics
    import time

    times = {impl: [] for impl in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for impl, spent in times.items():
                t0 = time.perf_counter()
                models[impl](ids, mask)
                spent.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()}
    out.update({f"ratio_vs_{k}": round(v / med["tvm"], 3) for k, v in med.items() if k != "tvm"})
    return out


PEERS = ("float", "onnx", "torchao-pt2e")
CASES = [(b, impl) for b in (1, 32) for impl in (*PEERS, "tvm")]


@pytest.mark.parametrize("batch,impl", CASES, ids=[f"b{b}-s{SEQUENCE}-{i}" for b, i in CASES])
def test_minilm_tvm(benchmark, minilm, w8a8, artifacts, compiled_peers, session_cache, quality, batch, impl):
    torch.set_num_threads(1)
    ids, mask = _fixed_inputs(minilm, batch)

    def model_of(name):
        if name == "float":
            return minilm.model
        return compiled_peers(name, batch)[0] if name == "torchao-pt2e" else artifacts[name]

    model = model_of(impl)
    benchmark.group = f"minilm-tvm-b{batch}-s{SEQUENCE}"

    def run():
        with torch.inference_mode():
            return model(ids, mask)

    rounds, warmup = ROUNDS[batch]
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("tvm-bench", batch, impl)] = median
    info = {"batch": batch, "sequence": SEQUENCE, "threads": 1}
    for peer in PEERS:
        other = session_cache.get(("tvm-bench", batch, peer))
        if other and peer != impl:
            info[f"ratio_vs_{peer}"] = round(other / median, 3)
    if impl == "tvm":
        info["interleaved"] = _interleaved({name: model_of(name) for name in (*PEERS, "tvm")}, ids, mask, rounds)
        with torch.inference_mode():
            info["cosine_vs_reference"] = cosine(w8a8(ids, mask), out)
        info["compile_seconds"] = round(artifacts["tvm"].compile_seconds, 1)
        info["family"] = artifacts["tvm"].family
        info["quality"] = quality
    if impl == "torchao-pt2e":
        with torch.inference_mode():
            info["cosine_vs_float"] = cosine(minilm.model(ids, mask), out)
        info["build_seconds"] = round(compiled_peers(impl, batch)[1], 1)
    benchmark.extra_info.update(info)
    if impl == "tvm":
        assert info["cosine_vs_reference"] > 0.999
        assert quality["tvm_vs_reference"]["mean_cosine"] > 0.999
