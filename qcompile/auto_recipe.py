"""``Recipe.auto(...)`` as data: :class:`AutoRecipe` (the candidates, the budget or quality
contract) and :class:`Quality`, with the checks of a budget's shape. Nothing here measures or
quantizes: :func:`qcompile.search.quantize_auto` does, when :func:`qcompile.quantize` is given one.

Budgets (one of):

* ``{"bits_per_weight": b}`` or ``{"bytes": n}``: the size of the quantized layers' weights;
* ``{"latency_ms": ms, "backend": "onnx", ...}``: measured on a backend (:mod:`qcompile.latency`).
  Keys: ``latency_ms`` (required), ``backend`` (required), ``target`` (the backend's lowering
  target, default ``"onnxruntime"``), ``runs`` (end-to-end timing runs, default 10), ``attempts``
  (default 3), ``margin`` (the fraction of the budget the first allocation leaves free for timing
  noise, default 0.05), ``clock``: ``"wall"`` (default: the time a caller waits) or ``"cpu"`` (the
  CPU time of the one thread that runs every kernel: on a host shared with other jobs, wall time
  grows with their load and CPU time much less). Which backends and targets exist is checked when
  the search starts (:func:`qcompile.latency.check_budget`), not here.

Imports: ``errors`` only (this is the recipe layer: ``recipe.Recipe.auto`` builds an AutoRecipe).

Example::

    >>> auto = AutoRecipe(("w8", "w4-g64"), {"bits_per_weight": 4.5})
    >>> qmodel = qcompile.quantize(model, auto, (ids,), calibration=batches)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import RecipeError

SIZE_BUDGETS = ("bits_per_weight", "bytes")
LATENCY_DEFAULTS = {"target": "onnxruntime", "runs": 10, "attempts": 3, "clock": "wall", "margin": 0.05}
LATENCY_KEYS = ("latency_ms", "backend", *LATENCY_DEFAULTS)
CLOCKS = ("wall", "cpu")
# What a layer's sensitivity is measured as (qcompile.mixed.layer_noise): "output", the model-output
# SQNR (one forward pass of the whole model per layer and candidate: exact, but hours on an LLM);
# "hessian", the layer-local Hessian-diagonal proxy (one float pass with hooks); "auto" picks by the
# model's size (qcompile.search.OUTPUT_COST_MAX_PARAMS).
COSTS = ("auto", "output", "hessian", "gptq")


def size_budget(budget: dict) -> tuple[str, float]:
    """``(key, value)`` of a ``{"bits_per_weight": b}`` or ``{"bytes": n}`` budget; a
    :class:`RecipeError` naming the field otherwise."""
    if not isinstance(budget, dict) or len(budget) != 1:
        raise RecipeError("budget", f"expected one of {{'bits_per_weight': b}} or {{'bytes': n}}, got {budget!r}")
    (key, value), = budget.items()
    if key in SIZE_BUDGETS:
        return key, float(value)
    if key == "latency_ms":
        raise RecipeError("budget.latency_ms", "a latency budget has no byte limit: allocate(..., costs=) takes "
                                               "measured per-layer times (qcompile.latency)")
    raise RecipeError(f"budget.{key}", "unknown budget; use bits_per_weight, bytes, or latency_ms with backend")


def latency_budget(budget: dict) -> dict:
    """A latency budget with defaults filled in, its shape checked (keys, milliseconds, clock,
    margin, runs, attempts); a :class:`RecipeError` naming the field otherwise. The backend and
    target are :func:`qcompile.latency.check_budget`'s to check."""
    unknown = sorted(set(budget) - set(LATENCY_KEYS))
    if unknown:
        raise RecipeError(f"budget.{unknown[0]}", f"unknown latency budget key; use {', '.join(LATENCY_KEYS)}")
    ms = budget.get("latency_ms")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0:
        raise RecipeError("budget.latency_ms", f"expected a positive number of milliseconds, got {ms!r}")
    out = {**LATENCY_DEFAULTS, **budget}
    if out["clock"] not in CLOCKS:
        raise RecipeError("budget.clock", f"unknown clock {out['clock']!r}; use one of {CLOCKS}")
    m = out["margin"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
        raise RecipeError("budget.margin", f"expected a fraction in [0, 1), got {m!r}")
    for key in ("runs", "attempts"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise RecipeError(f"budget.{key}", f"expected a positive integer, got {out[key]!r}")
    return out


@dataclass(frozen=True)
class Quality:
    """A quality contract for :meth:`Recipe.auto`: ``metric(model) -> float`` on the user's own
    evaluation data (higher is better unless ``higher_is_better=False``); the search returns the
    smallest configuration whose metric is within ``max_drop`` of the float model's, or, when none
    is, the best one found with the report saying so. ``steps``: budgets tried, smallest first.

    Example: ``Recipe.auto(["w8", "w4-g64"], quality=Quality(accuracy_on_my_data, max_drop=0.01))``."""

    metric: Callable
    max_drop: float
    higher_is_better: bool = True
    steps: int = 6


@dataclass(frozen=True)
class AutoRecipe:
    """A recipe to be chosen by measurement when :func:`qcompile.quantize` runs: analyze the model
    with every candidate on the calibration data, allocate under ``budget`` (or search under a
    ``quality`` contract), quantize with the result (:func:`qcompile.search.quantize_auto`).
    ``Recipe.auto(candidates=["w8", "w4-g64"], budget={"bits_per_weight": 4.5})``.

    ``cost``: how each layer's sensitivity is measured (``COSTS``): ``"output"`` (model-output SQNR,
    ``layers x candidates`` forward passes), ``"hessian"`` (the layer-local proxy of round-to-nearest,
    one pass), ``"gptq"`` (each layer's own output error after GPTQ, one pass and one GPTQ solve per
    layer and candidate) or ``"auto"`` (output for models up to
    ``qcompile.search.OUTPUT_COST_MAX_PARAMS`` parameters; above, gptq when the chosen recipe will be
    solved with GPTQ (the first candidate's ``weight_algorithm``), else hessian)."""

    candidates: tuple
    budget: dict = field(hash=False, default_factory=dict)
    max_samples: int = 8
    name: str = "auto"
    quality: Optional[Quality] = field(default=None, hash=False, compare=False)
    cost: str = "auto"

    def __post_init__(self):
        if len(self.candidates) < 1:
            raise RecipeError("candidates", "give at least one candidate recipe")
        if self.cost not in COSTS:
            raise RecipeError("cost", f"unknown cost {self.cost!r}; use one of {COSTS}")
        if isinstance(self.budget, dict) and "latency_ms" in self.budget:
            latency_budget(self.budget)
        elif self.quality is None or self.budget:
            size_budget(self.budget)

    @property
    def searches(self) -> bool:
        """True when choosing means quantizing and measuring candidates: a quality contract or a
        latency budget (a size budget quantizes once)."""
        return self.quality is not None or "latency_ms" in self.budget


__all__ = ["AutoRecipe", "Quality", "size_budget", "latency_budget", "SIZE_BUDGETS", "LATENCY_DEFAULTS",
           "LATENCY_KEYS", "CLOCKS", "COSTS"]
