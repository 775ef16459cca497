"""The backend protocol: one folder per backend under ``qcompile/backends/``, one entry in
:data:`BACKENDS`. A backend declares what it runs natively (:class:`Capabilities`) and lowers a
:class:`~qcompile.model.QuantizedModel` into an :class:`Artifact` called like the model."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import BackendError, closest


@dataclass(frozen=True)
class Capabilities:
    formats: frozenset = field(default_factory=frozenset)         # format ids run natively
    granularities: frozenset = field(default_factory=frozenset)
    ops: frozenset = field(default_factory=frozenset)             # "linear", "conv", "embedding"
    dynamic_activations: bool = False
    # op kinds whose outputs the backend wants quantized too (integer chains: QLinearConv)
    quantized_outputs: frozenset = field(default_factory=frozenset)


@runtime_checkable
class Artifact(Protocol):
    """What ``lower`` returns: callable like the model; ``save(path)`` writes it."""

    backend: str

    def __call__(self, *args, **kwargs): ...

    def save(self, path): ...


class Backend(Protocol):
    id: str
    capabilities: Capabilities

    def lower(self, qmodel, **options) -> Artifact: ...


# backend id -> (module, class name, the extra that installs its dependencies)
BACKENDS = {
    "reference": ("qcompile.backends.reference", "ReferenceBackend", None),
    "onnx": ("qcompile.backends.onnx", "OnnxBackend", "onnx"),
    "tvm": ("qcompile.backends.tvm", "TvmBackend", "tvm"),
    "triton-cuda": ("qcompile.backends.triton", "TritonBackend", "triton"),
}
ALIASES = {"torch": "reference", "pytorch": "reference", "onnx-ort": "onnx", "tvm-llvm": "tvm", "triton": "triton-cuda"}


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; a clear error naming the extra when its dependencies
    are not installed."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; {closest(name, BACKENDS)}")
    module, cls, extra = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = f": pip install 'qcompile[{extra}]'" if extra else ""
        raise BackendError(f"backend '{name}' needs packages that are not installed ({e.name}){hint}") from e
    return getattr(mod, cls)()


def lower(qmodel, backend: str = "reference", **options) -> Artifact:
    """Lower a quantized model to ``backend``. ``reference`` returns the PyTorch Q/DQ model itself:
    the numerical ground truth other backends are checked against.

    Example::

        >>> art = qcompile.lower(qmodel, backend="reference")
        >>> out = art(input_ids, attention_mask)
    """
    return get_backend(backend).lower(qmodel, **options)
