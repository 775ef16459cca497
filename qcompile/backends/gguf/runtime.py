"""The GGUF artifact: writes the planned file (atomically) and runs it in llama.cpp through
``llama-cpp-python`` (the ``gguf`` extra), so ``art(ids)`` gives llama.cpp's own logits."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import torch

from ...distributed import writes_on_rank_zero
from ...errors import BackendError
from .llama import ARCH, GgufPlan


class GgufArtifact:
    """A GGUF file to be: ``save(path)`` writes it; ``types`` maps each tensor to its GGUF type;
    calling it with ``input_ids [1, n]`` runs the saved file in llama.cpp and returns its logits
    ``[1, n, vocab]`` (float32)."""

    backend = "gguf"

    def __init__(self, plan: GgufPlan):
        self.plan = plan
        self.path: Optional[Path] = None
        self._llama = None
        self._tmp = None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "GgufArtifact":
        """A GGUF file already on disk (any writer's: llama.cpp's own quantizer too), to run it."""
        art = cls(GgufPlan())
        art.path = Path(path)
        return art

    @property
    def types(self) -> dict:
        return self.plan.types()

    @writes_on_rank_zero
    def save(self, path: Union[str, Path]) -> Path:
        """Write the GGUF file (to a temporary sibling first, then renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, ARCH)
            for method, args in self.plan.metadata:
                getattr(writer, method)(*args)
            for t in self.plan.tensors:
                raw = None if t.type == "F32" else gguf.GGMLQuantizationType[t.type]
                writer.add_tensor(t.name, t.data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.path, self._llama = path, None
        return path

    def llama(self, n_ctx: int = 512, **kwargs):
        """The saved file loaded by llama-cpp-python (one thread, logits for every position).
        ``use_cache`` in ``__call__`` is accepted for the transformers calling convention: every call
        starts from an empty KV cache."""
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise BackendError("running a GGUF file needs llama-cpp-python: pip install 'qcompile[gguf]'") from e
        if self.path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qcompile-gguf-")
            self.save(Path(self._tmp.name) / "model.gguf")
        if self._llama is None or self._llama.n_ctx() < n_ctx or kwargs:
            self._llama = Llama(str(self.path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True,
                                verbose=False, **kwargs)
        return self._llama

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        ids = [int(i) for i in torch.as_tensor(input_ids).reshape(-1)]
        llm = self.llama(n_ctx=max(512, len(ids)))
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)).unsqueeze(0)


def read_types(path: Union[str, Path]) -> dict:
    """GGUF tensor name → type name of a file on disk (the ``gguf`` package's reader)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
