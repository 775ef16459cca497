"""Measure a converted graph against float: fills the per-layer and whole-model numbers of a
:class:`~qcompile.report.Report`. Runs the quantized graph once per report batch with an fx
Interpreter that keeps the inputs and outputs of the quantized ops, and the user's float model
with forward hooks on the same layers."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils import _pytree as pytree

from .artifact import stored_nbytes
from .capture import flatten_inputs
from .formats import get_format
from .ops import DEQUANTIZE, QUANTIZE
from .passes.annotate import annotated_nodes
from .passes.infra import get_attr_tensor
from .report import LayerReport, Report, cosine, sqnr, sqnr_from_energy


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, keep):
        super().__init__(gm, garbage_collect_values=True)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            # a clone: later in-place ops in the graph (residual add_) must not change what we keep
            self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def _float_input(node, ann):
    """The float tensor feeding the op before any activation quantization."""
    src = node.args[ann.input_arg if ann.input_arg is not None else 1]
    if getattr(src, "target", None) == DEQUANTIZE and getattr(src.args[0], "target", None) == QUANTIZE:
        return src.args[0].args[0]
    return src


def _spec_name(spec) -> str:
    if spec is None:
        return None
    g = {"per_tensor": "tensor", "per_channel": "channel", "per_group": f"g{spec.group_size}", "per_token": "token",
         "per_token_group": f"token-g{spec.group_size}"}
    return f"{spec.format}/{g[spec.granularity]}{'' if spec.symmetric else '/asym'}{'/dyn' if spec.dynamic else ''}"


def weight_bytes(gm, dq_node) -> int:
    """Stored bytes of one quantized weight: packed codes, plus whatever its scale and zero point
    are built from (a double-quantized scale is itself packed codes, block scales and an offset)."""
    q = get_attr_tensor(gm, dq_node.args[0])
    n = get_format(dq_node.args[3]).packed_nbytes(q.numel())
    for a in dq_node.args[1:3]:
        if a is None:
            continue
        t = get_attr_tensor(gm, a)
        n += t.nbytes if t is not None else weight_bytes(gm, _dequantize_in(a))
    return n


def _dequantize_in(node):
    """The dequantize node a computed scale is rebuilt from."""
    while node.target != DEQUANTIZE:
        node = node.args[0]
    return node


def const_value(gm, node):
    """Value of a node computed from constants only (a dequantize argument, e.g. a rebuilt scale)."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return get_attr_tensor(gm, node)
    args = [const_value(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    return node.target(*args, **node.kwargs)


MASK_NAMES = ("attention_mask", "mask", "input_mask")


def padding_mask(binder, args: tuple, kwargs: dict):
    """``(name, mask)``: the model's attention-mask input when it has one (named like
    ``attention_mask``/``mask``, an integer ``[batch, seq]`` tensor of 0s and 1s, 1 for a real
    token), else ``(None, None)``. Cumulative SQNR leaves out the positions it marks 0: the model
    masks them, so their error never reaches what it returns."""
    named = {**dict(zip(binder.positional, args)), **{k: kwargs[k] for k in binder.keywords if k in kwargs}}
    for name, t in named.items():
        if not (name in MASK_NAMES or name.endswith("attention_mask")) or not isinstance(t, torch.Tensor):
            continue
        if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool and bool(((t == 0) | (t == 1)).all()):
            return name, t.bool()
    return None, None


def _real_positions(mask, ref, test):
    """``(ref, test)`` at the positions ``mask`` keeps, when both are ``[batch, seq, ...]`` with the
    mask's shape in front; else unchanged."""
    if mask is None or ref.dim() < 2 or tuple(ref.shape[:2]) != tuple(mask.shape):
        return ref, test
    return ref[mask], test.reshape(ref.shape)[mask]


def measure(report: Report, gm, float_weights: dict, model, binder, inputs, folded=()) -> Report:
    """Fill ``report`` from ``inputs`` (calibration-like items) — see the module docstring."""
    ops = annotated_nodes(gm)
    keep = set()
    for node, ann in ops:
        keep.add(node)
        keep.add(_float_input(node, ann))
    energy = defaultdict(lambda: [0.0, 0.0])  # key -> [signal, noise]
    out_pairs = []
    layer_nodes = defaultdict(list)
    for node, ann in ops:
        layer_nodes[ann.layer].append(node)
    modules = {}
    for layer, nodes in layer_nodes.items():
        if len(nodes) == 1 and layer not in folded:
            try:
                modules[layer] = model.get_submodule(layer)
            except AttributeError:
                pass
    for item in inputs:
        args, kwargs = binder.bind(item)
        mask_name, mask = padding_mask(binder, args, kwargs)
        if mask_name is not None:
            report.cumulative_sqnr_mask = mask_name
        rec = _Recorder(gm, keep)
        with torch.no_grad():
            q_out = rec.run(*flatten_inputs(gm, args, kwargs))
            float_outs, handles = {}, []
            for layer, mod in modules.items():
                handles.append(mod.register_forward_hook(
                    lambda m, a, o, layer=layer, outs=float_outs: outs.setdefault(
                        layer, o.detach() if isinstance(o, torch.Tensor) else None)))
            try:
                f_out = model(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for node, ann in ops:
                y_q = rec.values[node]
                ref_args = list(node.args)
                x_idx = ann.input_arg if ann.input_arg is not None else 1
                ref_args[x_idx] = rec.values[_float_input(node, ann)]
                ref_args[ann.weight_arg] = float_weights.get(node.name, None)
                if ref_args[ann.weight_arg] is None:
                    continue
                ref_args = [get_attr_tensor(gm, a) if getattr(a, "op", None) == "get_attr" else a for a in ref_args]
                y_f = node.target(*ref_args, **node.kwargs)
                _acc(energy[("own", node.name)], y_f, y_q)
                fo = float_outs.get(ann.layer)
                if fo is not None and fo.numel() == y_q.numel():  # GPT-2's Conv1D: module [B,S,N], op [B*S,N]
                    _acc(energy[("cum", ann.layer)], *_real_positions(mask, fo, y_q.reshape(fo.shape)))
        f_leaves = [t for t in pytree.tree_leaves(f_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        q_leaves = [t for t in pytree.tree_leaves(q_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if f_leaves and len(f_leaves) == len(q_leaves):
            # .float(): outputs may be fp8 codes (a quantized KV cache), which torch.cat will not promote
            out_pairs.append((torch.cat([t.flatten().float() for t in f_leaves]),
                              torch.cat([t.flatten().float() for t in q_leaves])))
        report.report_samples += 1

    seen = set()
    for node, ann in ops:
        dq = node.args[ann.weight_arg] if ann.weight is not None else None
        w_f = float_weights.get(node.name)
        row = LayerReport(ann.layer, ann.op, _spec_name(ann.weight), _spec_name(ann.activation))
        if dq is not None and w_f is not None:
            w_q = const_value(gm, dq)
            row.weight_sqnr = sqnr(w_f, w_q)
            row.weight_bytes_float = w_f.nbytes
            row.weight_bytes_quantized = weight_bytes(gm, dq)
        if ("own", node.name) in energy:
            row.output_sqnr = _db(energy[("own", node.name)])
        if ("cum", ann.layer) in energy:
            row.cumulative_sqnr = _db(energy[("cum", ann.layer)])
        report.layers.append(row)
        if dq is not None and id(dq) not in seen:
            seen.add(id(dq))
            report.linear_weight_bytes_before += row.weight_bytes_float
            report.linear_weight_bytes_after += row.weight_bytes_quantized
    report.bytes_before = sum(t.nbytes for t in _unique_tensors(model))
    report.bytes_after = stored_nbytes(gm)
    if out_pairs:
        ref = torch.cat([a for a, _ in out_pairs])
        test = torch.cat([b for _, b in out_pairs])
        report.output_sqnr = sqnr(ref, test)
        report.output_cosine = cosine(ref, test)
        report.output_max_abs_diff = float((ref - test).abs().max())
    return report


def _acc(acc, ref, test):
    ref, test = ref.double(), test.double()
    acc[0] += float(ref.pow(2).sum())
    acc[1] += float((ref - test).pow(2).sum())


def _db(acc) -> float:
    return sqnr_from_energy(acc[0], acc[1])


def _unique_tensors(model):
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
