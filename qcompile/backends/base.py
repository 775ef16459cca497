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


def placement(backend: "str | None") -> Capabilities:
    """What the pipeline places quantize/dequantize by: the capabilities of ``backend`` (a recipe's
    ``backend`` field), or the defaults when it names none."""
    return get_backend(backend).capabilities if backend else Capabilities()


def lower(qmodel, backend: str = "reference", **options) -> Artifact:
    """Lower a quantized model to ``backend``. ``reference`` returns the PyTorch Q/DQ model itself:
    the numerical ground truth other backends are checked against.

    Example::

        >>> art = qcompile.lower(qmodel, backend="reference")
        >>> out = art(input_ids, attention_mask)
    """
    return get_backend(backend).lower(qmodel, **options)


def node_module(node) -> str:
    """Where a graph node came from, for error messages: ``module 'encoder.fc' (Linear)``. A weight's
    dequantize carries its layer's path; the type is read from the op that consumes it."""
    from ..spec import LAYER, LAYER_TYPE

    layer, ltype = node.meta.get(LAYER), node.meta.get(LAYER_TYPE)
    if layer is None and node.meta.get("nn_module_stack"):
        layer, mtype = list(node.meta["nn_module_stack"].values())[-1]
        ltype = mtype if isinstance(mtype, str) else mtype.__name__
    if ltype is None:
        ltype = next((u.meta[LAYER_TYPE] for u in node.users if u.meta.get(LAYER) == layer and LAYER_TYPE in u.meta),
                     None)
    if not layer:
        return "module <unknown>"
    return f"module '{layer}'" + (f" ({str(ltype).rsplit('.', 1)[-1]})" if ltype else "")


def check_formats(gm, backend: str, formats, group_wise: bool = True, error: type = BackendError) -> None:
    """Before lowering: ``error`` naming the node and module of the first quantize / dequantize /
    choose_qparams whose format ``backend`` does not lower (or that is group-wise, when it has no
    group-wise kernels), instead of a failure deep inside an exporter or compiler."""
    from ..ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE

    for node in gm.graph.nodes:
        if node.target in (QUANTIZE, DEQUANTIZE):
            fmt, group = node.args[3], node.args[4]
        elif node.target == CHOOSE_QPARAMS:
            fmt, group = node.args[1], (node.args[4] if len(node.args) > 4 else 0)
        else:
            continue
        if fmt not in formats:
            raise error(f"node '{node.name}' of {node_module(node)}: backend {backend} does not lower format "
                        f"'{fmt}' here (it lowers {', '.join(sorted(formats))}); keep that layer float with an "
                        "override or choose another recipe/backend")
        if group and not group_wise:
            raise error(f"node '{node.name}' of {node_module(node)}: backend {backend} has no group-wise "
                        f"kernels (group_size={group}); use per_channel weights for this backend")
    check_integer_zero_points(gm, backend, error)


def check_integer_zero_points(gm, backend: str, error: type = BackendError) -> None:
    """``error`` naming the first quantize / dequantize with a float zero point
    (``QuantSpec.zero_point_dtype``, ``x = s*q + min``), for backends whose kernels and Q/DQ ops
    take integer zero points only. Call it before any fusion reads the zero points."""
    from ..ops import DEQUANTIZE, QUANTIZE
    from ..spec import QPARAMS

    for node in gm.graph.nodes:
        spec = node.meta.get(QPARAMS) if node.target in (QUANTIZE, DEQUANTIZE) else None
        if spec is not None and getattr(spec, "float_zero_point", False):
            raise error(f"node '{node.name}' of {node_module(node)}: backend {backend} cannot express a float "
                        f"zero point (zero_point_dtype: {spec.zero_point_dtype}, x = s*q + min); its integer "
                        "kernels take an integer zero point: use zero_point_dtype: code, or the reference backend")
