"""The entry points users call: ``quantize``, ``prepare``, ``convert``. This is the top of the
library (only the CLI sits above it): it resolves what the user passed — a preset name, a file, a
dict, a :class:`~qcompile.recipe.Recipe`, or a mixed-precision ``Recipe.auto`` to be searched —
and the backend's placement, once, then hands a resolved recipe to the pipeline
(:mod:`qcompile.pipeline`) or to the search (:mod:`qcompile.search`)."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torch import nn

from . import blockwise, distributed, pipeline, search
from .auto_recipe import AutoRecipe
from .backends.base import placement
from .calibration import reiterable
from .errors import InputError
from .llm.kv_quant import bind_kv_cache
from .model import PreparedModel, QuantizedModel, load
from .recipe import Recipe, RecipeLike, resolve_recipe


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
    model, example_inputs, example_kwargs, dynamic_shapes, calibration = bind_kv_cache(
        recipe.kv_cache, model, example_inputs, example_kwargs, dynamic_shapes, calibration)
    return pipeline.prepare(model, recipe, example_inputs, placement=placement(recipe.backend),
                            example_kwargs=example_kwargs, calibration=calibration, dynamic_shapes=dynamic_shapes,
                            dump_dir=dump_dir)


def convert(prepared: PreparedModel, report_inputs: Optional[Iterable] = None,
            dump_dir: Optional[str] = None) -> QuantizedModel:
    """Turn a calibrated :class:`PreparedModel` into a :class:`QuantizedModel` with a report
    measured on ``report_inputs`` (default: the example inputs). A trained
    :class:`~qcompile.qat.QATModel` is frozen first (on a copy) into the same observed graph."""
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"convert expects the PreparedModel returned by qcompile.prepare, got {type(prepared).__name__}")
    return pipeline.convert(prepared.to_prepared(dump_dir), report_inputs)


def quantize(model: nn.Module, recipe: RecipeLike, example_inputs: tuple = None, calibration: Optional[Iterable] = None,
             *, example_kwargs: Optional[dict] = None, dynamic_shapes: Any = "auto", report_samples: int = 8,
             backend: Optional[str] = None, dump_dir: Optional[str] = None,
             process_group: Any = None, out: Optional[str] = None,
             max_memory: Union[int, str, None] = None) -> QuantizedModel:
    """Quantize ``model`` with ``recipe``; returns a :class:`QuantizedModel` (an ``nn.Module``
    called like ``model``) with ``.report``, ``.recipe`` and ``.save(path)``. ``model`` itself is
    never modified.

    ``recipe``: a :class:`Recipe`, a preset (``"w8a8"``, ``"w8a8-dynamic"``, ``"w8"``, ``"w4-g64"``,
    ``"w4-g128"``, ...), a YAML/JSON path, or ``Recipe.auto(...)`` (mixed precision chosen by
    measurement). ``example_inputs``: positional inputs as ``torch.export`` takes them.
    ``calibration``: any iterable (list, generator, DataLoader) of tuples or kwargs dicts; required
    when the recipe has static activation scales. A re-iterable one (list, DataLoader, Dataset) is
    streamed on every pass, never copied; a one-shot generator is kept in a list when the recipe
    needs more than one pass over it (smoothing, GPTQ/AWQ): pass a DataLoader for calibration sets
    larger than memory. ``backend``: the backend you will lower to (sets ``recipe.backend``):
    quantize/dequantize go where that backend runs them natively (``"onnx"``: conv outputs quantized
    too, so onnxruntime runs conv chains as QLinearConv). ``dynamic_shapes``: ``"auto"`` keeps the
    batch free, and the sequence of token and sequence inputs, but the channel and spatial dims of
    image inputs static (:func:`qcompile.capture.auto_dims`); ``None`` for static shapes, or a
    ``torch.export`` spec such as ``{"pixel_values": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}``.
    ``process_group``: data-parallel calibration over this ``torch.distributed`` group (default: the
    world group when ``torch.distributed`` is initialized): each rank passes its own shard as
    ``calibration`` and every rank gets the model one process on all the shards would; only rank 0
    writes on ``save`` (``docs/distributed.md``).

    ``model`` may also be the path of a transformers decoder-only model directory (safetensors
    shards, Llama/Qwen2/Mistral): it is quantized one decoder block at a time without ever being
    loaded whole (:mod:`qcompile.blockwise`), into ``out`` (resumable; a temporary directory when
    None), and the assembled result is returned (``example_inputs`` is not needed; calibration
    items are token ids). ``max_memory`` (``"8GB"``; a model directory only): over it, the hidden
    states between blocks are kept on disk in ``out`` (same codes).

    Example::

        >>> import qcompile
        >>> qmodel = qcompile.quantize(model, "w8a8", (ids, mask), calibration=batches)
        >>> print(qmodel.report)
        >>> qmodel.save("out/model-w8a8")
    """
    def quantize_with(concrete: Recipe, data: Optional[Iterable], dump: Optional[str]) -> QuantizedModel:
        if backend is not None:
            concrete = dataclasses.replace(concrete, backend=backend).validate()
        # a kv_cache spec captures the cache as codes + scales (qcompile.llm.kv_quant)
        lm, inputs, kwargs, shapes, data = bind_kv_cache(concrete.kv_cache, model, example_inputs, example_kwargs,
                                                         dynamic_shapes, data)
        return pipeline.quantize(lm, concrete, inputs, data, placement=placement(concrete.backend),
                                 example_kwargs=kwargs, dynamic_shapes=shapes,
                                 report_samples=report_samples, dump_dir=dump)

    with distributed.using(process_group):
        if blockwise.is_model_directory(model):
            return _quantize_directory(model, recipe, calibration, backend, out, max_memory)
        if max_memory is not None:
            raise InputError(f"max_memory={max_memory!r}: a memory budget applies to a model directory "
                             f"(quantized block by block); this model is an nn.Module already in memory")
        if isinstance(recipe, AutoRecipe):
            if distributed.group() is not None:
                raise NotImplementedError("Recipe.auto under data-parallel calibration: the sensitivity analysis "
                                          "(qcompile.analyze) does not reduce its measurements across ranks yet, so "
                                          "ranks could choose different recipes; search in one process, then quantize "
                                          "the chosen recipe on all ranks")
            data = reiterable(calibration, 4)
            dump = None if recipe.searches else dump_dir  # a search quantizes many times: no dumps
            qmodel = search.quantize_auto(recipe, model, example_inputs, data, example_kwargs,
                                          lambda concrete: quantize_with(resolve_recipe(concrete), data, dump))
        else:
            qmodel = quantize_with(resolve_recipe(recipe), calibration, dump_dir)
    qmodel.process_group = process_group
    return qmodel


def _quantize_directory(model_dir, recipe: RecipeLike, calibration, backend: Optional[str], out: Optional[str],
                        max_memory=None):
    """A transformers model directory, quantized block by block (:mod:`qcompile.blockwise`)."""
    if isinstance(recipe, AutoRecipe):
        raise NotImplementedError("Recipe.auto on a model directory: the mixed-precision search needs the whole "
                                  "model; layer-by-layer quantization takes a concrete recipe")
    if distributed.group() is not None:
        raise NotImplementedError("layer-by-layer quantization under torch.distributed: the per-block runner does not "
                                  "split calibration data or writes across ranks yet; run it in one process")
    concrete = resolve_recipe(recipe)
    if concrete.kv_cache is not None:
        raise NotImplementedError("kv_cache on a model directory: layer-by-layer quantization captures blocks "
                                  "without a KV cache; quantize qcompile.causal_lm(model, max_context=...) instead")
    if backend is not None:
        concrete = dataclasses.replace(concrete, backend=backend).validate()
    if out is not None:
        return load(blockwise.quantize_directory(model_dir, concrete, calibration, out, max_memory=max_memory))
    with tempfile.TemporaryDirectory() as tmp:
        return load(blockwise.quantize_directory(model_dir, concrete, calibration, Path(tmp) / "out",
                                                 max_memory=max_memory))
