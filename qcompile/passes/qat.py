"""QAT passes over a graph captured in training mode.

* :class:`InsertFakeQuantPass` — from the same annotations PTQ uses: a :class:`FakeQuantize` on
  every quantized weight edge and (one per edge and spec, as observers are shared) on every
  activation edge; an annotated ``conv → batch_norm`` becomes one :class:`QATConvBn` (simulated
  folding) when the recipe's ``qat.fold_bn`` is on.
* :class:`TrainEvalOpsPass` — ``torch.export`` bakes the training flag into ``batch_norm``,
  ``dropout`` and attention's ``dropout_p``; the ones left become modules, so
  ``model.train()/eval()`` switch them.
* :class:`FreezeQATPass` — at convert, on a copy: each fused conv becomes a plain conv on its folded
  weight and bias, weight quantizers leave their trained qparams on the op
  (``spec.WEIGHT_QPARAMS``), activation quantizers become :class:`FixedQParamsObserver`\\ s and the
  modules of the previous pass become inference ops again. The result is exactly the graph PTQ
  hands to :class:`~qcompile.passes.ConvertPass`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..fake_quant import FakeQuantize, FixedQParamsObserver, GraphAttention, GraphBatchNorm, QATConvBn
from ..recipe import QATConfig
from ..spec import ANNOTATION, LAYER, ROLE, WEIGHT_QPARAMS, WeightQParams
from .annotate import annotated_nodes
from .infra import Pass, PassResult, add_tensor, get_attr_tensor, tensor_owner
from .observe import insert_on_edge

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _is_train_bn(node) -> bool:
    return node.op == "call_function" and node.target == aten.batch_norm.default and bool(node.args[5])


def _unique(gm, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _take(gm, node):
    """The tensor behind a ``get_attr`` node, detached from its old attribute (it moves into a module)."""
    if node is None:
        return None
    t = get_attr_tensor(gm, node)
    owner, attr = tensor_owner(gm, node.target)
    owner._parameters.pop(attr, None)
    owner._buffers.pop(attr, None)
    return t


def _erase_if_unused(gm, node):
    if node is not None and not node.users:
        gm.graph.erase_node(node)


def _take_batch_norm(gm, bn, sync: bool) -> GraphBatchNorm:
    """A :class:`GraphBatchNorm` owning ``bn``'s tensors; removes the ``num_batches_tracked += 1``
    export wrote next to it (the module counts itself)."""
    _x, w, b, mean, var, _training, momentum, eps = bn.args[:8]
    prefix = mean.target.rpartition(".")[0]
    nbt_node = next((n for n in gm.graph.nodes if n.op == "get_attr"
                     and n.target == (f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked")), None)
    if nbt_node is not None:
        for user in list(nbt_node.users):
            if user.target in (aten.add_.Tensor, aten.add.Tensor) and not user.users:
                gm.graph.erase_node(user)
    tensors = [_take(gm, n) for n in (w, b, mean, var, nbt_node)]
    _erase_if_unused(gm, nbt_node)
    return GraphBatchNorm(*tensors, momentum, eps, sync=sync)


def _erase_bn_inputs(gm, nodes):
    for n in nodes:
        _erase_if_unused(gm, n)


class InsertFakeQuantPass(Pass):
    """See the module docstring."""

    name = "insert_fake_quant"

    def __init__(self, config: QATConfig):
        self.config = config

    def call(self, gm):
        """``changed``: the conv layers trained with simulated batch-norm folding."""
        folded: list[str] = []
        acts: dict = {}
        weights: dict = {}
        modified = False
        for node, ann in annotated_nodes(gm):
            target = node
            bn = self._bn_after(gm, node) if ann.op == "conv" and self.config.fold_bn else None
            if bn is not None:
                target = self._fuse(gm, node, ann, bn)
                folded.append(ann.layer)
            elif ann.weight is not None:
                w_node = node.args[ann.weight_arg]
                key = (w_node.target, ann.weight)
                if key not in weights:
                    fq = FakeQuantize(ann.weight, [ann.layer], self.config, weight=get_attr_tensor(gm, w_node),
                                      channel_axis=ann.channel_axis)
                    name = _unique(gm, f"wfq_{w_node.target}")
                    gm.add_submodule(name, fq)
                    with gm.graph.inserting_after(w_node):
                        weights[key] = gm.graph.call_module(name, (w_node,))
                    weights[key].meta[ROLE], weights[key].meta[LAYER] = "weight", ann.layer
                node.args = _replace(node.args, ann.weight_arg, weights[key])
            if ann.activation is not None:
                src = target.args[ann.input_arg]
                insert_on_edge(gm, target, ann.input_arg, FakeQuantize(ann.activation, [ann.layer], self.config),
                               "qfq", acts, (src, ann.activation))
            modified = True
        return PassResult(gm, modified, changed=folded)

    @staticmethod
    def _bn_after(gm, conv):
        users = list(conv.users)
        if conv.target not in _CONVS or len(users) != 1 or not _is_train_bn(users[0]):
            return None
        bn = users[0]
        if bn.args[0] is not conv or any(n is not None and get_attr_tensor(gm, n) is None for n in bn.args[1:5]):
            return None
        if get_attr_tensor(gm, bn.args[3]) is None or get_attr_tensor(gm, bn.args[4]) is None:
            return None
        return bn

    def _fuse(self, gm, conv, ann, bn):
        bn_mod = _take_batch_norm(gm, bn, self.config.sync_observers)
        weight = _take(gm, conv.args[1])
        bias = _take(gm, conv.args[2]) if len(conv.args) > 2 and conv.args[2] is not None else None
        fq = None
        if ann.weight is not None:
            w_fold = weight.detach() * bn_mod.folded_scale().detach().reshape(-1, *([1] * (weight.dim() - 1)))
            fq = FakeQuantize(ann.weight, [ann.layer], self.config, weight=w_fold, channel_axis=ann.channel_axis)
        conv_args = list(conv.args[3:])
        mod = QATConvBn(conv.target, weight, bias, conv_args, bn_mod, fq, self.config.freeze_bn_steps)
        name = _unique(gm, f"qat_{ann.layer}")
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(bn):
            fused = gm.graph.call_module(name, (conv.args[0],))
        fused.meta.update(conv.meta)  # the annotation and layer travel with it; FreezeQATPass restores the conv
        fused.meta[ROLE] = "qat_conv_bn"
        bn.replace_all_uses_with(fused)
        inputs = [a for a in list(bn.args[1:5]) + list(conv.args[1:3]) if isinstance(a, torch.fx.Node)]
        gm.graph.erase_node(bn)
        gm.graph.erase_node(conv)
        _erase_bn_inputs(gm, inputs)
        return fused

    def ensures(self, gm):
        for node, ann in annotated_nodes(gm):
            if ann.activation is not None and not ann.activation.dynamic:
                src = node.args[ann.input_arg]
                if src.op != "call_module" or not isinstance(gm.get_submodule(src.target), FakeQuantize):
                    raise AssertionError(f"{node.name}: activation without a fake-quant")


class TrainEvalOpsPass(Pass):
    """Training-mode ``batch_norm`` → :class:`GraphBatchNorm`, ``dropout`` → ``nn.Dropout``,
    ``scaled_dot_product_attention`` with ``dropout_p > 0`` → :class:`GraphAttention`."""

    name = "train_eval_ops"

    def __init__(self, sync: bool = True):
        self.sync = sync

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if _is_train_bn(node):
                if any(get_attr_tensor(gm, n) is None for n in node.args[3:5]):
                    continue  # statistics computed in the graph: leave the op as captured
                mod = _take_batch_norm(gm, node, self.sync)
                name = _unique(gm, f"bn_{node.meta.get(LAYER) or node.name}")
            elif node.op == "call_function" and node.target == aten.dropout.default:
                mod = nn.Dropout(float(node.args[1]))
                name = _unique(gm, f"dropout_{node.meta.get(LAYER) or node.name}")
            elif _sdpa_dropout(node):
                args = list(node.args) + [None] * (6 - len(node.args))
                mod = GraphAttention(node.args[4] if len(node.args) > 4 else node.kwargs["dropout_p"],
                                     args[5] if args[5] is not None else node.kwargs.get("is_causal", False),
                                     {k: v for k, v in node.kwargs.items() if k not in ("dropout_p", "is_causal",
                                                                                         "attn_mask")})
                name = _unique(gm, f"attention_{node.meta.get(LAYER) or node.name}")
                inputs = (*node.args[:3], args[3] if args[3] is not None else node.kwargs.get("attn_mask"))
            else:
                continue
            gm.add_submodule(name, mod)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, inputs if isinstance(mod, GraphAttention) else (node.args[0],))
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            node.replace_all_uses_with(new)
            inputs = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
            gm.graph.erase_node(node)
            _erase_bn_inputs(gm, inputs)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if (node.op == "call_function" and node.target == aten.dropout.default) or _sdpa_dropout(node):
                raise AssertionError(f"{node.name}: dropout left with a fixed training flag")


def _sdpa_dropout(node) -> bool:
    if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
        return False
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    return float(p) > 0


class FreezeQATPass(Pass):
    """Trained QAT graph → the observed graph :class:`ConvertPass` takes (see the module docstring)."""

    name = "freeze_qat"

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QATConvBn):
                self._unfuse(gm, node, mod)
            elif isinstance(mod, FakeQuantize) and mod.is_weight:
                w = get_attr_tensor(gm, node.args[0])
                qp = WeightQParams(*mod.qparams(w), reference=w)
                for user in node.users:
                    user.meta[WEIGHT_QPARAMS] = qp
                self._bypass(gm, node)
            elif isinstance(mod, FakeQuantize) and mod.spec.dynamic:
                self._bypass(gm, node)
            elif isinstance(mod, FakeQuantize):
                scale, zp = mod.qparams()
                obs = FixedQParamsObserver(mod.spec, mod.layers, scale.reshape(()),
                                           None if zp is None else zp.reshape(()), int(mod.steps))
                gm.delete_submodule(node.target)
                gm.add_submodule(node.target, obs)
                node.meta[ROLE] = "qobs"
            elif isinstance(mod, GraphBatchNorm):
                self._batch_norm(gm, node, mod)
            elif isinstance(mod, nn.Dropout):
                self._bypass(gm, node)
            elif isinstance(mod, GraphAttention):
                with gm.graph.inserting_before(node):
                    att = gm.graph.call_function(aten.scaled_dot_product_attention.default,
                                                 (*node.args, 0.0, mod.is_causal), dict(mod.kwargs))
                att.meta.update(node.meta)
                node.replace_all_uses_with(att)
                gm.graph.erase_node(node)
                gm.delete_submodule(node.target)
            else:
                continue
            modified = True
        return PassResult(gm, modified)

    @staticmethod
    def _bypass(gm, node):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)

    @staticmethod
    def _unfuse(gm, node, mod):
        with torch.no_grad():
            w_fold, b_fold = mod.folded()
        w = add_tensor(gm, f"{node.target}_weight", w_fold, node)
        b = add_tensor(gm, f"{node.target}_bias", b_fold, node)
        for n in (w, b):
            n.meta[LAYER] = node.meta.get(LAYER)
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(mod.conv_op, (node.args[0], w, b, *mod.conv_args))
        conv.meta.update({k: v for k, v in node.meta.items() if k != ROLE})
        if mod.weight_fq is not None:
            conv.meta[WEIGHT_QPARAMS] = WeightQParams(*mod.weight_fq.qparams(w_fold), reference=w_fold)
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)

    @staticmethod
    def _batch_norm(gm, node, mod):
        tensors = [mod.weight, mod.bias, mod.running_mean, mod.running_var]
        names = ["weight", "bias", "running_mean", "running_var"]
        args = [add_tensor(gm, f"{node.target}_{n}", t.detach(), node) if t is not None else None
                for n, t in zip(names, tensors)]
        momentum = 0.1 if mod.momentum is None else float(mod.momentum)
        with gm.graph.inserting_before(node):
            bn = gm.graph.call_function(aten.batch_norm.default,
                                        (node.args[0], *args, False, momentum, mod.eps, False))
        bn.meta.update(node.meta)
        node.replace_all_uses_with(bn)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                       (FakeQuantize, QATConvBn, GraphBatchNorm, GraphAttention)):
                raise AssertionError(f"{node.name}: QAT module left after freeze")
            if ANNOTATION in node.meta and node.op == "call_module":
                raise AssertionError(f"{node.name}: annotated module left after freeze")


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return tuple(args)


__all__ = ["InsertFakeQuantPass", "TrainEvalOpsPass", "FreezeQATPass"]
