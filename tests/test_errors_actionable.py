"""Errors a user can act on: a failed capture or ONNX export keeps a summary of the underlying
message (no terminal escape codes, not only its first line), names the module (and the node, when
the exporter names one) and gives the next step; a capture or export past its time budget says
which inputs and dims were dynamic and how to keep them static."""
import time

import pytest
import torch
from conftest import TinyBlock
from torch import nn

import qcompile
from qcompile import BackendError, CaptureError
from qcompile.errors import summarize

pytest.importorskip("onnx")


def test_summarize_strips_escape_codes_and_keeps_the_meaningful_lines():
    text = ("\x1b[96mFailed to decompose\x1b[0m the FX graph\n\n=========\n"
            '  File "x.py", line 3, in f\n'
            "Cannot guard on s0 // 7\nFor more information, run with TORCH_LOGS=+dynamic\n" + "detail\n" * 20)
    out = summarize(text)
    assert "\x1b" not in out
    assert out.startswith("Failed to decompose the FX graph\n  Cannot guard on s0 // 7\n  detail")
    assert "File " not in out and "TORCH_LOGS" not in out and "=====" not in out
    assert out.endswith(" ...") and out.count("\n") == 5                 # bounded: 6 lines
    assert len(summarize("x" * 5000)) <= 804


class Loud(nn.Module):
    def forward(self, x):
        if x.shape[0] > 0:   # a static fact during capture: the raise is reached
            raise RuntimeError("\x1b[31mkernel exploded\x1b[0m\nshape [2, 4] is not supported here")
        return x


class WithLoud(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.loud = nn.Linear(4, 4), Loud()

    def forward(self, x):
        return self.loud(self.fc(x))


def test_capture_error_names_module_keeps_summary_no_escape_codes():
    with pytest.raises(CaptureError) as info:
        qcompile.quantize(WithLoud(), "w8", (torch.randn(2, 4),))
    msg = str(info.value)
    assert "module 'loud' (Loud)" in msg
    assert "kernel exploded" in msg and "shape [2, 4] is not supported here" in msg   # more than the first line
    assert "hint:" in msg and "\x1b" not in msg


@torch.library.custom_op("qcompile_test::halve", mutates_args=())
def halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


@halve.register_fake
def _(x):
    return torch.empty_like(x)


class Halve(nn.Module):
    def forward(self, x):
        return torch.ops.qcompile_test.halve(x)


class WithCustomOp(nn.Module):
    """Linear → ``act`` (a module calling a custom op) → Linear."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 8), act, nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_onnx_export_failure_names_node_module_and_next_step():
    q = qcompile.quantize(WithCustomOp(Halve()).eval(), "w8", (torch.randn(2, 8),))
    with pytest.raises(BackendError) as info:
        qcompile.lower(q, "onnx")
    msg = str(info.value)
    assert "at node 'halve' of module 'act' (Halve)" in msg
    assert "No ONNX function found" in msg and "qcompile_test.halve" in msg   # the exporter's summary, not its banner
    assert "hint: that op has no ONNX translation" in msg
    assert "\x1b" not in msg and "Next steps" not in msg
    assert len(msg) < 1500


STALL = {"seconds": 0.0}   # how long the fake (shape) kernel of qcompile_test::stall sleeps


@torch.library.custom_op("qcompile_test::stall", mutates_args=())
def stall(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


@stall.register_fake
def _(x):
    time.sleep(STALL["seconds"])   # a stand-in for symbolic-shape work that takes the exporter minutes
    return torch.empty_like(x)


class Stall(nn.Module):
    def forward(self, x):
        return torch.ops.qcompile_test.stall(x)


def _stalled_export_error(q, budget_s: float) -> str:
    """The message of the BackendError an ONNX export stalled in qcompile_test::stall stops with."""
    STALL["seconds"] = 30.0
    try:
        with pytest.raises(BackendError) as info:
            qcompile.lower(q, "onnx", budget_s=budget_s)
    finally:
        STALL["seconds"] = 0.0
    return str(info.value)


def test_onnx_export_budget_names_the_node_and_module_it_stopped_in():
    """The export stalls in one module's op: the budget's error names that node and module."""
    q = qcompile.quantize(WithCustomOp(Stall()).eval(), "w8", (torch.randn(2, 8),))
    msg = _stalled_export_error(q, budget_s=1)
    assert "within its budget of 1 s (stopped at node 'stall' of module 'act' (Stall))" in msg, msg
    assert "hint:" in msg and "dynamic_shapes=" in msg and "\x1b" not in msg


class StalledTinyBlock(nn.Module):
    """TinyBlock (inputs ``ids`` and ``mask``) followed by the stalling op."""

    def __init__(self):
        super().__init__()
        self.block, self.act = TinyBlock(), Stall()

    def forward(self, ids, mask):
        return self.act(self.block(ids, mask))


def test_onnx_export_budget_names_dynamic_inputs_and_hint():
    """An export past its budget names the dynamic inputs and dims and how to keep them static (a
    real Swin's dynamic H/W explodes at capture already: tests/test_capture_dims.py). The export
    stalls in a known op, so the timer always fires at the same place (a budget far below any
    export's time would cut it at a random point)."""
    torch.manual_seed(0)
    model = StalledTinyBlock().eval()
    example = (torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    q = qcompile.quantize(model, "w8", example)
    msg = _stalled_export_error(q, budget_s=0.5)
    assert "within its budget of 0.5 s" in msg
    assert "input 'ids' dims 0, 1; input 'mask' dims 0, 1" in msg
    assert "dynamic_shapes={'ids': {0: Dim.AUTO}, 'mask': {0: Dim.AUTO}}" in msg and "hint:" in msg
    assert "\x1b" not in msg
    plain = qcompile.quantize(TinyBlock().eval(), "w8", example)   # and the exporter still works afterwards
    assert torch.allclose(qcompile.lower(plain, "onnx")(*example), plain(*example), atol=1e-4)
