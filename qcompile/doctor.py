"""Calibration doctor: is this calibration data enough for this recipe?

``qcompile.check_calibration(model, recipe, calibration)`` prepares the model, feeds the data one item
at a time and watches every static activation observer:

* **stability**: each observer's scale after every item; if it still moved by more than
  ``tolerance`` (relative) over the second half of the data, and on at least a quarter of those
  items (a trend, not one new extreme of iid data), the ranges are still growing: the
  finding says by how much and roughly how many items would settle it (the change shrinks about
  geometrically when the data is doubled, so ``n * 2^ceil(log2(change / tolerance))``);
* **coverage**: observers that saw nothing (a branch the data never reached), a constant input (all
  zeros, min = max), or NaN/Inf (the layer is named);
* **halves**: the data split in two disjoint halves, each calibrating (and smoothing) its own copy;
  each copy's output SQNR against float on all the data. Halves more than ``halves_db`` apart mean
  the result depends on which samples were picked.

Fewer than ``min_items`` items is a finding of its own: stability cannot be measured.

Example::

    >>> check = qcompile.check_calibration(model, "w8a8", batches)
    >>> print(check); assert check.enough
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch.utils import _pytree as pytree

from . import pipeline
from .backends.base import placement
from .calibration import iterate
from .errors import CalibrationError
from .observers import Observer
from .recipe import resolve_recipe
from .report import sqnr
from .spec import ROLE


@dataclass
class Finding:
    kind: str            # "too_few" | "unstable" | "unexercised" | "constant" | "nonfinite" | "halves_disagree"
    layers: str
    detail: str


@dataclass
class CalibrationCheck:
    items: int
    tolerance: float
    findings: list = field(default_factory=list)
    scale_change: dict = field(default_factory=dict)    # observer layers -> relative change over the 2nd half
    halves_sqnr_db: Optional[tuple] = None              # (half A, half B) output SQNR vs float
    suggested_items: Optional[int] = None

    @property
    def enough(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"items": self.items, "enough": self.enough, "tolerance": self.tolerance,
                "findings": [f.__dict__ for f in self.findings], "scale_change": self.scale_change,
                "halves_sqnr_db": self.halves_sqnr_db, "suggested_items": self.suggested_items}

    def __str__(self) -> str:
        head = (f"calibration check on {self.items} item(s): "
                f"{'enough' if self.enough else f'{len(self.findings)} finding(s)'}")
        if self.scale_change:
            worst = max(self.scale_change.items(), key=lambda kv: kv[1])
            head += f"; largest scale change over the second half {100 * worst[1]:.2f}% ({worst[0]})"
        if self.halves_sqnr_db is not None:
            head += f"; halves: output SQNR {self.halves_sqnr_db[0]:.1f} / {self.halves_sqnr_db[1]:.1f} dB"
        lines = [head] + [f"  [{f.kind}] {f.layers}: {f.detail}" for f in self.findings]
        if self.suggested_items:
            lines.append(f"  suggestion: about {self.suggested_items} items")
        return "\n".join(lines)


def _observers(prepared) -> list:
    gm = prepared.graph_module
    seen = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.meta.get(ROLE) == "qobs" and n.target not in seen:
            mod = gm.get_submodule(n.target)
            if isinstance(mod, Observer) and not mod.spec.dynamic:
                seen[n.target] = mod
    return list(seen.items())


def _scale(obs) -> Optional[float]:
    if obs.batches == 0:
        return None
    return float(obs.qparams()[0].reshape(-1)[0])


def check_calibration(model, recipe, calibration: Iterable, example_inputs: Optional[tuple] = None, *,
                      tolerance: float = 0.1, min_items: int = 4, halves: bool = True, halves_db: float = 3.0,
                      max_items: Optional[int] = None) -> CalibrationCheck:
    """Check ``calibration`` (an iterable of positional tuples or kwargs dicts, as for
    :func:`qcompile.quantize`) for ``recipe`` on ``model`` (see the module docstring). ``model`` is
    not modified."""
    recipe = resolve_recipe(recipe)
    items = list(iterate(calibration, max_items))
    if not items:
        raise CalibrationError("check_calibration needs calibration data: the iterable was empty")
    example = example_inputs if example_inputs is not None else items[0]
    ex_args, ex_kwargs = (example, None) if not isinstance(example, dict) else ((), example)
    check = CalibrationCheck(items=len(items), tolerance=tolerance)

    def fresh(data):
        return pipeline.prepare(model, recipe, tuple(ex_args) if not isinstance(ex_args, tuple) else ex_args,
                                placement=placement(recipe.backend), example_kwargs=ex_kwargs, calibration=data)

    prepared = fresh(items)
    observers = _observers(prepared)
    if not observers:
        check.findings.append(Finding("too_few", "-", "the recipe has no static activation scales: nothing to check"))
        return check
    traces = {t: [] for t, _ in observers}
    check_moves: dict = {}
    binder = prepared._captured.binder
    for i, item in enumerate(items):
        try:
            with torch.no_grad():
                binder.apply(prepared, item)
        except CalibrationError as e:
            check.findings.append(Finding("nonfinite", "see detail", f"item {i}: {e}"))
            return check
        for t, obs in observers:
            traces[t].append(_scale(obs))
    for t, obs in observers:
        layers = ",".join(obs.layers)
        if obs.batches == 0:
            check.findings.append(Finding("unexercised", layers, "the calibration data never reached this input"))
            continue
        lo, hi = (float(v) for v in obs.range())
        if lo == hi:
            check.findings.append(Finding("constant", layers, f"every calibration value was {lo:g}: its scale "
                                                              "means nothing (is this input always zero here?)"))
            continue
        trace = [s for s in traces[t] if s is not None]
        h = len(trace) // 2
        check.scale_change[layers] = abs(trace[-1] - trace[h]) / max(trace[-1], 1e-30)
        # how many items of the second half moved the scale: a range still growing moves it on many
        # (a trend); iid data sets a new extreme only now and then (~ln 2 new records expected)
        check_moves[layers] = sum(abs(b - a) > 1e-6 * abs(b) for a, b in zip(trace[h:], trace[h + 1:]))
    if len(items) < min_items:
        check.findings.append(Finding("too_few", "all", f"{len(items)} item(s): at least {min_items} are needed to "
                                                        "see whether the scales settle"))
        check.suggested_items = max(min_items, 8 * len(items))
    else:
        second_half = len(items) - len(items) // 2
        moving = {k: v for k, v in check.scale_change.items()
                  if v > tolerance and check_moves.get(k, 0) >= max(3, second_half // 4)}
        for layers, change in sorted(moving.items(), key=lambda kv: -kv[1])[:10]:
            check.findings.append(Finding("unstable", layers, f"scale still moved {100 * change:.1f}% over the "
                                                              f"second half of the data, on {check_moves[layers]} of its "
                                                              f"{second_half} items (tolerance {100 * tolerance:g}%)"))
        if moving:
            worst = max(moving.values())
            check.suggested_items = len(items) * 2 ** math.ceil(math.log2(worst / tolerance))
    if halves and len(items) >= 2 * min_items:
        _check_halves(check, model, fresh, items, halves_db)
    return check


def _check_halves(check, model, fresh, items, halves_db):
    def flat(out):
        return torch.cat([t.detach().float().flatten() for t in pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.is_floating_point()])

    binder = None
    quality = []
    for part in (items[0::2], items[1::2]):
        p = fresh(part)
        p.calibrate(part, progress=False)
        q = pipeline.convert(p, report_inputs=part[:1])
        binder = q.binder
        with torch.no_grad():
            quality.append(sqnr(torch.cat([flat(binder.apply(model, it)) for it in items]),
                                torch.cat([flat(binder.apply(q, it)) for it in items])))
    check.halves_sqnr_db = tuple(quality)
    if abs(quality[0] - quality[1]) > halves_db:
        check.findings.append(Finding("halves_disagree", "-", f"calibrating on one half or the other of the data "
                                      f"gives output SQNR {quality[0]:.1f} vs {quality[1]:.1f} dB: the result depends "
                                      "on the samples (more, or more varied, data)"))
