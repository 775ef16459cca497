"""Insert observers on the activation edges the annotations mark static. One observer per
(edge, spec): Q, K and V reading the same LayerNorm output share one, so the converted graph
quantizes that tensor once."""
from __future__ import annotations

from ..observers import make_observer
from ..spec import ROLE, LAYER
from .annotate import annotated_nodes
from .infra import Pass, PassResult


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


class InsertObserversPass(Pass):
    name = "insert_observers"

    def call(self, gm):
        shared: dict = {}
        for node, ann in annotated_nodes(gm):
            spec = ann.activation
            if spec is None or spec.dynamic:
                continue
            src = node.args[ann.input_arg]
            insert_on_edge(gm, node, ann.input_arg, make_observer(spec, [ann.layer]), "qobs", shared, (src, spec))
        return PassResult(gm, bool(shared))

    def ensures(self, gm):
        for node, ann in annotated_nodes(gm):
            if ann.activation is not None and not ann.activation.dynamic:
                src = node.args[ann.input_arg]
                if src.op != "call_module" or src.meta.get(ROLE) != "qobs":
                    raise AssertionError(f"{node.name}: static activation without an observer")
