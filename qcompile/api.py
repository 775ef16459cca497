"""Orchestration only: capture → passes → calibrate → convert → report. Every step lives in its
own module; this file decides their order."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torch import nn

from .calibration import reiterable, run_calibration
from .capture import call_checked, capture
from .errors import CalibrationError, RecipeError, closest
from .measure import measure
from .model import PreparedModel, QuantizedModel
from .passes import (AnnotatePass, ApplySmoothingPass, ApplyWeightAlgorithmPass, ConvertPass, FoldBatchNormPass, InsertChannelStatsPass,
                     InsertObserversPass, NormalizeLinearPass, PassManager)
from .passes.annotate import annotated_nodes
from .passes.infra import prune_unused_tensors, tensor_owner
from .recipe import Recipe
from .report import Report

RecipeLike = Union[Recipe, str, Path, dict]


def resolve_recipe(recipe: RecipeLike) -> Recipe:
    """A :class:`Recipe` from a Recipe, a preset name, a path to a YAML/JSON file, or a dict."""
    from .presets import PRESETS

    if isinstance(recipe, Recipe):
        return recipe.validate()
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        s = str(recipe)
        if s in PRESETS:
            return Recipe.preset(s)
        if s.endswith((".yaml", ".yml", ".json")) or Path(s).exists():
            if not Path(s).exists():
                raise RecipeError("recipe", f"file '{s}' does not exist")
            return Recipe.load(s)
        raise RecipeError("recipe", f"'{s}' is neither a preset nor a recipe file; {closest(s, PRESETS)}")
    raise RecipeError("recipe", f"expected a Recipe, preset name, path or dict, got {type(recipe).__name__}")


def _needs_static_calibration(gm) -> bool:
    return any(a.activation is not None and not a.activation.dynamic for _, a in annotated_nodes(gm))


def prepare(model: nn.Module, recipe: RecipeLike, example_inputs: tuple, *, example_kwargs: Optional[dict] = None,
            calibration: Optional[Iterable] = None, dynamic_shapes: Any = "auto",
            dump_dir: Optional[str] = None) -> PreparedModel:
    """Capture ``model`` and insert observers per ``recipe``; call the result on calibration
    data, then :func:`convert`. A recipe with ``smoothing`` measures its smoothing scales on
    ``calibration`` here (they change what the observers see), so it needs that argument.

    Example::

        >>> prepared = qcompile.prepare(model, "w8a8-dynamic", (ids, mask))
        >>> for batch in data: prepared(*batch)
        >>> qmodel = qcompile.convert(prepared)
    """
    recipe = resolve_recipe(recipe)
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, example_kwargs, dynamic_shapes)
    gm = cap.graph_module
    fold, annotate = FoldBatchNormPass(), AnnotatePass(recipe)
    PassManager([fold, NormalizeLinearPass(), annotate], dump_dir)(gm)
    info = {"kept_float": dict(annotate.skipped), "folded": list(fold.folded), "smoothing": [],
            "tied": dict(annotate.tied), "weight_algorithm": [],
            "timings_s": {"capture": time.perf_counter() - t0}}
    has_act = any(a.activation is not None for _, a in annotated_nodes(gm))
    if recipe.smoothing is not None and has_act:
        if calibration is None:
            raise CalibrationError(f"recipe '{recipe.name}' uses smoothing, whose scales are measured on data: "
                                   "pass calibration= to prepare (or quantize), or set smoothing to null")
        t1 = time.perf_counter()
        stats = InsertChannelStatsPass(_placement(recipe).quantized_outputs)
        PassManager([stats])(gm)
        run_calibration(lambda item: _call_checked(gm, cap.binder, item), calibration,
                        recipe.calibration.max_samples, recipe.calibration.progress, desc="smoothing statistics")
        sm = recipe.smoothing
        smooth = ApplySmoothingPass(sm.alpha, sm.fold_only, sm.alphas, sm.outlier_quantiles)
        PassManager([smooth])(gm)
        info["smoothing"] = stats.skipped + smooth.applied
        info["timings_s"]["smoothing"] = time.perf_counter() - t1
    if recipe.weight_algorithm is not None:
        if calibration is None:
            raise CalibrationError(f"recipe '{recipe.name}' uses {recipe.weight_algorithm.method}, which solves the "
                                   "weights on data: pass calibration= to prepare (or quantize)")
        t1 = time.perf_counter()
        algo = ApplyWeightAlgorithmPass(recipe.weight_algorithm, calibration, cap.binder,
                                        recipe.calibration.max_samples, recipe.calibration.progress)
        PassManager([algo], dump_dir)(gm)
        info["weight_algorithm"] = algo.applied
        info["timings_s"][recipe.weight_algorithm.method] = time.perf_counter() - t1
    observe = InsertObserversPass(_placement(recipe).quantized_outputs)
    PassManager([observe], dump_dir)(gm)
    info["quantized_outputs"] = list(observe.outputs)
    return PreparedModel(gm, cap, recipe, model, info)


def _call_checked(gm, binder, item):
    """``gm`` on one calibration item, its inputs checked first (an error naming the input)."""
    args, kwargs = binder.bind(item)
    return call_checked(gm, args, kwargs, CalibrationError)


def _placement(recipe: Recipe):
    """The capabilities of the backend the recipe targets (where to place Q/DQ); none: the default."""
    from .backends.base import Capabilities, get_backend

    return get_backend(recipe.backend).capabilities if recipe.backend else Capabilities()


def convert(prepared: PreparedModel, report_inputs: Optional[Iterable] = None,
            dump_dir: Optional[str] = None) -> QuantizedModel:
    """Turn a calibrated :class:`PreparedModel` into a :class:`QuantizedModel` with a report
    measured on ``report_inputs`` (default: the example inputs). A trained
    :class:`~qcompile.qat.QATModel` is frozen first (on a copy) into the same observed graph."""
    from .qat import QATModel

    if isinstance(prepared, QATModel):
        prepared = prepared.to_prepared(dump_dir)
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"convert expects the PreparedModel returned by qcompile.prepare, got {type(prepared).__name__}")
    gm, cap, recipe, info = prepared.graph_module, prepared._captured, prepared.recipe, prepared._info
    t0 = time.perf_counter()
    conv = ConvertPass()
    PassManager([conv], dump_dir)(gm)
    prune_unused_tensors(gm)
    _own_tensors(gm)
    gm.recompile()
    info["timings_s"]["convert"] = time.perf_counter() - t0
    report = Report(recipe=recipe.name, kept_float=info["kept_float"], smoothing=info["smoothing"],
                    tied_weights=info.get("tied", {}), weight_algorithm=info.get("weight_algorithm", []),
                    folded_batch_norms=info["folded"], calibration_samples=prepared.calibrated_batches)
    t1 = time.perf_counter()
    items = list(report_inputs) if report_inputs is not None else [(*cap.example_args, *[cap.example_kwargs[k] for k in cap.binder.keywords])]
    measure(report, gm, conv.float_weights, prepared._float_model[0], cap.binder, items, set(info["folded"]))
    info["timings_s"]["report"] = time.perf_counter() - t1
    report.timings_s = dict(info["timings_s"])
    example = (cap.example_args, cap.example_kwargs, cap.dynamic_shapes)
    return QuantizedModel(gm, cap.binder, recipe, report, example)


def _own_tensors(gm) -> None:
    """Give the converted graph its own copies of the float tensors it still reads. ``torch.export``
    shares parameter objects with the user's model; an inference artifact must neither alias them
    (a later in-place update of the user's model would leak in) nor record autograd history."""
    for name, p in list(gm.named_parameters()):
        owner, attr = tensor_owner(gm, name)
        owner._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=False)
    for name, b in list(gm.named_buffers()):
        owner, attr = tensor_owner(gm, name)
        owner._buffers[attr] = b.detach().clone()


def quantize(model: nn.Module, recipe: RecipeLike, example_inputs: tuple, calibration: Optional[Iterable] = None, *,
             example_kwargs: Optional[dict] = None, dynamic_shapes: Any = "auto", report_samples: int = 8,
             backend: Optional[str] = None, dump_dir: Optional[str] = None) -> QuantizedModel:
    """Quantize ``model`` with ``recipe``; returns a :class:`QuantizedModel` (an ``nn.Module``
    called like ``model``) with ``.report``, ``.recipe`` and ``.save(path)``. ``model`` itself is
    never modified.

    ``recipe``: a :class:`Recipe`, a preset (``"w8a8"``, ``"w8a8-dynamic"``, ``"w8"``, ``"w4-g64"``,
    ``"w4-g128"``) or a YAML/JSON path. ``example_inputs``: positional inputs as ``torch.export``
    takes them. ``calibration``: any iterable (list, generator, DataLoader) of tuples or kwargs
    dicts; required when the recipe has static activation scales. A re-iterable one (list,
    DataLoader, Dataset) is streamed on every pass, never copied; a one-shot generator is kept
    in a list when the recipe needs more than one pass over it (smoothing, GPTQ/AWQ): pass a
    DataLoader for calibration sets larger than memory. ``backend``: the backend you
    will lower to (sets ``recipe.backend``): quantize/dequantize go where that backend runs them
    natively (``"onnx"``: conv outputs quantized too, so onnxruntime runs conv chains as QLinearConv).

    Example::

        >>> import qcompile
        >>> qmodel = qcompile.quantize(model, "w8a8", (ids, mask), calibration=batches)
        >>> print(qmodel.report)
        >>> qmodel.save("out/model-w8a8")
    """
    from .auto_recipe import AutoRecipe

    if isinstance(recipe, AutoRecipe):
        from .search import quantize_auto

        data = reiterable(calibration, 4)
        dump = None if recipe.searches else dump_dir  # a search quantizes many times: no dumps
        return quantize_auto(recipe, model, example_inputs, data, example_kwargs, lambda concrete: quantize(
            model, concrete, example_inputs, data, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
            report_samples=report_samples, backend=backend, dump_dir=dump))
    recipe = resolve_recipe(recipe)
    if backend is not None:
        recipe = dataclasses.replace(recipe, backend=backend).validate()
    # smoothing stats, weight algorithm, observers, report samples
    passes = 1 + (recipe.smoothing is not None) + (recipe.weight_algorithm is not None) + 1
    data = reiterable(calibration, passes)
    prepared = prepare(model, recipe, example_inputs, example_kwargs=example_kwargs, calibration=data,
                       dynamic_shapes=dynamic_shapes, dump_dir=dump_dir)
    t0 = time.perf_counter()
    if _needs_static_calibration(prepared.graph_module):
        if data is None:
            raise CalibrationError(f"recipe '{recipe.name}' has static activation scales: pass calibration=<iterable "
                                   "of inputs> (e.g. a few hundred representative samples)")
        prepared.calibrate(data)
    prepared._info["timings_s"]["calibrate"] = time.perf_counter() - t0
    report_items = None
    if data is not None and report_samples:
        from .calibration import iterate

        report_items = list(iterate(data, report_samples))
    return convert(prepared, report_inputs=report_items, dump_dir=dump_dir)
