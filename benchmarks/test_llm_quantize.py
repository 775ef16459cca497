"""SmolLM2-135M weight quantization benchmarks: wall time and peak memory of one
``qcompile.quantize`` call per weight algorithm (round-to-nearest, GPTQ, AWQ) at int4 groups of 64,
and the reference backend's weight-only Linear latency next to float.

* ``test_quantize_smollm2[rtn|gptq|awq]``: one call each (capture, the algorithm over 8 calibration
  windows of 512 tokens, convert, a 1-sample report), timed once. ``extra_info``: the algorithm's
  own seconds, the whole call's seconds, the process's peak RSS growth during the call (Linux
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), that growth as a multiple of the
  model's own size (its float32 parameters and buffers, 513 MiB), and the load average before and
  after (the machine is shared: times are only comparable at similar load). The issue's target:
  GPTQ < 5 min.
* ``test_weight_only_linear``: a 576 -> 1536 Linear (SmolLM2's gate_proj), one token, float vs the
  reference backend's ``dequantize -> linear`` (the reference is the numerics, not the fast path:
  it dequantizes the weight on every call, so it is expected to be slower than float).

Run::

    python -m pytest benchmarks/test_llm_quantize.py --benchmark-only
"""
import dataclasses
from pathlib import Path

import pytest
import torch

import qcompile

pytest.importorskip("gguf")

CALIBRATION_WINDOWS = 8


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
def smollm2():
    from qcompile.eval.perplexity import calibration_windows
    from qcompile.models.smollm2 import load_smollm2

    lm = load_smollm2()
    return lm, calibration_windows(lm.tokenizer, n=CALIBRATION_WINDOWS, length=512)


def _loadavg() -> list:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_smollm2(benchmark, smollm2, method):
    from qcompile.eval.perplexity import model_nbytes

    lm, cal = smollm2
    load_before = _loadavg()
    recipe = qcompile.Recipe.preset("w4-g64" if method == "rtn" else f"w4-g64-{method}")
    recipe = dataclasses.replace(recipe, tied_head="embedding",
                                 calibration=qcompile.CalibrationConfig(progress=False))
    reset = _peak_rss_reset()
    before = _peak_rss_mb()     # after the reset, VmHWM is the current RSS

    def run():
        return qcompile.quantize(lm.model, recipe, cal[0], calibration=cal, example_kwargs={"use_cache": False},
                                 report_samples=1)

    q = benchmark.pedantic(run, rounds=1, iterations=1)
    t = q.report.timings_s
    peak = _peak_rss_mb()
    growth = (peak - before) if reset else None
    model_mb = model_nbytes(lm.model) / 2**20
    benchmark.extra_info.update({
        "method": method, "calibration_tokens": CALIBRATION_WINDOWS * 512, "threads": torch.get_num_threads(),
        "algorithm_s": t.get(method, 0.0), "capture_s": t.get("capture"), "convert_s": t.get("convert"),
        "report_s": t.get("report"),
        "peak_rss_mb": peak, "peak_rss_growth_mb": growth, "model_mb": model_mb,
        "peak_rss_growth_vs_model": None if growth is None else growth / model_mb,
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
    })
    if method == "gptq":
        assert t["gptq"] < 300, f"GPTQ took {t['gptq']:.0f} s (target < 5 min)"


@pytest.mark.parametrize("impl", ["float", "reference-w4-g64"])
def test_weight_only_linear(benchmark, impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False)).eval()
    x = torch.randn(1, 1, 576)
    if impl != "float":
        model = qcompile.quantize(model, dataclasses.replace(qcompile.Recipe.preset("w4-g64"),
                                  calibration=qcompile.CalibrationConfig(progress=False)), (x,), calibration=[(x,)])
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=200, warmup_rounds=10, iterations=1)
    benchmark.extra_info.update({"impl": impl, "shape": "1x576 @ 576x1536", "threads": torch.get_num_threads()})
