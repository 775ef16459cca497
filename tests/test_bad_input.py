"""Bad input, clear error, nothing lost: each bad input a user can give raises a qcompile error
that names what is at fault (the layer, the input, the node and module, the recipe field), and
afterwards the user's model is unchanged (parameters and buffers bit for bit) and still runs.

``CASES`` is the one list: the tests run it, and ``python tests/test_bad_input.py`` prints the
table of docs/errors.md from a real run (the messages there are copied from its output).
"""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile import (BackendError, CalibrationError, CaptureError, InputError, QuantizationError, RecipeError)

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyBlock, assert_state_equal, state_copy  # noqa: E402


class MLP(nn.Module):
    """Float inputs (so calibration data can carry NaN/Inf), a residual and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.norm(self.fc1(x))))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return x
        return -x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def _recipe(name, **changes):
    r = qcompile.resolve_recipe(name)
    return dataclasses.replace(r, calibration=qcompile.CalibrationConfig(progress=False), **changes)


def _mlp_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, generator=g),) for _ in range(n)]


def _block_batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(n)]


def _with(batches, index, value):
    out = [tuple(t.clone() for t in b) for b in batches]
    out[1][0][index] = value
    return out


# -- each bad input: (id, model factory, trigger(model) -> raises, error type, words the message must contain)
def _empty_calibration(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _mlp_batches()[0], calibration=[])


def _empty_generator(m):
    qcompile.quantize(m, _recipe("w8a8"), _mlp_batches()[0], calibration=(b for b in []))


def _nan_calibration(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _mlp_batches()[0],
                      calibration=_with(_mlp_batches(), (2, 5), float("nan")))


def _inf_calibration(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _mlp_batches()[0],
                      calibration=_with(_mlp_batches(), (0, 0), float("inf")))


def _nan_calibration_smoothing(m):   # the smoothing statistics pass sees the data first
    qcompile.quantize(m, _recipe("w8a8"), _mlp_batches()[0], calibration=_with(_mlp_batches(), (1, 1), float("nan")))


def _mlp_with_nan_weight():
    """The user's own model has a NaN weight (a diverged training run)."""
    m = MLP()
    with torch.no_grad():
        m.fc2.weight[3, 4] = float("nan")
    return m


def _nan_weight(m):
    qcompile.quantize(m, _recipe("w8"), _mlp_batches()[0])


def _calibration_wrong_dtype(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _mlp_batches()[0],
                      calibration=[(torch.randn(4, 16, dtype=torch.float64),)])


def _calibration_wrong_shape(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _mlp_batches()[0], calibration=[(torch.randn(4, 12),)])


def _calibration_mismatched_inputs(m):
    qcompile.quantize(m, _recipe("w8a8", smoothing=None), _block_batches()[0],
                      calibration=[(torch.randint(0, 50, (3, 7)), torch.ones(3, 9, dtype=torch.long))])


def _call_wrong_dtype(m):
    q = qcompile.quantize(m, _recipe("w8"), _block_batches()[0])
    q(torch.randn(3, 7), torch.ones(3, 7, dtype=torch.long))


def _call_wrong_rank(m):
    q = qcompile.quantize(m, _recipe("w8"), _mlp_batches()[0])
    q(torch.randn(4, 16, 2))


def _call_missing_input(m):
    q = qcompile.quantize(m, _recipe("w8"), _block_batches()[0])
    q(torch.randint(0, 50, (3, 7)))


def _onnx_unsupported(m):
    q = qcompile.quantize(m, _recipe("w3-g64"), _mlp_batches()[0])  # ONNX has no 3-bit type
    qcompile.lower(q, backend="onnx", target="qdq")


def _tvm_unsupported(m):
    pytest.importorskip("tvm")
    q = qcompile.quantize(m, _recipe("fp8-e4m3", smoothing=None), _mlp_batches()[0], calibration=_mlp_batches())
    qcompile.lower(q, backend="tvm")


def _override_matches_nothing(m):
    qcompile.quantize(m, _recipe("w8").with_overrides({"fc3": None}), _mlp_batches()[0])


def _override_type_matches_nothing(m):
    qcompile.quantize(m, _recipe("w8").with_overrides({"type:Conv2d": None}), _mlp_batches()[0])


def _uncapturable(m):
    qcompile.quantize(m, _recipe("w8"), _mlp_batches()[0])


CASES = [
    ("empty calibration data", MLP, _empty_calibration, CalibrationError, ["empty"]),
    ("empty calibration generator", MLP, _empty_generator, CalibrationError, ["empty"]),
    ("NaN in calibration data", MLP, _nan_calibration, CalibrationError, ["NaN", "fc1"]),
    ("Inf in calibration data", MLP, _inf_calibration, CalibrationError, ["Inf", "fc1"]),
    ("NaN in calibration data (smoothing pass)", MLP, _nan_calibration_smoothing, CalibrationError, ["NaN", "fc1"]),
    ("NaN in a weight", _mlp_with_nan_weight, _nan_weight, QuantizationError, ["fc2", "NaN"]),
    ("calibration input of the wrong dtype", MLP, _calibration_wrong_dtype, CalibrationError,
     ["'x'", "torch.float64", "torch.float32"]),
    ("calibration input of the wrong shape", MLP, _calibration_wrong_shape, CalibrationError, ["'x'", "12", "16"]),
    ("calibration inputs whose sizes disagree", TinyBlock, _calibration_mismatched_inputs, CalibrationError,
     ["'mask'", "'ids'", "9", "7"]),
    ("quantized model called with the wrong dtype", TinyBlock, _call_wrong_dtype, InputError,
     ["'ids'", "torch.float32", "torch.int64"]),
    ("quantized model called with the wrong rank", MLP, _call_wrong_rank, InputError, ["'x'", "3 dims", "2 dims"]),
    ("quantized model called with an input missing", TinyBlock, _call_missing_input, InputError, ["'ids'", "'mask'"]),
    ("format a backend cannot lower (onnx, qdq target)", MLP, _onnx_unsupported, BackendError,
     ["node '", "module 'fc1' (Linear)", "uint3"]),
    ("format a backend cannot lower (tvm)", MLP, _tvm_unsupported, BackendError, ["node '", "module 'fc1'", "fp8_e4m3"]),
    ("recipe override matching nothing", MLP, _override_matches_nothing, RecipeError, ["overrides['fc3']", "matches no"]),
    ("recipe type override matching nothing", MLP, _override_type_matches_nothing, RecipeError,
     ["overrides['type:Conv2d']"]),
    ("model torch.export cannot capture", WithGate, _uncapturable, CaptureError, ["'gate' (Gate)", "hint:"]),
]


def _model(factory):
    torch.manual_seed(0)
    return factory().eval()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_clear_error_nothing_lost(case):
    _, factory, trigger, error, words = case
    model = _model(factory)
    x = _block_batches()[0] if factory is TinyBlock else _mlp_batches()[0]
    with torch.no_grad():
        out_before = model(*x) if factory is not WithGate else model.fc(*x)
    before = state_copy(model)
    with pytest.raises(error) as e:
        trigger(model)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"the error does not name {w!r}: {msg}"
    assert_state_equal(model, before)   # bit for bit, parameters and buffers
    with torch.no_grad():               # and still usable, with the same result
        out_after = model(*x) if factory is not WithGate else model.fc(*x)
    assert torch.equal(out_before.view(torch.int32), out_after.view(torch.int32))


def _docs_table() -> str:
    """The table of docs/errors.md, from a real run of every case."""
    rows = ["| bad input | error a user sees (verbatim) | pinned by |", "| --- | --- | --- |"]
    for name, factory, trigger, error, _ in CASES:
        model = _model(factory)
        try:
            trigger(model)
        except error as e:
            msg = f"{type(e).__name__}: {e}".replace("|", "\\|").replace("\n", "<br>")
        else:
            msg = "(no error: the case is broken)"
        rows.append(f"| {name} | `{msg}` | `tests/test_bad_input.py::test_bad_input_clear_error_nothing_lost[{name}]` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_docs_table())
