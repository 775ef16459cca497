"""The quantization pipeline as data: :func:`ptq_stages` turns a resolved recipe and a backend's
placement into the ordered list of stages — graph passes and calibration steps — that one
:class:`~qcompile.passes.infra.PassManager` runs; :func:`report_from_log` turns that run's typed log
into the :class:`~qcompile.report.Report`. ``prepare`` runs the stages up to the calibration
phase, the caller (or ``quantize``) calibrates, ``convert`` runs the rest: one run, one dump
numbering, one log.

Phases, in order (a stage's phase names its timing and groups its dump files)::

    capture        fold_batch_norm, decompose_recurrent, normalize_linear, annotate
    rotation       rotate_residual, rotate_heads, online_hadamard                   (recipe.rotation)
    smoothing      insert_channel_stats, calibrate (statistics), apply_smoothing    (recipe.smoothing)
    <method>       apply_weight_algorithm                                           (recipe.weight_algorithm)
    observe        insert_observers
    calibrate      calibrate (observers)                                            (quantize() only)
    convert        convert, own_tensors
    report         (measured by convert on the report inputs)

The list is plain data, so a runner that executes it per block of a large model (layer-by-layer
quantization) takes the same stages; the conditions (``Stage.when``) read only the graph.

This module takes a resolved :class:`~qcompile.recipe.Recipe` and a placement
(:class:`~qcompile.backends.base.Capabilities`); resolving names, presets and ``Recipe.auto`` is the
caller's (:mod:`qcompile.api`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from torch import nn

from .backends.base import Capabilities
from .calibration import iterate, reiterable, run_calibration
from .capture import Captured, call_checked, capture
from .errors import CalibrationError
from .measure import measure
from .model import PreparedModel, QuantizedModel
from .observers import all_reduce_statistics
from .passes import (AnnotatePass, ApplySmoothingPass, ApplyWeightAlgorithmPass, ConvertPass,
                     DecomposeRecurrentPass, FoldBatchNormPass, InsertChannelStatsPass, InsertFakeQuantPass,
                     InsertObserversPass, NormalizeLinearPass)
from .passes.annotate import AnnotateResult, annotated_nodes
from .passes.convert import ConvertResult
from .passes.rotate import RotateResidualPass, RotationResult
from .passes.rotate_inner import OnlineHadamardPass, RotateHeadsPass
from .passes.infra import Pass, PassManager, PassResult, Stage, prune_unused_tensors, tensor_owner
from .passes.smooth import SmoothingResult
from .passes.weight_algorithms import WeightAlgorithmResult
from .recipe import CalibrationConfig, Recipe
from .report import Report

CAPTURE, ROTATION, SMOOTHING, OBSERVE, CALIBRATE, CONVERT, REPORT = \
    "capture", "rotation", "smoothing", "observe", "calibrate", "convert", "report"


def quantizes_activations(gm) -> bool:
    return any(a.activation is not None for _, a in annotated_nodes(gm))


def needs_static_calibration(gm) -> bool:
    return any(a.activation is not None and not a.activation.dynamic for _, a in annotated_nodes(gm))


@dataclass
class CalibrationResult(PassResult):
    """A calibration step: how many items went through the graph, and whether they calibrated
    the observers (the report's ``calibration_samples``) or other statistics (smoothing)."""

    samples: int = 0
    calibrates_observers: bool = False


class CalibratePass(Pass):
    """Runs calibration items through the graph (observers or statistics record them); changes
    nothing. ``missing``: the error raised when the step must run and no data was given."""

    name = "calibrate"

    def __init__(self, data: Optional[Iterable], binder, config: CalibrationConfig, desc: str, missing: str,
                 observers: bool = True):
        self.data, self.binder, self.config, self.desc, self.missing = data, binder, config, desc, missing
        self.observers = observers

    def requires(self, gm):
        if self.data is None:
            raise CalibrationError(self.missing)

    def call(self, gm):
        def feed(item):
            args, kwargs = self.binder.bind(item)
            return call_checked(gm, args, kwargs, CalibrationError)

        n = run_calibration(feed, self.data, self.config.max_samples, self.config.progress, desc=self.desc)
        all_reduce_statistics(gm)   # data-parallel calibration: every rank gets all ranks' statistics
        return CalibrationResult(gm, False, samples=n, calibrates_observers=self.observers)


class OwnTensorsPass(Pass):
    """Deletes the float tensors the codes replaced and gives the converted graph its own copies of
    the float tensors it still reads: ``torch.export`` shares parameter objects with the user's
    model, and an inference artifact must neither alias them (a later in-place update of the
    user's model would leak in) nor record autograd history."""

    name = "own_tensors"

    def call(self, gm):
        prune_unused_tensors(gm)
        for name, p in list(gm.named_parameters()):
            owner, attr = tensor_owner(gm, name)
            owner._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(gm.named_buffers()):
            owner, attr = tensor_owner(gm, name)
            owner._buffers[attr] = b.detach().clone()
        gm.recompile()
        return PassResult(gm, False)


def ptq_stages(recipe: Recipe, placement: Capabilities, captured: Captured, calibration: Optional[Iterable],
               calibrate: bool) -> list[Stage]:
    """The post-training stages for ``recipe`` (see the module docstring). ``calibration``: the data
    smoothing statistics and GPTQ/AWQ read; ``calibrate``: include the observers' calibration step
    on the same data (``quantize``), else the caller calibrates the prepared model itself."""
    binder = captured.binder
    stages = [Stage(FoldBatchNormPass(), CAPTURE), Stage(DecomposeRecurrentPass(recipe), CAPTURE),
              Stage(NormalizeLinearPass(), CAPTURE), Stage(AnnotatePass(recipe), CAPTURE)]
    if recipe.rotation is not None:   # float-exact, so before everything that measures or solves on data
        rot = recipe.rotation
        stages.append(Stage(RotateResidualPass(rot), ROTATION))
        if rot.per_head:
            stages.append(Stage(RotateHeadsPass(rot.seed), ROTATION))
        if rot.online:
            stages.append(Stage(OnlineHadamardPass(rot.seed), ROTATION))
    if recipe.smoothing is not None:
        missing = (f"recipe '{recipe.name}' uses smoothing, whose scales are measured on data: pass calibration= "
                   "to prepare (or quantize), or set smoothing to null")
        stages += [Stage(InsertChannelStatsPass(recipe.smoothing, placement.quantized_outputs), SMOOTHING,
                         quantizes_activations),
                   Stage(CalibratePass(calibration, binder, recipe.calibration, "smoothing statistics", missing,
                                       observers=False), SMOOTHING, quantizes_activations),
                   Stage(ApplySmoothingPass(recipe.smoothing), SMOOTHING,
                         quantizes_activations)]
    wa = recipe.weight_algorithm
    if wa is not None:
        if calibration is None:
            stages.append(Stage(_Missing(CalibrationError(
                f"recipe '{recipe.name}' uses {wa.method}, which solves the weights on data: pass calibration= to "
                "prepare (or quantize)")), wa.method))
        else:
            stages.append(Stage(ApplyWeightAlgorithmPass(wa, calibration, binder, recipe.calibration), wa.method))
    stages.append(Stage(InsertObserversPass(placement.quantized_outputs), OBSERVE))
    if calibrate:
        missing = (f"recipe '{recipe.name}' has static activation scales: pass calibration=<iterable of inputs> "
                   "(e.g. a few hundred representative samples)")
        stages.append(Stage(CalibratePass(calibration, binder, recipe.calibration, "calibrating", missing),
                            CALIBRATE, needs_static_calibration))
    return stages + convert_stages()


def convert_stages() -> list[Stage]:
    return [Stage(ConvertPass(), CONVERT), Stage(OwnTensorsPass(), CONVERT)]


class _Missing(Pass):
    """A stage that cannot run without something the caller did not give: raises ``error``
    at its turn (so errors about earlier stages, e.g. capture, come first)."""

    def __init__(self, error: Exception):
        self.error = error
        self.name = ApplyWeightAlgorithmPass.name   # it stands where that pass would run

    def call(self, gm):
        raise self.error


def prepare(model: nn.Module, recipe: Recipe, example_inputs: tuple, *, placement: Capabilities,
            example_kwargs: Optional[dict] = None, calibration: Optional[Iterable] = None,
            dynamic_shapes: Any = "auto", dump_dir: Optional[str] = None, calibrate: bool = False) -> PreparedModel:
    """Capture ``model`` and run the stages before calibration (see :func:`ptq_stages`)."""
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, example_kwargs, dynamic_shapes)
    run = PassManager(ptq_stages(recipe, placement, cap, calibration, calibrate), dump_dir)
    run.record("capture", CAPTURE, time.perf_counter() - t0, PassResult(cap.graph_module, False))
    run.run(cap.graph_module, until=CALIBRATE if calibrate else CONVERT)
    return PreparedModel(cap.graph_module, cap, recipe, model, run)


def convert(prepared: PreparedModel, report_inputs: Optional[Iterable] = None) -> QuantizedModel:
    """Run the stages left in ``prepared``'s pipeline (calibration, when ``quantize`` drives it,
    then conversion) and measure the report on ``report_inputs`` (default: the example inputs)."""
    gm, cap, recipe, run = prepared.graph_module, prepared._captured, prepared.recipe, prepared.pipeline
    run.run(gm)
    t1 = time.perf_counter()
    report = report_from_log(recipe.name, run, prepared.calibrated_batches)
    items = list(report_inputs) if report_inputs is not None else \
        [(*cap.example_args, *[cap.example_kwargs[k] for k in cap.binder.keywords])]
    float_weights = {k: v for r in run.results(ConvertResult) for k, v in r.float_weights.items()}
    measure(report, gm, float_weights, prepared._float_model[0], cap.binder, items, set(report.folded_batch_norms))
    run.record("report", REPORT, time.perf_counter() - t1)
    report.timings_s = run.timings()
    example = (cap.example_args, cap.example_kwargs, cap.dynamic_shapes)
    return QuantizedModel(gm, cap.binder, recipe, report, example)


def report_from_log(recipe_name: str, run: PassManager, user_calibration: int) -> Report:
    """The report's fields that the stages wrote (the measured ones are filled by
    :func:`~qcompile.measure.measure`)."""
    annotate = run.results(AnnotateResult)
    folded = [layer for r in run.records if r.name in (FoldBatchNormPass.name, InsertFakeQuantPass.name) and r.result
              for layer in r.result.changed]
    calibrated = sum(r.samples for r in run.results(CalibrationResult) if r.calibrates_observers)
    return Report(recipe=recipe_name,
                  kept_float={**{k: v for r in annotate for k, v in r.skipped.items()},
                              **{k: v for r in run.records if r.name == DecomposeRecurrentPass.name and r.result
                                 for k, v in r.result.skipped.items()}},
                  smoothing=[e for r in run.results(SmoothingResult) for e in r.records],
                  tied_weights={**{k: v for r in annotate for k, v in r.tied.items()},
                                **{k: "untied by the rotation (the head holds E·diag(γ)·Q, the embedding E·Q): "
                                   "each quantized separately" for r in run.results(RotationResult) for k in r.untied}},
                  weight_algorithm=[e for r in run.results(WeightAlgorithmResult) for e in r.records],
                  folded_batch_norms=folded, calibration_samples=user_calibration + calibrated)


def quantize(model: nn.Module, recipe: Recipe, example_inputs: tuple, calibration: Optional[Iterable] = None, *,
             placement: Capabilities, example_kwargs: Optional[dict] = None, dynamic_shapes: Any = "auto",
             report_samples: int = 8, dump_dir: Optional[str] = None) -> QuantizedModel:
    """Post-training quantization of ``model`` with a resolved ``recipe`` in one pipeline run."""
    # smoothing stats, weight algorithm, observers, report samples
    passes = 1 + (recipe.smoothing is not None) + (recipe.weight_algorithm is not None) + 1
    data = reiterable(calibration, passes)
    prepared = prepare(model, recipe, example_inputs, placement=placement, example_kwargs=example_kwargs,
                       calibration=data, dynamic_shapes=dynamic_shapes, dump_dir=dump_dir, calibrate=True)
    report_items = list(iterate(data, report_samples)) if data is not None and report_samples else None
    return convert(prepared, report_inputs=report_items)

