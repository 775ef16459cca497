"""A GGUF file (llama.cpp's format, any writer's: llama.cpp's quantizer, qcompile's gguf backend,
a downloaded model) as a float32 transformers causal LM, so qcompile can re-quantize it or verify
what another tool produced.

transformers dequantizes every tensor to float32 on load (``gguf.quants``, every llama.cpp type
it has a dequantizer for) and undoes llama.cpp's q/k rotary row order; the tokenizer is rebuilt
from the file's ``tokenizer.ggml.*`` metadata. Needs the ``llm`` extra (transformers, gguf,
accelerate).

Example::

    >>> m = load_gguf("SmolLM2-135M-Instruct.Q4_K_M.gguf")          # doctest: +SKIP
    >>> m.types["blk.0.attn_q.weight"], m.model.config.model_type    # doctest: +SKIP
    ('Q5_0', 'llama')
    >>> q = qcompile.quantize(m.model, "gguf-q4_k_m-gptq", ids, calibration=windows,
    ...                       example_kwargs={"use_cache": False})   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch


@dataclass
class GgufModel:
    """A GGUF file loaded as float: the transformers model (eval, float32, eager attention), its
    tokenizer, and the file's tensor types (GGUF tensor name → ``Q4_K``, ``F32``, ...)."""

    model: torch.nn.Module
    tokenizer: Any
    path: Path
    types: dict = field(default_factory=dict)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a ``[1, n]`` int64 tensor."""
        return torch.tensor([self.tokenizer(text)["input_ids"]], dtype=torch.int64)


def load_gguf(path: Union[str, Path]) -> GgufModel:
    """Load the GGUF file at ``path`` as a float32 transformers causal LM and its tokenizer
    (``from_pretrained(dir, gguf_file=name)``); ``FileNotFoundError`` naming the path when it is
    missing, ``ImportError`` naming the ``llm`` extra when a package is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        import accelerate  # noqa: F401 - transformers' GGUF loader needs it
        import gguf
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"loading a GGUF file needs the llm extra: pip install 'qcompile[llm]' ({exc})") from exc
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.config.use_cache = False
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    return GgufModel(model.eval(), tokenizer, path, types)
