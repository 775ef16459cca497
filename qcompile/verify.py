"""The parity contract every backend meets: :func:`verify` runs a lowered artifact and the reference
backend on the same inputs and reports how far apart they are, end to end and at every static
activation quantization point, in units of that point's quantization step.

Why codes: a backend computes the same Q/DQ graph with other kernels (integer GEMMs, fused
epilogues, another summation order), so floats differ in their last bits and, where a value sits
near a rounding boundary, a quantized code flips by one. Comparing the integer codes each
activation quantizer produces measures exactly that: 0 is bit-exact, 1 is "a rounding tie broke
the other way", more is a bug. A backend exposes its codes by implementing
``quantized_activations(*args, **kwargs) -> list[(scale, codes)]`` in graph order; one that does not
gets end-to-end parity only (the report says so). A backend that can also take the reference's
codes as the input of each layer (``supports_forced_codes``, ``quantized_activations(..., forced=)``)
is compared layer by layer: a rounding flip in one layer changes the next layer's input, and in a deep
network such flips compound, so free-running codes drift by more than one step (MiniLM: 1 step in the
first layer, tens by the sixth) without any kernel being wrong.

Example::

    >>> art = qcompile.lower(qmodel, backend="onnx")
    >>> parity = qcompile.verify(art, qmodel, [(ids, mask)])
    >>> print(parity); assert parity.passed
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch.utils import _pytree as pytree

from .capture import flatten_inputs
from .errors import BackendError
from .ops import QUANTIZE
from .passes.infra import get_attr_tensor
from .spec import LAYER


@dataclass
class PointParity:
    """One static activation quantization point (the input edge of the layers named)."""
    layers: str
    scale: float
    max_steps: int = 0           # largest |code_backend - code_reference|
    mismatched: float = 0.0      # fraction of codes that differ
    count: int = 0


@dataclass
class ParityReport:
    backend: str
    samples: int = 0
    output_max_abs: float = 0.0
    output_max_rel: float = 0.0  # max |backend - reference| / max |reference|, per output leaf
    points: list = field(default_factory=list)
    note: str = ""
    max_steps_allowed: int = 1

    @property
    def max_steps(self) -> int:
        return max((p.max_steps for p in self.points), default=0)

    @property
    def passed(self) -> bool:
        return self.max_steps <= self.max_steps_allowed

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(max_steps=self.max_steps, passed=self.passed)
        return d

    def __str__(self) -> str:
        lines = [f"parity of backend '{self.backend}' vs reference on {self.samples} input(s): "
                 f"{'PASS' if self.passed else 'FAIL'} (largest difference {self.max_steps} quantization step(s), "
                 f"allowed {self.max_steps_allowed})",
                 f"  outputs: max |diff| {self.output_max_abs:.3g}, relative {self.output_max_rel:.3g}"]
        if self.note:
            lines.append(f"  {self.note}")
        for p in self.points:
            lines.append(f"  {p.layers:60s} steps {p.max_steps}  differing {100 * p.mismatched:.3f}% of {p.count}")
        return "\n".join(lines)


def static_activation_quantizers(gm: torch.fx.GraphModule) -> list:
    """The converted graph's static activation ``quantize`` nodes in graph order: the points whose
    codes backends expose (a dynamic scale is computed at run time and is not a fixed point)."""
    # weights are stored as codes, so every quantize op left in a converted graph is an activation's
    # (meta keys do not survive save/load; the graph structure does)
    return [n for n in gm.graph.nodes if n.target == QUANTIZE and get_attr_tensor(gm, n.args[1]) is not None]


class _CodeRecorder(torch.fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.codes = set(nodes), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.nodes:
            self.codes[n] = out.detach().clone()
        return out


def reference_activations(qmodel, args: tuple, kwargs: dict) -> list:
    """``[(scale, codes, layers)]`` of the reference graph's static activation quantizers, in graph order."""
    return _run_reference(qmodel, args, kwargs)[1]


def _run_reference(qmodel, args: tuple, kwargs: dict) -> tuple[list, list]:
    """One run of the reference graph: (its output leaves, its quantizers' codes as in
    :func:`reference_activations`)."""
    gm = qmodel.graph_module
    nodes = static_activation_quantizers(gm)
    rec = _CodeRecorder(gm, nodes)
    a, k = qmodel.binder.call(args, dict(kwargs))
    with torch.no_grad():
        out = rec.run(*flatten_inputs(gm, a, k))
    codes = [(float(get_attr_tensor(gm, n.args[1])), rec.codes[n], n.meta.get(LAYER, n.name)) for n in nodes]
    return pytree.tree_leaves(out), codes


def verify(artifact, reference, inputs: Iterable, max_steps: int = 1) -> ParityReport:
    """Compare ``artifact`` (what :func:`qcompile.lower` returned) with ``reference`` (the
    :class:`~qcompile.model.QuantizedModel` it was lowered from) on ``inputs`` (an iterable of
    positional tuples or kwargs dicts, like calibration data). ``max_steps``: the allowed
    difference in quantization steps at any activation quantizer."""
    report = ParityReport(backend=getattr(artifact, "backend", type(artifact).__name__), max_steps_allowed=max_steps)
    exposes = callable(getattr(artifact, "quantized_activations", None))
    if not exposes:
        report.note = "this backend exposes no intermediate codes: end-to-end parity only"
    points: Optional[list] = None
    for item in inputs:
        args, kwargs = reference.binder.bind(item)
        # one reference run gives both the outputs and, when the backend can be compared per layer, the codes
        if exposes:
            ref_leaves, ref_codes = _run_reference(reference, args, kwargs)
        else:
            with torch.no_grad():
                ref_leaves = pytree.tree_leaves(reference(*args, **kwargs))
        with torch.no_grad():
            out = artifact(*args, **kwargs)
        for r, o in zip(ref_leaves, pytree.tree_leaves(out)):
            if not isinstance(r, torch.Tensor):
                continue
            if r.shape != o.shape:
                raise BackendError(f"backend output shape {tuple(o.shape)} differs from the reference's {tuple(r.shape)}")
            diff = (o.float() - r.float()).abs().max().item() if r.numel() else 0.0
            report.output_max_abs = max(report.output_max_abs, diff)
            report.output_max_rel = max(report.output_max_rel, diff / max(r.abs().max().item(), 1e-12))
        report.samples += 1
        if not exposes:
            continue
        if getattr(artifact, "supports_forced_codes", False):
            got = artifact.quantized_activations(*args, forced=[c for _, c, _ in ref_codes], **kwargs)
        else:
            got = artifact.quantized_activations(*args, **kwargs)
        if len(got) != len(ref_codes):
            raise BackendError(f"backend exposes {len(got)} activation quantizers, the reference graph has "
                               f"{len(ref_codes)}: cannot pair them")
        if points is None:
            points = [PointParity(layers=layer, scale=s) for s, _, layer in ref_codes]
            report.points = points
            if not points:
                report.note = "the graph has no static activation quantizers (weight-only or dynamic): end-to-end parity only"
            elif getattr(artifact, "supports_forced_codes", False):
                report.note = ("per layer: each quantizer's codes computed from the reference's upstream codes "
                               "(teacher-forced), so a flip in one layer is not counted again downstream")
            else:
                report.note = "per quantizer, free-running: differences may accumulate from layer to layer"
        for p, (s_ref, c_ref, layer), (s_got, c_got) in zip(points, ref_codes, got):
            if abs(s_got - s_ref) > 1e-6 * abs(s_ref):
                raise BackendError(f"activation quantizer of '{layer}': backend scale {s_got} != reference {s_ref} "
                                   "(the backend's quantizers are not in the reference's order)")
            d = (c_got.to(torch.int32) - c_ref.to(torch.int32)).abs()
            p.max_steps = max(p.max_steps, int(d.max()) if d.numel() else 0)
            p.mismatched = (p.mismatched * p.count + float((d > 0).sum())) / max(p.count + d.numel(), 1)
            p.count += d.numel()
    return report
