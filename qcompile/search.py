"""Mixed precision chosen by measurement: what quantizing with an
:class:`~qcompile.auto_recipe.AutoRecipe` runs. One entry point, :func:`quantize_auto`, three cases:

* **a size budget** (``bits_per_weight`` or ``bytes``): analyze every candidate per layer, allocate
  once (:func:`qcompile.mixed.allocate`), quantize with the chosen recipe;
* **a quality contract** (:class:`~qcompile.auto_recipe.Quality`): allocate under sizes from the
  smallest to the largest possible, quantize each, keep the first whose metric is within the
  contract's drop of the float model's (else the best one, reported as such);
* **a latency budget** (``latency_ms`` on a backend): per-layer kernel times measured on the backend
  (:func:`qcompile.latency.measure_layers`); the float model is timed end to end, and the *float
  remainder* (what is not a candidate layer: attention, norms, the session itself) is that time
  minus the float layers' times; allocate under ``budget - remainder`` with the measured times as
  costs, then quantize, lower and time the choice end to end (median of ``runs``, one thread); over
  budget, tighten the limit by the overshoot and try again (at most ``attempts`` times). When no
  attempt meets it, the fastest one measured is returned with ``met: false``.

The last two are one loop, :func:`search_loop`, given how a step's limit is chosen, how an
allocation is measured and when to stop. Every case records what it measured and chose in the
report's ``mixed_precision``.

Imports: ``analyze``, ``latency``, ``mixed`` (the allocator), ``pipeline`` (to quantize latency's
branch models), ``auto_recipe``, ``recipe``, ``model``, ``errors``. Called from the top
(:func:`qcompile.quantize`), never from below.

Example::

    >>> auto = qcompile.Recipe.auto(["w8", "w4-g64"], {"bits_per_weight": 4.5})
    >>> qmodel = quantize_auto(auto, model, (ids,), batches, None, lambda r: qcompile.quantize(model, r, (ids,), batches))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .analyze import SensitivityTable, analyze, layer_sites, quantizable_layers
from .auto_recipe import AutoRecipe
from .errors import CalibrationError
from .latency import FLOAT, check_budget, measure_layers
from .mixed import Allocation, allocate
from . import pipeline
from .backends.base import placement, timing_module
from .model import QuantizedModel
from .recipe import Recipe, resolve_recipe


def quantize_auto(auto: AutoRecipe, model, example_inputs, calibration, example_kwargs,
                  quantize_with: Callable[[Recipe], QuantizedModel]) -> QuantizedModel:
    """Quantize ``model`` with the recipe ``auto`` chooses (see the module docstring).

    ``calibration``: a re-iterable of inputs (analysis and every quantization read it);
    ``quantize_with(recipe)``: quantizes the user's model with a concrete :class:`Recipe`. Returns the
    chosen quantized model; its ``report.mixed_precision`` says what was measured and chosen."""
    if calibration is None:
        raise CalibrationError("Recipe.auto measures each layer's sensitivity: pass calibration=")
    args = (auto, model, example_inputs, calibration, example_kwargs, quantize_with)
    if "latency_ms" in auto.budget:
        return _latency_budget(*args)
    if auto.quality is not None:
        return _quality_contract(*args)
    return _size_budget(*args)


# Above this many parameters, Recipe.auto's default cost is the Hessian proxy: the model-output cost
# runs layers x candidates forward passes (840 for SmolLM2-135M's 210 Linears and 4 candidates: 17
# minutes at 14 GB without finishing, issue 25), while MiniLM's (22.7 M, 36 Linears) takes seconds.
OUTPUT_COST_MAX_PARAMS = 50_000_000


def resolved_cost(auto: AutoRecipe, model) -> str:
    """``auto.cost``, with ``"auto"`` made ``"output"`` by a model's size up to
    :data:`OUTPUT_COST_MAX_PARAMS`, else ``"gptq"`` when the chosen recipe will be solved with GPTQ
    (it takes the first candidate's ``weight_algorithm``: :meth:`Allocation.recipe`), else
    ``"hessian"`` (round-to-nearest, what the recipe will do)."""
    if auto.cost != "auto":
        return auto.cost
    params = sum(p.numel() for p in model.parameters())
    if params <= OUTPUT_COST_MAX_PARAMS:
        return "output"
    algo = resolve_recipe(auto.candidates[0]).weight_algorithm
    return "gptq" if algo is not None and algo.method == "gptq" else "hessian"


def measure_candidates(auto: AutoRecipe, model, example_inputs, calibration,
                       example_kwargs) -> tuple[SensitivityTable, dict]:
    """(the sensitivity table of ``auto``'s candidates, candidate name -> :class:`Recipe`), measured
    with the cost :func:`resolved_cost` names (the table's ``model_output`` says which)."""
    cost = resolved_cost(auto, model)
    table = analyze(model, list(auto.candidates), example_inputs, calibration, example_kwargs=example_kwargs,
                    max_samples=auto.max_samples, model_output=cost == "output", gptq=cost == "gptq",
                    progress=cost != "output")
    recipes = {c if isinstance(c, str) else resolve_recipe(c).name: resolve_recipe(c) for c in auto.candidates}
    return table, recipes


@dataclass
class Trial:
    """One allocation tried by :func:`search_loop`: the model quantized with it, the limit it was
    allocated under, its ``score`` (lower is better), whether it ``met`` the target, whether the
    search ``stop``s after it, and the ``record`` the report lists it by."""

    allocation: Allocation
    qmodel: Any
    limit: float
    score: float
    met: bool
    stop: bool
    record: dict


def search_loop(steps: int, next_limit: Callable[[int, Optional[Trial]], float],
                allocate_under: Callable[[float], Allocation], evaluate: Callable[[Allocation, float], Trial],
                repeat: str = "skip") -> tuple[Trial, list]:
    """(the best trial, every trial in order). For up to ``steps`` steps: ``next_limit(step, last
    trial)`` chooses a limit, ``allocate_under(limit)`` allocates, ``evaluate(allocation, limit)``
    quantizes and measures it. The best trial is the first that meets its target, else the lowest
    score; the loop ends after a trial with ``stop``. An allocation already tried is skipped
    (``repeat="skip"``) or ends the search (``"stop"``: the limit no longer changes the choice)."""
    trials, seen, best, last = [], set(), None, None
    for step in range(steps):
        limit = next_limit(step, last)
        alloc = allocate_under(limit)
        choice = tuple(sorted(alloc.choice.items()))
        if choice in seen:
            if repeat == "stop":
                break
            continue
        seen.add(choice)
        last = evaluate(alloc, limit)
        trials.append(last)
        if best is None or last.met or last.score < best.score:
            best = last
        if last.stop:
            break
    return best, trials


def _size_budget(auto, model, example_inputs, calibration, example_kwargs, quantize_with):
    table, recipes = measure_candidates(auto, model, example_inputs, calibration, example_kwargs)
    cost = resolved_cost(auto, model)
    alloc = allocate(table, auto.budget, cost=cost)
    info = {**alloc.to_dict(), "budget": dict(auto.budget), "cost": cost,
            "most_sensitive": _most_sensitive(table)}
    qmodel = quantize_with(alloc.recipe(recipes, auto.name))
    qmodel.report.mixed_precision = info
    return qmodel


def _quality_contract(auto, model, example_inputs, calibration, example_kwargs, quantize_with):
    q = auto.quality
    table, recipes = measure_candidates(auto, model, example_inputs, calibration, example_kwargs)
    sign = 1.0 if q.higher_is_better else -1.0
    base = float(q.metric(model))
    options = {}
    for r in table.rows:
        options.setdefault(r.layer, []).append(r.weight_bytes)
    lo, hi = sum(min(v) for v in options.values()), sum(max(v) for v in options.values())
    sizes = [lo + (hi - lo) * i / max(q.steps - 1, 1) for i in range(q.steps)]

    def evaluate(alloc, size):
        qmodel = quantize_with(alloc.recipe(recipes, auto.name))
        score = float(q.metric(qmodel))
        drop = sign * (base - score)
        row = {"bytes": alloc.total_bytes, "bits_per_weight": alloc.bits_per_weight, "metric": score,
               "drop": drop, "layers_per_candidate": _layers_per_candidate(alloc, recipes)}
        return Trial(alloc, qmodel, size, drop, met=drop <= q.max_drop, stop=drop <= q.max_drop, record=row)

    best, trials = search_loop(len(sizes), lambda step, last: sizes[step],
                               lambda size: allocate(table, {"bytes": size}), evaluate)
    tried = [t.record for t in trials]
    best.qmodel.report.mixed_precision = {
        **best.allocation.to_dict(), "contract": {"max_drop": q.max_drop, "metric_float": base, "met": best.met,
                                                  "chosen": best.record, "tried": tried, "pareto": _pareto(tried)},
        "note": "contract met by the smallest configuration tried" if best.met else
                "no configuration met the contract: this is the best one found"}
    return best.qmodel


def _latency_budget(auto, model, example_inputs, calibration, example_kwargs, quantize_with):
    budget = check_budget(auto.budget)
    timer = timing_module(budget["backend"])
    table, recipes = measure_candidates(auto, model, example_inputs, calibration, example_kwargs)
    sites = table.sites or layer_sites(model)
    layers = {name: (mod, sites[name]) for name, mod, _ in quantizable_layers(model) if name in set(table.layers)}
    lat = measure_layers(model, layers, recipes, example_inputs, example_kwargs, budget, _quantize_on)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    clock = budget["clock"]

    def run(recipe):
        qmodel = quantize_with(dataclasses.replace(recipe, backend=budget["backend"]))
        art = timer.lower(qmodel, budget["target"])
        return qmodel, timer.time_artifact(art, args, kwargs, budget["runs"])

    _, float_times = run(Recipe.preset(FLOAT))
    float_ms = float_times[clock]
    remainder = float_ms - sum(lat.float_ms.values())
    target_ms = float(budget["latency_ms"])

    def next_limit(step, last):
        if last is None:
            # an allocation fills its limit to the brim, and a repeated timing varies by a few percent:
            # aim a little below the budget so that the first measurement usually lands under it
            return target_ms * (1 - budget["margin"]) - remainder
        return last.limit - (last.score - target_ms)  # the prediction was optimistic by this much: ask for less

    def evaluate(alloc, limit):
        predicted = remainder + alloc.total_cost
        qmodel, times = run(alloc.recipe(recipes, auto.name))
        measured = times[clock]
        met = measured <= target_ms
        record = {"limit_ms": limit, "predicted_ms": predicted, "measured_ms": measured,
                  "measured_ms_both_clocks": times, "met": met, "feasible": alloc.feasible,
                  "layers_per_candidate": _layers_per_candidate(alloc, recipes)}
        return Trial(alloc, qmodel, limit, measured, met=met, stop=met or not alloc.feasible, record=record)

    best, trials = search_loop(budget["attempts"], next_limit,
                               lambda limit: allocate(table, {"latency_ms": limit}, costs=lat.ms), evaluate,
                               repeat="stop")
    alloc, measured, predicted = best.allocation, best.score, best.record["predicted_ms"]
    met = measured <= target_ms
    best.qmodel.report.mixed_precision = {
        **alloc.to_dict(), "budget": dict(auto.budget),
        "latency": {"backend": budget["backend"], "target": budget["target"], "budget_ms": target_ms,
                    "clock": clock, "predicted_ms": predicted, "measured_ms": measured, "met": met,
                    "float_ms": float_ms, "float_ms_both_clocks": float_times, "float_remainder_ms": remainder,
                    "runs": budget["runs"], "margin": budget["margin"], "threads": 1,
                    "attempts": [t.record for t in trials],
                    "layer_table": {"measured": lat.measured, "cached": lat.cached, "host": lat.host,
                                    "runtime": lat.runtime, "cache": lat.cache}},
        "most_sensitive": _most_sensitive(table),
        "note": "budget met (measured end to end)" if met else
                ("no choice of candidates is predicted to fit the budget: this is the fastest per layer, measured"
                 if not alloc.feasible else "no attempt met the budget when measured: this is the fastest one measured"),
    }
    return best.qmodel


def _layers_per_candidate(alloc: Allocation, recipes: dict) -> dict:
    return {c: list(alloc.choice.values()).count(c) for c in recipes}


def _most_sensitive(table: SensitivityTable) -> list:
    return [{"layer": r.layer, "candidate": r.candidate, "output_sqnr_db": r.output_sqnr_db}
            for r in table.most_sensitive(5)]


def _pareto(rows: list) -> list:
    """The rows no other row beats on both size and metric drop."""
    return [r for r in rows if not any(o["bytes"] <= r["bytes"] and o["drop"] < r["drop"] or
                                       o["bytes"] < r["bytes"] and o["drop"] <= r["drop"] for o in rows)]


__all__ = ["quantize_auto", "measure_candidates", "search_loop", "Trial"]


def _quantize_on(model, recipe: Recipe, example_inputs: tuple, calibration=None, *, report_samples: int = 8,
                 backend: Optional[str] = None) -> QuantizedModel:
    """A concrete recipe quantized for ``backend``'s placement (latency's branch models)."""
    if backend is not None:
        recipe = dataclasses.replace(recipe, backend=backend).validate()
    return pipeline.quantize(model, recipe, example_inputs, calibration, placement=placement(recipe.backend),
                             report_samples=report_samples)
