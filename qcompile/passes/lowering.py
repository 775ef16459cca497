"""Rewrites of the converted Q/DQ graph that every lowering backend may apply: exact (bit-identical
to the reference backend) and faster to run, and :class:`FuseResult`, what every backend's fusion
pass returns.

* :class:`GatherBeforeDequantizePass`: ``embedding(dequantize(W_q, s, z), ids)`` ⇒
  ``dequantize(embedding(W_q, ids), embedding(s, ids), embedding(z, ids))``. The converted graph
  dequantizes the whole table (MiniLM: 30,522 × 384) on every call; gathering the codes (and the
  rows' scales) first touches only the rows the batch uses. Each element still computes
  ``(q - z) * s`` with the same operands, so the result is unchanged bit for bit.
* :class:`ViewsAsReshapesPass`: ``aten.view`` ⇒ ``aten.reshape`` where nothing writes through the
  view. A backend that re-exports a rewritten graph traces it again with symbolic strides, which
  can differ from the capture's (a fused op's shape function lays out its output its own way), and
  a view of a tensor whose strides do not allow it then fails the export; a reshape is the same
  values and copies only when it must. For value-semantics backends (TVM's Relax)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import DEQUANTIZE
from .infra import Pass, PassResult, get_attr_tensor

aten = torch.ops.aten


@dataclass
class FuseResult(PassResult):
    """What a backend's fusion pass did: ``fused`` maps each node it replaced to the kernel or op
    that now computes it, in the order it fused them (``changed`` lists the same nodes);
    ``skipped`` maps each candidate it left alone to why (the negative cases tests pin).

    Example::

        >>> r = FuseOnnxruntimeKernelsPass()(gm)
        >>> r.fused, r.skipped      # {'linear': 'MatMulIntegerToFloat'}, {'linear_1': 'float weight'}
    """

    fused: dict = field(default_factory=dict)   # node -> kernel or op

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, fused: dict, skipped: dict) -> "FuseResult":
        """The result of a pass that changed the graph exactly where it fused something."""
        return cls(gm, bool(fused), list(fused), skipped, fused)


class GatherBeforeDequantizePass(Pass):
    name = "gather_before_dequantize"

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.target != aten.embedding.default:
                continue
            dq, ids = node.args[0], node.args[1]
            if getattr(dq, "target", None) != DEQUANTIZE:
                continue
            table, scale, zp = (get_attr_tensor(gm, a) for a in dq.args[:3])
            if table is None or scale is None or table.dim() != 2 or not _per_row(scale, table.shape[0]):
                continue
            with gm.graph.inserting_before(node):
                codes = gm.graph.call_function(aten.embedding.default, (dq.args[0], ids))
                s, z = dq.args[1], dq.args[2]
                if scale.numel() > 1:  # per row or per group of a row: gather the rows' parameters too
                    s = gm.graph.call_function(aten.embedding.default, (s, ids))
                    z = None if z is None else gm.graph.call_function(aten.embedding.default, (z, ids))
                out = gm.graph.call_function(DEQUANTIZE, (codes, s, z, *dq.args[3:]))
            out.meta = dict(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            if not dq.users:
                gm.graph.erase_node(dq)
            modified = True
        return PassResult(gm, modified)


def _per_row(scale: torch.Tensor, rows: int) -> bool:
    """Per-tensor, per-row or per-group-of-a-row parameters: gathering rows keeps them aligned."""
    return scale.numel() == 1 or (scale.dim() == 2 and scale.shape[0] == rows)


def quantized_linears(gm, skipped: dict) -> list:
    """``(linear node, input, weight dequantize node, bias)`` for every ``aten.linear`` whose weight is
    dequantized, in graph order (a list: a lowering pass may rewrite the graph while it walks it).
    Linears with a float weight are recorded in ``skipped`` with that reason."""
    found = []
    for node in list(gm.graph.nodes):
        if node.target != aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        if getattr(w, "target", None) != DEQUANTIZE:
            skipped[node.name] = "float weight"
            continue
        found.append((node, x, w, node.args[2] if len(node.args) > 2 else None))
    return found


class ViewsAsReshapesPass(Pass):
    name = "views_as_reshapes"

    def call(self, gm):
        changed = []
        for node in gm.graph.nodes:
            if node.target != aten.view.default or any(_writes(u) for u in node.users):
                continue
            node.target = aten.reshape.default
            changed.append(node.name)
        if changed:
            gm.recompile()
        return PassResult(gm, bool(changed), changed)


def _writes(node) -> bool:
    """Whether ``node`` is an in-place op (its first argument is written)."""
    target = getattr(node, "target", None)
    schema = getattr(target, "_schema", None)
    return node.op == "call_function" and (schema is None and str(target).endswith("_") or
                                            schema is not None and schema.is_mutable)

