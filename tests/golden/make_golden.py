"""Writes the golden record of qcompile's behaviour: every preset on the test models (outputs,
report, saved artifact). Run on main *before* a refactor that must not change behaviour; the
test (tests/test_golden.py) compares the current code against the record.

    python tests/golden/make_golden.py            # rewrites tests/golden/golden.safetensors + .json

What is recorded per (model, preset): the quantized model's outputs on held-out inputs, its
report (``Report.to_dict()`` without ``timings_s``, the one field that is a wall-clock time), the
saved artifact's tensors (``model.safetensors``, as tensors), its manifest without the timings and
checksums, and the converted graph's op sequence; or, where the preset does not apply to the model, the error's type and
message. Float numerics depend on the host's SIMD kernels, so the record names the host it was
made on (torch's CPU capability and version): the test is bit-exact there and within float
tolerance elsewhere.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ for conftest's models

from conftest import TinyCNN, randomise_bn, tiny_block_case  # noqa: E402

import qcompile  # noqa: E402
from qcompile.safetensors_io import read_safetensors  # noqa: E402


def block_case(d=32, ff=64):
    model, batches = tiny_block_case(d, ff)
    return model, batches[:4], batches[4:]


def cnn_case():
    torch.manual_seed(0)
    model = randomise_bn(TinyCNN()).eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(6)]
    return model, batches[:4], batches[4:]


CASES = {"block": block_case, "block64": lambda: block_case(64, 128), "cnn": cnn_case}


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings_s"}


def qat_w4a8(model, calib, held):
    """prepare_qat -> three SGD steps -> convert: the QAT path's own pipeline."""
    qat = qcompile.prepare_qat(model, "w4a8", held[0], calibration=calib)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for (x,) in calib[:3]:
        loss = qat(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qcompile.convert(qat.eval())


def auto_bits(model, calib, held):
    """Mixed precision under a bits budget: analyze -> allocate -> quantize."""
    auto = qcompile.Recipe.auto(["w8", "w4-g64"], budget={"bits_per_weight": 6.0}, max_samples=2)
    return qcompile.quantize(model, auto, held[0], calibration=calib)


# special cases beyond the presets: (case, name) -> how to quantize
SPECIAL = {
    ("cnn", "qat-w4a8"): qat_w4a8,
    ("block64", "auto-6bits"): auto_bits,
    ("cnn", "w8a8@onnx"): lambda m, c, h: qcompile.quantize(m, "w8a8", h[0], calibration=c, backend="onnx"),
}


def record(case: str, preset: str, tmp: Path):
    """(tensors, json entry) of one (model, preset), computed on one thread (a float sum's order,
    and so its last bit, can depend on the number of threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _record(case, preset, tmp)
    finally:
        torch.set_num_threads(threads)


def _record(case: str, preset: str, tmp: Path):
    model, calib, held = CASES[case]()
    torch.manual_seed(0)
    try:
        if (case, preset) in SPECIAL:
            q = SPECIAL[case, preset](model, calib, held)
        else:
            q = qcompile.quantize(model, preset, held[0], calibration=calib)
    except Exception as e:  # noqa: BLE001 - the error is part of the recorded behaviour
        return {}, {"error": type(e).__name__, "message": str(e)}
    tensors = {}
    with torch.no_grad():
        for i, item in enumerate(held):
            tensors[f"out.{i}"] = q(*item).detach().contiguous()
    q.save(tmp / f"{case}-{preset}")
    saved = read_safetensors(tmp / f"{case}-{preset}" / "model.safetensors")
    tensors.update({f"saved.{k}": v.contiguous() for k, v in saved.items()})
    manifest = json.loads((tmp / f"{case}-{preset}" / "qcompile.json").read_text())
    body = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")}
    body["report"] = without_timings(body["report"])
    ops = [f"{n.op}:{n.target}" for n in q.graph_module.graph.nodes]
    return tensors, {"report": without_timings(q.report.to_dict()), "manifest": body, "graph": ops}


def cases() -> list:
    return [(case, preset) for case in CASES for preset in qcompile.recipes()] + list(SPECIAL)


def main() -> None:
    from safetensors.torch import save_file

    tensors, entries = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for case, preset in cases():
            t, entry = record(case, preset, Path(d))
            entries[f"{case}/{preset}"] = entry
            tensors.update({f"{case}/{preset}/{k}": v for k, v in t.items()})
            print(case, preset, entry.get("error", "ok"), flush=True)
    host = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    save_file(tensors, str(HERE / "golden.safetensors"))
    (HERE / "golden.json").write_text(json.dumps({"host": host, "entries": entries}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
