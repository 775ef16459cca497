"""A recipe's ``kv_cache`` spec applied to a :class:`~qcompile.llm.cache.CausalLMWithCache` before
capture: the graph is captured from a wrapper whose cache inputs and outputs are codes plus one
float32 scale per head and token (:class:`~qcompile.llm.cache.CacheLayout` ``kv_format``), and the
example inputs, calibration items and dynamic shapes the user built for the float cache are
carried over to it, so ``qcompile.quantize(lm, recipe, lm.example_inputs, calibration=...,
**lm.capture_options)`` reads the same with or without a quantized cache.

Memory: ``int8`` / ``fp8_e4m3`` keep ``head_dim`` one-byte codes and a 4-byte scale per head and
token where the float cache keeps ``4 * head_dim`` bytes (3.76x less at ``head_dim`` 64)."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import RecipeError
from .cache import LAYOUT_KWARG, CausalLMWithCache, quantize_entries


class _Mapped:
    """A re-iterable view of ``items`` with ``fn`` applied to each (calibration data may be read
    more than once: smoothing, GPTQ), keeping ``len`` where the source has one."""

    def __init__(self, items: Iterable, fn):
        self.items, self.fn = items, fn

    def __iter__(self):
        return (self.fn(item) for item in self.items)

    def __len__(self):
        return len(self.items)


def with_kv_format(lm: CausalLMWithCache, format: str) -> CausalLMWithCache:
    """The same model (weights shared, not copied) behind a cache of ``format`` codes."""
    layout = lm.layout
    return CausalLMWithCache(lm.model, layout.max_context, layout.max_batch, layout.logits, kv_format=format)


def adapt_inputs(lm: CausalLMWithCache, item: Any) -> Any:
    """An input tuple ``(input_ids, cache_position, *cache)`` made for the float cache, with each
    cache tensor quantized per head and token into ``lm``'s codes and scales; an item already in
    ``lm``'s form (or a kwargs dict) is returned as it is."""
    layout = lm.layout
    if not layout.quantized or not isinstance(item, (tuple, list)) or len(item) != 2 + 2 * layout.layers:
        return item
    ids, positions, *cache = item
    codes, scales = [], []
    for tensor in cache:
        c, s, _ = quantize_entries(tensor.float(), layout.kv_format)
        codes.append(c)
        scales.append(s)
    return (ids, positions, *codes, *scales)


def bind_kv_cache(spec, model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict],
                  dynamic_shapes: Any, calibration: Optional[Iterable]):
    """``(model, example_inputs, example_kwargs, dynamic_shapes, calibration)`` to capture with the
    recipe's ``kv_cache`` spec (``None``: returned unchanged). :class:`RecipeError` naming
    ``kv_cache`` for a model not wrapped by :func:`qcompile.causal_lm` (it has no cache to quantize).

    Example::

        >>> lm = qcompile.causal_lm(model, max_context=256)
        >>> recipe = dataclasses.replace(qcompile.Recipe.preset("w4-g64"), kv_cache=KVCacheConfig("int8"))
        >>> q = qcompile.quantize(lm, recipe, lm.example_inputs, **lm.capture_options)   # binds here
    """
    if spec is None:
        return model, example_inputs, example_kwargs, dynamic_shapes, calibration
    if not isinstance(model, CausalLMWithCache):
        raise RecipeError("kv_cache", f"a quantized KV cache needs a model captured with a static cache: wrap the "
                                      f"*ForCausalLM with qcompile.causal_lm(model, max_context=...) (got "
                                      f"{type(model).__name__})")
    lm = with_kv_format(model, spec.format)

    def adapt(item):
        return adapt_inputs(lm, item)

    kwargs = dict(example_kwargs or {}, **{LAYOUT_KWARG: lm.layout.to_text()})
    data = None if calibration is None else _Mapped(calibration, adapt) if hasattr(calibration, "__len__") \
        else (adapt(item) for item in calibration)
    return lm, adapt(tuple(example_inputs)), kwargs, lm.capture_options["dynamic_shapes"], data
