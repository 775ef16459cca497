"""The mixed-precision allocator: pick one candidate per layer from a
:class:`~qcompile.analyze.SensitivityTable` under a size budget (or under measured per-layer costs).
Pure: it reads a table and returns an :class:`Allocation`; measuring, quantizing and searching are
:mod:`qcompile.search`'s. Imports: ``errors``, ``recipe``, ``scope``, ``auto_recipe`` (the budget's
shape); scipy when installed.

The damage of a choice is the sum over layers of the output noise each causes alone,
``10^(-SQNR/10)`` (noise-to-signal ratios add when layer errors are independent), and its cost is
the bytes its codes, scales and zero points take. :func:`allocate` minimises damage subject to
``bytes <= budget`` exactly as a 0/1 integer program (scipy's ``milp``) when scipy is installed and
the problem is small, else greedily by marginal gain per byte. It always returns an allocation:
when even the smallest choice per layer exceeds the budget it returns that one, marked infeasible.

Example::

    >>> table = qcompile.analyze(model, ["w8", "w4-g64", "w3-g64"], (ids,), calibration=batches)
    >>> alloc = allocate(table, {"bits_per_weight": 4.5})
    >>> recipe = alloc.recipe({"w8": ..., "w4-g64": ..., "w3-g64": ...})
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .auto_recipe import size_budget
from .errors import RecipeError
from .recipe import Recipe
from .scope import match_pattern, resolve_layer_config

EXACT_LIMIT = 20_000  # binary variables the exact solver takes before falling back to greedy


@dataclass
class Allocation:
    choice: dict                     # layer -> candidate name
    total_bytes: int
    params: int
    predicted_noise: float           # sum of the chosen rows' output noise-to-signal ratios
    feasible: bool
    solver: str                      # "milp" | "greedy"
    budget_bytes: float
    options: dict = field(default_factory=dict, repr=False)  # layer -> [(candidate, noise, bytes, op, cost)]
    total_cost: Optional[float] = None  # the sum of the chosen ``costs`` when allocate() was given some
    sites: dict = field(default_factory=dict, repr=False)  # the table's: every quantizable layer -> where it sits

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.params, 1)

    @property
    def predicted_sqnr_db(self) -> float:
        return math.inf if self.predicted_noise == 0 else -10 * math.log10(self.predicted_noise)

    def recipe(self, recipes: dict, name: str = "auto") -> Recipe:
        """A concrete recipe (the first candidate's, renamed): every allocated layer overridden, by its
        exact path, with the config its chosen candidate gives it (:func:`~qcompile.scope.resolve_layer_config`:
        that candidate's overrides and ``keep_float`` included, ``None`` where it keeps the layer float).
        The layers not allocated (tied, or left out of the analysis) keep what the first candidate
        gives them: of its patterns and ``keep_first``/``keep_last``, those that still reach one of them."""
        base = next(iter(recipes.values()))
        overrides = {layer: resolve_layer_config(recipes[cand], layer, **self._site(layer))[0]
                     for layer, cand in self.choice.items()}
        rest = [(layer, site) for layer, site in self.sites.items() if layer not in self.choice]

        def reaches_rest(pattern):
            return any(match_pattern(pattern, layer, site["layer_type"]) for layer, site in rest)

        overrides.update({p: cfg for p, cfg in base.overrides.items() if p not in overrides and reaches_rest(p)})
        # smoothing only touches activation-quantized layers: a weight-only or float candidate beside
        # w8a8 must not switch it off for the w8a8 layers
        act = [r for r in recipes.values() if r.default is not None and r.default.activation is not None]
        smoothing = act[0].smoothing if act and all(r.smoothing for r in act) else None
        return replace(base, name=name, overrides=overrides, smoothing=smoothing,
                       keep_float=tuple(p for p in base.keep_float if reaches_rest(p)),
                       keep_first=base.keep_first and any(site["first"] for _, site in rest),
                       keep_last=base.keep_last and any(site["last"] for _, site in rest)).validate()

    def _site(self, layer: str) -> dict:
        """Where ``layer`` sits (the resolver's keyword arguments); from the layer's kind alone for a
        table saved before tables recorded it (``type:`` patterns then match nothing)."""
        return self.sites.get(layer) or {"layer_type": "", "kind": self.options[layer][0][3]}

    def to_dict(self) -> dict:
        return {"choice": dict(self.choice), "total_bytes": self.total_bytes, "bits_per_weight": self.bits_per_weight,
                "predicted_sqnr_db": self.predicted_sqnr_db, "feasible": self.feasible, "solver": self.solver,
                "budget_bytes": self.budget_bytes}


def budget_bytes(budget: dict, params: int) -> float:
    """Bytes allowed by ``{"bits_per_weight": b}`` or ``{"bytes": n}``."""
    key, value = size_budget(budget)
    return value * params / 8.0 if key == "bits_per_weight" else value


COSTS = ("output", "hessian", "gptq")


def layer_noise(row, cost: str = "output") -> float:
    """A row's noise-to-signal ratio: ``"output"``, of the model output with only that layer
    quantized (``10^(-SQNR/10)``); ``"hessian"``, the layer's own Hessian-proxy ratio (no model
    forward pass needed: :func:`qcompile.analyze` with ``model_output=False``); ``"gptq"``, the
    layer's own output error after GPTQ times the share of it that reaches the model output
    (``gptq_proxy x output_gain``: :func:`qcompile.analyze` with ``gptq=True``)."""
    if cost == "hessian":
        return max(float(row.hessian_proxy), 0.0)
    if cost == "gptq":
        if math.isnan(row.gptq_proxy):
            raise RecipeError("cost", f"the table has no GPTQ cost (layer {row.layer}): analyze was run without "
                                      "gptq=True; allocate with cost='hessian' or measure it")
        gain = getattr(row, "output_gain", math.nan)   # a table measured before gains existed: 1
        return max(float(row.gptq_proxy), 0.0) * (1.0 if math.isnan(gain) else gain)
    if cost != "output":
        raise RecipeError("cost", f"unknown cost '{cost}'; use one of {COSTS}")
    if math.isnan(row.output_sqnr_db):
        raise RecipeError("cost", f"the table has no model-output SQNR (layer {row.layer}): analyze was run with "
                                  "model_output=False; allocate with cost='hessian'")
    return 0.0 if not math.isfinite(row.output_sqnr_db) else 10 ** (-row.output_sqnr_db / 10)


def allocate(table, budget: dict, solver: Optional[str] = None, cost: Optional[str] = None,
             costs: Optional[dict] = None) -> Allocation:
    """Choose a candidate per layer of ``table`` minimising the summed noise (``cost``, see
    :func:`layer_noise`; default: ``"output"`` when the table measured the model output, else
    ``"gptq"`` when it measured the GPTQ cost, else ``"hessian"``) within ``budget``.

    ``costs``: ``{(layer, candidate): cost}`` in the budget's unit, constrained instead of bytes
    (``{"latency_ms": ms}`` with measured kernel times: :mod:`qcompile.latency`)."""
    if cost is None:
        cost = "output" if getattr(table, "model_output", True) else "gptq" if getattr(table, "gptq", False) \
            else "hessian"
    options: dict = {}
    for r in table.rows:
        noise = layer_noise(r, cost)
        spent = r.weight_bytes if costs is None else costs[(r.layer, r.candidate)]
        options.setdefault(r.layer, []).append((r.candidate, noise, r.weight_bytes, r.op, spent))
    params = sum({r.layer: r.params for r in table.rows}.values())
    sites = dict(getattr(table, "sites", {}))
    limit = budget_bytes(budget, params) if costs is None else float(next(iter(budget.values())))
    smallest = {layer: min(opts, key=lambda o: (o[4], o[1])) for layer, opts in options.items()}
    if sum(o[4] for o in smallest.values()) > limit:
        return _result({k: v[0] for k, v in smallest.items()}, options, params, False, "greedy", limit, sites)
    n_vars = sum(len(v) for v in options.values())
    if solver in (None, "milp") and n_vars <= EXACT_LIMIT:
        try:
            choice = _milp(options, limit)
            return _result(choice, options, params, True, "milp", limit, sites)
        except ImportError:
            if solver == "milp":
                raise
    return _result(_greedy(options, limit, smallest), options, params, True, "greedy", limit, sites)


def _result(choice, options, params, feasible, solver, limit, sites) -> Allocation:
    rows = {layer: next(o for o in options[layer] if o[0] == c) for layer, c in choice.items()}
    return Allocation(choice=choice, total_bytes=int(sum(o[2] for o in rows.values())), params=params,
                      predicted_noise=sum(o[1] for o in rows.values()), feasible=feasible, solver=solver,
                      budget_bytes=limit, options=options, total_cost=sum(o[4] for o in rows.values()), sites=sites)


def _milp(options, limit) -> dict:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    flat = [(layer, o) for layer, opts in options.items() for o in opts]
    cost = np.array([o[1] for _, o in flat])
    size = np.array([float(o[4]) for _, o in flat])
    layers = list(options)
    one_each = np.zeros((len(layers), len(flat)))
    for j, (layer, _) in enumerate(flat):
        one_each[layers.index(layer), j] = 1
    res = milp(cost, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size[None, :], -np.inf, limit)])
    if not res.success:
        raise ImportError(f"milp failed: {res.message}")  # fall back to greedy
    return {layer: o[0] for (layer, o), x in zip(flat, res.x) if x > 0.5}


def _greedy(options, limit, smallest) -> dict:
    choice = dict(smallest)
    spent = sum(o[4] for o in choice.values())
    while True:
        best, best_gain = None, 0.0
        for layer, opts in options.items():
            cur = choice[layer]
            for o in opts:
                extra = o[4] - cur[4]
                gain = cur[1] - o[1]
                if gain <= 0 or spent + extra > limit:
                    continue
                ratio = gain / max(extra, 1e-9)
                if ratio > best_gain:
                    best, best_gain = (layer, o), ratio
        if best is None:
            return {k: v[0] for k, v in choice.items()}
        layer, o = best
        spent += o[4] - choice[layer][4]
        choice[layer] = o
