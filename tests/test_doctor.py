"""qcompile.check_calibration: each finding, and its negative case."""
import dataclasses

import pytest
import torch
from torch import nn

import qcompile


class MLP(nn.Module):
    def __init__(self, zero_branch=False):
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(16, 8)
        self.zero_branch = zero_branch

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x)))
        return y + self.side(x * 0) if self.zero_branch else y


def _recipe():
    r = qcompile.Recipe.preset("w8a8")
    return dataclasses.replace(r, smoothing=None, calibration=qcompile.CalibrationConfig(progress=False))


def _items(n, seed=0, scale=lambda i: 1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g) * scale(i),) for i in range(n)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP().eval()


def test_enough_iid_data_has_no_findings(model):
    check = qcompile.check_calibration(model, _recipe(), _items(128))
    assert check.enough, str(check)
    assert len(check.halves_sqnr_db) == 2  # a new extreme now and then (fc2 moved once) is not a trend


def test_too_few_items_say_how_many(model):
    check = qcompile.check_calibration(model, _recipe(), _items(2))
    assert [f.kind for f in check.findings] == ["too_few"] and check.suggested_items >= 4


def test_ranges_still_growing_are_unstable(model):
    check = qcompile.check_calibration(model, _recipe(), _items(16, scale=lambda i: 1 + i / 2), halves=False)
    kinds = {f.kind for f in check.findings}
    assert kinds == {"unstable"} and check.suggested_items > 16
    assert any(f.layers == "fc1" for f in check.findings)


def test_constant_input_is_named():
    torch.manual_seed(0)
    check = qcompile.check_calibration(MLP(zero_branch=True).eval(), _recipe(), _items(8), halves=False)
    assert [(f.kind, f.layers) for f in check.findings] == [("constant", "side")]


def test_nan_in_calibration_names_the_layer(model):
    items = _items(8)
    items[5] = (torch.full((8, 16), float("nan")),)
    check = qcompile.check_calibration(model, _recipe(), items)
    assert check.findings[0].kind == "nonfinite" and "fc1" in check.findings[0].detail and "item 5" in check.findings[0].detail


def test_halves_that_disagree_are_flagged(model):
    items = _items(32, scale=lambda i: 1.0 if i % 2 == 0 else 4.0)  # the split takes even / odd items
    check = qcompile.check_calibration(model, _recipe(), items)
    assert "halves_disagree" in {f.kind for f in check.findings}, str(check)


def test_empty_data_is_an_error(model):
    with pytest.raises(qcompile.CalibrationError, match="empty"):
        qcompile.check_calibration(model, _recipe(), [])
