"""Lower a converted qcompile graph to Triton kernels: a copy of the Q/DQ graph in which quantized
Linears call :mod:`.graph_ops` and everything else stays PyTorch.

:class:`FuseTritonKernelsPass` rewrites

* ``linear(dequantize(quantize(x, s_a, z_a)), dequantize(W_q int8, s_w), b)`` (static per-tensor or
  dynamic per-token int8/uint8 activations, symmetric per-channel int8 weights) into the W8A8
  integer GEMM on the activation codes;
* ``linear(dequantize(quantize(x, s_a) fp8), dequantize(W_q fp8, s_w), b)`` (per-tensor or per-token
  activation scale, per-channel weights) into the FP8 GEMM (GPUs of compute capability 8.9+);
* ``linear(x, dequantize(W_q, s_w, z_w, fmt, group), b)`` with ``fmt`` in int8/uint8/int4/uint4/nf4/fp8
  (per-channel or per-group) into the weight-only kernel (``x`` may itself be a dequantized
  activation: the kernel reads it as float);

then :class:`QuantizeActivationsPass` replaces each static per-tensor int8/uint8 ``quantize`` by the
Triton quantize kernel and each ``choose_qparams(per_token)`` + ``quantize`` pair by the fused
per-token kernel. Weights are repacked once here (:func:`weight_only.pack_weight`,
:func:`w8a8.pack_int8_weight`) and stored as buffers of the copy. Both return a
:class:`~qcompile.passes.lowering.FuseResult`: ``fused`` maps each rewritten node to its kernel,
``skipped`` says why a Linear (or a quantize) stayed in PyTorch."""
from __future__ import annotations

import copy
import operator

import torch

from ...ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ...passes.infra import Pass, PassManager, add_tensor, get_attr_tensor, prune_unused_tensors
from ...passes.lowering import FuseResult, quantized_linears
from . import graph_ops
from .activation_quant import ACTIVATION_FORMATS
from .fp8 import FP8_FORMATS, pack_fp8_weight
from .w8a8 import pack_int8_weight
from .weight_only import WEIGHT_FORMATS, pack_weight

aten = torch.ops.aten


def _out_dtype(dq) -> torch.dtype:
    return dq.args[5] if len(dq.args) > 5 else torch.float32


def _activation_scale_reason(gm, dq) -> str | None:
    """Why the activation scale of ``dq`` cannot go to a GEMM epilogue (None: it can). The kernels
    take one scale per tensor or per row: a 0-d constant or ``choose_qparams``' output."""
    s_a = get_attr_tensor(gm, dq.args[1])
    if s_a is not None:
        return None if s_a.numel() == 1 else "static activation scale is not per-tensor"
    if _dynamic_source(gm, dq.args[1]) is None:
        return "activation scale is neither a constant nor choose_qparams' output"
    return None


def _dynamic_source(gm, scale_node):
    """The ``choose_qparams`` node a dynamic scale comes from (``getitem(choose_qparams(...), 0)``)."""
    if getattr(scale_node, "target", None) is operator.getitem and getattr(scale_node.args[0], "target", None) == CHOOSE_QPARAMS:
        return scale_node.args[0]
    return None


class FuseTritonKernelsPass(Pass):
    """Quantized Linears → Triton GEMMs (see the module docstring). Its :class:`FuseResult`'s ``fused``
    maps each rewritten linear node to its kernel, ``skipped`` each other linear to the reason it
    stayed in PyTorch."""

    name = "fuse_triton_kernels"

    def __init__(self, fp8_gemm: bool = True, autotune: bool = False):
        self.fp8_gemm = fp8_gemm  # False on GPUs without FP8 tensor cores (before compute capability 8.9)
        self.autotune = autotune  # passed to every kernel call (GPU only)

    def call(self, gm):
        fused: dict[str, str] = {}    # linear node -> kernel
        skipped: dict[str, str] = {}  # linear node -> why it stayed in PyTorch
        for node, x, w_dq, bias in quantized_linears(gm, skipped):
            wq, sw, zw = (get_attr_tensor(gm, a) for a in w_dq.args[:3])
            if wq is None or sw is None or (w_dq.args[2] is not None and zw is None):
                skipped[node.name] = "weight codes or scales are not constants"
                continue
            if zw is not None and zw.is_floating_point():   # the kernels take integer zero points
                skipped[node.name] = "float zero point (x = s*q + min): no kernel, stays in PyTorch"
                continue
            kernel, reason = self._w8a8(gm, node, x, w_dq, wq, sw, zw, bias)
            if kernel is None:
                kernel, reason2 = self._weight_only(gm, node, x, w_dq, wq, sw, zw, bias)
                if kernel is None:
                    skipped[node.name] = f"{reason2}; not W8A8 either: {reason}"
                    continue
            fused[node.name] = kernel
        return FuseResult.of(gm, fused, skipped)

    # _w8a8, _fp8, _weight_only: (the kernel's name, None) when they rewrote ``node``, else (None, why not)
    def _w8a8(self, gm, node, x, w_dq, wq, sw, zw, bias):
        if getattr(x, "target", None) != DEQUANTIZE or getattr(x.args[0], "target", None) != QUANTIZE:
            return None, "activation not quantized"
        q = x.args[0]
        if q.args[3] in FP8_FORMATS:
            return self._fp8(gm, node, x, q, w_dq, wq, sw, zw, bias)
        if q.args[3] not in ACTIVATION_FORMATS or q.args[4] != 0:
            return None, f"activation format '{q.args[3]}' (group {q.args[4]}) has no integer GEMM"
        reason = _activation_scale_reason(gm, x)
        if reason:
            return None, reason
        if w_dq.args[3] != "int8" or w_dq.args[4] != 0:
            return None, f"weight format '{w_dq.args[3]}' (group {w_dq.args[4]}) is not per-channel int8"
        try:
            p = pack_int8_weight(wq, sw, zw)
        except ValueError as e:
            return None, str(e)
        self._replace(gm, node, w_dq, graph_ops.w8a8_linear, (q, x.args[1], x.args[2]), p,
                      (bias, p.n, p.k, _out_dtype(w_dq)))
        return f"w8a8 ({q.args[3]} activations)", None

    def _fp8(self, gm, node, x, q, w_dq, wq, sw, zw, bias):
        if not self.fp8_gemm:
            return None, "this GPU has no FP8 tensor cores (compute capability < 8.9)"
        if w_dq.args[3] not in FP8_FORMATS or w_dq.args[4] != 0 or zw is not None:
            return None, f"fp8 activations with '{w_dq.args[3]}' weights (group {w_dq.args[4]}): the FP8 GEMM needs per-channel fp8"
        reason = _activation_scale_reason(gm, x) or ("fp8 activations with a zero point" if x.args[2] is not None else None)
        if reason:
            return None, reason
        try:
            p = pack_fp8_weight(wq, sw)
        except ValueError as e:
            return None, str(e)
        self._replace(gm, node, w_dq, graph_ops.fp8_linear, (q, x.args[1]), p, (bias, p.n, p.k, _out_dtype(w_dq)))
        return f"fp8 gemm ({q.args[3]} activations)", None

    def _weight_only(self, gm, node, x, w_dq, wq, sw, zw, bias):
        fmt, group = w_dq.args[3], w_dq.args[4]
        if fmt not in WEIGHT_FORMATS:
            return None, f"weight format '{fmt}' has no Triton kernel (have {', '.join(WEIGHT_FORMATS)})"
        try:
            p = pack_weight(wq, sw, zw, fmt, group)
        except ValueError as e:
            return None, str(e)
        self._replace(gm, node, w_dq, graph_ops.weight_only_linear, (x,), p, (bias, fmt, group, p.n, p.k))
        return f"weight-only {fmt}" + (f" g{group}" if group else " per-channel"), None

    def _replace(self, gm, node, w_dq, target, lead, packed, tail):
        """``node`` ⇒ ``target(*lead, *packed tensors as buffers, *tail)``."""
        name = w_dq.args[0].target
        tensors = [None if t is None else add_tensor(gm, f"{name}_tri_{k}", t, node) for k, t in packed.tensors().items()]
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(target, (*lead, *tensors, *tail, self.autotune))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)


class QuantizeActivationsPass(Pass):
    """Static per-tensor and dynamic per-token int8/uint8 ``quantize`` nodes → Triton kernels
    (same codes as the canonical op). Its :class:`FuseResult`'s ``fused`` maps each replaced
    quantize node to its kernel, ``skipped`` names quantizers left to PyTorch and why."""

    name = "quantize_activations_triton"

    def call(self, gm):
        replaced: dict[str, str] = {}  # quantize node -> kernel
        skipped: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.target != QUANTIZE:
                continue
            x, s, z, fmt, group = node.args
            if fmt not in ACTIVATION_FORMATS or group != 0:
                skipped[node.name] = f"format '{fmt}' group {group}"
                continue
            s_t = get_attr_tensor(gm, s)
            if s_t is not None:
                if s_t.numel() != 1:
                    skipped[node.name] = "static scale is not per-tensor"
                    continue
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(graph_ops.quantize_static, (x, s, z, fmt))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                replaced[node.name] = "static per-tensor"
                continue
            src = _dynamic_source(gm, s)
            if src is None or src.args[0] is not x or src.args[1] != fmt or not src.args[3] \
                    or getattr(z, "args", (None,))[0] is not src:
                skipped[node.name] = "dynamic scale is not choose_qparams(per_token=True) of the same tensor"
                continue
            if len(src.args) > 4 and src.args[4]:  # per_token_group: one scale per row and K-block
                skipped[node.name] = "per-token-group scales (the per-token kernel takes one scale per row)"
                continue
            symmetric = src.args[2]
            if symmetric and fmt == "uint8":
                skipped[node.name] = "symmetric per-token uint8 (mid-range zero point)"
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(graph_ops.quantize_per_token, (x, fmt, symmetric))
                codes, scale, zero = (gm.graph.call_function(operator.getitem, (fused, i)) for i in range(3))
            codes.meta = dict(node.meta)
            s.replace_all_uses_with(scale)
            z.replace_all_uses_with(zero)
            node.replace_all_uses_with(codes)
            gm.graph.erase_node(node)
            replaced[node.name] = "dynamic per-token (fused)"
        gm.graph.eliminate_dead_code()
        return FuseResult.of(gm, replaced, skipped)


def lower_graph(gm: torch.fx.GraphModule, fp8_gemm: bool = True,
                autotune: bool = False) -> tuple[torch.fx.GraphModule, FuseResult, FuseResult]:
    """(a lowered copy of ``gm``, the fusion pass's result, the activation pass's): the original is untouched."""
    gm = copy.deepcopy(gm)
    fuse, acts = FuseTritonKernelsPass(fp8_gemm, autotune), QuantizeActivationsPass()
    pm = PassManager([fuse, acts])
    pm(gm)
    gm.graph.eliminate_dead_code()
    prune_unused_tensors(gm)
    gm.recompile()
    return gm, pm.result(fuse.name), pm.result(acts.name)
