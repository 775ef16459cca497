"""Unroll recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) into Linears and gates, so the
Linear machinery quantizes them like any layer: weight-only, dynamic or static activations.

``torch.export`` captures an ``nn.LSTM`` as one fused ``aten.lstm.input`` node reading the flat
weights. No backend has a quantized kernel for that node, and dynamic activation quantization
(PyTorch's eager ``quantize_dynamic`` LSTM) quantizes the hidden state *at every step*, which a
fused op hides. So each layer and direction becomes::

    xw  = linear(x, W_ih, b_ih)                   # the input projection, all steps at once
    for t in steps:                               # unrolled: the sequence length must be static
        g = xw[t] + linear(h, W_hh, b_hh)         # LSTM: i, f, g, o gates; GRU: r, z, n; RNN: tanh/relu
        h, c = cell(g, c)
    output = stack(h_t), h_n, c_n

Every ``linear`` carries the recurrent module's path as its layer (``rnn``), so ``keep_float:
[rnn]``, ``overrides: {"type:LSTM": ...}`` and the report address the module as a whole; the
step Linears read the same ``W_hh`` node, so convert quantizes it once. The graph stays plain
aten ops (slice, sigmoid, tanh, mul, add, stack): ONNX exports and onnxruntime runs it, TVM lowers
it, the reference backend runs it.

What is left fused (and then listed in ``kept_float`` by :class:`~qcompile.passes.annotate.AnnotatePass`
with the reason this pass gives): a layer the recipe keeps float; a sequence length that is dynamic
(capture it static — ``capture`` does so by default for models with recurrent layers); a
training-mode graph (live dropout between layers); weights computed in the graph. An LSTM with
``proj_size`` unrolls like the others, its projection ``h = W_hr (o * tanh(c))`` one more Linear
per step on the same ``W_hr``."""
from __future__ import annotations

import operator
from typing import Optional

import torch

from ..recipe import Recipe
from ..scope import resolve_layer_config
from ..spec import LAYER, LAYER_TYPE
from .infra import Pass, PassResult, get_attr_tensor

aten = torch.ops.aten

# fused op -> (cell kind, gates stacked in its weight rows)
CELLS = {aten.lstm.input: ("lstm", 4), aten.gru.input: ("gru", 3),
             aten.rnn_tanh.input: ("rnn_tanh", 1), aten.rnn_relu.input: ("rnn_relu", 1)}


class DecomposeRecurrentPass(Pass):
    """Unroll every recurrent node the recipe quantizes (see the module docstring). ``skipped``:
    module path -> why its recurrent node stays fused and float."""

    name = "decompose_recurrent"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, gm):
        result = PassResult(gm, False)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in CELLS:
                continue
            layer = node.meta.get(LAYER, node.name)
            why = self._why_not(gm, node, layer)
            if why is not None:
                result.skipped[layer] = why
                continue
            _unroll(gm, node, layer)
            result.changed.append(layer)
            result.modified = True
        if result.modified:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return result

    def _why_not(self, gm, node, layer) -> Optional[str]:
        kind, gates = CELLS[node.target]
        mtype = node.meta.get(LAYER_TYPE, kind.upper())
        cfg, source = resolve_layer_config(self.recipe, layer, mtype, "linear")
        if cfg is None or (cfg.weight is None and cfg.activation is None):
            return f"kept float by {source}"
        x, params, has_bias, layers, train, bidirectional, batch_first = _args(node)
        if train:
            return (f"no quantized kernel for {mtype} in a training graph (kept float): capture the model in eval "
                    f"mode (model.eval()) to unroll and quantize it")
        if _per_direction(params, has_bias, layers, bidirectional) is None:
            return f"no quantized kernel for {mtype} with {len(params)} weight tensors (kept float): not a torch layout"
        if any(p.op != "get_attr" for p in params):
            return (f"no quantized kernel for {mtype}: its weights are computed in the graph (kept float): make them "
                    f"parameters of the module to quantize it")
        val = x.meta.get("val")
        steps = val.shape[1 if batch_first else 0] if isinstance(val, torch.Tensor) and val.dim() == 3 else None
        if not isinstance(steps, int):
            return (f"no quantized kernel for {mtype} with a dynamic sequence length (kept float): quantizing it "
                    f"unrolls the recurrence; capture with a static sequence length (dynamic_shapes= with the "
                    f"batch dim only)")
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            return (f"no quantized kernel for {mtype}: its outputs are read as a whole (kept float): read them by "
                    f"index (out, h = rnn(x)) to quantize it")
        return None


def _per_direction(params, has_bias, layers, bidirectional) -> Optional[int]:
    """Weight tensors per layer and direction: ``W_ih, W_hh[, b_ih, b_hh][, W_hr]`` (``W_hr`` with
    ``proj_size``), or ``None`` when ``params`` fits neither layout."""
    groups = layers * (2 if bidirectional else 1)
    for per in ((4, 5) if has_bias else (2, 3)):
        if len(params) == groups * per:
            return per
    return None


def _args(node):
    """(input, params, has_biases, num_layers, train, bidirectional, batch_first) of a recurrent node."""
    a = node.args
    return a[0], list(a[2]), a[3], a[4], a[6], a[7], a[8]


class _Emitter:
    """Appends aten nodes before ``anchor``, each tagged with the recurrent module's layer."""

    def __init__(self, gm, anchor, layer, mtype):
        self.gm, self.anchor, self.layer, self.mtype = gm, anchor, layer, mtype

    def __call__(self, op, *args):
        with self.gm.graph.inserting_before(self.anchor):
            n = self.gm.graph.call_function(op, args)
        n.meta[LAYER], n.meta[LAYER_TYPE] = self.layer, self.mtype
        n.meta["nn_module_stack"] = self.anchor.meta.get("nn_module_stack", {})
        return n

    def gates(self, g, n, hidden):
        # dim 1 of a step's [batch, gates * hidden], not -1: TVM's relax frontend wants it non-negative
        return [self(aten.slice.Tensor, g, 1, k * hidden, (k + 1) * hidden) for k in range(n)]


def _unroll(gm, node, layer):
    kind, n_gates = CELLS[node.target]
    x, params, has_bias, layers, _, bidirectional, batch_first = _args(node)
    hx = node.args[1]
    h0s, c0s = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    emit = _Emitter(gm, node, layer, node.meta.get(LAYER_TYPE, kind.upper()))
    time_dim = 1 if batch_first else 0
    steps = x.meta["val"].shape[time_dim]
    dirs = 2 if bidirectional else 1
    per = _per_direction(params, has_bias, layers, bidirectional)
    projected = per == (5 if has_bias else 3)   # proj_size: h = W_hr (o * tanh(c)), W_hr the last of the group
    hidden = get_attr_tensor(gm, params[1]).shape[0] // n_gates   # W_hh is [gates * hidden, proj_size or hidden]
    seq, h_n, c_n = x, [], []
    for lay in range(layers):
        outs = []
        for d in range(dirs):
            idx = lay * dirs + d
            w_ih, w_hh = params[idx * per], params[idx * per + 1]
            b_ih, b_hh = (params[idx * per + 2], params[idx * per + 3]) if has_bias else (None, None)
            w_hr = params[idx * per + per - 1] if projected else None
            xw = emit(aten.linear.default, seq, w_ih, b_ih)    # every step's input projection at once
            h = emit(aten.select.int, h0s, 0, idx)
            c = emit(aten.select.int, c0s, 0, idx) if c0s is not None else None
            out = [None] * steps
            for t in (range(steps - 1, -1, -1) if d else range(steps)):
                xt = emit(aten.select.int, xw, time_dim, t)
                hw = emit(aten.linear.default, h, w_hh, b_hh)
                h, c = _cell(emit, kind, n_gates, hidden, xt, hw, h, c)
                if w_hr is not None:
                    h = emit(aten.linear.default, h, w_hr, None)
                out[t] = h
            outs.append(emit(aten.stack.default, out, time_dim))
            h_n.append(h)
            c_n.append(c)
        seq = outs[0] if dirs == 1 else emit(aten.cat.default, outs, 2)
    results = [seq, emit(aten.stack.default, h_n, 0)]
    if kind == "lstm":
        results.append(emit(aten.stack.default, c_n, 0))
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _cell(emit, kind, n_gates, hidden, xt, hw, h, c):
    """One step: (new h, new c) from the step's input projection ``xt`` and ``hw = W_hh h + b_hh``."""
    if kind == "lstm":   # gate order i, f, g, o (torch's)
        i, f, g, o = emit.gates(emit(aten.add.Tensor, xt, hw), 4, hidden)
        i, f, o = (emit(aten.sigmoid.default, v) for v in (i, f, o))
        c = emit(aten.add.Tensor, emit(aten.mul.Tensor, f, c), emit(aten.mul.Tensor, i, emit(aten.tanh.default, g)))
        return emit(aten.mul.Tensor, o, emit(aten.tanh.default, c)), c
    if kind == "gru":    # r, z, n; n = tanh(x_n + r * (W_hn h + b_hn)); h' = n + z * (h - n)
        xr, xz, xn = emit.gates(xt, 3, hidden)
        hr, hz, hn = emit.gates(hw, 3, hidden)
        r = emit(aten.sigmoid.default, emit(aten.add.Tensor, xr, hr))
        z = emit(aten.sigmoid.default, emit(aten.add.Tensor, xz, hz))
        n = emit(aten.tanh.default, emit(aten.add.Tensor, xn, emit(aten.mul.Tensor, r, hn)))
        return emit(aten.add.Tensor, n, emit(aten.mul.Tensor, z, emit(aten.sub.Tensor, h, n))), None
    act = aten.tanh.default if kind == "rnn_tanh" else aten.relu.default
    return emit(act, emit(aten.add.Tensor, xt, hw)), None


__all__ = ["DecomposeRecurrentPass", "CELLS"]
