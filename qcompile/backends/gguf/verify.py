"""Check a GGUF file against a quantized model: every tensor the gguf backend would write for it
(codes, scales, minima packed into llama.cpp's blocks; F32 norms) is read back from the file with
``gguf.GGUFReader`` and compared byte for byte, so "is this file exactly my model?" has a yes/no
answer naming every tensor and block that differs."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import gguf
import numpy as np

from ...errors import BackendError
from .llama import llama_tensors


def verify_gguf(path: Union[str, Path], qmodel, config, requantize: bool = False) -> dict:
    """Compare the GGUF file at ``path`` with what the gguf backend writes for ``qmodel`` (its
    transformers ``config``): tensor names, types, shapes and every stored byte. Returns
    ``{tensor name: type}`` when all agree; a :class:`BackendError` listing each tensor that is
    missing, extra, of another type, or differs (with how many of its blocks) otherwise.
    ``requantize``: the file was lowered with ``requantize=True`` (its off-grid layers are compared
    with their requantized blocks).

    Example::

        >>> art.save("model.gguf")
        >>> verify_gguf("model.gguf", q, model.config)["blk.0.attn_q.weight"]
        'Q4_K'
    """
    expected = {t.name: t for t in llama_tensors(qmodel, config, requantize)}
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    problems = [f"'{name}' missing from the file" for name in expected if name not in stored]
    problems += [f"'{name}' in the file, not in the model" for name in stored if name not in expected]
    for name, want in expected.items():
        got = stored.get(name)
        if got is None:
            continue
        if got.tensor_type.name != want.type:
            problems.append(f"'{name}' is {got.tensor_type.name} in the file, {want.type} in the model")
            continue
        a = np.ascontiguousarray(got.data).view(np.uint8).reshape(-1)
        b = np.ascontiguousarray(want.data).view(np.uint8).reshape(-1)
        if a.size != b.size:
            problems.append(f"'{name}' has {a.size} bytes in the file, {b.size} in the model")
            continue
        block = gguf.GGML_QUANT_SIZES[got.tensor_type][1]
        differ = int((a != b).reshape(-1, block).any(1).sum())
        if differ:
            problems.append(f"'{name}' ({want.type}, layer '{want.layer}'): {differ} of {a.size // block} blocks differ")
    if problems:
        raise BackendError(f"{path} does not hold this model bit for bit: " + "; ".join(problems))
    return {name: t.type for name, t in expected.items()}
