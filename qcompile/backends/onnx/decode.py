"""The decode loop's fast path for a KV-cache ONNX file: onnxruntime IOBinding over preallocated
buffers, so a decode step costs one ``run_with_iobinding`` and one cache write, nothing else.

The plain path (``OnnxArtifact.__call__``) builds a feed dict of 2 + 2L numpy arrays per call and
lets onnxruntime allocate every output; for SmolLM2 (30 layers) that is 62 conversions and 61 output
allocations per token. Here every buffer is a torch tensor allocated once and bound by pointer:

* the cache is one ``[2L, B, H_kv, max_context, D]`` tensor; input ``past_key_i`` / ``past_value_i``
  is bound to its slice ``i`` (contiguous: the leading dim), and read in place by every call;
* the outputs (logits, ``new_key_i`` / ``new_value_i``) are bound to one ``[2L, B, H_kv, S, D]``
  buffer per sequence length ``S`` (the prompt's, then 1), so onnxruntime writes them where the
  next copy reads them;
* after each call one ``copy_`` writes all ``2L`` new entries into the cache at ``cache_position``.

Binding changes only when the sequence length does (prefill, then decode): twice per generation.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OnnxDecoder:
    """``decoder(tokens [B, S], positions [S]) -> logits [B, S_out, V]``: one call of the captured
    graph through onnxruntime IOBinding, the new cache entries written at ``positions`` in place.

    The returned logits are a view of a buffer the next call overwrites: read them before it.
    Made by :meth:`~qcompile.backends.onnx.runtime.OnnxArtifact.decoder`; ``layout`` is the
    artifact's :class:`~qcompile.llm.cache.CacheLayout` (read by attribute)."""

    def __init__(self, session, layout, batch: int):
        self.session, self.layout, self.batch = session, layout, batch
        self.pairs = 2 * layout.layers
        dtype = getattr(torch, layout.dtype)
        self.cache = torch.zeros(self.pairs, batch, layout.kv_heads, layout.max_context, layout.head_dim, dtype=dtype)
        inputs = session.get_inputs()
        self._cache_type = _NUMPY[inputs[2].type]
        self._outputs = [o.name for o in session.get_outputs()]
        self._io = session.io_binding()
        shape = tuple(self.cache.shape[1:])
        for i, inp in enumerate(inputs[2:]):
            self._bind_input(inp.name, self.cache[i], shape)
        self._seq = None   # the sequence length the ids/positions/outputs are bound for

    @classmethod
    def supports(cls, session, layout) -> Optional[str]:
        """None when the file has exactly the captured cache signature (``CacheLayout.input_names``
        in, logits then ``2L`` new entries out, float caches), else why the plain path must run it."""
        names = [i.name for i in session.get_inputs()]
        if names != layout.input_names():
            return f"inputs {names[:3]}... are not the captured cache signature {layout.input_names()[:3]}..."
        if len(session.get_outputs()) != 1 + 2 * layout.layers:
            return f"{len(session.get_outputs())} outputs, not logits + {2 * layout.layers} cache entries"
        expected = {"float32": "tensor(float)", "float16": "tensor(float16)"}.get(layout.dtype)
        types = sorted({i.type for i in session.get_inputs()[2:]})
        if types != [expected]:
            return f"cache inputs of type {types}, not the layout's {layout.dtype} (float32/float16 caches only)"
        if session.get_outputs()[0].type != "tensor(float)":
            return f"logits of type {session.get_outputs()[0].type}, not float32"
        return None

    def _bind_input(self, name: str, t: torch.Tensor, shape) -> None:
        self._io.bind_input(name, "cpu", 0, _NUMPY_OF[t.dtype], list(shape), t.data_ptr())

    def _bind_output(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_output(name, "cpu", 0, _NUMPY_OF[t.dtype], list(t.shape), t.data_ptr())

    def _bind_sequence(self, seq: int) -> None:
        layout, b = self.layout, self.batch
        self._ids = torch.zeros(b, seq, dtype=torch.int64)
        self._positions = torch.zeros(seq, dtype=torch.int64)
        self._bind_input("input_ids", self._ids, self._ids.shape)
        self._bind_input("cache_position", self._positions, self._positions.shape)
        rows = seq if layout.logits == "all" else 1
        self._logits = torch.empty(b, rows, layout.vocab_size, dtype=torch.float32)
        self._new = torch.empty(self.pairs, b, layout.kv_heads, seq, layout.head_dim, dtype=self.cache.dtype)
        self._bind_output(self._outputs[0], self._logits)
        for i, name in enumerate(self._outputs[1:]):
            self._bind_output(name, self._new[i])
        self._seq = seq

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq != self._seq:
            self._bind_sequence(seq)
        self._ids.copy_(tokens)
        self._positions.copy_(positions)
        self.session.run_with_iobinding(self._io)
        first = int(positions[0])
        self.cache[:, :, :, first:first + seq].copy_(self._new)
        return self._logits


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
