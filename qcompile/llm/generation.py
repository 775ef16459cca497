"""``generate``: greedy or sampled decoding with a static KV cache through any artifact captured from
:class:`~qcompile.llm.cache.CausalLMWithCache` — the reference ``QuantizedModel``, ``lower(q, "onnx")``,
``lower(q, "tvm")`` — shaped like transformers' ``model.generate``.

The loop calls the one captured graph for the prompt (prefill) and then once per token (decode),
and writes each call's new cache entries into one preallocated cache in place: nothing the size of
the cache is allocated per token on the Python side. Every input is checked before the first call,
so a bad request raises a :class:`~qcompile.errors.GenerationError` and leaves the artifact as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ..errors import GenerationError
from .cache import LAYOUT_KWARG, CacheLayout, write_new_entries


@dataclass
class GenerationStats:
    """Timings of one :func:`generate` call: the prefill (one call over the prompt) and the decode
    steps (one call per new token after the first) measured separately, wall clock."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (per sequence) processed per second in the prefill call."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens (per sequence) generated per second by the decode calls (the first new token comes
        from the prefill and is not counted here)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens: {self.prefill_tokens_per_s:.1f} tok/s; decode "
                f"{self.new_tokens} tokens: {self.decode_tokens_per_s:.1f} tok/s (batch {self.batch})")


def cache_layout(artifact: Any) -> CacheLayout:
    """The :class:`CacheLayout` an artifact was captured with, read from the constant keyword input its
    input binder carries (the reference model's ``binder``, the ONNX/TVM artifacts' own copy).
    :class:`GenerationError` when the artifact was not captured with a KV cache. The float
    :class:`~qcompile.llm.cache.CausalLMWithCache` itself carries its ``layout`` (eager generation)."""
    if isinstance(getattr(artifact, "layout", None), CacheLayout):
        return artifact.layout
    # every artifact keeps the binder of the model it was lowered from; the ONNX and TVM ones
    # name it privately, so it is read by duck typing rather than through a backend import
    binder = getattr(artifact, "binder", None) or getattr(artifact, "_binder", None)
    text = getattr(binder, "constants", {}).get(LAYOUT_KWARG) if binder is not None else None
    if not isinstance(text, str):
        raise GenerationError(f"{type(artifact).__name__} was not captured with a KV cache, so it cannot generate: "
                              f"quantize qcompile.causal_lm(model, max_context=...) (a *ForCausalLM), then lower that")
    return CacheLayout.from_text(text)


def _check_request(layout: CacheLayout, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool,
                   temperature: float, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise GenerationError(f"input_ids must be integer token ids of shape [batch, seq], got {input_ids.dtype} "
                              f"{tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if seq == 0 or batch == 0:
        raise GenerationError(f"empty prompt (input_ids of shape {tuple(input_ids.shape)}): give at least one token")
    if batch > layout.max_batch:
        raise GenerationError(f"batch {batch} exceeds max_batch {layout.max_batch} the model was captured with")
    bad = (input_ids < 0) | (input_ids >= layout.vocab_size)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise GenerationError(f"token id {int(input_ids[tuple(where)])} at position {where} is outside the vocabulary "
                              f"(0..{layout.vocab_size - 1})")
    if seq > layout.max_context:
        raise GenerationError(f"prompt of {seq} tokens exceeds the maximum context of {layout.max_context} the model "
                              f"was captured with")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if seq + max_new_tokens > layout.max_context:
        raise GenerationError(f"prompt ({seq} tokens) + max_new_tokens ({max_new_tokens}) = {seq + max_new_tokens} "
                              f"exceeds the maximum context of {layout.max_context}; lower max_new_tokens to at most "
                              f"{layout.max_context - seq} or capture with a larger max_context")
    if do_sample:
        if not temperature > 0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise GenerationError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    return input_ids.to(torch.int64)


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``: argmax when ``do_sample`` is False, else a
    sample after temperature, top-k and top-p (nucleus) filtering, in transformers' order."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False                       # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def decoder(artifact: Any, layout: CacheLayout, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(tokens [B, S], positions [S]) -> logits``: one call of ``artifact`` with a cache of
    ``batch`` rows that the step updates in place. The artifact's own fast loop when it has one
    (``artifact.decoder(layout, batch)``: the ONNX artifact's IOBinding loop), else the plain one:
    call the artifact with the whole cache, then :func:`write_new_entries`."""
    make = getattr(artifact, "decoder", None)
    fast = make(layout, batch) if make is not None else None
    if fast is not None:
        return fast
    cache = layout.empty_cache(batch)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits, *new = artifact(tokens, positions, *cache)
        write_new_entries(cache, new, positions)
        return logits
    return step


def _emit(streamer, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):          # a transformers streamer (TextStreamer, TextIteratorStreamer)
        streamer.put(tokens)
    else:
        streamer(tokens)


def generate(artifact: Any, input_ids: Union[torch.Tensor, Iterable], max_new_tokens: int = 20, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None,
             eos_token_id: Optional[Union[int, Iterable[int]]] = None, pad_token_id: Optional[int] = None,
             streamer: Optional[Union[Callable[[torch.Tensor], Any], Any]] = None,
             return_stats: bool = False):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (``[batch, seq]`` or ``[seq]``) with
    an artifact captured from :func:`qcompile.causal_lm`; returns ``[batch, seq + new]`` token ids (the
    prompt, then the new tokens), like transformers' ``generate``, and with ``return_stats=True`` a
    ``(ids, GenerationStats)`` pair.

    ``do_sample=False``: greedy (argmax). ``do_sample=True``: ``temperature``, ``top_k``, ``top_p`` then
    a draw from a ``torch.Generator`` seeded with ``seed`` (same seed, same tokens). ``eos_token_id``:
    one id or several; a sequence that emits one stops, and is padded with ``pad_token_id`` (default:
    the first eos id) while the others go on; the call ends when all have stopped. ``streamer``: a
    callable given each step's ``[batch]`` new tokens, or a transformers streamer (``put`` receives
    the prompt first, then each step's tokens; ``end`` at the end).

    Example::

        >>> ids = qcompile.generate(qcompile.lower(q, "onnx"), tok("Hello", return_tensors="pt").input_ids,
        ...                         max_new_tokens=32, eos_token_id=tok.eos_token_id)
    """
    layout = cache_layout(artifact)
    input_ids = _check_request(layout, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p)
    stops = ([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    stop_ids = torch.tensor(stops, dtype=torch.int64)
    generator = None
    if do_sample:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    batch, prompt_len = input_ids.shape
    decode = decoder(artifact, layout, batch)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu() if batch > 1 else input_ids[0].cpu())

    out = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.int64)
    out[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens, positions = input_ids, torch.arange(prompt_len)
    prefill_s = decode_s = 0.0
    produced = 0
    for step in range(max_new_tokens):
        start = time.perf_counter()
        logits = decode(tokens, positions)
        token = next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if step == 0:
            prefill_s = time.perf_counter() - start
        else:
            decode_s += time.perf_counter() - start
        if stops:
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= torch.isin(token, stop_ids)
        out[:, prompt_len + step] = token
        produced = step + 1
        _emit(streamer, token)
        if stops and bool(finished.all()):
            break
        tokens, positions = token[:, None], positions[-1:] + 1
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    ids = out[:, :prompt_len + produced]
    stats = GenerationStats(batch, prompt_len, produced, prefill_s, decode_s)
    return (ids, stats) if return_stats else ids
