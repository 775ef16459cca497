"""Pass infrastructure: a pass is a small callable over a GraphModule with ``requires / call /
ensures`` that returns a typed :class:`PassResult` (what it changed, what it skipped and why); the
:class:`PassManager` runs an ordered list of stages — graph passes and calibration steps alike — as
one run: one dump numbering, one log of every stage's result and time (grouped by *phase*), and a
failure that names the failing stage and every stage before it, across ``prepare`` and ``convert``.

Example::

    >>> class DropDropoutPass(Pass):
    ...     name = "drop_dropout"
    ...     def call(self, gm):
    ...         ...  # edit gm.graph
    ...         return PassResult(gm, modified=True, changed=["dropout"])
    >>> pm = PassManager([DropDropoutPass()], dump_dir="graphs")
    >>> pm(gm); pm.log
    [('drop_dropout', True)]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch

from ..errors import PassError, QCompileError
from ..spec import LAYER


@dataclass
class PassResult:
    """What one stage did. Passes with more to say subclass it with typed fields (e.g.
    :class:`~qcompile.passes.annotate.AnnotateResult`); the pipeline reads those from the log."""

    graph_module: torch.fx.GraphModule
    modified: bool
    changed: list = field(default_factory=list)    # layers or nodes it changed
    skipped: dict = field(default_factory=dict)    # layer or node -> why it was left alone


R = TypeVar("R", bound=PassResult)


class Pass:
    """Base class. Passes mutate the GraphModule they get (it is qcompile's own captured copy,
    never the user's model), keep no state from one call to the next, and describe what they did
    in the :class:`PassResult` they return."""

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


@dataclass(frozen=True)
class Stage:
    """One entry of a pipeline: a pass (or a calibration step, which is a pass that leaves the graph
    alone), the phase it belongs to (timings and dumps are grouped by it), and an optional
    condition read from the graph when the stage's turn comes (e.g. "some activation is quantized")."""

    step: Pass
    phase: str = ""
    when: Optional[Callable[[torch.fx.GraphModule], bool]] = None

    @property
    def name(self) -> str:
        return self.step.name


@dataclass
class StageRecord:
    """The log entry of one stage that ran (or was skipped by its condition: ``result`` None)."""

    index: int
    name: str
    phase: str
    seconds: float
    result: Optional[PassResult]

    @property
    def modified(self) -> bool:
        return bool(self.result is not None and self.result.modified)


class PassManager:
    """Runs stages in order over one GraphModule and keeps the log. ``passes``: :class:`Pass` or
    :class:`Stage` objects; more can be added with :meth:`extend`, and :meth:`run` may stop before a
    phase and continue later (``prepare`` stops before calibration, ``convert`` continues), with one
    dump numbering. ``dump_dir``: write ``NN_<stage>.txt`` (the graph) after each stage."""

    def __init__(self, passes: Sequence = (), dump_dir: Optional[str] = None):
        self.pending: list[Stage] = []
        self.records: list[StageRecord] = []
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.extend(passes)

    def extend(self, passes: Sequence) -> "PassManager":
        self.pending.extend(p if isinstance(p, Stage) else Stage(p, p.name) for p in passes)
        return self

    def record(self, name: str, phase: str, seconds: float, result: Optional[PassResult] = None) -> None:
        """Log a step (one that ran outside the manager too: capture, a caller's own calibration)
        and dump the graph it left when it ran (``result`` not None)."""
        self.records.append(StageRecord(len(self.records), name, phase, seconds, result))
        if self.dump_dir and result is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{len(self.records) - 1:02d}_{name}.txt").write_text(str(result.graph_module.graph))

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.run(gm)

    def run(self, gm: torch.fx.GraphModule, until: Optional[str] = None) -> PassResult:
        """Run the pending stages, stopping before the first one of phase ``until`` (None: all)."""
        modified = False
        while self.pending and (until is None or self.pending[0].phase != until):
            stage = self.pending.pop(0)
            t0 = time.perf_counter()
            if stage.when is not None and not stage.when(gm):
                self.record(stage.name, stage.phase, 0.0)
                continue
            try:
                result = stage.step(gm)
            except (QCompileError, NotImplementedError):   # already name what is at fault (or missing)
                raise
            except Exception as e:  # noqa: BLE001 - re-raised naming the stage
                before = ", ".join(r.name for r in self.records) or "none"
                raise PassError(f"pass '{stage.name}' failed: {type(e).__name__}: {e} "
                                f"(passes run before it: {before})") from e
            gm = result.graph_module
            modified |= result.modified
            self.record(stage.name, stage.phase, time.perf_counter() - t0, result)
        return PassResult(gm, modified)

    def drop(self, phase: str) -> None:
        """Remove the pending stages of ``phase`` (a step the caller did itself)."""
        self.pending = [s for s in self.pending if s.phase != phase]

    @property
    def log(self) -> list[tuple[str, bool]]:
        """``(stage name, modified)`` for every stage run so far, in order."""
        return [(r.name, r.modified) for r in self.records if r.result is not None]

    def results(self, kind: type[R]) -> list[R]:
        """The results of type ``kind`` in run order (e.g. every smoothing record)."""
        return [r.result for r in self.records if isinstance(r.result, kind)]

    def result(self, name: str) -> Optional[PassResult]:
        """The result of the last stage named ``name`` that ran; None when none ran (not in this
        manager, not reached yet, or skipped by its condition)."""
        return next((r.result for r in reversed(self.records) if r.name == name and r.result is not None), None)

    def timings(self) -> dict[str, float]:
        """Seconds per phase, in the order the phases first ran."""
        out: dict[str, float] = {}
        for r in self.records:
            out[r.phase] = out.get(r.phase, 0.0) + r.seconds
        return out


def get_attr_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node, or None for any other node."""
    if node is None or not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def layer_of(node: torch.fx.Node) -> str:
    """The module path a node belongs to: its layer tag (capture's, or a pass's), else the innermost
    module of its ``nn_module_stack``, else the node's own name."""
    if node.meta.get(LAYER):
        return node.meta[LAYER]
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else node.name


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
