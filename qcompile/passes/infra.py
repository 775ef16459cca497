"""Pass infrastructure: a pass is a small callable over a GraphModule with ``requires / call /
ensures``; the manager runs a list, recompiles, names the failing pass and those before it, and
can dump the graph after each pass.

Example::

    >>> class DropDropoutPass(Pass):
    ...     name = "drop_dropout"
    ...     def call(self, gm):
    ...         ...  # edit gm.graph
    ...         return PassResult(gm, modified=True)
    >>> PassManager([DropDropoutPass()], dump_dir="graphs")(gm)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import PassError, QCompileError


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


class Pass:
    """Base class. Passes mutate the GraphModule they get (it is qcompile's own captured copy,
    never the user's model) and say whether they changed it."""

    name: str = "pass"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Raise if ``gm`` is not in the state this pass expects."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Raise if the pass left ``gm`` in a state it promised not to."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            result.graph_module.graph.eliminate_dead_code()
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        self.ensures(result.graph_module)
        return result


class PassManager:
    """Runs passes in order. ``dump_dir``: write ``NN_<pass>.txt`` (the graph) after each pass."""

    def __init__(self, passes: Sequence[Pass], dump_dir: Optional[str] = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.log: list[tuple[str, bool]] = []

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for i, p in enumerate(self.passes):
            try:
                result = p(gm)
            except QCompileError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised naming the pass
                before = ", ".join(q.name for q in self.passes[:i]) or "none"
                raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e} "
                                f"(passes run before it: {before})") from e
            gm = result.graph_module
            modified |= result.modified
            self.log.append((p.name, result.modified))
            if self.dump_dir:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                (self.dump_dir / f"{i:02d}_{p.name}.txt").write_text(str(gm.graph))
        return PassResult(gm, modified)


def get_attr_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node, or None for any other node."""
    if node is None or not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def constant_value(gm: torch.fx.GraphModule, node) -> Optional[torch.Tensor]:
    """The value of ``node`` when it depends on constants only (``get_attr`` tensors and literals
    through pure ``call_function`` nodes, e.g. double-quantized scales the graph rebuilds from their
    int8 codes), evaluated with the graph's own ops, so the result is bit-identical to what the
    graph computes; None when it depends on an input."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return get_attr_tensor(gm, node)
    if node.op != "call_function":
        return None
    resolved = []
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, torch.fx.Node):
            v = constant_value(gm, a)
            if v is None:
                return None
            resolved.append(v)
    it = iter(resolved)
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda _: next(it))
    out = node.target(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else None


def add_tensor(gm: torch.fx.GraphModule, name: str, value: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """Register ``value`` as a new buffer of ``gm`` under a unique name derived from ``name`` and
    return a ``get_attr`` node for it inserted before ``before``. Never overwrites a tensor."""
    base = name.replace(".", "_")
    unique, i = base, 0
    while hasattr(gm, unique):
        i += 1
        unique = f"{base}_{i}"
    gm.register_buffer(unique, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(unique)


def tensor_owner(gm: torch.nn.Module, name: str):
    """(the submodule holding the tensor ``name``, its attribute name) for a dotted state name."""
    owner_name, _, attr = name.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), attr


def prune_unused_tensors(gm: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads any more (the float weights that
    quantized codes replaced), and submodules left empty. Returns how many tensors were removed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        owner, attr = tensor_owner(gm, name)
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        removed += 1
    for name, module in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and name not in called and name not in used and not any(True for _ in module.parameters()) \
                and not any(True for _ in module.buffers()) and not any(True for _ in module.children()) \
                and not any(c.startswith(name + ".") for c in called | used):
            parent, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, attr)
    return removed
