"""The TVM artifact: a compiled Relax VM executable called like the model, saved as a shared
library plus a JSON file, loadable with TVM's runtime alone (no original model, no qcompile graph)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import tvm
from torch.utils import _pytree as pytree
from tvm import relax

from ...atomic import atomic_directory, read_manifest, write_manifest
from ...capture import InputBinder
from ...contract import SMOKE_FILE, parity_of, record, smoke_bytes, smoke_tensors
from ...distributed import writes_on_rank_zero
from ...errors import ArtifactError, BackendError
from .host import detect, request_amx

LIBRARY, METADATA = "model.so", "tvm.json"
FORMAT_VERSION = 2  # 2: sizes and sha256 of every file in tvm.json


class TvmArtifact:
    """Callable like the quantized model: torch tensors in, torch tensors out (same structure).

    Attributes: ``compile_seconds`` (Relax build and LLVM code generation), ``import_seconds`` (export and Relax import), ``target`` (the LLVM target spec),
    ``family`` (integer kernel family), ``fused`` / ``skipped`` (which Linears run as integer
    GEMMs, and why the others do not)."""

    backend = "tvm"

    def __init__(self, executable, binder: InputBinder, in_spec, out_spec, meta: dict):
        self.executable = executable
        self._binder = binder
        self._in_spec = in_spec
        self._out_spec = out_spec
        self.meta = meta
        self.compile_seconds = meta.get("compile_seconds")
        self.target = meta.get("target")
        self.family = meta.get("family")
        self.fused = meta.get("fused", [])
        self.skipped = meta.get("skipped", {})
        if self.family == "amx":
            if not request_amx():   # else the first tile instruction kills the process (SIGILL)
                raise ArtifactError("this tvm artifact uses AMX tiles, and Linux refused this process the AMX tile "
                                    "state (arch_prctl ARCH_REQ_XCOMP_PERM); lower the model again with family='vnni'")
        self._dev = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self._dev)
        self._main = self.vm["main"]   # looked up once: a lookup per call costs microseconds
        self._bounds = [(b["input"], b["dim"], b["max"], b["name"]) for b in meta.get("input_bounds", [])]

    def _flatten(self, args, kwargs) -> list:
        flat, got = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and got != self._in_spec:
            keys = self._in_spec.children_specs[1].context
            flat, got = pytree.tree_flatten((args, {k: kwargs[k] for k in keys}))
        return flat

    def __call__(self, *args, **kwargs):
        args, kwargs = self._binder.call(args, dict(kwargs))
        flat = [_aligned(t) for t in self._flatten(args, kwargs) if isinstance(t, torch.Tensor)]
        for i, dim, most, name in self._bounds:
            if i < len(flat) and flat[i].dim() > dim and flat[i].shape[dim] > most:
                raise BackendError(f"input '{name}' has size {flat[i].shape[dim]} in dim {dim}; this tvm artifact "
                                   f"was compiled for at most {most} there (the range torch.export recorded, e.g. "
                                   "a model's position table), and its memory is planned to that size")
        # zero-copy both ways (DLPack): torch memory is read in place, and each output becomes a
        # torch tensor that keeps the VM's buffer alive (outputs are never planned, so never reused)
        out = self._main(*[tvm.runtime.from_dlpack(t) for t in flat])
        starts = {t.data_ptr() for t in flat}
        outs = [_own(torch.from_dlpack(o), starts) for o in _leaves(out)]
        return pytree.tree_unflatten(outs, self._out_spec) if self._out_spec is not None else tuple(outs)

    @writes_on_rank_zero
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``model.so`` (the compiled library) and ``tvm.json`` (call signature, target,
        kernel family, compile time) to the directory ``path``, atomically. When the artifact knows
        the model it was lowered from (``qmodel``, set by ``qcompile.lower``) and that model has its
        capture example, the directory also carries the contract (``tvm.json``'s ``contract``: recipe,
        quality, this artifact's parity against the reference on the smoke inputs) and the smoke
        inputs with the reference outputs (``smoke.safetensors``, checksummed with the library),
        which ``qcompile.check`` runs again."""
        path = Path(path)
        contract, smoke = self._contract()
        with atomic_directory(path) as tmp:
            self.executable.export_library(str(tmp / LIBRARY))
            meta = dict(self.meta, format_version=FORMAT_VERSION, binder=self._binder.to_dict(),
                        in_spec=pytree.treespec_dumps(self._in_spec) if self._in_spec is not None else None,
                        out_spec=pytree.treespec_dumps(self._out_spec) if self._out_spec is not None else None)
            files = [LIBRARY]
            if contract is not None:
                (tmp / SMOKE_FILE).write_bytes(smoke_bytes(smoke))
                meta["contract"], files = contract, [LIBRARY, SMOKE_FILE]
            write_manifest(tmp, meta, files, name=METADATA)
        return path

    def _contract(self) -> tuple:
        """(contract record, smoke tensors) measured now, or (None, None) without a source model."""
        qmodel = getattr(self, "qmodel", None)
        if qmodel is None or getattr(qmodel, "_example", None) is None:
            return None, None
        args, kwargs = qmodel.export_example("the tvm contract's smoke inputs")[:2]
        kwargs = {k: v for k, v in kwargs.items() if k in qmodel.binder.keywords}
        with torch.no_grad():
            reference = qmodel(*args, **kwargs)
        leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
        parity = parity_of(self(*args, **kwargs), leaves)
        runtime = f"TVM {tvm.__version__} (Relax VM, {self.family or 'float'} kernels, target {self.target})"
        return record(qmodel.recipe, qmodel.report, self.backend, parity, runtime), \
            smoke_tensors(args, kwargs, reference)


_ALIGN = 64   # TVM's from_dlpack requires 64-byte aligned, contiguous memory (its kernels assume it)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, detached, contiguous and 64-byte aligned: itself when it already is
    (torch's CPU allocator aligns to 64), else a copy (a view into the middle of a tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.data_ptr() % _ALIGN:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _own(t: torch.Tensor, inputs: set) -> torch.Tensor:
    """An output that is one of the inputs' buffers (a model returning an input as is) is copied,
    so the caller never gets its own input back under another name."""
    return t.clone() if t.data_ptr() in inputs else t


def _leaves(out) -> list:
    if isinstance(out, (tvm.runtime.Tensor,)):
        return [out]
    return [x for o in out for x in _leaves(o)]


def load(path: Union[str, Path]) -> TvmArtifact:
    """Load what :meth:`TvmArtifact.save` wrote; needs TVM's runtime, not the original model."""
    path = Path(path)
    # sizes and checksums before dlopen: loading a corrupted shared library can crash the process
    meta = read_manifest(path, version_key="format_version", version=FORMAT_VERSION, kind="tvm artifact",
                         name=METADATA, required=[LIBRARY])
    host_flags = detect().flags
    missing = [f for f in meta.get("requires_flags", []) if f not in host_flags]
    if missing:
        raise ArtifactError(f"'{path}' was compiled for a CPU with {', '.join(missing)}, which this host lacks")
    b = meta["binder"]
    binder = InputBinder(b["positional"], b["keywords"], b.get("constants", {}))
    in_spec = pytree.treespec_loads(meta["in_spec"]) if meta.get("in_spec") else None
    out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None
    return TvmArtifact(tvm.runtime.load_module(str(path / LIBRARY)), binder, in_spec, out_spec, meta)
