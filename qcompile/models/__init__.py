"""Bundled real models for end-to-end quantization tests and demos.

Example:
    >>> from qcompile.models import load_minilm
    >>> m = load_minilm()                                   # doctest: +SKIP
    >>> ids, mask = m.encode_batch(["hello world"])         # doctest: +SKIP
    >>> m.model(ids, mask).shape                            # doctest: +SKIP
    torch.Size([1, 384])
"""

from qcompile.models.gguf_import import GgufModel, load_gguf
from qcompile.models.minilm import MiniLM, SentenceEncoder, load_minilm

__all__ = ["GgufModel", "MiniLM", "SentenceEncoder", "load_gguf", "load_minilm"]
