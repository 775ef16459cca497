"""A transformers causal LM with a static KV cache as explicit graph inputs and outputs, so that ONE
captured graph serves prefill (``seq`` = prompt length) and decode (``seq`` = 1) on every backend.

The captured call is::

    (input_ids [B, S], cache_position [S], past_key_0 .. past_key_{L-1}, past_value_0 .. past_value_{L-1})
        -> (logits [B, 1 or S, V], new_key_0 .. new_key_{L-1}, new_value_0 .. new_value_{L-1})

``past_key_i`` / ``past_value_i`` are ``[B, H_kv, max_context, D]`` (slot ``t`` holds position
``t``); ``new_key_i`` / ``new_value_i`` are ``[B, H_kv, S, D]``: only the entries of the ``S``
positions just computed. The caller writes them into its cache at ``cache_position`` (in place:
:func:`qcompile.generate` does, and so can a user's own onnxruntime loop), so no backend allocates
a whole new cache per token.

Why these choices (each measured or hit while building it):

* The update inside the graph is a one-hot blend, ``where(hit[t], onehot[t, s] @ new[s], past[t])``,
  not ``index_copy``: TVM's importer rejects the ``index_put`` that ``index_copy`` decomposes into
  ("IndexPut requires the number of index tensors (3) to match the data tensor dimensions (4)"),
  and concatenating ``[past; new]`` gives attention a key length ``max_context + S`` whose stride
  guards torch.export cannot prove. The blend keeps every attention shape static in
  ``max_context``; it is exact (one non-zero term per row) and costs ``max_context * S * D``
  multiply-adds per head, small beside the Linears.
* The attention mask is built here (additive, ``[B, 1, S, max_context]``: key ``t`` visible to the
  query at position ``p`` iff ``t <= p``) and handed to the model as a 4-D mask, which transformers
  uses as is: slots past the current position (zeros or stale entries) are never read.
* The cache layout travels with every artifact as a constant keyword input (``kv_cache``, a
  ``key=value,...`` string) that the input binder saves with the model, the ONNX file and the TVM library alike:
  :func:`qcompile.generate` reads the number of layers, heads, head size, maximum context and
  vocabulary from it, with no other knowledge of the artifact.
"""
from __future__ import annotations

import functools
import inspect
import dataclasses
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import GenerationError
from ..formats import get_format
from .attention import GROUPED_ATTENTION, register_grouped_attention

LAYOUT_KWARG = "kv_cache"   # the constant keyword input that carries :class:`CacheLayout`


@dataclass(frozen=True)
class CacheLayout:
    """The static KV cache of a captured causal LM: ``layers`` pairs of ``[B, kv_heads, max_context,
    head_dim]`` tensors of ``dtype``; ``vocab_size`` logits per position; ``logits`` ``"last"`` (one
    position per call: prefill skips the LM head on all but the last token) or ``"all"``."""

    layers: int
    kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    max_batch: int = 8
    logits: str = "last"
    dtype: str = "float32"
    kv_format: str = "float"   # or a Recipe.kv_cache format: codes plus one float32 scale per head and token

    @property
    def quantized(self) -> bool:
        """Whether the cache holds codes and scales (a recipe's ``kv_cache``) rather than floats."""
        return self.kv_format != "float"

    def to_text(self) -> str:
        """``layers=2,kv_heads=2,...``: no quotes, because torch.export writes a constant input into
        its guard code inside quotes of its own (a JSON string there is a SyntaxError)."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())

    @classmethod
    def from_text(cls, text: str) -> "CacheLayout":
        fields = dict(item.split("=", 1) for item in text.split(","))
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) if types[k] in ("int", int) else v for k, v in fields.items()})

    def input_names(self) -> list[str]:
        """The captured positional inputs, in order (a quantized cache: the codes, then the scales)."""
        kinds = ("key", "value", "key_scale", "value_scale") if self.quantized else ("key", "value")
        return ["input_ids", "cache_position"] + [f"past_{k}_{i}" for k in kinds for i in range(self.layers)]

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        """``2 * layers`` zero tensors (keys, then values) to start a generation with; a quantized
        cache: ``2 * layers`` code tensors then ``2 * layers`` ``[B, H, T, 1]`` float32 scales."""
        shape = (batch, self.kv_heads, self.max_context, self.head_dim)
        if not self.quantized:
            return [torch.zeros(shape, dtype=getattr(torch, self.dtype)) for _ in range(2 * self.layers)]
        codes = [torch.zeros(shape, dtype=get_format(self.kv_format).storage) for _ in range(2 * self.layers)]
        return codes + [torch.zeros(shape[:-1] + (1,)) for _ in range(2 * self.layers)]

    def cache_nbytes(self, batch: int = 1) -> int:
        """Bytes of the cache a generation holds between steps (codes and scales when quantized)."""
        return sum(t.numel() * t.element_size() for t in self.empty_cache(batch))


def quantize_entries(x: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of KV entries ``[B, H, S, D]``: one symmetric scale per head and
    token (``[B, H, S, 1]``), through the canonical ops every backend lowers (the zero point is
    zeros: kept for the dequantize that attention reads, never stored)."""
    scale, zero_point = torch.ops.qcompile.choose_qparams(x, format, True, True)
    return torch.ops.qcompile.quantize(x, scale, zero_point, format, 0), scale, zero_point


def dequantize_entries(codes: torch.Tensor, scale: torch.Tensor, format: str, dtype: torch.dtype,
                       zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float KV entries attention reads from ``codes`` and their per head/token ``scale``."""
    return torch.ops.qcompile.dequantize(codes, scale, zero_point, format, 0, dtype)


def write_new_entries(cache: list[torch.Tensor], new: list[torch.Tensor], cache_position: torch.Tensor) -> None:
    """Write one call's ``new_key_i`` / ``new_value_i`` (``[B, H, S, D]``) into ``cache`` at
    ``cache_position`` (``S`` consecutive positions), in place: what a decode loop does between calls."""
    first, count = int(cache_position[0]), cache_position.shape[0]
    for past, fresh in zip(cache, new):
        past[:, :, first:first + count].copy_(fresh)


def layout_of_model(model: nn.Module, max_context: int, max_batch: int = 8, logits: str = "last") -> CacheLayout:
    """The :class:`CacheLayout` of a transformers ``*ForCausalLM``; :class:`GenerationError` for a
    model without a causal-LM head (a bare encoder/decoder, a classifier)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    can_generate = getattr(model, "can_generate", lambda: False)()
    if config is None or head is None or not can_generate:
        raise GenerationError(f"{type(model).__name__} has no causal-LM head (a transformers *ForCausalLM with "
                              f"get_output_embeddings() and generate()): it cannot generate; load it with "
                              f"AutoModelForCausalLM")
    if logits not in ("last", "all"):
        raise GenerationError(f"logits must be 'last' or 'all', got {logits!r}")
    if max_context < 2 or max_batch < 1:
        raise GenerationError(f"max_context must be >= 2 and max_batch >= 1, got {max_context} and {max_batch}")
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and max_context > limit:
        raise GenerationError(f"max_context {max_context} exceeds the model's max_position_embeddings ({limit})")
    other = sorted({t for t in (getattr(text, "layer_types", None) or ()) if t != "full_attention"})
    if other:
        raise NotImplementedError(f"{type(model).__name__} has {', '.join(other)} layers; the static cache "
                                  f"serves full-attention layers only (sliding-window caches are not built yet)")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return CacheLayout(text.num_hidden_layers, kv_heads, head_dim, max_context, text.vocab_size,
                       max_batch, logits, dtype)


@functools.lru_cache(maxsize=None)
def _functional_layer_class():
    """A transformers ``StaticLayer`` whose ``update`` is functional: it reads the past tensors the
    graph was given and returns the blended ones, remembering the new entries for the outputs."""
    from transformers.cache_utils import StaticLayer

    class FunctionalStaticLayer(StaticLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
            super().__init__(keys.shape[2])
            self.keys, self.values, self.positions = keys, values, cache_position
            self.cumulative_length = cache_position[0]
            self.is_initialized = True
            self.new_keys = self.new_values = None

        def update(self, key_states, value_states, *args, **kwargs):
            self.new_keys, self.new_values = key_states, value_states
            return self.blend(key_states, self.keys), self.blend(value_states, self.values)

        def blend(self, new: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
            slots = torch.arange(past.shape[2], device=new.device)
            onehot = (slots[:, None] == self.positions[None, :]).to(new.dtype)            # [T, S]
            hit = (onehot.sum(1) > 0)[:, None]                                            # [T, 1]
            return torch.where(hit, onehot @ new, past)

    class QuantizedStaticLayer(FunctionalStaticLayer):
        """The same layer over a quantized cache: the new entries are quantized as they are written
        (their codes and scales are the graph's outputs), and attention reads the dequantized
        past blended with the dequantized new entries, so a prompt scores the same whatever the
        chunks it is fed in."""

        def __init__(self, keys, values, key_scales, value_scales, cache_position, format: str):
            super().__init__(keys, values, cache_position)
            self.key_scales, self.value_scales, self.format = key_scales, value_scales, format

        def update(self, key_states, value_states, *args, **kwargs):
            keys, (self.new_keys, self.new_key_scales) = self.write(key_states, self.keys, self.key_scales)
            values, (self.new_values, self.new_value_scales) = self.write(value_states, self.values, self.value_scales)
            return keys, values

        def write(self, new: torch.Tensor, past_codes: torch.Tensor, past_scales: torch.Tensor):
            """(what attention reads, (the new entries' codes, their scales))."""
            codes, scale, zero = quantize_entries(new, self.format)
            read = self.blend(dequantize_entries(codes, scale, self.format, new.dtype, zero),
                              dequantize_entries(past_codes, past_scales, self.format, new.dtype))
            return read, (codes, scale)

    return FunctionalStaticLayer, QuantizedStaticLayer


class CausalLMWithCache(nn.Module):
    """A causal LM called as ``(input_ids, cache_position, *past_keys, *past_values) -> (logits,
    *new_keys, *new_values)`` (module docstring). Quantize it like any model with the inputs it
    describes::

        >>> lm = qcompile.causal_lm(model, max_context=256)
        >>> q = qcompile.quantize(lm, "w8a8", lm.example_inputs, calibration=lm.calibration(prompts),
        ...                       **lm.capture_options)
        >>> ids = qcompile.generate(q, prompt_ids, max_new_tokens=32)

    ``max_context``: the cache size (prompt + generated tokens); ``max_batch``: the largest batch
    the captured graph accepts; ``logits``: ``"last"`` or ``"all"`` positions per call.
    """

    def __init__(self, model: nn.Module, max_context: int, max_batch: int = 8, logits: str = "last",
                 kv_format: str = "float"):
        super().__init__()
        self.layout = dataclasses.replace(layout_of_model(model, max_context, max_batch, logits), kv_format=kv_format)
        self.model = model
        names = self.layout.input_names()
        # torch.export and qcompile's input binder read the inputs' names from the signature: one
        # name per cache tensor (``past_key_3``) instead of an anonymous ``*cache``
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        params.append(inspect.Parameter(LAYOUT_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None))
        signature = inspect.Signature(params)
        fn = functools.partial(type(self)._step, self)
        fn.__signature__ = signature
        self.forward = fn

    def _step(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *cache: torch.Tensor, kv_cache=None):
        n, layout = self.layout.layers, self.layout
        plain, quantized = _functional_layer_class()
        if layout.quantized:
            layers = [quantized(*cache[i::n], cache_position, layout.kv_format) for i in range(n)]
        else:
            layers = [plain(k, v, cache_position) for k, v in zip(cache[:n], cache[n:])]
        from transformers.cache_utils import Cache

        batch, seq = input_ids.shape
        slots = torch.arange(self.layout.max_context, device=input_ids.device)
        visible = slots[None, :] <= cache_position[:, None]                                  # [S, T]
        dtype = getattr(torch, self.layout.dtype)
        mask = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None].expand(batch, 1, seq, -1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=cache_position[None].expand(batch, seq),
                         cache=Cache(layers=layers), use_cache=True,
                         logits_to_keep=1 if self.layout.logits == "last" else 0)
        kinds = ("keys", "values", "key_scales", "value_scales") if layout.quantized else ("keys", "values")
        return (out.logits, *[getattr(layer, f"new_{kind}") for kind in kinds for layer in layers])

    @property
    def example_inputs(self) -> tuple:
        """Capture examples: batch 2 and 4 prompt tokens (torch.export specialises sizes 0 and 1)."""
        return (torch.zeros(2, 4, dtype=torch.int64), torch.arange(4), *self.layout.empty_cache(2))

    @property
    def capture_options(self) -> dict:
        """``example_kwargs`` (the layout constant) and ``dynamic_shapes`` (batch 1..max_batch, sequence
        1..max_context; the cache's context dim static) for ``qcompile.quantize`` / ``prepare``."""
        from torch.export import Dim

        # the capture example has batch 2 (torch.export specialises 1), so the graph admits 3 even when
        # max_batch is 1 or 2; generate still refuses a batch above max_batch. At most 2, torch.export
        # (2.13) gives input_ids and each cache tensor a batch symbol of its own (the blend's where()
        # broadcasts them), and TVM cannot infer that where()'s shape: its legalization of the
        # expand_dims after it failed on SmolLM2 (max_batch=2). From 3 up it is one symbol.
        batch = Dim("batch", min=1, max=max(3, self.layout.max_batch))
        seq = Dim("seq", min=1, max=self.layout.max_context)
        n = len(self.layout.empty_cache(1))
        names = self.layout.input_names()
        shapes = {names[0]: {0: batch, 1: seq}, names[1]: {0: seq}, **{name: {0: batch} for name in names[2:2 + n]},
                  LAYOUT_KWARG: None}
        return {"example_kwargs": {LAYOUT_KWARG: self.layout.to_text()}, "dynamic_shapes": shapes}

    def calibration(self, prompts: Iterable[torch.Tensor]) -> list[tuple]:
        """Calibration items (prefill calls on empty caches) from ``[B, S]`` or ``[S]`` token-id tensors."""
        items = []
        for ids in prompts:
            ids = torch.as_tensor(ids, dtype=torch.int64)
            ids = ids[None] if ids.dim() == 1 else ids
            if ids.shape[1] > self.layout.max_context:
                raise GenerationError(f"calibration prompt of {ids.shape[1]} tokens exceeds max_context "
                                      f"{self.layout.max_context}")
            items.append((ids, torch.arange(ids.shape[1]), *self.layout.empty_cache(ids.shape[0])))
        return items


def causal_lm(model: nn.Module, max_context: int, max_batch: int = 8, logits: str = "last",
              attn_implementation: Optional[str] = None) -> CausalLMWithCache:
    """Wrap a transformers ``*ForCausalLM`` with a static KV cache of ``max_context`` positions, ready to
    quantize (:class:`CausalLMWithCache`). ``attn_implementation`` (``"sdpa"``, ``"eager"``,
    ``"qcompile_grouped"``: grouped-query attention without copying the cache per query head, see
    :mod:`qcompile.llm.attention`) sets the model's attention kernel first; default: the model's own. The model's weights are shared, not copied.

    Example::

        >>> lm = qcompile.causal_lm(AutoModelForCausalLM.from_pretrained(path), max_context=512)
    """
    if attn_implementation == GROUPED_ATTENTION:
        register_grouped_attention()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return CausalLMWithCache(model.eval(), max_context, max_batch, logits)
