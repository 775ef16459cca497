"""Capture: which dims ``dynamic_shapes="auto"`` leaves free, the time budget that turns a capture
torch.export cannot bound quickly into a named error, and errors a user can act on."""
import re
import time

import pytest
import torch
from conftest import ToySwin
from torch import nn
from torch.export import Dim

import qcompile
from qcompile import CaptureError
from qcompile.budget import BudgetExceeded, time_budget
from qcompile.capture import auto_dims, capture, describe_dynamic


def test_auto_dims_like_a_user_would():
    assert auto_dims(torch.zeros(2, 7, dtype=torch.long)) == [0, 1]            # token ids, masks
    assert auto_dims(torch.zeros(2, 7, 16)) == [0, 1, 2]                       # features: F specialised by a weight
    assert auto_dims(torch.zeros(2, 800)) == [0, 1]                            # audio samples
    assert auto_dims(torch.zeros(2, 3, 32, 32)) == [0]                         # image: batch only
    assert auto_dims(torch.zeros(2, 3, 4, 32, 32)) == [0]                      # video
    assert auto_dims(torch.zeros(2, 3, 32, 32, dtype=torch.long)) == [0, 1, 2, 3]  # integer 4-D: not an image


def _placeholder_shapes(gm):
    return {str(n.target): n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder"}


def test_auto_keeps_batch_free_and_spatial_static():
    model = ToySwin().eval()
    cap = capture(model, (torch.randn(2, 3, 40, 40),))
    shape = _placeholder_shapes(cap.graph_module)["pixel_values"]
    assert not isinstance(shape[0], int) and list(shape[1:]) == [3, 40, 40]
    out = cap.graph_module(torch.randn(5, 3, 40, 40))
    assert out.shape == (5, 10)


def test_user_spec_makes_spatial_dynamic():
    """The opt-in: ``dynamic_shapes=`` with H and W free (a model whose shapes stay simple)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    spec = {"input": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}
    q = qcompile.quantize(model, "w8", (torch.randn(2, 3, 16, 16),), dynamic_shapes=spec)
    assert q(torch.randn(3, 3, 24, 20)).shape == (3, 4)
    default = qcompile.quantize(model, "w8", (torch.randn(2, 3, 16, 16),))
    with pytest.raises(qcompile.errors.InputError, match="static size 16"):
        default(torch.randn(3, 3, 24, 20))


def test_budget_stops_exploding_capture_with_named_error():
    """Swin-like window padding on a dynamic H/W: torch.export needs minutes to bound the shapes;
    a 2 s budget stops it with the input, the dims and the hint."""
    model = ToySwin().eval()
    spec = {"pixel_values": {i: Dim.AUTO for i in range(4)}}
    t0 = time.perf_counter()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 3, 40, 40),), dynamic_shapes=spec, budget_s=2)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert elapsed < 90, elapsed   # ~2 s on an idle machine; unbounded, the capture takes many minutes
    assert "within its budget of 2 s" in msg
    assert re.search(r"in module '[^']+' \(\w+\)\)", msg), msg   # where torch.export was when it stopped
    assert "input 'pixel_values' dims 0, 1, 2, 3" in msg
    assert "dynamic_shapes={'pixel_values': {0: Dim.AUTO}}" in msg and "hint:" in msg
    assert "\x1b" not in msg
    # torch is left usable: the default (static spatial) capture of the same model works right after
    t0 = time.perf_counter()
    q = qcompile.quantize(model, "w8a8", (torch.randn(2, 3, 40, 40),),
                          calibration=[(torch.randn(2, 3, 40, 40),) for _ in range(2)])
    print(f"ToySwin w8a8 quantize, default dims: {time.perf_counter() - t0:.1f} s")
    x = torch.randn(3, 3, 40, 40)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.98


def test_time_budget_restores_handler_and_is_off_outside_main_thread():
    import signal
    import threading

    before = signal.getsignal(signal.SIGALRM)
    with time_budget(5):
        pass
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    with pytest.raises(BudgetExceeded):
        with time_budget(0.2):
            while True:
                pass
    assert signal.getsignal(signal.SIGALRM) is before
    seen = []
    t = threading.Thread(target=lambda: seen.append(signal.getitimer(signal.ITIMER_REAL)[0] == 0 and
                                                    _run_in_thread()))
    t.start()
    t.join()
    assert seen == [True]


def test_time_budget_raises_again_when_its_exception_is_swallowed():
    """A weakref callback or a fallback ``except`` can drop the timer's exception: it is raised again
    until the block exits."""
    swallowed = []
    with pytest.raises(BudgetExceeded):
        with time_budget(0.05):
            try:
                while True:
                    pass
            except BudgetExceeded as e:   # lost, as `Exception ignored in ...` loses it
                swallowed.append(e)
            while True:
                pass
    assert len(swallowed) == 1


def _spin_then_convert():
    try:
        while True:
            pass
    except BudgetExceeded as e:            # a C++ boundary converting the exception on its way out
        raise TypeError("failed to unpack the object at pos 1") from e


def test_time_budget_names_the_converted_exception_and_keeps_the_original_frames():
    with pytest.raises(BudgetExceeded) as info:
        with time_budget(0.05):
            _spin_then_convert()
    stop = info.value
    assert isinstance(stop.__cause__, TypeError) and isinstance(stop.original, BudgetExceeded)
    names = [f.f_code.co_name for f in stop.frames()]   # innermost first: the spin, then the test
    assert names.index("_spin_then_convert") < names.index(
        "test_time_budget_names_the_converted_exception_and_keeps_the_original_frames")
    with pytest.raises(TypeError):            # an exception before the budget ran out is left alone
        with time_budget(5):
            raise TypeError("not the budget")


def _run_in_thread():
    with time_budget(0.01):   # not the main thread: no timer, no error
        time.sleep(0.05)
    return True


def test_describe_dynamic():
    assert describe_dynamic(None) == "none (static shapes)"
    assert describe_dynamic({"ids": {0: Dim.AUTO, 1: Dim.AUTO}, "mask": None}) == "input 'ids' dims 0, 1"
