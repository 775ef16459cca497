"""Capture a model with ``torch.export``: dynamic batch/sequence dims, node → module-path map, and
errors that name the module being traced, the reason and a hint.

Example::

    >>> cap = capture(model, (input_ids, attention_mask))
    >>> cap.graph_module            # an fx GraphModule, called like the model
"""
from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim
from torch.utils import _pytree as pytree

from .budget import BudgetExceeded, time_budget
from .errors import CalibrationError, CaptureError, summarize
from .spec import LAYER, LAYER_TYPE


@dataclass
class InputBinder:
    """Maps any calibration item (a tuple of positional args, or a kwargs dict) onto the call
    structure the model was captured with, naming the input that is missing or extra."""

    positional: list[str]
    keywords: list[str]
    constants: dict = field(default_factory=dict)  # non-tensor kwargs fixed at capture (use_cache=False)

    def bind(self, item) -> tuple[tuple, dict]:
        if isinstance(item, dict):
            unknown = set(item) - set(self.positional) - set(self.keywords) - set(self.constants)
            if unknown:
                raise CalibrationError(f"calibration input has unknown key(s) {sorted(unknown)}; "
                                       f"the model was captured with {self.positional + self.keywords}")
            missing = [n for n in self.positional + self.keywords if n not in item]
            if missing:
                raise CalibrationError(f"calibration input lacks {missing}; the model was captured with "
                                       f"{self.positional + self.keywords}")
            args = tuple(item[n] for n in self.positional)
            kwargs = {n: item[n] for n in self.keywords}
        else:
            if isinstance(item, torch.Tensor):
                item = (item,)
            if not isinstance(item, (tuple, list)):
                raise CalibrationError(f"a calibration item must be a tuple of positional inputs or a dict "
                                       f"of keyword inputs, got {type(item).__name__}")
            if len(item) != len(self.positional) + len(self.keywords):
                raise CalibrationError(f"calibration item has {len(item)} inputs; the model was captured with "
                                       f"{len(self.positional) + len(self.keywords)} ({self.positional + self.keywords})")
            args = tuple(item[: len(self.positional)])
            kwargs = dict(zip(self.keywords, item[len(self.positional):]))
        kwargs.update(self.constants)
        return args, kwargs

    def apply(self, fn, item):
        """``fn`` called on one calibration item bound to the captured structure."""
        args, kwargs = self.bind(item)
        return fn(*args, **kwargs)

    def call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A live call's ``(args, kwargs)`` in the captured structure: positional inputs passed by
        keyword are moved to their slots, the fixed constants are filled in."""
        if any(n in kwargs for n in self.positional[len(args):]):
            args = tuple(args) + tuple(kwargs.pop(n) for n in self.positional[len(args):] if n in kwargs)
            kwargs = dict(kwargs)
        return tuple(args), {**self.constants, **kwargs}

    def to_dict(self) -> dict:
        return {"positional": self.positional, "keywords": self.keywords, "constants": self.constants}


@dataclass
class Captured:
    graph_module: torch.fx.GraphModule
    binder: InputBinder
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any
    layer_types: dict[str, str]   # module path -> class name, for "type:" overrides


def auto_dims(value: torch.Tensor) -> list[int]:
    """The dims ``dynamic_shapes="auto"`` leaves free on one tensor input, chosen as a user would:

    * a float tensor of rank 4 or 5 (an image or a video, ``[B, C, H, W]``): the batch only. Free
      channel and spatial dims turn window or patch arithmetic (Swin's padding to a multiple of
      the window) into symbolic expressions torch.export and the ONNX exporter may take minutes
      to bound; a user who needs other image sizes passes ``dynamic_shapes=`` (see ``capture``);
    * any other tensor (token ids, masks, positions ``[B, S]``; sequence features ``[B, S, F]``,
      audio ``[B, T]``, ``[B, C, T]``): every dim, as ``Dim.AUTO``, so batch and sequence stay free
      and a dim a weight fixes (features, channels) is specialised by torch.export without error.
    """
    if value.is_floating_point() and value.dim() in (4, 5):
        return [0]
    return list(range(value.dim()))


def _auto_dynamic(value):
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in auto_dims(value)}
    return pytree.tree_map(lambda v: {i: Dim.AUTO for i in auto_dims(v)} if isinstance(v, torch.Tensor) else None,
                           value)


def _batch_dynamic(value):
    return pytree.tree_map(lambda v: {0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None, value)


CAPTURE_BUDGET_S = 300.0   # seconds torch.export may take in capture() before a CaptureError (None: no limit)


def describe_dynamic(dynamic_shapes) -> str:
    """Which inputs and dims a ``dynamic_shapes`` spec leaves free, for error messages:
    ``input 'pixel_values' dims 0, 1, 2, 3``; ``none`` for a static spec."""
    if dynamic_shapes is None:
        return "none (static shapes)"
    if not isinstance(dynamic_shapes, dict):
        return str(dynamic_shapes)
    parts = [f"input '{name}' dim{'s' if len(dims) > 1 else ''} {', '.join(str(d) for d in sorted(dims))}"
             for name, dims in dynamic_shapes.items() if isinstance(dims, dict) and dims]
    return "; ".join(parts) or "none (static shapes)"


def batch_only(dynamic_shapes) -> str:
    """The same spec with only dim 0 of each input free, written as the user would pass it."""
    if not isinstance(dynamic_shapes, dict):
        return "{'<input>': {0: Dim.AUTO}}"
    items = [f"'{name}': {{0: Dim.AUTO}}" for name, dims in dynamic_shapes.items() if isinstance(dims, dict) and dims]
    return "{" + ", ".join(items) + "}"


def capture(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None,
            dynamic_shapes: Any = "auto", training: bool = False, budget_s: Optional[float] = None) -> Captured:
    """Export ``model`` on ``example_inputs``.

    ``dynamic_shapes="auto"`` (see :func:`auto_dims`) keeps the batch of every input free, and the
    sequence of token inputs and sequence features; the channel and spatial dims of image-like
    inputs (float, 4-D or 5-D) stay static. A model with recurrent layers (``nn.LSTM``, ``nn.GRU``,
    ``nn.RNN``) keeps only the batch free: quantizing them unrolls the recurrence over a fixed number
    of steps (:mod:`qcompile.passes.recurrent`). Pass ``None`` for fully static shapes or a
    ``torch.export`` spec of your own, e.g. ``{"pixel_values": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}``
    for images of any size. ``training=True`` captures the training graph (batch-norm with batch
    statistics, live dropout) for QAT. Sizes 0/1 in the examples are specialised by
    ``torch.export``: give examples with batch and sequence ≥ 2. ``budget_s`` (default
    :data:`CAPTURE_BUDGET_S`): a capture still running after it stops with a :class:`CaptureError`
    naming the dynamic inputs and dims (symbolic shapes torch.export cannot bound quickly).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    example_kwargs = dict(example_kwargs or {})
    binder = input_binder(model, example_inputs, example_kwargs)
    positional, constants = binder.positional, binder.constants
    tensor_kwargs = {k: example_kwargs[k] for k in binder.keywords}
    if dynamic_shapes == "auto":
        # an LSTM/GRU/RNN is quantized unrolled over a fixed number of steps: only the batch stays free
        auto = _batch_dynamic if any(isinstance(m, nn.RNNBase) for m in model.modules()) else _auto_dynamic
        dynamic_shapes = {**{n: auto(a) for n, a in zip(positional, example_inputs)},
                          **{k: auto(v) for k, v in tensor_kwargs.items()},
                          **{k: None for k in constants}}
        if any(n.startswith("arg") for n in positional):  # *args forward: name-keyed spec impossible
            dynamic_shapes = None
    was_training = model.training
    model.train(training)
    try:
        ep = _export(model, example_inputs, example_kwargs, dynamic_shapes,
                     CAPTURE_BUDGET_S if budget_s is None else budget_s)
    finally:
        model.train(was_training)
    gm = ep.module()
    layer_types = {name: type(m).__name__ for name, m in model.named_modules()}
    _tag_layers(gm)
    return Captured(gm, binder, example_inputs, example_kwargs, dynamic_shapes, layer_types)


def input_binder(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None) -> InputBinder:
    """How calls to ``model`` are structured: positional names from ``forward``'s signature, tensor
    keyword inputs, and non-tensor keywords fixed as constants."""
    example_kwargs = dict(example_kwargs or {})
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [p.name for p in params[: len(example_inputs)]]
    if len(positional) < len(example_inputs):
        positional += [f"arg{i}" for i in range(len(positional), len(example_inputs))]
    tensor_kwargs = [k for k, v in example_kwargs.items() if _has_tensor(v)]
    constants = {k: v for k, v in example_kwargs.items() if k not in tensor_kwargs}
    return InputBinder(positional, tensor_kwargs, constants)


def _has_tensor(v) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))


def _export(model, args, kwargs, dynamic_shapes, budget_s=None):
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(mod, _args):
        stack.append(names[mod] or "<root>")

    def leave(mod, _args, _out):  # a forward hook must return None, or it replaces the output
        if stack:
            stack.pop()

    for m in names:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    def where():
        module = stack[-1] if stack else "<root> (its inputs or outputs)"
        mtype = type(model.get_submodule(module)).__name__ if stack and module != "<root>" else type(model).__name__
        return f"module '{module}' ({mtype})"

    t0 = time.monotonic()
    try:
        with time_budget(budget_s):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    except BudgetExceeded:
        raise CaptureError(
            f"torch.export did not finish capturing {type(model).__name__} within its budget of {budget_s:g} s "
            f"(stopped after {time.monotonic() - t0:.1f} s in {where()}); dynamic: {describe_dynamic(dynamic_shapes)}\n"
            f"hint: symbolic shapes on these dims (window or patch padding arithmetic) can take torch.export "
            f"minutes to bound: keep them static with dynamic_shapes= (e.g. dynamic_shapes={batch_only(dynamic_shapes)} "
            f"keeps only the batch free), or raise qcompile.capture.CAPTURE_BUDGET_S") from None
    except Exception as e:  # noqa: BLE001 - re-raised with context
        reason = summarize(str(e)) if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture {where()}: {reason}\n"
                           f"hint: {_hint(str(e))}") from e
    finally:
        for h in handles:
            h.remove()


_HINTS = [
    (r"DynamicCache|Cache'?>? in output|register a pytree", "the model returns a KV cache object: capture with the cache "
     "disabled, e.g. example_kwargs={'use_cache': False}"),
    (r"data.dependent|GuardOnDataDependent|item\(\)|nonzero", "control flow or shapes depend on tensor values: "
     "move that logic out of forward, use torch.cond, or torch._check the value"),
    (r"Constraints violated|specializ|Not all values of|dynamic_shapes", "a dimension marked dynamic is forced static "
     "by the model: pass dynamic_shapes=None (static) or your own torch.export spec"),
    (r"not a known type|unsupported.*type|pytree", "an input or output is a type torch.export cannot flatten: "
     "register it with torch.utils._pytree or return tensors/tuples/dicts"),
]


def _hint(msg: str) -> str:
    for pattern, hint in _HINTS:
        if re.search(pattern, msg, flags=re.IGNORECASE):
            return hint
    return ("the error above was raised in that module's forward while torch.export traced it: make it traceable "
            "(tensor ops, no Python logic on tensor values) or capture a model without it; examples with batch "
            "and sequence >= 2 avoid 0/1 specialisation")


def _tag_layers(gm: torch.fx.GraphModule) -> None:
    """Write each node's innermost module path and type into ``node.meta`` (LAYER, LAYER_TYPE)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, mtype = list(stack.values())[-1]
            node.meta[LAYER] = path
            node.meta[LAYER_TYPE] = (mtype if isinstance(mtype, str) else mtype.__name__).rsplit(".", 1)[-1]
        elif node.op == "get_attr":
            node.meta[LAYER] = node.target.rsplit(".", 1)[0]


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat placeholder values of a captured GraphModule for ``(args, kwargs)``."""
    spec = getattr(gm, "_in_spec", None)
    flat, got = pytree.tree_flatten((args, kwargs))
    if spec is not None and got != spec:
        # kwargs in another order: reorder by the captured spec's key order
        keys = spec.children_specs[1].context if hasattr(spec, "children_specs") else list(kwargs)
        flat, got = pytree.tree_flatten((args, {k: kwargs[k] for k in keys}))
    return flat



def check_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, error: type = CalibrationError) -> list:
    """The flat inputs of ``gm`` for ``(args, kwargs)``, checked against what the graph was captured
    with: the count, and for each tensor its dtype, rank, static sizes and the sizes it must share
    with other inputs (one symbol in ``torch.export``'s shapes). Raises ``error`` naming the input,
    where running the graph would fail with a guard, a ``TreeSpec`` or a kernel's dtype error."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(n.target) for n in placeholders]   # the forward's argument names (node names may be suffixed)
    try:
        flat = flatten_inputs(gm, args, kwargs)
    except KeyError as e:
        raise error(f"input {e} is missing; the model was captured with inputs {names}") from None
    if len(flat) != len(placeholders):
        raise error(f"got {len(flat)} input(s); the model was captured with {len(placeholders)}: {names}")
    if torch.compiler.is_compiling() or any(isinstance(v, FakeTensor) for v in flat):
        return flat   # being traced (export/compile of a wrapper): comparing symbolic sizes would add guards
    symbols: dict = {}
    for node, value in zip(placeholders, flat):
        want = node.meta.get("val")
        if not isinstance(want, torch.Tensor):
            continue
        name = str(node.target)
        shape = "[" + ", ".join(str(d) if isinstance(d, int) else "dynamic" for d in want.shape) + "]"
        if not isinstance(value, torch.Tensor):
            raise error(f"input '{name}' must be a tensor ({want.dtype}, shape {shape}), got {type(value).__name__}")
        if value.dtype != want.dtype:
            raise error(f"input '{name}' has dtype {value.dtype}; the model was captured with {want.dtype}")
        if value.dim() != want.dim():
            raise error(f"input '{name}' has shape {list(value.shape)} ({value.dim()} dims); the model was captured "
                        f"with {want.dim()} dims, shape {shape}")
        for i, (got, dim) in enumerate(zip(value.shape, want.shape)):
            if isinstance(dim, int):
                if got != dim:
                    raise error(f"input '{name}' has size {got} at dim {i} (shape {list(value.shape)}); the model was "
                                f"captured with a static size {dim} there (shape {shape}); to run other sizes, "
                                f"quantize with dynamic_shapes={{'{name}': {{{i}: Dim.AUTO}}}} (a recurrent layer "
                                f"then stays float, listed in the report), or pad the input to {dim}")
                continue
            expr = dim.node.expr
            if getattr(expr, "is_Symbol", False):   # the same symbol on two inputs: sizes must agree
                first = symbols.setdefault(expr, (name, i, got))
                if first[2] != got:
                    raise error(f"input '{name}' has size {got} at dim {i}, but input '{first[0]}' has size "
                                f"{first[2]} at dim {first[1]}; the model was captured with these sizes equal")
    return flat


def call_checked(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, error: type = CalibrationError):
    """``gm(*args, **kwargs)`` after :func:`check_inputs`; a shape relation only ``torch.export``'s
    guards know (``8 * (h // 2) * (w // 2) == 128``) becomes ``error`` quoting the guard, which names
    the inputs."""
    check_inputs(gm, args, kwargs, error)
    try:
        return gm(*args, **kwargs)
    except AssertionError as e:
        if "Guard failed" not in str(e):
            raise
        guard = str(e).strip().removeprefix("Guard failed:").strip()
        names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        shapes = {n: list(v.shape) for n, v in zip(names, flatten_inputs(gm, args, kwargs)) if isinstance(v, torch.Tensor)}
        named = [n for n in names if re.search(rf"\b{re.escape(n)}\.size\(\)", guard)] or names
        got = ", ".join(f"input '{n}' has shape {shapes.get(n)}" for n in named)
        raise error(f"{got}; the model was captured with the shape relation {guard}, which it breaks") from e


def example_to_dict(example, binder: InputBinder,
                    exported: Optional[torch.export.ExportedProgram] = None) -> Optional[dict]:
    """The capture examples ``(args, kwargs, dynamic_shapes)`` as JSON data, so a loaded model can
    be exported again (lowered to a backend): each input's shape and dtype (not its values) and its
    dynamic dims. With ``exported`` (the program these examples exported), each dynamic dim also
    gets the symbol and range torch.export gave it (``dims``: ``{dim: {"symbol", "min", "max"}}``,
    ``max`` ``None`` when unbounded), so a user's ``Dim(max=...)`` and a bound torch.export found
    in the graph (BERT's 512 positions) survive, and inputs sharing a symbol stay equal.
    ``None`` when an input is not a plain tensor or the dynamic-shape spec is not keyed by name."""
    args, kwargs, dynamic_shapes = example
    if dynamic_shapes is not None and not isinstance(dynamic_shapes, dict):
        return None
    named = {**dict(zip(binder.positional, args)), **{k: kwargs[k] for k in binder.keywords}}
    exported_dims = _exported_dims(exported) if exported is not None and dynamic_shapes is not None else {}
    inputs = {}
    for name, t in named.items():
        dyn = (dynamic_shapes or {}).get(name)
        if not isinstance(t, torch.Tensor) or (dyn is not None and not isinstance(dyn, dict)):
            return None
        inputs[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "dynamic": sorted(int(i) for i in (dyn or {}))}
        if name in exported_dims:
            inputs[name]["dims"] = exported_dims[name]
    return {"inputs": inputs, "dynamic": dynamic_shapes is not None}


def _exported_dims(ep: torch.export.ExportedProgram) -> dict[str, dict]:
    """Input name → ``{dim: {"symbol", "min", "max"}}`` for the dynamic dims of ``ep``'s user
    inputs. A dim that is an expression of symbols (``2*s0``) gets ``{"auto": True}``: torch.export
    derives it again from the graph."""
    user_inputs = set(ep.graph_signature.user_inputs)
    out = {}
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user_inputs or not isinstance(val, torch.Tensor):
            continue
        dims = {}
        for i, d in enumerate(val.shape):
            if not isinstance(d, torch.SymInt):
                continue
            expr = d.node.expr
            if not getattr(expr, "is_Symbol", False) or expr not in ep.range_constraints:
                dims[str(i)] = {"auto": True}
                continue
            vr = ep.range_constraints[expr]   # the upper end is torch's int_oo when unbounded
            dims[str(i)] = {"symbol": str(expr), "min": int(vr.lower),
                            "max": int(vr.upper) if vr.upper.is_Integer else None}
        out[str(node.target)] = dims
    return out


def example_from_dict(data: dict, binder: InputBinder) -> tuple:
    """Inverse of :func:`example_to_dict`: zero tensors of the saved shapes (values do not matter
    to ``torch.export``; sizes do; zeros are valid token ids) and a dynamic-shape spec: one
    ``Dim(symbol, min=, max=)`` per saved symbol, shared by the inputs that shared it; a saved
    record without ``dims`` (written before the ranges were saved) gets ``Dim.AUTO`` on its
    dynamic dims, which loses a user's bounds but not torch.export's own."""
    tensors = {n: torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for n, s in data["inputs"].items()}
    args = tuple(tensors[n] for n in binder.positional)
    kwargs = {**{k: tensors[k] for k in binder.keywords}, **binder.constants}
    dynamic = None
    if data["dynamic"]:
        symbols: dict[str, Dim] = {}

        def dim(saved: dict):
            if saved.get("auto"):
                return Dim.AUTO
            name = saved["symbol"]
            if name not in symbols:
                symbols[name] = Dim(name, min=saved["min"], max=saved["max"])
            return symbols[name]

        dynamic = {n: {int(i): dim(d) for i, d in s["dims"].items()} if "dims" in s
                   else {i: Dim.AUTO for i in s["dynamic"]} for n, s in data["inputs"].items()}
        dynamic.update({k: None for k in binder.constants})
    return args, kwargs, dynamic
