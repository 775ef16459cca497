"""The backend contract: one folder per backend under ``qcompile/backends/``, one entry in
:data:`BACKENDS`. A backend declares what it lowers in one :class:`Capabilities` record, and
:func:`lower` checks the converted graph against it before any backend code runs; the backend then
lowers a :class:`~qcompile.model.QuantizedModel` into an :class:`Artifact` called like the model.

This module is a low layer (other code below the backends reads it): it imports only ``errors``,
``formats``, ``spec`` and ``ops``."""
from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import torch

from ..errors import BackendError, closest
from ..formats import FORMATS
from ..ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ..spec import LAYER, LAYER_TYPE, ONLINE_ROTATION, QPARAMS, ROLE

# Weight granularities a backend may declare, and activation modes ("<static|dynamic> <granularity>")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_MODES = ("static per_tensor", "static per_channel", "dynamic per_tensor", "dynamic per_token",
                    "dynamic per_token_group")
STATIC_DYNAMIC = frozenset({"static per_tensor", "dynamic per_tensor", "dynamic per_token"})


def _table(table) -> Mapping[str, frozenset]:
    order = list(FORMATS)   # the format table's order, so messages read the same in every process
    rows = sorted(dict(table).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return MappingProxyType({fmt: frozenset(v) for fmt, v in rows})


@dataclass(frozen=True, eq=False)
class Capabilities:
    """The one declaration a backend makes of what it lowers. :func:`lower` reads it (through
    :func:`check_capabilities`) before any backend code runs; ``prepare`` reads ``quantized_outputs``
    (:func:`placement`); ``qcompile.latency`` reads ``timing`` (:func:`timing_module`).

    * ``weights``: format id → weight granularities (:data:`WEIGHT_GRANULARITIES`);
    * ``activations``: format id → activation modes (:data:`ACTIVATION_MODES`, e.g. ``"static
      per_tensor"``, ``"dynamic per_token"``);
    * ``float_zero_points``: whether ``QuantSpec.zero_point_dtype`` float (``x = s*q + min``) lowers;
    * ``ops``: the op kinds whose quantized weights it lowers (``linear``, ``conv``, ``embedding``);
    * ``kernel_only``: ``(role, format, granularity or mode)`` entries lowered only inside a fused
      kernel: after its fusion passes the backend calls :func:`check_kernels_took`, which names what
      no kernel took and why (kernel limits the table cannot say, e.g. a group that does not divide K);
    * ``fallback``: ``None`` (undeclared quantization is refused by name) or ``"pytorch"`` (it stays
      PyTorch ops in the artifact, named in its ``skipped``: the table then says what runs in the
      backend's own kernels);
    * ``quantized_outputs``: op kinds whose outputs it wants quantized too (integer chains: QLinearConv);
    * ``timing``: module path of its latency-timing protocol, or ``None`` with ``timing_missing``
      saying why;
    * ``error``: the :class:`BackendError` subclass its refusals raise (tvm: ``NotBuiltError``);
    * ``graph_ops``: whether it runs the graph's float ops between the Linears (False for formats
      that store weights for another runtime's fixed architecture: GGUF, compressed-tensors), so
      an op a pass inserted there (the online Hadamard of ``recipe.rotation.online``) is refused.

    Example::

        >>> Capabilities(weights={"int8": {"per_channel"}},
        ...              activations={"int8": {"static per_tensor", "dynamic per_token"}},
        ...              ops={"linear"})
    """

    weights: Mapping[str, frozenset] = field(default_factory=dict)
    activations: Mapping[str, frozenset] = field(default_factory=dict)
    float_zero_points: bool = False
    ops: frozenset = frozenset()
    kernel_only: frozenset = frozenset()
    fallback: Optional[str] = None
    quantized_outputs: frozenset = frozenset()
    timing: Optional[str] = None
    timing_missing: str = "latency timing is not built for this backend"
    error: type = BackendError
    graph_ops: bool = True

    def __post_init__(self):
        for name in ("weights", "activations"):
            object.__setattr__(self, name, _table(getattr(self, name)))
        for name in ("ops", "kernel_only", "quantized_outputs"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        bad = sorted({g for gs in self.weights.values() for g in gs} - set(WEIGHT_GRANULARITIES)) + \
            sorted({m for ms in self.activations.values() for m in ms} - set(ACTIVATION_MODES))
        if bad:
            raise ValueError(f"Capabilities: unknown granularity or mode '{bad[0]}' "
                             f"(weights: {WEIGHT_GRANULARITIES}; activations: {ACTIVATION_MODES})")
        if self.fallback not in (None, "pytorch"):
            raise ValueError(f"Capabilities.fallback must be None or 'pytorch', got {self.fallback!r}")

    def lowers(self, role: str, format: str, mode: str) -> bool:
        """Whether ``role`` (``"weight"`` / ``"activation"``) tensors in ``format`` at ``mode`` (a
        weight granularity or an activation mode) are declared."""
        table = self.weights if role == "weight" else self.activations
        return mode in table.get(format, ())

    def describe(self, role: str) -> str:
        """``int8/uint8 per_channel/per_tensor; int4 per_group`` for error messages."""
        table = self.weights if role == "weight" else self.activations
        rows: dict = {}
        for fmt, modes in table.items():
            rows.setdefault(tuple(sorted(modes)), []).append(fmt)
        return "; ".join(f"{'/'.join(fmts)} {', '.join(modes)}" for modes, fmts in rows.items()) or "none"


@runtime_checkable
class Artifact(Protocol):
    """What ``lower`` returns: callable like the model; ``save(path)`` writes it."""

    backend: str

    def __call__(self, *args, **kwargs): ...

    def save(self, path): ...


class Backend(Protocol):
    """A backend: an ``id``, its :class:`Capabilities`, and ``lower``, which may assume the graph
    passed :func:`check_capabilities` (:func:`lower` runs it first)."""

    id: str
    capabilities: Capabilities

    def lower(self, qmodel, **options) -> Artifact: ...


# backend id -> (module, class name, the extra that installs its dependencies)
BACKENDS = {
    "reference": ("qcompile.backends.reference", "ReferenceBackend", None),
    "onnx": ("qcompile.backends.onnx", "OnnxBackend", "onnx"),
    "tvm": ("qcompile.backends.tvm", "TvmBackend", "tvm"),
    "triton-cuda": ("qcompile.backends.triton", "TritonBackend", "triton"),
    "gguf": ("qcompile.backends.gguf", "GgufBackend", "gguf"),
    "compressed-tensors": ("qcompile.backends.compressed_tensors", "CompressedTensorsBackend", "ct"),
}
ALIASES = {"torch": "reference", "pytorch": "reference", "onnx-ort": "onnx", "tvm-llvm": "tvm", "triton": "triton-cuda", "llama.cpp": "gguf",
           "vllm": "compressed-tensors", "ct": "compressed-tensors"}


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
    impl = get_backend(backend)
    check_capabilities(qmodel.graph_module, impl)
    artifact = impl.lower(qmodel, **options)
    if not isinstance(artifact, torch.nn.Module) and hasattr(artifact, "__dict__") and \
            getattr(artifact, "qmodel", None) is None:
        artifact.qmodel = qmodel   # the source of the contract record a save writes (qcompile.contract)
    return artifact


def placement(backend: Optional[str]) -> Capabilities:
    """The capabilities ``prepare`` places Q/DQ for (its ``quantized_outputs``); no backend: the default."""
    return get_backend(backend).capabilities if backend else Capabilities()


def timing_module(backend: str):
    """The module implementing ``backend``'s latency-timing protocol (``ID``, ``version()``,
    ``lower(qmodel, target)``, ``time_artifact(...)``, ``time_branches(...)``), from its
    :attr:`Capabilities.timing`. ``NotImplementedError`` with the reason when the backend has none;
    :class:`BackendError` for an unknown backend or one whose packages are not installed.

    Example::

        >>> timer = timing_module("onnx")        # qcompile.backends.onnx.timing
        >>> timing_module("tvm")                 # NotImplementedError: latency budgets on tvm: ...
    """
    caps = get_backend(backend).capabilities
    if caps.timing is None:
        raise NotImplementedError(caps.timing_missing)
    return importlib.import_module(caps.timing)


def node_module(node) -> str:
    """Where a graph node came from, for error messages: ``module 'encoder.fc' (Linear)``. A quantize
    or dequantize carries its layer's path; the type is read from the op that consumes it."""
    layer, ltype = node.meta.get(LAYER), node.meta.get(LAYER_TYPE)
    if layer is None and node.meta.get("nn_module_stack"):
        layer, mtype = list(node.meta["nn_module_stack"].values())[-1]
        ltype = mtype if isinstance(mtype, str) else mtype.__name__
    if ltype is None:   # an activation's choose_qparams reaches its op through getitem, quantize, dequantize
        ltype = next((u.meta[LAYER_TYPE] for u in _readers(node) if u.meta.get(LAYER) == layer and LAYER_TYPE in u.meta),
                     None)
    if not layer:
        return "module <unknown>"
    return f"module '{layer}'" + (f" ({str(ltype).rsplit('.', 1)[-1]})" if ltype else "")


class QuantUse(NamedTuple):
    """One quantized tensor of a converted graph, as the contract sees it."""

    node: torch.fx.Node   # the choose_qparams / quantize / dequantize that implements it
    role: str             # "weight" | "activation"
    format: str
    mode: str             # a weight granularity or an activation mode ("dynamic per_token")
    float_zero_point: bool
    op: Optional[str]     # weights: the kind of op that reads them ("linear", "conv", "embedding")
    note: str = ""        # e.g. "double-quantized scales of a nf4 weight"

    def describe(self) -> str:
        return f"format '{self.format}' as {self.mode} {self.role}s" + (f" ({self.note})" if self.note else "")


_OP_KINDS = {"linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
             "conv_transpose1d": "conv", "conv_transpose2d": "conv", "conv_transpose3d": "conv",
             "embedding": "embedding", "embedding_bag": "embedding"}


def _op_kind(node) -> Optional[str]:
    for user in node.users:
        name = getattr(getattr(user.target, "_overloadpacket", user.target), "__name__", "")
        if name in _OP_KINDS:
            return _OP_KINDS[name]
    return None


def _tensor_meta(gm, node):
    """(shape, dtype) of a graph value: a buffer's tensor, or the traced ``val``; None when unknown."""
    if getattr(node, "op", None) == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part, None)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape), t.dtype
    val = getattr(node, "meta", {}).get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _choose_qparams_of(scale):
    if getattr(scale, "target", None) is operator.getitem and getattr(scale.args[0], "target", None) == CHOOSE_QPARAMS:
        return scale.args[0]
    return None


KV_CACHE_NOTE = "a quantized KV cache, Recipe.kv_cache"


def _kv_cache_entry(node) -> bool:
    """A quantized KV cache (:mod:`qcompile.llm.kv_quant`) crosses steps as graph inputs and outputs:
    its dequantize reads codes that are a graph input, its choose_qparams feeds a quantize whose
    codes are a graph output. No other quantized tensor is an input or output of the graph."""
    if node.target == DEQUANTIZE:
        return getattr(node.args[0], "op", None) == "placeholder"
    return any(q.target == QUANTIZE and any(u.op == "output" for u in q.users)
               for item in node.users for q in item.users)


def quant_uses(gm) -> Iterator[QuantUse]:
    """Every quantized tensor of a converted graph: dynamic activations at their ``choose_qparams``,
    static ones at their ``quantize``, weights at their ``dequantize`` of stored codes. The spec is
    read from ``node.meta`` (:data:`~qcompile.spec.QPARAMS`) where convert wrote it, else from the op
    arguments and the scale's shape (a graph re-exported by ``qcompile.load`` has no custom meta)."""
    for node in gm.graph.nodes:
        spec = node.meta.get(QPARAMS)
        if node.target == CHOOSE_QPARAMS:
            fmt, per_token = node.args[1], node.args[3]
            group = node.args[4] if len(node.args) > 4 else 0
            gran = "per_token_group" if group else ("per_token" if per_token else "per_tensor")
            yield QuantUse(node, "activation", fmt, f"dynamic {gran}", False, None,
                           KV_CACHE_NOTE if _kv_cache_entry(node) else "")
        elif node.target == QUANTIZE:
            if _choose_qparams_of(node.args[1]) is not None:
                continue   # a dynamic activation: its choose_qparams is the use
            fmt = node.args[3]
            if spec is not None and spec.format == fmt:
                gran = spec.granularity
            else:
                meta = _tensor_meta(gm, node.args[1])
                gran = "per_tensor" if meta is None or torch.Size(meta[0]).numel() == 1 else "per_channel"
            yield QuantUse(node, "activation", fmt, f"static {gran}", _float_zero_point(gm, node, spec), None)
        elif node.target == DEQUANTIZE:
            if getattr(node.args[0], "target", None) in (QUANTIZE, CHOOSE_QPARAMS) or \
                    _choose_qparams_of(node.args[1]) is not None:
                continue   # an activation's dequantize: its quantize is the use
            fmt, group = node.args[3], node.args[4]
            if _kv_cache_entry(node):   # the cache read back: quantized per head/token when it was written
                yield QuantUse(node, "activation", fmt, "dynamic per_token", False, None, KV_CACHE_NOTE)
                continue
            note = ""
            if spec is not None and spec.format == fmt:
                gran = spec.granularity
            else:
                if spec is not None:   # the int8 codes of a weight's scales or zero points (scale_dtype int8)
                    note = f"double-quantized scales of a {spec.format} weight"
                meta = _tensor_meta(gm, node.args[1])
                gran = "per_group" if group else (
                    "per_tensor" if meta is None or torch.Size(meta[0]).numel() == 1 else "per_channel")
            yield QuantUse(node, "weight", fmt, gran, _float_zero_point(gm, node, spec), _op_kind(node), note)


def _float_zero_point(gm, node, spec) -> bool:
    if spec is not None and spec.format == node.args[3]:
        return spec.float_zero_point
    z = node.args[2]
    meta = None if z is None else _tensor_meta(gm, z)
    return meta is not None and meta[1].is_floating_point


def _refusal(use: QuantUse, backend: str, caps: Capabilities, what: str, lowers: str) -> BackendError:
    fix = ("set the recipe's kv_cache to null or to a format it lowers" if use.note == KV_CACHE_NOTE else
           "keep that layer float with an override")
    return caps.error(f"node '{use.node.name}' of {node_module(use.node)}: backend '{backend}' {what} "
                      f"({lowers}); {fix}, or choose another recipe or backend")


def check_capabilities(gm, backend) -> None:
    """The generic check :func:`lower` runs before any backend code: the backend's
    ``Capabilities.error`` naming the node, its module path, the format and granularity and what
    the backend does lower, for the first quantized tensor (:func:`quant_uses`) it does not declare.
    A backend with ``fallback="pytorch"`` refuses nothing (undeclared tensors stay PyTorch ops)."""
    caps, name = backend.capabilities, backend.id
    if not caps.graph_ops:
        online = next((n for n in gm.graph.nodes if n.meta.get(ROLE) == ONLINE_ROTATION), None)
        if online is not None:
            raise caps.error(f"node '{online.name}' of {node_module(online)}: backend '{name}' stores weights for a "
                             "fixed architecture and cannot carry the online Hadamard rotation inserted there "
                             "(recipe.rotation.online); set rotation.online to false, or choose a graph backend "
                             "(reference, onnx, tvm)")
    if caps.fallback is not None:
        return
    for use in quant_uses(gm):
        if not caps.lowers(use.role, use.format, use.mode):
            raise _refusal(use, name, caps, f"does not lower {use.describe()}",
                           f"it lowers {use.role}s: {caps.describe(use.role)}")
        if use.float_zero_point and not caps.float_zero_points:
            spec = use.node.meta.get(QPARAMS)
            dtype = f"zero_point_dtype: {spec.zero_point_dtype}, " if spec is not None else ""
            raise _refusal(use, name, caps, f"cannot express a float zero point ({dtype}x = s*q + min)",
                           "its integer kernels take an integer zero point: use zero_point_dtype: code")
        if use.op is not None and caps.ops and use.op not in caps.ops:
            raise _refusal(use, name, caps, f"does not lower quantized {use.op} weights",
                           f"it lowers {', '.join(sorted(caps.ops))}")


def check_kernels_took(gm, backend: str, skipped: dict) -> None:
    """After a backend's fusion passes: its ``Capabilities.error`` for the first quantized tensor
    declared ``kernel_only`` that no kernel took, with the fusion pass's reason (``skipped``: op
    node name → why it did not fuse), e.g. an int4 group that does not divide K."""
    caps = get_backend(backend).capabilities
    for use in quant_uses(gm):
        if (use.role, use.format, use.mode) in caps.kernel_only:
            why = "; ".join(f"{u.name}: {skipped[u.name]}" for u in _readers(use.node) if u.name in skipped)
            raise _refusal(use, backend, caps, f"lowers {use.describe()} only inside a "
                           "fused kernel, and none took this one", why or "no fusion pass matched it")


def _readers(node, depth: int = 4) -> list:
    """The nodes within ``depth`` uses of ``node`` (a dynamic activation's choose_qparams reaches its
    Linear through getitem, quantize and dequantize)."""
    out, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        out += frontier
    return out
