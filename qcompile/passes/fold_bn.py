"""Fold inference batch-norm into the preceding convolution: ``bn(conv(x, w, b))`` becomes
``conv(x, w * g, (b - mean) * g + beta)`` with ``g = gamma / sqrt(var + eps)``, so the int8 weight
already carries the BN scale and no float op is left between the conv and its consumer."""
from __future__ import annotations

import operator

import torch

from ..spec import LAYER
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_NO_TRAIN_BN = getattr(aten._native_batch_norm_legit_no_training, "default", None)


def _bn_parts(node):
    """(bn node to replace, input, weight, bias, mean, var, eps), or None when ``node`` is not an
    inference batch-norm."""
    if node.target == aten.batch_norm.default:
        x, w, b, mean, var, training, _momentum, eps = node.args[:8]
        return None if training else (node, x, w, b, mean, var, eps)
    if node.target == _NO_TRAIN_BN:
        x, w, b, mean, var, _momentum, eps = node.args[:7]
        users = list(node.users)
        if len(users) != 1 or users[0].target != operator.getitem or users[0].args[1] != 0:
            return None
        return (users[0], x, w, b, mean, var, eps)
    return None


class FoldBatchNormPass(Pass):
    """conv → batch_norm (eval) ⇒ conv with folded weight and bias. Creates new tensors; the
    original parameters are left untouched."""

    name = "fold_batch_norm"

    def call(self, gm):
        """``changed``: the conv layers folded (the report's ``folded_batch_norms``); ``skipped``:
        batch-norm node -> why it was not folded."""
        result = PassResult(gm, False)
        for node in list(gm.graph.nodes):
            parts = _bn_parts(node)
            if parts is None:
                continue
            out, conv, gamma, beta, mean, var, eps = parts
            reason = self._why_not(gm, conv, (gamma, beta, mean, var))
            if reason:
                result.skipped[node.name] = reason
                continue
            w = get_attr_tensor(gm, conv.args[1])
            b = get_attr_tensor(gm, conv.args[2]) if len(conv.args) > 2 and conv.args[2] is not None else None
            tensors = [get_attr_tensor(gm, n) if n is not None else None for n in (gamma, beta, mean, var)]
            g_, be, mu, va = tensors
            g = (g_ if g_ is not None else torch.ones_like(mu)) / torch.sqrt(va + eps)
            new_w = w * g.reshape(-1, *([1] * (w.dim() - 1)))
            new_b = ((b if b is not None else torch.zeros_like(mu)) - mu) * g + (be if be is not None else 0)
            w_node = add_tensor(gm, f"{conv.args[1].target}_bnfold", new_w, conv)
            b_node = add_tensor(gm, f"{conv.args[1].target.rsplit('.', 1)[0]}.bias_bnfold", new_b, conv)
            for n in (w_node, b_node):
                n.meta[LAYER] = conv.meta.get(LAYER)
            args = list(conv.args)
            while len(args) < 3:
                args.append(None)
            args[1], args[2] = w_node, b_node
            conv.args = tuple(args)
            out.replace_all_uses_with(conv)
            result.changed.append(conv.meta.get(LAYER, conv.name))
            result.modified = True
        return result

    @staticmethod
    def _why_not(gm, conv, bn_tensors):
        if not isinstance(conv, torch.fx.Node) or conv.target not in CONVS:
            return "its input is not a convolution"
        if len(conv.users) != 1:
            return "the convolution output has other users"
        if get_attr_tensor(gm, conv.args[1]) is None:
            return "the convolution weight is not a parameter"
        if any(n is not None and get_attr_tensor(gm, n) is None for n in bn_tensors):
            return "batch-norm statistics are not constants"
        return None

    def ensures(self, gm):
        for node in gm.graph.nodes:
            parts = _bn_parts(node)
            if parts and parts[1].target in CONVS and self._why_not(gm, parts[1], parts[2:6]) is None:
                raise AssertionError(f"batch-norm {node.name} after a conv was left unfolded")
