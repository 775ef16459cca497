"""Fuse what follows an integer GEMM into its epilogue: activation, per-column multiply and the
static quantize of the next Linear's input, so the GEMM stores ``uint8``/``int8`` codes.

In a transformer FFN the up-projection's float output ``[tokens, 4·hidden]`` is read back once,
by a kernel doing GELU, SmoothQuant's per-channel multiply and the down-projection's activation
quantize. :class:`FuseEpiloguePass` (on the FX graph, after :class:`~.fuse.FuseInt8LinearPass`)
replaces the chain

    ``int8_linear → [gelu | relu] → [mul by a constant per-column vector] → quantize``

by one ``qcompile_tvm::int8_linear_q`` whose kernel (:func:`~.kernels.gemm_kernel` with an
``epilogue``) does all of it in registers and writes a quarter of the bytes. The pass runs on the
FX graph rather than in Relax because the chain is plainest there (no reshapes, slices or fused
TIR to look through), ``int8_linear``'s constants are at hand, and the fused op has a PyTorch
implementation, so the pass is tested without TVM.

What fuses: a quantize with a constant per-tensor scale and integer zero point (static), format
``uint8``/``int8``, of an ``int8_linear`` output that nothing else reads (each intermediate has
that one consumer). Dynamic (per-token) quantizers compute their scale from the very tensor the
GEMM writes, so they cannot be fused this way and are left alone; :attr:`FuseEpiloguePass.skipped`
says why for each ``int8_linear`` left as it was.

Numerics: the kernel repeats the unfused graph's steps in order — GELU as
``pipeline._gelu_te`` (TVM's ``fast_erf``), then ``* cm``, then ``round(x * (1/scale)) + zp``
(round half to even), clamped — so codes match the unfused TVM build up to float rounding of the
polynomial (FMA contraction), which moves a code by one step only on an exact rounding tie.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...formats import get_format
from ...ops import CHOOSE_QPARAMS, QUANTIZE
from ...passes.infra import Pass, PassResult, add_tensor, get_attr_tensor
from .fuse import INT8_LINEAR, int8_linear

aten = torch.ops.aten

_ACTIVATIONS = {aten.gelu.default: "gelu", aten.relu.default: "relu"}


@torch.library.custom_op("qcompile_tvm::int8_linear_q", mutates_args=())
def int8_linear_q(a: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w_packed: torch.Tensor,
                  colsum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, n: int, a_format: str,
                  activation: str, channel_mul: torch.Tensor, out_inv_scale: torch.Tensor, out_zero: torch.Tensor,
                  out_format: str) -> torch.Tensor:
    """``quantize(activation(int8_linear(...)) * channel_mul, 1 / out_inv_scale, out_zero)``: codes of
    ``out_format`` ``[..., n]``. ``channel_mul`` is padded like the bias (``[Np]``); ``out_inv_scale``
    is ``1 / scale`` computed in float32, as the reference quantize computes it."""
    y = int8_linear(a, a_scale, a_zero, w_packed, colsum, w_scale, bias, n, a_format)
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "relu":
        y = torch.relu(y)
    elif activation != "none":
        raise ValueError(f"unknown activation '{activation}'")
    fmt = get_format(out_format)
    q = torch.round((y * channel_mul[:n]) * out_inv_scale) + out_zero.float()
    return q.clamp(fmt.qmin, fmt.qmax).to(fmt.storage)


@int8_linear_q.register_fake
def _(a, a_scale, a_zero, w_packed, colsum, w_scale, bias, n, a_format, activation, channel_mul, out_inv_scale,
      out_zero, out_format):
    return a.new_empty((*a.shape[:-1], n), dtype=get_format(out_format).storage)


INT8_LINEAR_Q = torch.ops.qcompile_tvm.int8_linear_q.default


_DYNAMIC = "the quantize is dynamic (its scale is computed at run time from this output): not fusable"


def _only_user(node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _why_many(node, what: str) -> str:
    if any(u.target == CHOOSE_QPARAMS for u in node.users):
        return _DYNAMIC
    return f"{what} has {len(node.users)} consumers"


def _channel_vector(gm, node, n: int) -> Optional[torch.Tensor]:
    """The constant factor of ``mul(x, c)`` / ``mul(c, x)`` as a ``[n]`` float vector when it
    scales the last dim only (per column or one scalar), else None."""
    if node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    consts = [get_attr_tensor(gm, a) for a in node.args]
    c = consts[1] if consts[1] is not None else consts[0]
    if c is None or consts[0] is not None and consts[1] is not None or c.dtype != torch.float32:
        return None
    if c.numel() == 1:
        return c.reshape(1).expand(n).clone()
    if c.shape[-1] == n and c.numel() == n:
        return c.reshape(n).clone()
    return None


class FuseEpiloguePass(Pass):
    """``quantize(mul(gelu(int8_linear(...)), c))`` ⇒ ``int8_linear_q(..., "gelu", c, 1/scale, zp)``
    (the activation and the multiply optional; see the module docstring)."""

    name = "fuse_int8_epilogue"

    def __init__(self):
        self.skipped: dict[str, str] = {}   # int8_linear node name -> why its epilogue was not fused
        self.fused: list[str] = []          # int8_linear node names whose epilogue was fused

    def _match(self, gm, lin):
        """(activation node, mul node, quantize node, per-column vector) or a reason string."""
        n = lin.args[7]
        act = mul = None
        cur = _only_user(lin)
        if cur is None:
            return _why_many(lin, "its output")
        if cur.op == "call_function" and cur.target in _ACTIVATIONS:
            if cur.target == aten.gelu.default and (cur.kwargs.get("approximate", "none") != "none"
                                                    or len(cur.args) > 1 and cur.args[1] != "none"):
                return "GELU with the tanh approximation is not fused"
            act, cur = cur, _only_user(cur)
            if cur is None:
                return _why_many(act, f"the {_ACTIVATIONS[act.target]} output")
        cm = torch.ones(n)
        if cur.op == "call_function" and cur.target == aten.mul.Tensor:
            vec = _channel_vector(gm, cur, n)
            if vec is None:
                return f"'{cur.name}' is not a multiply by a constant per-column vector"
            mul, cm, cur = cur, vec, _only_user(cur)
            if cur is None:
                return _why_many(mul, "the multiply's output")
        if cur.op != "call_function" or cur.target != QUANTIZE:
            return f"followed by '{cur.name}', not a quantize"
        if cur.args[0] is not (mul or act or lin):
            return "the quantize does not read the chain's output"
        scale, zp, fmt_name, group = cur.args[1], cur.args[2], cur.args[3], cur.args[4]
        s = get_attr_tensor(gm, scale)
        if s is None or s.numel() != 1:
            return _DYNAMIC if s is None else "the quantize's scale is not one value (per channel)"
        z = get_attr_tensor(gm, zp) if zp is not None else torch.zeros(1, dtype=torch.int32)
        if z is None or z.numel() != 1 or z.is_floating_point():
            return "the quantize's zero point is not a constant integer"
        if fmt_name not in ("uint8", "int8") or group:
            return f"quantize format {fmt_name} (group {group}) is not an 8-bit per-tensor code"
        fmt = get_format(fmt_name)
        full = (0, 255) if fmt_name == "uint8" else (-128, 127)
        if (fmt.qmin, fmt.qmax) != full:
            return f"quantize range [{fmt.qmin}, {fmt.qmax}] is not the full {fmt_name} range"
        return act, mul, cur, cm, s, z

    def call(self, gm):
        modified = False
        for lin in list(gm.graph.nodes):
            if lin.op != "call_function" or lin.target != INT8_LINEAR:
                continue
            match = self._match(gm, lin)
            if isinstance(match, str):
                self.skipped[lin.name] = match
                continue
            act, mul, quant, cm, s, z = match
            n, np_ = lin.args[7], get_attr_tensor(gm, lin.args[6]).shape[0]   # the padded bias: [Np]
            padded = torch.ones(np_)
            padded[:n] = cm
            inv = 1.0 / s.float().reshape(1)   # float32, as the reference quantize (torchao) computes it
            args = (*lin.args, "none" if act is None else _ACTIVATIONS[act.target],
                    add_tensor(gm, f"{lin.name}_cmul", padded, quant),
                    add_tensor(gm, f"{lin.name}_qinv", inv, quant),
                    add_tensor(gm, f"{lin.name}_qzero", z.reshape(1).to(torch.int32), quant), quant.args[3])
            with gm.graph.inserting_before(quant):
                fused = gm.graph.call_function(INT8_LINEAR_Q, args)
            fused.meta = dict(quant.meta)
            quant.replace_all_uses_with(fused)
            for node in (quant, mul, act, lin):
                if node is not None:
                    gm.graph.erase_node(node)
            self.fused.append(lin.name)
            modified = True
        return PassResult(gm, modified)
