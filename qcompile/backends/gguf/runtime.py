"""The GGUF artifact: writes the planned file (atomically) and runs it in llama.cpp through
``llama-cpp-python`` (the ``gguf`` extra), so ``art(ids)`` gives llama.cpp's own logits."""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import torch

from ...contract import parity_of, record, smoke_bytes, smoke_tensors
from ...distributed import writes_on_rank_zero
from ...errors import BackendError
from .llama import ARCH, GgufPlan


# GGUF metadata keys of the contract record (JSON) and the smoke tensors (base64 safetensors)
CONTRACT_KEY, SMOKE_KEY = "qcompile.contract", "qcompile.smoke"
# the smoke input is the first tokens of the capture example: its reference logits are stored in the
# file ([1, n, vocab] float32: SmolLM2's 512-token example made them 100 MB, 134 MB as base64)
SMOKE_TOKENS = 16


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

    @property
    def requantized(self) -> dict:
        """layer → ``{grid, why, type, added_rel_rms, added_max_abs, added_sqnr_db, bits}`` for each
        layer the ``requantize=True`` option wrote to the nearest type (empty: every layer bit-exact)."""
        return self.plan.requantized

    @writes_on_rank_zero
    def save(self, path: Union[str, Path]) -> Path:
        """Write the GGUF file (to a temporary sibling first, then renamed into place). When the
        artifact knows the model it was lowered from (``qmodel``, set by ``qcompile.lower``), the
        file also carries the contract (:data:`CONTRACT_KEY`: recipe, quality, llama.cpp's parity
        against the reference on the smoke inputs, measured on the file written without it) and
        the smoke tensors (:data:`SMOKE_KEY`: the example's first :data:`SMOKE_TOKENS` tokens and
        the reference logits on them), which ``qcompile.check`` runs again."""
        qmodel = getattr(self, "qmodel", None)
        if qmodel is None or getattr(qmodel, "_example", None) is None:
            return self._write(path, [])
        ids = qmodel.export_example("the gguf contract's smoke inputs")[0][0][..., :SMOKE_TOKENS]
        with torch.no_grad():
            reference = qmodel(ids, use_cache=False)
        reference = reference.logits if hasattr(reference, "logits") else reference
        self._write(path, [])
        parity = parity_of(self(ids), [reference])
        import llama_cpp

        contract = record(qmodel.recipe, qmodel.report, self.backend, parity,
                          f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, n_threads=1)")
        smoke = smoke_tensors((ids,), {}, reference)
        return self._write(path, [("add_string", (CONTRACT_KEY, json.dumps(contract))),
                                  ("add_string", (SMOKE_KEY, base64.b64encode(smoke_bytes(smoke)).decode()))])

    def _write(self, path: Union[str, Path], extra_metadata: list) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, ARCH)
            for method, args in [*self.plan.metadata, *extra_metadata]:
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


def read_contract(path: Union[str, Path]) -> tuple[dict, dict]:
    """(contract record, smoke tensors) a GGUF file written by :meth:`GgufArtifact.save` carries;
    ``({}, {})`` when it carries none (llama.cpp's own files, older saves)."""
    from safetensors.torch import load

    fields = gguf.GGUFReader(str(path)).fields
    if CONTRACT_KEY not in fields or SMOKE_KEY not in fields:
        return {}, {}
    try:
        text = {k: bytes(fields[k].parts[fields[k].data[0]]).decode() for k in (CONTRACT_KEY, SMOKE_KEY)}
        return json.loads(text[CONTRACT_KEY]), load(base64.b64decode(text[SMOKE_KEY]))
    except (ValueError, IndexError, json.JSONDecodeError) as e:
        raise BackendError(f"'{path}': its contract metadata is unreadable ({e})") from None


def read_types(path: Union[str, Path]) -> dict:
    """GGUF tensor name → type name of a file on disk (the ``gguf`` package's reader)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
