"""The modules users hold: :class:`PreparedModel` (observed, being calibrated) and
:class:`QuantizedModel` (converted; runs the Q/DQ graph on the reference backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import distributed
from .artifact import code_tensors, load_program, save_program
from .blockwise_artifact import is_blockwise, load_blockwise
from .calibration import run_calibration
from .contract import SMOKE_FILE, record, smoke_bytes, smoke_tensors
from .capture import Captured, InputBinder, call_checked, example_from_dict, example_to_dict
from .errors import BackendError, CalibrationError, InputError
from .observers import all_reduce_statistics
from .passes.infra import PassManager
from .recipe import Recipe
from .report import Report
from .verify import reference_activations


class PreparedModel(nn.Module):
    """A captured model with observers inserted. Call it on calibration data, then
    ``qcompile.convert(prepared)``. ``.calibrate(data)`` does the calling for you.

    ``pipeline``: the :class:`~qcompile.passes.infra.PassManager` of this model's quantization run,
    with the stages still to run (conversion) and the log of those that ran."""

    def __init__(self, graph_module: torch.fx.GraphModule, captured: Captured, recipe: Recipe,
                 float_model: nn.Module, pipeline: PassManager):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self._captured = captured
        self.pipeline = pipeline
        self._float_model = [float_model]   # a list: keep a reference without registering it as a submodule
        self.calibrated_batches = 0

    def forward(self, *args, **kwargs):
        args, kwargs = self._captured.binder.call(args, dict(kwargs))
        out = call_checked(self.graph_module, args, kwargs, CalibrationError)
        self.calibrated_batches += 1
        return out

    def to_prepared(self, dump_dir: Optional[str] = None) -> "PreparedModel":
        """The model ``convert`` takes: this one (a QAT model returns a frozen copy)."""
        return self

    def calibrate(self, data, max_samples: Optional[int] = None, progress: Optional[bool] = None) -> int:
        """Run every item of ``data`` (tuples or kwargs dicts) through the model."""
        cfg = self.recipe.calibration
        n = run_calibration(lambda item: self._captured.binder.apply(self, item), data,
                            max_samples or cfg.max_samples, cfg.progress if progress is None else progress)
        all_reduce_statistics(self.graph_module)   # data-parallel calibration (qcompile.distributed)
        return n


class QuantizedModel(nn.Module):
    """A converted model: call it like the original (same arguments, same output structure).

    Attributes: ``report`` (:class:`~qcompile.report.Report`), ``recipe``, ``graph_module`` (the
    explicit quantize/dequantize graph). ``save(path)`` writes a directory ``qcompile.load`` reads.
    """

    backend = "reference"

    def __init__(self, graph_module: torch.fx.GraphModule, binder: InputBinder, recipe: Recipe,
                 report: Report, example: Optional[tuple] = None,
                 exported: Optional[torch.export.ExportedProgram] = None):
        super().__init__()
        self.graph_module = graph_module
        self.binder = binder
        self.recipe = recipe
        self.report = report
        self._example = example          # (args, kwargs, dynamic_shapes) to re-export for saving
        self._exported = exported
        self.process_group = None        # the torch.distributed group quantize() ran on (None: the default)

    def forward(self, *args, **kwargs):
        args, kwargs = self.binder.call(args, dict(kwargs))
        return call_checked(self.graph_module, args, kwargs, InputError)

    def quantized_activations(self, *args, **kwargs) -> list:
        """``[(scale, codes)]`` at every static activation quantizer, in graph order: the
        reference side of :func:`qcompile.verify`."""
        return [(s, c) for s, c, _ in reference_activations(self, args, kwargs)]

    def exported_program(self) -> torch.export.ExportedProgram:
        """The converted graph as a ``torch.export.ExportedProgram`` (what backends import)."""
        if self._exported is None:
            args, kwargs, dynamic_shapes = self.export_example("torch.export")
            self._exported = torch.export.export(self.graph_module, args, kwargs, dynamic_shapes=dynamic_shapes)
        return self._exported

    def export_example(self, target: str) -> tuple:
        """``(args, kwargs, dynamic_shapes)`` that export this model's graph again, e.g. a backend's
        rewritten copy of it. A quantized model has its capture examples; a loaded one has zero
        tensors of the saved shapes and dtypes with the saved dynamic dims and their ranges
        (:func:`~qcompile.capture.example_from_dict`). ``target`` names what needs them in the
        error raised when there are none (a save by a qcompile before the examples were saved, or a
        model whose inputs are not plain tensors keyed by name).

        Example::

            >>> args, kwargs, dynamic_shapes = qcompile.load("out/m").export_example("the tvm backend")
        """
        if self._example is None:
            raise BackendError(f"this model has no capture examples (shapes, dtypes and dynamic dims of its inputs) "
                               f"to export it again for {target}: it was saved by an older qcompile, or its "
                               f"inputs are not plain tensors; lower the model returned by quantize(), or quantize "
                               f"and save it again with this qcompile")
        return self._example

    def save(self, path: Union[str, Path], extra_files: Optional[dict] = None) -> Path:
        """Write the model to the directory ``path``: atomic, versioned and checksummed, no pickle
        (see :mod:`qcompile.artifact`). ``extra_files``: file name → bytes or text saved (and
        checksummed) in the same directory, e.g. ``{"report.html": ...}``."""
        meta = {"recipe": self.recipe.to_dict(), "binder": self.binder.to_dict(), "report": self.report.to_dict(),
                "example": example_to_dict(self._example, self.binder, self.exported_program())
                if self._example is not None else None}
        extra_files = dict(extra_files or {})
        if self._example is not None:   # the contract: smoke inputs, reference outputs, parity (qcompile.check)
            args, kwargs = self._example[:2]
            kwargs = {k: v for k, v in kwargs.items() if k in self.binder.keywords}
            with torch.no_grad():
                smoke = smoke_tensors(args, kwargs, self(*args, **kwargs))
            extra_files[SMOKE_FILE] = smoke_bytes(smoke)
            # the saved program is this graph: the reference of every backend, bit-identical on reload
            meta["contract"] = record(self.recipe, self.report, self.backend, {"max_abs": 0.0, "max_rel": 0.0},
                                      "qcompile reference (the saved torch.export program)")
        with distributed.using(self.process_group):   # under data-parallel calibration rank 0 alone writes
            return save_program(self.exported_program(), code_tensors(self.graph_module), meta, path, extra_files)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name!r}, backend={self.backend!r}"


def load(path: Union[str, Path]) -> QuantizedModel:
    """Load a model saved with :meth:`QuantizedModel.save` (or, from a layer-by-layer run, the
    assembled :class:`~qcompile.blockwise_artifact.BlockwiseModel`); outputs are bit-identical, and it lowers
    to a backend like the model ``quantize()`` returned (the saved input shapes, dtypes and
    dynamic-dim ranges export it again: :meth:`QuantizedModel.export_example`).

    Example::

        >>> qmodel.save("out/minilm-w8a8")
        >>> same = qcompile.load("out/minilm-w8a8")
        >>> art = qcompile.lower(same, backend="tvm")
    """
    if is_blockwise(path):
        return load_blockwise(path)
    ep, meta = load_program(path)
    b = meta["binder"]
    binder = InputBinder(b["positional"], b["keywords"], b.get("constants", {}))
    example = example_from_dict(meta["example"], binder) if meta.get("example") else None
    return QuantizedModel(ep.module(), binder, Recipe.from_dict(meta["recipe"]), Report.from_dict(meta["report"]),
                          example=example, exported=ep)


