"""The GPTQ-aware sensitivity cost (issue 25): ``analyze(gptq=True)`` measures each Linear's own
output error after GPTQ, and ``allocate(cost="gptq")`` / ``Recipe.auto(cost="gptq")`` choose on it."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import qcompile
from conftest import wide_tiny_block
from qcompile import search
from qcompile.analyze import SensitivityTable
from qcompile.mixed import allocate


class TwoHeads(nn.Module):
    """Two Linears reading one input tensor (like q/k): one Gram matrix shared, each layer's error
    visible in its slice of the output."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(128, 48), nn.Linear(128, 32)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x)], -1)


def _gptq(name="w4-g64-gptq"):
    # keep_first/keep_last off: every layer of these tiny models is quantized
    return dataclasses.replace(qcompile.Recipe.preset(name), keep_first=False, keep_last=False,
                               calibration=qcompile.CalibrationConfig(progress=False))


@pytest.fixture(scope="module")
def two_heads():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    g = torch.Generator().manual_seed(1)
    spread = torch.linspace(0.1, 3.0, 128)   # uneven channel energies: GPTQ's feedback matters
    cal = [(torch.randn(4, 16, 128, generator=g) * spread,) for _ in range(4)]
    return model, cal


def test_gptq_cost_equals_the_error_of_the_converted_gptq_model(two_heads):
    model, cal = two_heads
    recipe = _gptq()
    table = qcompile.analyze(model, [recipe], cal[0], cal, model_output=False, gptq=True)
    q = qcompile.quantize(model, recipe, cal[0], calibration=cal)
    assert sorted((r["layer"], r["method"]) for r in q.report.weight_algorithm) == [("k", "gptq"), ("q", "gptq")]
    with torch.no_grad():
        ref = torch.cat([model(*c) for c in cal])
        out = torch.cat([q(*c) for c in cal])
    for layer, cols in (("q", slice(0, 48)), ("k", slice(48, 80))):
        measured = float((out[..., cols] - ref[..., cols]).pow(2).mean() / ref[..., cols].pow(2).mean())
        row = table.get(layer, recipe.name)
        assert row.gptq_proxy == pytest.approx(measured, rel=1e-4), layer
        assert row.gptq_proxy < 0.9 * row.hessian_proxy   # GPTQ's error is below round-to-nearest's


def test_table_marks_the_gptq_cost_round_trips_and_allocates_on_it():
    model, batches = wide_tiny_block()
    names = ["w8", "w4-g64", "w3-g64"]
    table = qcompile.analyze(model, names, batches[0], batches, model_output=False, gptq=True)
    assert table.gptq and not table.model_output
    linear = {r.layer for r in table.rows if r.op == "linear"}
    for r in table.rows:
        if r.op == "linear":
            assert 0 < r.gptq_proxy < r.hessian_proxy * 1.05, r   # solved, never much worse than rounding
        else:   # embeddings are not solved by GPTQ: their round-to-nearest proxy
            assert r.gptq_proxy == r.hessian_proxy
    assert linear
    again = SensitivityTable.from_dict(json.loads(table.to_json()))
    assert again.gptq and [r.gptq_proxy for r in again.rows] == [r.gptq_proxy for r in table.rows]
    assert "GPTQ" in table.cost_label
    budget = {"bits_per_weight": 5.0}
    assert allocate(table, budget).choice == allocate(table, budget, cost="gptq").choice   # the default
    alloc = allocate(table, budget)
    assert alloc.predicted_noise == pytest.approx(sum(table.get(k, c).gptq_proxy * table.get(k, c).output_gain
                                                      for k, c in alloc.choice.items()))


def test_output_gain_is_the_model_output_noise_of_the_coarsest_candidate_over_its_proxy(two_heads):
    model, cal = two_heads
    names = ["w8", "w4-g64", "w3-g64"]     # the coarsest (largest error): w3-g64
    table = qcompile.analyze(model, names, cal[0], cal, model_output=False, gptq=True)
    first = qcompile.analyze(model, names, cal[0], cal[:1], max_samples=1)   # the output cost on item 0
    for layer in ("q", "k"):
        row = table.get(layer, "w3-g64")
        assert {table.get(layer, c).output_gain for c in names} == {row.output_gain}   # one per layer
        noise = 10 ** (-first.get(layer, "w3-g64").output_sqnr_db / 10)
        assert row.output_gain * row.hessian_proxy == pytest.approx(noise, rel=1e-4)
    # q has 48 of the 80 output columns: more of the output, more of its error reaches it
    assert table.get("q", "w3-g64").output_gain > table.get("k", "w3-g64").output_gain


def test_recipe_auto_asks_for_the_gptq_cost_and_auto_picks_it_for_gptq_recipes(monkeypatch):
    model, batches = wide_tiny_block()
    auto = qcompile.Recipe.auto(["w8", "w4-g64-gptq"], {"bits_per_weight": 6.0}, cost="gptq")
    q = qcompile.quantize(model, auto, batches[0], calibration=batches)
    mp = q.report.mixed_precision
    assert mp["cost"] == "gptq" and mp["feasible"] and mp["bits_per_weight"] <= 6.0
    # "auto" on a model above the output cost's size: gptq when the recipe will be solved with GPTQ
    monkeypatch.setattr(search, "OUTPUT_COST_MAX_PARAMS", 0)
    assert search.resolved_cost(qcompile.Recipe.auto(["w4-g64-gptq", "w8"], {"bits_per_weight": 6}), model) == "gptq"
    assert search.resolved_cost(qcompile.Recipe.auto(["w4-g64", "w8"], {"bits_per_weight": 6}), model) == "hessian"


def test_gptq_cost_errors_are_named():
    with pytest.raises(qcompile.RecipeError, match="cost"):
        qcompile.Recipe.auto(["w8"], {"bits_per_weight": 6}, cost="gptq-kl")
    model, batches = wide_tiny_block()
    local = qcompile.analyze(model, ["w8", "w4-g64"], batches[0], batches, model_output=False)
    assert not local.gptq and all(math.isnan(r.gptq_proxy) for r in local.rows)
    with pytest.raises(qcompile.RecipeError, match="gptq=True"):
        allocate(local, {"bits_per_weight": 6.0}, cost="gptq")
