"""Quantized causal LMs that generate: capture with a static KV cache as explicit graph inputs and
outputs (:mod:`.cache`), and a transformers-shaped ``generate`` over any artifact (:mod:`.generation`)."""
from .cache import CacheLayout, CausalLMWithCache, causal_lm, write_new_entries
from .generation import GenerationStats, cache_layout, generate, next_token

__all__ = ["CacheLayout", "CausalLMWithCache", "causal_lm", "write_new_entries", "GenerationStats", "cache_layout", "generate", "next_token"]
