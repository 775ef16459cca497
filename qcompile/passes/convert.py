"""Convert an annotated (and, for static activations, calibrated) graph into the explicit
quantize/dequantize graph every backend lowers and the reference backend runs:

* weights: ``W`` → ``dequantize(W_q, scale, zp)`` with ``W_q`` stored as codes (a new buffer);
* static activations: the observer becomes ``dequantize(quantize(x, s, z), s, z)``;
* dynamic activations: ``s, z = choose_qparams(x)`` then the same pair.

The op's output stays float: backends pattern-match ``dequantize → op`` into integer kernels."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from ..errors import CalibrationError, QuantizationError
from ..formats import (DOUBLE_QUANT_BLOCK, SUPER_BLOCK, TWO_LEVEL, double_quantize_scales, rebuild_scales,
                       two_level_quantize, two_level_values)
from ..observers import Observer, weight_qparams
from ..ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ..spec import LAYER, QPARAMS, ROLE, WEIGHT_QPARAMS
from .annotate import annotated_nodes
from .infra import Pass, PassResult, add_tensor, get_attr_tensor


def _group(spec) -> int:
    return spec.group_size if spec.granularity == "per_group" else 0


def _tag(node, role, layer, spec):
    node.meta[ROLE], node.meta[LAYER], node.meta[QPARAMS] = role, layer, spec
    return node


@dataclass
class ConvertResult(PassResult):
    """``float_weights``: op node name -> the float weight its codes replaced (what the report
    measures the weight error against; GPTQ/AWQ record their own reference)."""

    float_weights: dict = field(default_factory=dict)


class ConvertPass(Pass):
    name = "convert"

    def requires(self, gm):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Observer):
                obs = gm.get_submodule(node.target)
                if obs.batches == 0:
                    raise CalibrationError(f"observer for layer(s) {', '.join(obs.layers)} saw no data: "
                                           "calibrate (call the prepared model on data) before convert")

    def call(self, gm):
        float_weights: dict = {}
        weights: dict = {}   # weight target -> dequantize node (a shared weight is quantized once)
        acts: dict = {}      # (input node, spec) -> dequantize node
        for node, ann in annotated_nodes(gm):
            if ann.weight is not None:
                w_node = node.args[ann.weight_arg]
                solved = node.meta.get(WEIGHT_QPARAMS)
                float_weights[node.name] = solved.reference if solved is not None else get_attr_tensor(gm, w_node)
                key = (w_node.target, ann.weight)
                if key not in weights:
                    weights[key] = self._weight(gm, node, w_node, ann)
                node.args = _replace(node.args, ann.weight_arg, weights[key])
            if ann.activation is not None and ann.activation.dynamic:
                src = node.args[ann.input_arg]
                key = (src, ann.activation)
                if key not in acts:
                    acts[key] = self._dynamic(gm, src, node, ann)
                node.args = _replace(node.args, ann.input_arg, acts[key])
        modified = bool(weights or acts)
        observers: dict = {}  # observer target -> (scale node, zero-point node): one set of qparams per module
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Observer):
                self._static(gm, node, observers)
                modified = True
        for target in observers:  # an observer may be called on several edges (a reused output grid)
            gm.delete_submodule(target)
        return ConvertResult(gm, modified, float_weights=float_weights)

    def _weight(self, gm, op_node, w_node, ann):
        spec = ann.weight
        w = get_attr_tensor(gm, w_node)
        solved = op_node.meta.get(WEIGHT_QPARAMS)
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            bad = "NaN" if bool(torch.isnan(w).any()) else "Inf"
            raise QuantizationError(f"layer '{ann.layer}': its weight has {bad} values, which cannot be quantized "
                                    f"to '{spec.format}'; fix the float model (or keep the layer float with an override)")
        # GPTQ/AWQ weights lie on the grid they were solved for, QAT trained its scales: keep them
        # (min-max would move them); PTQ derives them from the weight
        scale, zp = (solved.scale, solved.zero_point) if solved is not None else weight_qparams(w, spec, ann.channel_axis)
        base = w_node.target
        if spec.scale_dtype == "int8":
            s, scale = self._double_quantized_scale(gm, op_node, base, scale, ann)
        elif spec.scale_dtype in TWO_LEVEL:
            s, scale = self._two_level(gm, op_node, base, scale, ann, spec.scale_dtype)
        else:
            s = add_tensor(gm, f"{base}_scale", scale, op_node)
        if zp is not None and spec.zero_point_dtype == "int8":   # a float zero point, double-quantized
            z, zp = self._double_quantized_scale(gm, op_node, base, zp, ann, "zero_point", None)
        elif zp is not None and spec.zero_point_dtype in TWO_LEVEL:   # a k-quant minimum
            z, zp = self._two_level(gm, op_node, base, zp, ann, spec.zero_point_dtype, "zero_point")
        elif zp is not None and spec.zero_point_dtype == "float32":
            zp = zp.float()
        codes = QUANTIZE(w.detach(), scale, zp, spec.format, _group(spec))
        q = add_tensor(gm, f"{base}_q", codes, op_node)
        if zp is not None and spec.zero_point_dtype != "int8" and spec.zero_point_dtype not in TWO_LEVEL:
            z = add_tensor(gm, f"{base}_zero_point", zp, op_node)
        elif zp is None:
            z = None
        with gm.graph.inserting_before(op_node):
            dq = gm.graph.call_function(DEQUANTIZE, (q, s, z, spec.format, _group(spec), w.dtype))
        for n in (q, s, z, dq):
            if n is not None:
                _tag(n, "weight", ann.layer, spec)
        return dq

    @staticmethod
    def _double_quantized_scale(gm, op_node, base, scale, ann, what="scale", floor=torch.finfo(torch.float32).tiny):
        """Scales (or float zero points: ``what="zero_point"``, ``floor=None``) stored as int8 codes
        (``formats.double_quantize_scales``); the graph rebuilds them:
        ``clamp_min(reshape(dequantize(codes) + offset), tiny)`` (a scale's block rounding must
        never make it <= 0; a zero point has no floor). Returns that node and the rebuilt values
        (the weight's codes are computed with them, as the graph will use them)."""
        codes, block_scales, offset = double_quantize_scales(scale)
        nodes = [add_tensor(gm, f"{base}_{what}_q", codes, op_node),
                 add_tensor(gm, f"{base}_{what}_scale", block_scales, op_node),
                 add_tensor(gm, f"{base}_{what}_offset", offset, op_node)]
        with gm.graph.inserting_before(op_node):
            dq = gm.graph.call_function(DEQUANTIZE, (nodes[0], nodes[1], None, "int8", DOUBLE_QUANT_BLOCK,
                                                     torch.float32))
            add = gm.graph.call_function(torch.ops.aten.add.Tensor, (dq, nodes[2]))
            out = gm.graph.call_function(torch.ops.aten.reshape.default, (add, list(scale.shape)))
            made = [dq, add, out]
            if floor is not None:
                out = gm.graph.call_function(torch.ops.aten.clamp_min.default, (out, floor))
                made.append(out)
        for n in (*nodes, *made):
            _tag(n, "weight", ann.layer, ann.weight)
        return out, rebuild_scales(codes, block_scales, offset, scale.shape, floor=floor)

    @staticmethod
    def _two_level(gm, op_node, base, values, ann, dtype, what="scale"):
        """Scales (or k-quant minima: ``what="zero_point"``, a float64 result) stored the way
        llama.cpp's k-quants store them (``formats.two_level_quantize``): small codes and one float16
        super-scale per 256 weights of a row; the graph rebuilds them with one dequantize (exact).
        Returns that node and the rebuilt values."""
        group = ann.weight.group_size
        codes, sup = two_level_quantize(values, dtype, group)
        out_dtype = torch.float64 if what == "zero_point" else torch.float32
        nodes = [add_tensor(gm, f"{base}_{what}_q", codes, op_node),
                 add_tensor(gm, f"{base}_{what}_super", sup, op_node)]
        with gm.graph.inserting_before(op_node):
            dq = gm.graph.call_function(DEQUANTIZE, (nodes[0], nodes[1], None, TWO_LEVEL[dtype],
                                                     SUPER_BLOCK // group, out_dtype))
        for n in (*nodes, dq):
            _tag(n, "weight", ann.layer, ann.weight)
        return dq, two_level_values(codes, sup, group, out_dtype)

    def _dynamic(self, gm, src, op_node, ann):
        spec = ann.activation
        with gm.graph.inserting_before(op_node):
            # per_token_group: one more argument (the group), so graphs without it keep their schema
            extra = (spec.group,) if spec.group else ()
            qp = gm.graph.call_function(CHOOSE_QPARAMS, (src, spec.format, spec.symmetric, spec.per_token, *extra))
            s = gm.graph.call_function(operator.getitem, (qp, 0))
            z = gm.graph.call_function(operator.getitem, (qp, 1))
            q = gm.graph.call_function(QUANTIZE, (src, s, z, spec.format, spec.group))
            dq = gm.graph.call_function(DEQUANTIZE, (q, s, z, spec.format, spec.group, _dtype(src)))
        for n in (qp, s, z, q, dq):
            _tag(n, "activation", ann.layer, spec)
        return dq

    def _static(self, gm, obs_node, observers):
        obs = gm.get_submodule(obs_node.target)
        spec = obs.spec
        src = obs_node.args[0]
        layer = ",".join(obs.layers)
        if obs_node.target not in observers:
            scale, zp = obs.qparams()
            s = add_tensor(gm, f"{obs_node.target}_scale", scale.reshape(()), obs_node)
            z = add_tensor(gm, f"{obs_node.target}_zero_point", zp.reshape(()), obs_node) if zp is not None else None
            observers[obs_node.target] = (s.target, None if z is None else z.target)
        else:
            with gm.graph.inserting_before(obs_node):
                s, z = (None if t is None else gm.graph.get_attr(t) for t in observers[obs_node.target])
        with gm.graph.inserting_before(obs_node):
            q = gm.graph.call_function(QUANTIZE, (src, s, z, spec.format, 0))
            dq = gm.graph.call_function(DEQUANTIZE, (q, s, z, spec.format, 0, _dtype(src)))
        for n in (s, z, q, dq):
            if n is not None:
                _tag(n, "activation", layer, spec)
        obs_node.replace_all_uses_with(dq)
        gm.graph.erase_node(obs_node)

    def ensures(self, gm):
        for node, ann in annotated_nodes(gm):
            if ann.weight is not None and node.args[ann.weight_arg].target != DEQUANTIZE:
                raise AssertionError(f"{node.name}: weight not dequantized after convert")
            if ann.activation is not None and node.args[ann.input_arg].target != DEQUANTIZE:
                raise AssertionError(f"{node.name}: activation not quantized after convert")


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return tuple(args)


def _dtype(node) -> torch.dtype:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32


