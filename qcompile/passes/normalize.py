"""Rewrite matmuls against a constant weight into ``aten.linear`` so every later pass and backend
sees one op: ``addmm(b, x, W)`` (GPT-2's ``Conv1D``), ``mm(x, W)`` and ``matmul(x, W)`` with ``W`` a
2-D parameter become ``linear(x, W.T, b)``. The transposed weight is a new tensor."""
from __future__ import annotations

import torch

from ..spec import LAYER
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten


class NormalizeLinearPass(Pass):
    name = "normalize_linear"

    def call(self, gm):
        modified = False
        transposed: dict[str, torch.fx.Node] = {}  # a weight shared by several matmuls is transposed once
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten.addmm.default and not node.kwargs:
                bias, x, w = node.args[:3]
                if len(node.args) > 3:  # beta/alpha given: not a plain linear
                    continue
            elif node.target in (aten.mm.default, aten.matmul.default):
                (x, w), bias = node.args[:2], None
            else:
                continue
            weight = get_attr_tensor(gm, w)
            if weight is None or weight.dim() != 2 or (bias is not None and get_attr_tensor(gm, bias) is None):
                continue
            if w.target not in transposed:
                transposed[w.target] = add_tensor(gm, f"{w.target}_t", weight.t(), node)
                transposed[w.target].meta[LAYER] = node.meta.get(LAYER)
            with gm.graph.inserting_before(node):
                linear = gm.graph.call_function(aten.linear.default, (x, transposed[w.target], bias))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if node.target == aten.addmm.default and len(node.args) == 3:
                w = get_attr_tensor(gm, node.args[2])
                if w is not None and get_attr_tensor(gm, node.args[0]) is not None:
                    raise AssertionError(f"{node.name}: addmm with constant weight left in the graph")


