"""Integer conv2d on the tvm backend (qcompile/backends/tvm/conv.py), side by side in one process,
one thread: the TVM artifact with integer convs (``tvm``) vs the same TVM build with the convs left
float on dequantized weights (``tvm-float-conv``: the path before conv.py), onnxruntime running
qcompile's ONNX export of the same model and recipe (quantized for the onnx backend, so its convs
become ``QLinearConv``), and PyTorch float eager. Two models, batch 32 of scikit-learn's digits
(calibration on real images, weights seeded, not trained: speed does not depend on them):

- ``digits``: examples/qat_digits.py's DigitsCNN on the 8x8 images (conv 1→16, conv 16→32, 3x3);
- ``conv28``: a conv stack on the images upsampled to 28x28 (conv 1→32, conv 32→64, max-pool,
  conv 64→64, all 3x3 padding 1, global pool, Linear): 1.4 GOP per batch.

``extra_info``: ``ratio_vs_<impl>`` (the other's median / this median: > 1 is faster), on the ``tvm``
rows ``interleaved`` (all four called in turn, ROUNDS rounds: medians in ms and TVM's ratio to each,
which load from other processes affects alike), ``family``, ``fused``, ``max_abs_vs_reference``.
Run::

    TVM_NUM_THREADS=1 python -m pytest benchmarks/test_tvm_conv.py --benchmark-only
"""
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qcompile  # noqa: E402

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import qat_digits  # noqa: E402

BATCH = 32
ROUNDS = {"digits": (40, 3), "conv28": (10, 2)}
IMPLS = ("float", "onnx", "tvm-float-conv", "tvm")


class Conv28(nn.Module):
    """A representative conv stack for 28x28 single-channel images."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(64, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(torch.nn.functional.max_pool2d(x, 2)))
        return self.fc(x.mean((2, 3)))


def _images(name: str) -> torch.Tensor:
    x = qat_digits.load_data()[0]
    return x if name == "digits" else torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear")


def _lower_without_integer_conv(qmodel):
    """The tvm build before conv.py: FuseInt8ConvPass fuses nothing, convs stay float."""
    from qcompile.backends.tvm.conv import FuseInt8ConvPass
    from qcompile.passes.lowering import FuseResult

    call = FuseInt8ConvPass.call
    FuseInt8ConvPass.call = lambda self, gm: FuseResult.of(gm, {}, {})
    try:
        return qcompile.lower(qmodel, backend="tvm")
    finally:
        FuseInt8ConvPass.call = call


@pytest.fixture(scope="module")
def setups():
    """name -> (models by impl, input batch, the reference-backend model for tvm)."""
    import dataclasses

    torch.set_num_threads(1)
    built = {}
    for name, make in (("digits", qat_digits.DigitsCNN), ("conv28", Conv28)):
        torch.manual_seed(0)
        model = make().eval()
        images = _images(name)
        calib = [(images[i:i + 128],) for i in range(0, 512, 128)]
        recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"),
                                     calibration=qcompile.CalibrationConfig(progress=False))
        q = qcompile.quantize(model, recipe, (images[:2],), calibration=calib, report_samples=1)
        q_onnx = qcompile.quantize(model, recipe, (images[:2],), calibration=calib, report_samples=1, backend="onnx")
        models = {"float": model, "onnx": qcompile.lower(q_onnx, backend="onnx", threads=1),
                  "tvm-float-conv": _lower_without_integer_conv(q), "tvm": qcompile.lower(q, backend="tvm")}
        built[name] = (models, images[-BATCH:].contiguous(), q)
    return built


def _interleaved(models: dict, x, rounds: int) -> dict:
    times = {impl: [] for impl in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for impl, spent in times.items():
                t0 = time.perf_counter()
                models[impl](x)
                spent.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()}
    out.update({f"ratio_vs_{k}": round(v / med["tvm"], 3) for k, v in med.items() if k != "tvm"})
    return out


CASES = [(m, impl) for m in ("digits", "conv28") for impl in IMPLS]


@pytest.mark.parametrize("model_name,impl", CASES, ids=[f"{m}-b{BATCH}-{i}" for m, i in CASES])
def test_tvm_conv(benchmark, setups, session_cache, model_name, impl):
    torch.set_num_threads(1)
    models, x, q = setups[model_name]
    model = models[impl]
    benchmark.group = f"conv-{model_name}-b{BATCH}"

    def run():
        with torch.inference_mode():
            return model(x)

    rounds, warmup = ROUNDS[model_name]
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    session_cache[("conv-bench", model_name, impl)] = median
    info = {"batch": BATCH, "threads": 1, "load_average": os.getloadavg()}
    for other in IMPLS:
        seen = session_cache.get(("conv-bench", model_name, other))
        if seen and other != impl:
            info[f"ratio_vs_{other}"] = round(seen / median, 3)
    if impl == "tvm":
        info["interleaved"] = _interleaved(models, x, rounds)
        info["family"], info["fused"] = model.family, model.meta["fused"]
        with torch.inference_mode():
            info["max_abs_vs_reference"] = float((out - q(x)).abs().max())
    benchmark.extra_info.update(info)
    if impl == "tvm":
        assert [f for f in model.meta["fused"] if f.startswith("conv")], "no conv was fused"
        with torch.inference_mode():
            assert torch.allclose(out, q(x), rtol=1e-2, atol=1e-2 * float(q(x).abs().max()))
