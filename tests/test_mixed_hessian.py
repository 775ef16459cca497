"""Sensitivity without the per-layer model forward passes (``analyze(model_output=False)``) and the
allocation on its Hessian proxy (``allocate(cost="hessian")``): what large models use."""
import dataclasses
import json
import math

import pytest

import qcompile
from conftest import wide_tiny_block
from qcompile.analyze import SensitivityTable
from qcompile.mixed import allocate


@pytest.fixture(scope="module")
def setup():
    model, batches = wide_tiny_block()
    full = qcompile.analyze(model, ["w8", "w4-g64", "w3-g64"], batches[0], batches)
    local = qcompile.analyze(model, ["w8", "w4-g64", "w3-g64"], batches[0], batches, model_output=False)
    return model, batches, full, local


def test_layer_local_table_has_the_same_local_columns_and_no_output_columns(setup):
    _, _, full, local = setup
    assert not local.model_output and full.model_output
    assert [(r.layer, r.candidate) for r in local.rows] == [(r.layer, r.candidate) for r in full.rows]
    for a, b in zip(full.rows, local.rows):
        assert math.isnan(b.output_sqnr_db) and math.isnan(b.output_cosine)
        assert (a.hessian_proxy, a.weight_bytes) == (b.hessian_proxy, b.weight_bytes)
        # the local table measures the layer SQNR on the first item only (its memory: one item's
        # activations per layer, not all of them); the same error, on fewer tokens
        assert abs(a.layer_sqnr_db - b.layer_sqnr_db) < 1.5, (a, b)
    worst = local.most_sensitive(3, "w3-g64")  # ranked by the proxy, not by the NaN output column
    assert [local.cost_db(r) for r in worst] == sorted(local.cost_db(r) for r in local.rows
                                                       if r.candidate == "w3-g64")[:3]
    # the view shows the proxy in dB: fewer bits, lower
    for layer in ("q", "up", "down"):
        assert local.cost_db(local.get(layer, "w3-g64")) < local.cost_db(local.get(layer, "w4-g64")) \
            < local.cost_db(local.get(layer, "w8"))


def test_saved_table_round_trips_and_renders(setup, tmp_path):
    _, _, full, local = setup
    for table in (full, local):
        again = SensitivityTable.from_dict(json.loads(table.to_json()))
        assert again.model_output == table.model_output and again.candidates == table.candidates
        for a, b in zip(table.rows, again.rows):
            assert all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                       zip(dataclasses.astuple(a), dataclasses.astuple(b)))
    page = local.to_html(tmp_path / "s.html").read_text()
    assert "Hessian-proxy" in page and "nan" not in page
    pytest.importorskip("matplotlib")
    png = local.to_png(tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_hessian_allocation_beats_uniform_w4_at_30_percent_more_bytes(setup):
    model, batches, _, local = setup
    w4_bytes = sum(r.weight_bytes for r in local.rows if r.candidate == "w4-g64")
    alloc = allocate(local, {"bytes": w4_bytes * 1.3})
    assert alloc.total_bytes <= w4_bytes * 1.3
    assert len({c for layer, c in alloc.choice.items() if layer != "emb"}) >= 2  # really mixed
    recipes = {n: dataclasses.replace(qcompile.Recipe.preset(n), calibration=qcompile.CalibrationConfig(progress=False))
               for n in ("w8", "w4-g64", "w3-g64")}
    q_auto = qcompile.quantize(model, alloc.recipe(recipes), batches[0], calibration=batches, report_samples=4)
    q_w4 = qcompile.quantize(model, recipes["w4-g64"], batches[0], calibration=batches, report_samples=4)
    assert q_auto.report.output_sqnr > q_w4.report.output_sqnr + 3  # dB


def test_output_cost_needs_the_output_column_and_unknown_costs_are_named(setup):
    _, _, full, local = setup
    with pytest.raises(qcompile.RecipeError, match="model_output=False"):
        allocate(local, {"bits_per_weight": 6.0}, cost="output")
    assert allocate(local, {"bits_per_weight": 6.0}).choice == allocate(local, {"bits_per_weight": 6.0},
                                                                        cost="hessian").choice  # the default
    with pytest.raises(qcompile.RecipeError, match="cost"):
        allocate(full, {"bits_per_weight": 6.0}, cost="latency")
    # both costs work on the full table; the output one is what analyze measured
    assert allocate(full, {"bits_per_weight": 6.0}, cost="hessian").feasible
