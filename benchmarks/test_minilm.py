"""MiniLM (all-MiniLM-L6-v2) benchmarks: what quantizing costs, and what the reference backend
costs at run time next to float.

* ``test_quantize_w8a8``: one ``qcompile.quantize(model, "w8a8", ...)`` call on 256 calibration
  sentences (capture, smoothing statistics and search, calibration, convert, report), timed once.
* ``test_latency``: float (eager and ``torch.compile``), reference-backend, onnx-backend and
  torchao PT2E x86 int8 (compiled; ``benchmarks/peers.py``) forward passes on the same
  fixed-length inputs, batch 1 and batch 32, sequence 128, in one group per shape so the table
  puts them side by side. Each quantized row records ``ratio_vs_float`` (its median / the float
  median) and its cosine to float in ``extra_info``. The onnx rows are skipped when onnxruntime
  is not installed (``pip install 'qcompile[onnx]'``).

The reference backend is the numerical ground truth (weights dequantized, activations
fake-quantized, all in float): it is expected to be slower than float. Speed comes from the
lowering backends: onnx here, TVM in ``test_tvm_minilm.py``, Triton (GPU) in ``benchmarks/gpu``.

Run::

    python -m pytest benchmarks --benchmark-only
"""
import dataclasses
import resource

import pytest
import torch

import qcompile
from qcompile.eval import docstring_sentences
from qcompile.report import cosine

CALIBRATION_SENTENCES = 256
CALIBRATION_BATCH = 16
SEQUENCE = 128
# (rounds, warmup rounds) per batch size: enough rounds for a stable median, few enough that the
# whole suite stays within a few minutes on a 2-core machine at one thread
ROUNDS = {1: (30, 3), 32: (5, 1)}


def _quiet_w8a8() -> qcompile.Recipe:
    return dataclasses.replace(qcompile.Recipe.preset("w8a8"), calibration=qcompile.CalibrationConfig(progress=False))


def _calibration_batches(minilm):
    cal = docstring_sentences("calibration", limit=CALIBRATION_SENTENCES)
    return [minilm.encode_batch(cal[i:i + CALIBRATION_BATCH]) for i in range(0, len(cal), CALIBRATION_BATCH)]


def _quantize(minilm, batches):
    return qcompile.quantize(minilm.model, _quiet_w8a8(), batches[0], calibration=batches)


def _long_texts(minilm, count: int) -> list[str]:
    """``count`` distinct texts of held-out docstring sentences, each at least ``SEQUENCE`` tokens
    long, so that truncation makes every row exactly ``SEQUENCE`` tokens (no padding at all)."""
    sentences = docstring_sentences("evaluation")
    texts, current = [], []
    for s in sentences:
        current.append(s)
        text = " ".join(current)
        if len(minilm.tokenizer.encode(text).ids) >= SEQUENCE:   # truncated to 128: long enough
            texts.append(text)
            current = []
            if len(texts) == count:
                return texts
    raise RuntimeError(f"not enough evaluation text for {count} inputs of {SEQUENCE} tokens")


def _fixed_inputs(minilm, batch: int):
    ids, mask = minilm.encode_batch(_long_texts(minilm, batch), max_length=SEQUENCE)
    assert ids.shape == (batch, SEQUENCE) and bool(mask.all()), "inputs must be exactly batch x 128 real tokens"
    return ids, mask


@pytest.fixture(scope="module")
def calibration_batches(minilm):
    return _calibration_batches(minilm)


@pytest.fixture(scope="module")
def quantized(minilm, calibration_batches, session_cache):
    """The w8a8 model ``test_quantize_w8a8`` produced, or a fresh one when that test was deselected."""
    if "w8a8" not in session_cache:
        session_cache["w8a8"] = _quantize(minilm, calibration_batches)
    return session_cache["w8a8"]


def test_quantize_w8a8(benchmark, minilm, calibration_batches, session_cache):
    benchmark.group = "minilm-quantize"
    qmodel = benchmark.pedantic(_quantize, args=(minilm, calibration_batches), rounds=1, iterations=1)
    session_cache["w8a8"] = qmodel
    report = qmodel.report
    benchmark.extra_info.update({
        "recipe": "w8a8",
        "calibration_sentences": CALIBRATION_SENTENCES,
        "calibration_batches": len(calibration_batches),
        "report_samples": report.report_samples,
        "timings_s": {k: round(v, 2) for k, v in report.timings_s.items()},
        "output_cosine": report.output_cosine,
        "output_sqnr_db": report.output_sqnr,
        "threads": torch.get_num_threads(),
    })
    assert report.output_cosine > 0.99


@pytest.fixture(scope="module")
def onnx_artifact(quantized):
    """The w8a8 model lowered to onnxruntime, one intra-op thread like torch here."""
    pytest.importorskip("onnxruntime")
    return qcompile.lower(quantized, backend="onnx", threads=1)


CASES = [(b, impl) for b in (1, 32) for impl in ("float", "float-compiled", "reference", "onnx", "torchao-pt2e")]


@pytest.mark.parametrize("batch,impl", CASES, ids=[f"b{b}-s{SEQUENCE}-{i}" for b, i in CASES])
def test_latency(benchmark, request, minilm, quantized, session_cache, batch, impl):
    ids, mask = _fixed_inputs(minilm, batch)
    build_seconds = None
    if impl == "float":
        model = minilm.model
    elif impl in ("float-compiled", "torchao-pt2e"):
        model, build_seconds = request.getfixturevalue("compiled_peers")(impl, batch)
    elif impl == "reference":
        model = qcompile.lower(quantized, backend="reference")
    else:
        model = request.getfixturevalue("onnx_artifact")
    benchmark.group = f"minilm-latency-b{batch}-s{SEQUENCE}"

    def run():
        with torch.inference_mode():
            return model(ids, mask)

    rounds, warmup = ROUNDS[batch]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    median = benchmark.stats.stats.median
    session_cache[("median", batch, impl)] = median
    # Minor page faults per call: large temporaries (the reference backend dequantizes every weight,
    # the 47 MB word-embedding table included, on every call) may be mmap'd and freed each time,
    # and the page faults that follow can double the batch-1 time. Recorded so a slow run explains itself.
    benchmark.extra_info.update({"batch": batch, "sequence": SEQUENCE, "impl": impl, "threads": torch.get_num_threads(),
                                 "minor_page_faults_per_call": round(faults / (rounds + warmup))})
    if build_seconds is not None:   # export + calibration + torch.compile, for the compiled peers
        benchmark.extra_info["build_seconds"] = round(build_seconds, 1)
    if impl != "float":
        with torch.inference_mode():
            benchmark.extra_info["cosine_vs_float"] = cosine(minilm.model(ids, mask), out)
            if impl == "onnx":  # a lowering backend is checked against the reference, not float
                benchmark.extra_info["cosine_vs_reference"] = cosine(quantized(ids, mask), out)
        float_median = session_cache.get(("median", batch, "float"))
        if float_median:
            benchmark.extra_info["ratio_vs_float"] = round(median / float_median, 3)
        assert benchmark.extra_info["cosine_vs_float"] > 0.99
