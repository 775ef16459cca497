"""Fuse ``linear(dequantize(a_codes), dequantize(W_int8), bias)`` into one integer GEMM node.

:class:`FuseInt8LinearPass` runs on a copy of the converted graph before it is imported into
Relax. It replaces each matching Linear by ``qcompile_tvm::int8_linear`` whose weights are packed
here, once, for the kernels (:func:`~.int8_gemm.pack_weights`), with their column sums (for the
activation zero point) and the per-channel scales and bias padded alongside. The op has a PyTorch
implementation (the same arithmetic with an exact int32 product), so the pass is tested on its
own; the TVM importer turns it into a call to the TIR kernel.

What fuses: activations ``uint8``/``int8`` quantized per tensor or per token (dynamic), weights
``int8`` per channel or per tensor, symmetric, ``K`` a multiple of 4. Anything else stays a float
Linear on dequantized values; the pass's :class:`~qcompile.passes.lowering.FuseResult` says why for
each node (``skipped``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...ops import CHOOSE_QPARAMS, DEQUANTIZE
from ...passes.infra import Pass, add_tensor, get_attr_tensor
from ...passes.lowering import FuseResult
from . import int8_gemm

aten = torch.ops.aten


@torch.library.custom_op("qcompile_tvm::int8_linear", mutates_args=())
def int8_linear(a: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w_packed: torch.Tensor,
                colsum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, n: int,
                a_format: str) -> torch.Tensor:
    """``linear(dequantize(a), dequantize(W), bias)`` on integer codes: ``a`` u8/s8 ``[..., K]``,
    ``w_packed`` from :func:`~.int8_gemm.pack_weights`, per-tensor or per-row ``a_scale``/``a_zero``.
    Returns float32 ``[..., n]``. s8 activations are shifted to u8 (+128, and the zero point too)."""
    k = a.shape[-1]
    w = torch.from_numpy(int8_gemm.unpack_weights(w_packed.numpy())).to(torch.float64)
    a2 = a.reshape(-1, k).to(torch.int32)
    za = torch.zeros(1, dtype=torch.int32) if a_zero is None else a_zero.reshape(-1).to(torch.int32)
    if a_format == "int8":
        a2, za = a2 + 128, za + 128
    acc = (a2.to(torch.float64) @ w.T).to(torch.int32)  # exact: |acc| < 2**31 < 2**53
    rows = a2.shape[0]
    sa = a_scale.reshape(-1, 1).float()
    out = (acc - za.reshape(-1, 1) * colsum).float() * (sa * w_scale) + bias
    return out[:, :n].reshape(*a.shape[:-1], n) if rows else a.new_empty((*a.shape[:-1], n), dtype=torch.float32)


@int8_linear.register_fake
def _(a, a_scale, a_zero, w_packed, colsum, w_scale, bias, n, a_format):
    return a.new_empty((*a.shape[:-1], n), dtype=torch.float32)


INT8_LINEAR = torch.ops.qcompile_tvm.int8_linear.default


def variable_bias(gm, node) -> Optional[str]:
    """Why a Linear's bias keeps it out of a fused kernel (the kernels take a constant one), or None."""
    if len(node.args) > 2 and node.args[2] is not None and get_attr_tensor(gm, node.args[2]) is None:
        return "the bias is not a constant"
    return None


def replace_linear(gm, node, op, args: tuple) -> None:
    """``node`` (a Linear) replaced by ``op(*args)``, which takes over its meta and its users."""
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(op, args)
    fused.meta = dict(node.meta)
    node.replace_all_uses_with(fused)
    gm.graph.erase_node(node)


def padded_bias(gm, node, n: int, padded: int) -> torch.Tensor:
    """The Linear's constant float bias (zeros without one) padded to the kernel's ``padded`` columns."""
    bias = torch.zeros(padded)
    if len(node.args) > 2 and node.args[2] is not None:
        bias[:n] = get_attr_tensor(gm, node.args[2]).float()
    return bias


def pack_int8_weights(w: np.ndarray, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 weights ``[N, K]`` (``K`` a multiple of 4) and their per-channel or per-tensor scale →
    the GEMM kernels' constants: ``(packed [Np/16, K/4, 64], colsum i32 [Np], w_scale f32 [Np])``,
    ``Np`` = :func:`~.int8_gemm.padded_n`, the padding columns zero."""
    n, k = w.shape
    np_ = int8_gemm.padded_n(n)
    wfull = np.zeros((np_, k), np.int32)
    wfull[:n] = w
    sw = torch.zeros(np_)
    sw[:n] = w_scale.float().reshape(-1).expand(n)
    return torch.from_numpy(int8_gemm.pack_weights(w)), torch.from_numpy(wfull.sum(1).astype(np.int32)), sw


def _static_numel(gm, node) -> Optional[int]:
    t = get_attr_tensor(gm, node)
    if t is not None:
        return t.numel()
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
        return val.numel()
    return None


def _activation_granularity(gm, dq) -> Optional[str]:
    """``per_tensor`` / ``per_token`` for the scale of an activation dequantize, else None."""
    scale = dq.args[1]
    if _static_numel(gm, scale) == 1:
        return "per_tensor"
    src = scale.args[0] if getattr(scale, "target", None) is not None and scale.op == "call_function" \
        and scale.args and getattr(scale.args[0], "target", None) == CHOOSE_QPARAMS else None
    if src is not None:
        return "per_token" if src.args[3] else "per_tensor"
    return None


def int8_operands_reason(gm, node, weight_dim: int, per_token: Optional[str] = None) -> Optional[str]:
    """Why the operands ``(dequantize(a), dequantize(W), ...)`` of ``node`` (a Linear or a conv) do
    not fit the int8 GEMM kernels, or None: u8/s8 activations per tensor or per token, constant s8
    symmetric weights of ``weight_dim`` dims, per channel or per tensor. ``per_token``: the reason
    per-token activation scales do not fit (None: they do)."""
    dqa, dqw = node.args[0], node.args[1]
    if getattr(dqa, "target", None) != DEQUANTIZE:
        return "the input is not dequantized (weight-only or float layer)"
    if getattr(dqw, "target", None) != DEQUANTIZE:
        return "the weight is not dequantized"
    if dqa.args[3] not in ("uint8", "int8") or dqa.args[4] != 0:
        return f"activation format {dqa.args[3]} (group {dqa.args[4]}) has no integer kernel"
    granularity = _activation_granularity(gm, dqa)
    if granularity is None:
        return "activation scale is neither per tensor nor per token"
    if granularity == "per_token" and per_token:
        return per_token
    w = get_attr_tensor(gm, dqw.args[0])
    sw = get_attr_tensor(gm, dqw.args[1])
    if w is None or sw is None or w.dim() != weight_dim:
        return f"weight codes or scale are not constant {weight_dim}-D tensors"
    if dqw.args[3] != "int8" or dqw.args[4] != 0:
        return f"weight format {dqw.args[3]} (group {dqw.args[4]}) has no integer kernel"
    if dqw.args[2] is not None:
        return "asymmetric weights (a weight zero point) are not fused"
    if sw.numel() not in (1, w.shape[0]):
        return f"weight scale of shape {tuple(sw.shape)} is not per channel"
    return None


class FuseInt8LinearPass(Pass):
    """``linear(dequantize(a), dequantize(Wq), b)`` ⇒ ``int8_linear(a, ..., packed Wq, ...)``."""

    name = "fuse_int8_linear"

    def _why_not(self, gm, node) -> Optional[str]:
        if len(node.args) < 2:
            return "linear without a weight argument"
        reason = int8_operands_reason(gm, node, weight_dim=2)
        if reason:
            return reason
        k = get_attr_tensor(gm, node.args[1].args[0]).shape[1]
        if k % 4:
            return f"K={k} is not a multiple of 4"
        return variable_bias(gm, node)

    def call(self, gm):
        fused: dict[str, str] = {}     # linear node -> the op that replaced it
        skipped: dict[str, str] = {}   # linear node -> why it was not fused
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default:
                continue
            reason = self._why_not(gm, node)
            if reason:
                skipped[node.name] = reason
                continue
            dqa, dqw = node.args[0], node.args[1]
            w = get_attr_tensor(gm, dqw.args[0])
            n = w.shape[0]
            packed, colsum, sw = pack_int8_weights(w.numpy(), get_attr_tensor(gm, dqw.args[1]))
            bias = padded_bias(gm, node, n, int8_gemm.padded_n(n))
            base = dqw.args[0].target
            args = [dqa.args[0], dqa.args[1], dqa.args[2],
                    add_tensor(gm, f"{base}_packed", packed, node),
                    add_tensor(gm, f"{base}_colsum", colsum, node),
                    add_tensor(gm, f"{base}_wscale", sw, node),
                    add_tensor(gm, f"{base}_bias", bias, node)]
            replace_linear(gm, node, INT8_LINEAR, (*args, n, dqa.args[3]))
            fused[node.name] = INT8_LINEAR.name()
        return FuseResult.of(gm, fused, skipped)
