"""The TVM artifact: a compiled Relax VM executable called like the model, saved as a shared
library plus a JSON file, loadable with TVM's runtime alone (no original model, no qcompile graph)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ...artifact import atomic_directory, read_manifest, write_manifest
from ...capture import InputBinder
from ...errors import ArtifactError

LIBRARY, METADATA = "model.so", "tvm.json"
FORMAT_VERSION = 2  # 2: sizes and sha256 of every file in tvm.json


class TvmArtifact:
    """Callable like the quantized model: torch tensors in, torch tensors out (same structure).

    Attributes: ``compile_seconds`` (Relax build and LLVM code generation), ``import_seconds`` (export and Relax import), ``target`` (the LLVM target spec),
    ``family`` (integer kernel family), ``fused`` / ``skipped`` (which Linears run as integer
    GEMMs, and why the others do not)."""

    backend = "tvm"

    def __init__(self, executable, binder: InputBinder, in_spec, out_spec, meta: dict):
        import tvm
        from tvm import relax

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
        self._dev = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self._dev)

    def _flatten(self, args, kwargs) -> list:
        flat, got = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and got != self._in_spec:
            keys = self._in_spec.children_specs[1].context
            flat, got = pytree.tree_flatten((args, {k: kwargs[k] for k in keys}))
        return flat

    def __call__(self, *args, **kwargs):
        import tvm

        args, kwargs = self._binder.call(args, dict(kwargs))
        flat = [t for t in self._flatten(args, kwargs) if isinstance(t, torch.Tensor)]
        feed = [tvm.runtime.tensor(np.ascontiguousarray(t.detach().cpu().numpy()), self._dev) for t in flat]
        out = self.vm["main"](*feed)
        outs = [torch.from_numpy(o.numpy()) for o in _leaves(out)]
        return pytree.tree_unflatten(outs, self._out_spec) if self._out_spec is not None else tuple(outs)

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``model.so`` (the compiled library) and ``tvm.json`` (call signature, target,
        kernel family, compile time) to the directory ``path``, atomically."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.executable.export_library(str(tmp / LIBRARY))
            meta = dict(self.meta, format_version=FORMAT_VERSION, binder=self._binder.to_dict(),
                        in_spec=pytree.treespec_dumps(self._in_spec) if self._in_spec is not None else None,
                        out_spec=pytree.treespec_dumps(self._out_spec) if self._out_spec is not None else None)
            write_manifest(tmp, meta, [LIBRARY], name=METADATA)
        return path


def _leaves(out) -> list:
    import tvm

    if isinstance(out, (tvm.runtime.Tensor,)):
        return [out]
    return [x for o in out for x in _leaves(o)]


def load(path: Union[str, Path]) -> TvmArtifact:
    """Load what :meth:`TvmArtifact.save` wrote; needs TVM's runtime, not the original model."""
    import tvm

    path = Path(path)
    # sizes and checksums before dlopen: loading a corrupted shared library can crash the process
    meta = read_manifest(path, version_key="format_version", version=FORMAT_VERSION, kind="tvm artifact",
                         name=METADATA, required=[LIBRARY])
    host_flags = _host_flags()
    missing = [f for f in meta.get("requires_flags", []) if f not in host_flags]
    if missing:
        raise ArtifactError(f"'{path}' was compiled for a CPU with {', '.join(missing)}, which this host lacks")
    b = meta["binder"]
    binder = InputBinder(b["positional"], b["keywords"], b.get("constants", {}))
    in_spec = pytree.treespec_loads(meta["in_spec"]) if meta.get("in_spec") else None
    out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None
    return TvmArtifact(tvm.runtime.load_module(str(path / LIBRARY)), binder, in_spec, out_spec, meta)


def _host_flags() -> frozenset:
    from .host import detect

    return detect().flags
