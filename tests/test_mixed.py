"""Mixed-precision allocation from a sensitivity table: budget respected, exact = greedy on small
problems, beats the uniform recipe at the same size, never returns nothing."""
import dataclasses

import pytest
import torch

import qcompile
from conftest import wide_tiny_block
from qcompile.mixed import allocate


@pytest.fixture(scope="module")
def table_and_data():
    model, batches = wide_tiny_block()
    return model, batches, qcompile.analyze(model, ["w8", "w4-g64"], batches[0], batches)


def test_budget_is_respected_and_solvers_agree(table_and_data):
    _, _, table = table_and_data
    for bpw in (6.0, 7.0):
        exact = allocate(table, {"bits_per_weight": bpw}, solver="milp")
        greedy = allocate(table, {"bits_per_weight": bpw}, solver="greedy")
        for a in (exact, greedy):
            assert a.feasible and a.bits_per_weight <= bpw + 1e-9
        assert exact.predicted_noise <= greedy.predicted_noise + 1e-12
    assert allocate(table, {"bits_per_weight": 6.0}).solver == "milp"


def test_searched_recipe_beats_uniform_at_the_same_size(table_and_data):
    model, batches, table = table_and_data
    w4_bytes = sum(r.weight_bytes for r in table.rows if r.candidate == "w4-g64")
    alloc = allocate(table, {"bytes": w4_bytes * 1.3})
    recipes = {n: dataclasses.replace(qcompile.Recipe.preset(n), calibration=qcompile.CalibrationConfig(progress=False))
               for n in ("w8", "w4-g64")}
    auto = alloc.recipe(recipes)
    assert set(alloc.choice.values()) == {"w8", "w4-g64"}  # really mixed
    q_auto = qcompile.quantize(model, auto, batches[0], calibration=batches, report_samples=2)
    q_w4 = qcompile.quantize(model, recipes["w4-g64"], batches[0], calibration=batches, report_samples=2)
    assert q_auto.report.output_sqnr > q_w4.report.output_sqnr + 3  # dB
    assert set(auto.overrides) == set(table.layers)


def test_a_candidates_overrides_reach_analysis_and_allocation():
    """A candidate's overrides and keep_float decide its rows and its allocated configs
    (qcompile.scope.resolve_layer_config), as they decide what quantize does with it."""
    model, batches = wide_tiny_block(2)
    w8, w4 = qcompile.Recipe.preset("w8"), qcompile.Recipe.preset("w4-g64")
    mixed = dataclasses.replace(w4, name="w4-v8", overrides={"v": w8.default}, keep_float=("type:Embedding", "up"))
    table = qcompile.analyze(model, [w8, mixed], batches[0], batches, max_samples=1)
    assert table.get("v", "w4-v8").weight_bytes == table.get("v", "w8").weight_bytes       # int8, not int4
    assert table.get("q", "w4-v8").weight_bytes < table.get("q", "w8").weight_bytes        # the default: int4
    up = table.get("up", "w4-v8")                                                          # kept float
    assert up.hessian_proxy == 0.0 and up.weight_bytes == 4 * up.params
    assert table.get("emb", "w4-v8").bits_per_weight == 32.0                                # keep_float by type
    alloc = allocate(table, {"bits_per_weight": 32.0})
    alloc.choice.update(v="w4-v8", up="w4-v8", q="w4-v8", emb="w8")
    recipe = alloc.recipe({"w4-v8": mixed, "w8": w8})      # the first candidate is the base
    assert recipe.overrides["v"] == w8.default and recipe.overrides["q"] == w4.default and recipe.overrides["up"] is None
    assert recipe.overrides["emb"] == w8.embedding
    assert recipe.keep_float == ()                          # its patterns reach no layer left unallocated
    q = qcompile.quantize(model, recipe, batches[0], calibration=batches, report_samples=1)
    assert q.report.kept_float["up"] == "kept float by overrides['up']"
    # a layer left out of the analysis keeps what the first candidate gives it
    part = qcompile.analyze(model, [mixed, w8], batches[0], batches, max_samples=1, layers=["q", "v"], model_output=False)
    recipe = allocate(part, {"bits_per_weight": 32.0}).recipe({"w4-v8": mixed, "w8": w8})
    assert set(recipe.overrides) == {"q", "v"} and recipe.keep_float == ("type:Embedding", "up")


def test_impossible_budget_returns_the_smallest_marked_infeasible(table_and_data):
    _, _, table = table_and_data
    a = allocate(table, {"bits_per_weight": 1.0})
    assert not a.feasible
    assert all(c == "w4-g64" for layer, c in a.choice.items() if layer != "emb")  # the smallest everywhere
    assert a.to_dict()["feasible"] is False


def test_bad_budget_names_the_field(table_and_data):
    _, _, table = table_and_data
    with pytest.raises(qcompile.RecipeError, match="budget.bits"):
        allocate(table, {"bits": 4})
    with pytest.raises(qcompile.RecipeError, match="budget.latency_ms"):
        allocate(table, {"latency_ms": 3})  # measured per-layer costs are needed (tests/test_latency.py)


def test_recipe_auto_is_data_passed_to_quantize(table_and_data):
    model, batches, table = table_and_data
    w4_bytes = sum(r.weight_bytes for r in table.rows if r.candidate == "w4-g64")
    bpw = 8.0 * w4_bytes * 1.3 / sum({r.layer: r.params for r in table.rows}.values())
    auto = qcompile.Recipe.auto(["w8", "w4-g64"], {"bits_per_weight": bpw})
    q = qcompile.quantize(model, auto, batches[0], calibration=iter(batches), report_samples=2)  # one-shot data
    mp = q.report.mixed_precision
    assert mp["feasible"] and mp["bits_per_weight"] <= bpw and mp["solver"] == "milp"
    assert len(mp["most_sensitive"]) == 5 and set(mp["choice"].values()) == {"w8", "w4-g64"}
    assert q.recipe.name == "auto" and q.report.to_dict()["mixed_precision"]["choice"] == mp["choice"]
    with pytest.raises(qcompile.RecipeError, match="budget"):
        qcompile.Recipe.auto(["w8"], {"bitz": 3})
    assert mp["cost"] == "output"     # "auto" on a model this small: the exact model-output cost


def test_recipe_auto_takes_the_cost_the_cli_has(table_and_data):
    # issue 25: the cheap Hessian proxy is a Recipe.auto choice, not only the CLI's --cost
    model, batches, table = table_and_data
    bpw = 6.0
    q = qcompile.quantize(model, qcompile.Recipe.auto(["w8", "w4-g64"], {"bits_per_weight": bpw}, cost="hessian"),
                          batches[0], calibration=batches, report_samples=2)
    mp = q.report.mixed_precision
    assert mp["cost"] == "hessian" and mp["feasible"] and mp["bits_per_weight"] <= bpw
    assert set(mp["choice"].values()) <= {"w8", "w4-g64"}
    with pytest.raises(qcompile.RecipeError, match="cost"):
        qcompile.Recipe.auto(["w8"], {"bits_per_weight": 6}, cost="kl")


def _cosine_metric(batches):
    def metric(m):
        with torch.no_grad():
            return float(torch.stack([torch.nn.functional.cosine_similarity(
                m(*b).flatten(), _FLOAT[0](*b).flatten(), dim=0) for b in batches]).mean())
    return metric


_FLOAT = []


def test_quality_contract_returns_the_smallest_model_meeting_it_or_says_none_did(table_and_data):
    model, batches, _ = table_and_data
    _FLOAT[:] = [model]
    metric = _cosine_metric(batches)
    contract = qcompile.Quality(metric, max_drop=2e-3, steps=4)
    q = qcompile.quantize(model, qcompile.Recipe.auto(["w8", "w4-g64"], quality=contract), batches[0],
                          calibration=batches, report_samples=1)
    c = q.report.mixed_precision["contract"]
    assert c["met"] and c["chosen"]["drop"] <= 2e-3
    sizes = [t["bytes"] for t in c["tried"]]
    assert sizes == sorted(sizes) and c["chosen"] == c["tried"][-1]  # smallest first, stopped at the first that met it
    impossible = qcompile.quantize(model, qcompile.Recipe.auto(["w8", "w4-g64"], quality=qcompile.Quality(
        metric, max_drop=0.0, steps=3)), batches[0], calibration=batches, report_samples=1)
    c = impossible.report.mixed_precision["contract"]
    assert not c["met"] and "best one found" in impossible.report.mixed_precision["note"]
    assert len(c["tried"]) >= 2 and c["pareto"] and c["chosen"]["drop"] == min(t["drop"] for t in c["tried"])
    with pytest.raises(qcompile.RecipeError, match="budget"):
        qcompile.Recipe.auto(["w8"])


def test_one_search_loop_keeps_the_first_that_meets_else_the_best():
    """qcompile.search.search_loop, the loop the quality contract and the latency budget share."""
    from types import SimpleNamespace

    from qcompile.search import Trial, search_loop

    choices = {1.0: "a", 2.0: "a", 3.0: "b", 4.0: "c"}          # limit -> the allocation it gives
    scores = {"a": 5.0, "b": 3.0, "c": 1.0}

    def run(target, repeat):
        def evaluate(alloc, limit):
            s = scores[alloc.choice["x"]]
            return Trial(alloc, None, limit, s, met=s <= target, stop=s <= target, record={"limit": limit})
        return search_loop(4, lambda step, last: float(step + 1),
                           lambda limit: SimpleNamespace(choice={"x": choices[limit]}), evaluate, repeat)

    best, trials = run(3.0, "skip")       # the repeated "a" is skipped, "b" meets the target
    assert [t.limit for t in trials] == [1.0, 3.0] and best.limit == 3.0
    best, trials = run(0.5, "skip")       # none meets it: the lowest score
    assert [t.limit for t in trials] == [1.0, 3.0, 4.0] and best.limit == 4.0 and not best.met
    best, trials = run(0.5, "stop")       # a repeated choice ends the search
    assert [t.limit for t in trials] == [1.0] and best.limit == 1.0
