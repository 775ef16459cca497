"""Grouped-query attention without ``repeat_kv``: an attention function for transformers'
``AttentionInterface`` (name :data:`GROUPED_ATTENTION`) that a captured causal LM can use instead
of ``eager`` / ``sdpa``.

transformers' eager attention (and sdpa, once exported) repeats each key/value head ``G =
heads / kv_heads`` times before the two matmuls: in a captured graph with a static cache that is
an ``Expand`` + ``Reshape`` copy of the whole ``[B, H_kv, max_context, D]`` cache ``G`` times, per
layer, keys and values, every token. Measured on SmolLM2-135M's decode step in onnxruntime (9
heads on 3 KV heads, 256 slots): those copies (Expand, Reshape) and the QK matmul over the copied
keys were ~25 % of the step. Here the queries are grouped instead: ``[B, H, S, D]`` is read as
``[B, H_kv, G, S, D]`` (query head ``h`` uses KV head ``h // G``, as ``repeat_kv`` does) and each
matmul broadcasts one ``[B, H_kv, 1, T, D]`` cache over the group. Every score is the same dot product of the same two vectors; the
softmax and the mask are eager's (float32 softmax, additive mask); only the matmuls' batching
differs. Opt in with ``causal_lm(model, ..., attn_implementation="qcompile_grouped")``: the captured
graph, and so the reference backend, computes attention this way on every backend.
"""
from __future__ import annotations

import torch
from torch import nn

GROUPED_ATTENTION = "qcompile_grouped"


def grouped_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """``(output [B, S, H, D], weights [B, H, S, T])`` like transformers' ``eager_attention_forward``,
    without repeating the key/value heads (module docstring). ``query`` ``[B, H, S, D]``, ``key`` /
    ``value`` ``[B, H_kv, T, D]``, ``attention_mask`` additive ``[B, 1, S, T]`` or None."""
    batch, heads, seq, _ = query.shape
    kv_heads = key.shape[1]
    # split the head dim (a view for any strides, so torch.export needs no guard on seq) and let
    # the matmuls broadcast the one KV head over its group of queries
    grouped = query.unflatten(1, (kv_heads, heads // kv_heads))                       # [B, Hkv, G, S, D]
    weights = torch.matmul(grouped, key.unsqueeze(2).transpose(3, 4)) * scaling        # [B, Hkv, G, S, T]
    weights = weights.flatten(1, 2)                                                   # [B, H, S, T]
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.unflatten(1, (kv_heads, heads // kv_heads)), value.unsqueeze(2))   # [B, Hkv, G, S, D]
    out = out.flatten(1, 2).transpose(1, 2).contiguous()
    return out, weights


def register_grouped_attention() -> str:
    """Register :func:`grouped_attention_forward` with transformers (idempotent), with eager's additive
    float mask (transformers builds the mask a model hands to attention by the implementation's
    name); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)
    return GROUPED_ATTENTION
