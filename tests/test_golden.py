"""No behaviour change: every preset (and the QAT, mixed-precision and backend-placement paths) on the
test models gives what main gave before the pipeline redesign (issue 19), recorded by
``tests/golden/make_golden.py``: outputs, report, saved artifact and converted graph.

Bit-exact on a host like the one the record was made on (torch's CPU capability and version);
elsewhere torch's float kernels may sum in another order, so floats are compared within a tolerance
and integer codes may differ by one step in a few places (a value on a rounding boundary)."""
import json
import math

import pytest
import torch

from golden.make_golden import HERE, cases, record

GOLDEN = json.loads((HERE / "golden.json").read_text())
SAME_HOST = GOLDEN["host"] == {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


@pytest.fixture(scope="module")
def golden_tensors():
    from safetensors.torch import load_file

    return load_file(str(HERE / "golden.safetensors"))


def _close_json(a, b, where="") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            _close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3), \
            f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _close_tensor(name, got, want) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {got.dtype}{list(got.shape)}"
    if SAME_HOST:
        assert torch.equal(got.view(torch.uint8) if got.dtype.is_floating_point and got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.dtype.is_floating_point and want.element_size() == 1
                           else want), f"{name}: not bit-identical to the golden record"
    elif got.dtype.is_floating_point:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()),
                                   msg=f"{name}: outside float tolerance")
    else:
        diff = (got.long() - want.long()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.02, f"{name}: codes differ beyond one step"


@pytest.mark.parametrize("case,preset", cases(), ids=[f"{c}/{p}" for c, p in cases()])
def test_same_as_golden(case, preset, golden_tensors, tmp_path):
    key = f"{case}/{preset}"
    tensors, entry = record(case, preset, tmp_path)
    want = GOLDEN["entries"][key]
    if "error" in want:
        assert entry == want
        return
    assert "error" not in entry, entry
    entry = json.loads(json.dumps(entry, default=str))
    assert entry["graph"] == want["graph"], "the converted graph's ops changed"
    if SAME_HOST:
        assert entry["report"] == want["report"]
        assert entry["manifest"] == want["manifest"]
    else:
        _close_json(entry["report"], want["report"], "report")
        _close_json(entry["manifest"], want["manifest"], "manifest")
    prefix = f"{key}/"
    stored = {k[len(prefix):]: v for k, v in golden_tensors.items() if k.startswith(prefix)}
    assert stored.keys() == tensors.keys()
    for name, value in tensors.items():
        _close_tensor(f"{key}/{name}", value, stored[name])
