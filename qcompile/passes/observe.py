"""Insert observers on the activation edges the annotations mark static. One observer per
(edge, spec): Q, K and V reading the same LayerNorm output share one, so the converted graph
quantizes that tensor once.

``quantize_outputs`` (a backend's placement, see :class:`~qcompile.backends.base.Capabilities`):
for the op kinds named, also observe the op's *output* (after a ReLU that only it feeds), so the
converted graph is ``Q → DQ → conv → relu → Q`` and a backend can run the whole conv chain in
int8 (onnxruntime's QLinearConv). An input edge that reaches such an output only through ops that
merely select or move values (max-pool, flatten, reshape, permute) reuses that output's observer:
its values already sit on that grid, so the second quantize is exact and nothing is quantized
twice with different parameters."""
from __future__ import annotations

import torch

from ..observers import make_observer
from ..spec import ANNOTATION, LAYER, ROLE
from .annotate import annotated_nodes
from .infra import Pass, PassResult

aten = torch.ops.aten

# ops whose output elements are a selection/rearrangement of their input's: a grid stays a grid
PASSTHROUGH_OPS = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                   aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.permute.default,
                   aten.transpose.int, aten.clone.default, aten.contiguous.default}
# element-wise activations a backend fuses into the producing op's requantization
FUSED_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}


def insert_on_edge(gm, consumer, arg_index: int, module, prefix: str, shared: dict, key):
    """Route ``consumer.args[arg_index]`` through ``call_module(module)``, reusing the module
    already inserted for ``key`` when there is one. Returns the call_module node."""
    if key not in shared:
        name = f"{prefix}_{len(shared)}"
        gm.add_submodule(name, module)
        src = consumer.args[arg_index]
        with gm.graph.inserting_after(src):
            shared[key] = gm.graph.call_module(name, (src,))
        shared[key].meta[ROLE] = prefix
        shared[key].meta[LAYER] = src.meta.get(LAYER) if hasattr(src, "meta") else None
    else:
        gm.get_submodule(shared[key].target).layers.extend(module.layers)
    args = list(consumer.args)
    args[arg_index] = shared[key]
    consumer.args = tuple(args)
    return shared[key]


def _output_edge(node):
    """The tensor to quantize for ``node``'s output: the node, or the fused activation it alone feeds."""
    users = list(node.users)
    if len(users) == 1 and users[0].target in FUSED_ACTIVATIONS:
        return users[0]
    return node


class InsertObserversPass(Pass):
    name = "insert_observers"

    def __init__(self, quantize_outputs: frozenset = frozenset()):
        self.quantize_outputs = frozenset(quantize_outputs)

    def call(self, gm):
        shared: dict = {}
        outputs: dict = {}  # observed output node -> (observer node, spec)
        for node, ann in annotated_nodes(gm):
            spec = ann.activation
            if spec is None or spec.dynamic or ann.op not in self.quantize_outputs:
                continue
            out = _output_edge(node)
            consumers = [(u, i) for u in list(out.users) for i, a in enumerate(u.args) if a is out]
            if not consumers:
                continue
            first = None
            for user, i in consumers:
                first = insert_on_edge(gm, user, i, make_observer(spec, [f"{ann.layer}:output"]), "qobs", shared,
                                       (out, spec))
            outputs[out] = (first, spec)
        for node, ann in annotated_nodes(gm):
            spec = ann.activation
            if spec is None or spec.dynamic:
                continue
            src = node.args[ann.input_arg]
            if src.op == "call_module" and src.meta.get(ROLE) == "qobs":
                gm.get_submodule(src.target).layers.append(ann.layer)  # already observed (an output edge)
                continue
            origin = _through_passthrough(src)
            if origin is not None and origin.op == "call_module" and origin.meta.get(ROLE) == "qobs" \
                    and gm.get_submodule(origin.target).spec == spec:
                self._reuse(gm, node, ann, origin)
                continue
            insert_on_edge(gm, node, ann.input_arg, make_observer(spec, [ann.layer]), "qobs", shared, (src, spec))
        return PassResult(gm, bool(shared))

    def _reuse(self, gm, node, ann, observer_node):
        """Observe ``node``'s input with the module ``observer_node`` calls: one set of qparams."""
        src = node.args[ann.input_arg]
        with gm.graph.inserting_after(src):
            call = gm.graph.call_module(observer_node.target, (src,))
        call.meta[ROLE], call.meta[LAYER] = "qobs", src.meta.get(LAYER)
        gm.get_submodule(observer_node.target).layers.append(ann.layer)
        args = list(node.args)
        args[ann.input_arg] = call
        node.args = tuple(args)

    def ensures(self, gm):
        for node, ann in annotated_nodes(gm):
            if ann.activation is not None and not ann.activation.dynamic:
                src = node.args[ann.input_arg]
                if src.op != "call_module" or src.meta.get(ROLE) != "qobs":
                    raise AssertionError(f"{node.name}: static activation without an observer")


def _through_passthrough(node):
    """Walk back through single-input value-preserving ops; the first other node."""
    while getattr(node, "target", None) in PASSTHROUGH_OPS:
        node = node.args[0]
    return node


def quantized_output_source(node, kinds: frozenset):
    """The annotated op (of a kind in ``kinds``) whose quantized output reaches ``node`` through
    value-preserving ops and a fused activation only, or None."""
    origin = _through_passthrough(node)
    if getattr(origin, "target", None) in FUSED_ACTIVATIONS:
        origin = origin.args[0]
    ann = getattr(origin, "meta", {}).get(ANNOTATION)
    if ann is not None and ann.op in kinds and ann.activation is not None and not ann.activation.dynamic:
        return origin
    return None
