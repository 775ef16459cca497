"""The gguf backend (id ``gguf``): a quantized Llama-architecture causal LM as a GGUF file that
llama.cpp (and ollama, llama-cpp-python, ...) loads and runs.

Each quantized Linear's codes are written **bit for bit** into the llama.cpp block type whose grid
equals qcompile's (:mod:`.blocks`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; the ``gguf-*`` presets target
them); a grid no type holds is a :class:`~qcompile.errors.BackendError` naming the layer, its grid
and the nearest type, or with ``requantize=True`` is written to that type from its reference weight
(:mod:`.requantize`; ``artifact.requantized`` reports each layer's added error). A recipe may quantize
each Linear's input as llama.cpp's CPU dot products do (``presets.gguf_activation``: int8 per block of
32, or 256 for k-quants); any other activation spec is refused by layer. Norms are F32, a tied ``lm_head`` is llama.cpp's ``token_embd`` (Q8_0 when the
embedding is int8 in groups of 32, else its exact F32 values), the tokenizer is written from the
model's transformers tokenizer. K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 with two-level
scales, :mod:`.kquants`; the ``gguf-q4_k_m``/``-q5_k_m``/``-q6_k`` presets and
:func:`qcompile.presets.llama_cpp_mix`) are written bit for bit where rows are multiples of 256.
:func:`verify_gguf` checks a file on disk against the model byte for byte.

Example::

    >>> q = qcompile.quantize(model, "gguf-q4_0-gptq", ids, calibration=windows,
    ...                       example_kwargs={"use_cache": False})
    >>> art = qcompile.lower(q, backend="gguf", config=model.config, tokenizer=tok, tokenizer_pre="smollm")
    >>> art.save("model.gguf")                  # llama.cpp: Llama("model.gguf")
    >>> art(ids)                                # logits computed by llama.cpp (llama-cpp-python)
"""
from __future__ import annotations

from typing import Optional

from ..base import Capabilities
from .llama import plan_llama
from .runtime import GgufArtifact, read_types
from .verify import verify_gguf


class GgufBackend:
    id = "gguf"
    # weight-only; what blocks.BLOCK_TYPES holds: int8 / uint8 (Q8_0), int4 / uint4 (Q4_0, Q4_1),
    # uint5 (Q5_0, Q5_1) in groups of 32 (the group, symmetry and float16 scales are checked per
    # layer: blocks.match names the nearest type); int8 per channel only for the embedding / tied
    # head (written as its exact F32 values); float zero points are Q4_1/Q5_1's minimum
    capabilities = Capabilities(
        weights={"int8": {"per_group", "per_channel"}, "uint8": {"per_group"}, "int4": {"per_group"},
                 "uint4": {"per_group"}, "uint5": {"per_group"}, "int6": {"per_group"},
                 "uint6": {"per_group"}, "uint2": {"per_group"}, "int3": {"per_group"}},   # uint6: Q4_K/Q5_K's sub-block scale codes
        # llama.cpp's CPU dot products quantize each Linear's input to int8 per block of 32 (Q8_0/Q8_1)
        # or 256 (Q8_K); a recipe may say so (presets.gguf_activation), llama.check_activations
        # refuses any other activation spec
        activations={"int8": {"dynamic per_token_group"}},
        float_zero_points=True, ops={"linear", "embedding"},
        graph_ops=False,   # llama.cpp / vLLM run their own Llama graph: nothing inserted survives
        timing_missing="latency budgets on gguf: it writes a file for llama.cpp, whose speed qcompile does not "
                       "time yet; use backend='onnx'")

    def lower(self, qmodel, config=None, tokenizer=None, tokenizer_pre: str = "default",
              name: Optional[str] = None, requantize: bool = False) -> GgufArtifact:
        """``config``: the model's transformers config (``model.config``, a ``LlamaConfig``);
        ``tokenizer``: its transformers tokenizer (byte-level BPE); ``tokenizer_pre``: llama.cpp's
        pre-tokenizer name (``"smollm"`` for SmolLM2, ``"llama-bpe"`` for Llama 3); ``name``: the
        file's ``general.name`` (default: the recipe's); ``requantize``: a layer whose grid no GGUF
        type holds is requantized (round to nearest, from its reference weight) to the nearest type
        instead of refused; ``artifact.requantized`` (and the file's ``qcompile.requantized``
        metadata) reports each such layer's grid, type and added error."""
        return GgufArtifact(plan_llama(qmodel, config, tokenizer, tokenizer_pre, name, requantize))


__all__ = ["GgufBackend", "GgufArtifact", "read_types", "verify_gguf"]
