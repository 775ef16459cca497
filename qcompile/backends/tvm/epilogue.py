"""Fuse what follows an integer GEMM into its epilogue: activation, per-column multiply and the
static quantize of the next Linear's input, so the GEMM stores ``uint8``/``int8`` codes.

In a transformer FFN the up-projection's float output ``[tokens, 4·hidden]`` is read back once,
by a kernel doing GELU, SmoothQuant's per-channel multiply and the down-projection's activation
quantize. :class:`FuseEpiloguePass` (on the FX graph, after :class:`~.fuse.FuseInt8LinearPass`)
replaces the chain

    ``int8_linear → [gelu | relu] → [mul by a constant per-column vector] → quantize``

by one ``qcompile_tvm::int8_linear_q`` whose kernel (:func:`~.int8_gemm.gemm_kernel` with an
``epilogue``) does all of it in registers and writes a quarter of the bytes. The pass runs on the
FX graph rather than in Relax because the chain is plainest there (no reshapes, slices or fused
TIR to look through), ``int8_linear``'s constants are at hand, and the fused op has a PyTorch
implementation, so the pass is tested without TVM.

What fuses: a quantize with a constant per-tensor scale and integer zero point (static), format
``uint8``/``int8``, of an ``int8_linear`` output that nothing else reads (each intermediate has
that one consumer). Dynamic (per-token) quantizers compute their scale from the very tensor the
GEMM writes, so they cannot be fused this way and are left alone; the pass result's ``skipped``
says why for each ``int8_linear`` left as it was.

Numerics: the kernel repeats the unfused graph's steps in order — GELU as
``pipeline._gelu_te`` (TVM's ``fast_erf``), then ``* cm``, then ``round(x * (1/scale)) + zp``
(round half to even), clamped — so codes match the unfused TVM build up to float rounding of the
polynomial (FMA contraction), which moves a code by one step only on an exact rounding tie.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from tvm import relax, tirx
from tvm.script import tirx as T

from ...formats import get_format
from ...ops import CHOOSE_QPARAMS, QUANTIZE
from ...passes.infra import Pass, add_tensor, get_attr_tensor
from ...passes.lowering import FuseResult
from .fuse import INT8_LINEAR, int8_linear
from .int8_gemm import requantize_expr

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


def _static_quantize(gm, quant) -> str | tuple:
    """(1 / scale, zero point) of a static per-tensor 8-bit quantize node, or why it is not one."""
    s = get_attr_tensor(gm, quant.args[1])
    if s is None:
        return _DYNAMIC
    if s.numel() != 1:
        return "the quantize's scale is not one value (per channel)"
    zp = quant.args[2]
    z = get_attr_tensor(gm, zp) if zp is not None else torch.zeros(1, dtype=torch.int32)
    if z is None or z.numel() != 1 or z.is_floating_point():
        return "the quantize's zero point is not a constant integer"
    fmt_name, group = quant.args[3], quant.args[4]
    if fmt_name not in ("uint8", "int8") or group:
        return f"quantize format {fmt_name} (group {group}) is not an 8-bit per-tensor code"
    fmt = get_format(fmt_name)
    if (fmt.qmin, fmt.qmax) != ((0, 255) if fmt_name == "uint8" else (-128, 127)):
        return f"quantize range [{fmt.qmin}, {fmt.qmax}] is not the full {fmt_name} range"
    return 1.0 / s.float().reshape(1), z.reshape(1).to(torch.int32)   # 1/scale in float32, as the reference


class FuseEpiloguePass(Pass):
    """``quantize(mul(gelu(int8_linear(...)), c))`` ⇒ ``int8_linear_q(..., "gelu", c, 1/scale, zp)``
    (the activation and the multiply optional; see the module docstring)."""

    name = "fuse_int8_epilogue"

    def _match(self, gm, lin):
        """(activation node, mul node, quantize node, per-column vector, 1 / scale, zero point) or why not."""
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
        static = _static_quantize(gm, cur)
        if isinstance(static, str):
            return static
        return act, mul, cur, cm, *static

    def call(self, gm):
        fused: dict[str, str] = {}     # int8_linear node whose epilogue was fused -> the op that replaced it
        skipped: dict[str, str] = {}   # int8_linear node -> why its epilogue was not fused
        for lin in list(gm.graph.nodes):
            if lin.op != "call_function" or lin.target != INT8_LINEAR:
                continue
            match = self._match(gm, lin)
            if isinstance(match, str):
                skipped[lin.name] = match
                continue
            act, mul, quant, cm, inv, z = match
            n, np_ = lin.args[7], get_attr_tensor(gm, lin.args[6]).shape[0]   # the padded bias: [Np]
            padded = torch.ones(np_)
            padded[:n] = cm
            args = (*lin.args, "none" if act is None else _ACTIVATIONS[act.target],
                    add_tensor(gm, f"{lin.name}_cmul", padded, quant),
                    add_tensor(gm, f"{lin.name}_qinv", inv, quant),
                    add_tensor(gm, f"{lin.name}_qzero", z, quant), quant.args[3])
            with gm.graph.inserting_before(quant):
                new = gm.graph.call_function(INT8_LINEAR_Q, args)
            new.meta = dict(quant.meta)
            quant.replace_all_uses_with(new)
            for node in (quant, mul, act, lin):
                if node is not None:
                    gm.graph.erase_node(node)
            fused[lin.name] = INT8_LINEAR_Q.name()
        return FuseResult.of(gm, fused, skipped)


# --- LayerNorm → quantize: one row kernel writing the float row (residual path) and the codes ---

@torch.library.custom_op("qcompile_tvm::layer_norm_q", mutates_args=())
def layer_norm_q(a: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                 eps: float, channel_mul: torch.Tensor, out_inv_scale: torch.Tensor, out_zero: torch.Tensor,
                 out_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = layer_norm(a [+ residual])`` over the last dim and the codes of ``y * channel_mul``
    (static per-tensor quantize, ``out_inv_scale = 1 / scale``): ``(y, codes)``."""
    x = a if residual is None else a + residual
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    fmt = get_format(out_format)
    q = torch.round((y * channel_mul) * out_inv_scale) + out_zero.float()
    return y, q.clamp(fmt.qmin, fmt.qmax).to(fmt.storage)


@layer_norm_q.register_fake
def _(a, residual, weight, bias, eps, channel_mul, out_inv_scale, out_zero, out_format):
    return torch.empty_like(a), torch.empty_like(a, dtype=get_format(out_format).storage)


LAYER_NORM_Q = torch.ops.qcompile_tvm.layer_norm_q.default
_OPAQUE_PATTERN = 8   # TVM's OpPatternKind kOpaque: FuseOps fuses nothing into the kernel


def _is_eval_dropout(node) -> bool:
    return (node.op == "call_function" and node.target == aten.dropout.default
            and (len(node.args) > 2 and node.args[2] is False or node.kwargs.get("train") is False))


class FuseNormQuantizePass(Pass):
    """``quantize(mul(layer_norm(a + r), c))`` next to other readers of the LayerNorm output ⇒
    ``y, codes = layer_norm_q(a, r, ..., c, 1/scale, zp)``: the kernel
    (:func:`layer_norm_quantize_kernel`) writes the float row for the residual path and
    the codes for the next Linear in one pass. The residual ``add`` feeding only the LayerNorm, an
    eval-mode dropout after it and the multiply (SmoothQuant's) are optional."""

    name = "fuse_layer_norm_quantize"

    def _match(self, gm, ln):
        if len(ln.args) < 5 or len(ln.args[1]) != 1:
            return "normalizes over more than the last dim"
        d = ln.args[1][0]
        val = ln.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
            return "the LayerNorm output is not float32"
        if d % 32:
            return f"the normalized dim {d} is not a multiple of 32"
        w, b = (get_attr_tensor(gm, x) if x is not None else None for x in ln.args[2:4])
        if ln.args[2] is not None and w is None or ln.args[3] is not None and b is None:
            return "the weight or bias is not a constant"
        out = ln
        if len(ln.users) == 1 and _is_eval_dropout(next(iter(ln.users))):
            out = next(iter(ln.users))
        chains = []
        for u in out.users:
            if u.op == "call_function" and u.target == QUANTIZE and u.args[0] is out:
                chains.append((None, u, torch.ones(d)))
            elif u.op == "call_function" and u.target == aten.mul.Tensor and len(u.users) == 1:
                q = next(iter(u.users))
                vec = _channel_vector(gm, u, d)
                if vec is not None and q.target == QUANTIZE and q.args[0] is u:
                    chains.append((u, q, vec))
        if len(chains) != 1:
            return f"{len(chains)} quantize chains read the output (one is fused)"
        mul, quant, cm = chains[0]
        static = _static_quantize(gm, quant)
        if isinstance(static, str):
            return static
        return out, mul, quant, cm, *static

    def call(self, gm):
        fused: dict[str, str] = {}     # layer_norm node -> the op that replaced it
        skipped: dict[str, str] = {}   # layer_norm node -> why it was not fused
        for ln in list(gm.graph.nodes):
            if ln.op != "call_function" or ln.target != aten.layer_norm.default:
                continue
            match = self._match(gm, ln)
            if isinstance(match, str):
                skipped[ln.name] = match
                continue
            out, mul, quant, cm, inv, zero = match
            d = ln.args[1][0]
            x, residual = ln.args[0], None
            val = x.meta.get("val")
            if (x.op == "call_function" and x.target == aten.add.Tensor and len(x.users) == 1 and len(x.args) == 2
                    and not x.kwargs and all(isinstance(a, torch.fx.Node) for a in x.args)
                    and all(isinstance(a.meta.get("val"), torch.Tensor) and val is not None
                            and a.meta["val"].shape == val.shape and a.meta["val"].dtype == torch.float32
                            for a in x.args)):
                x, residual = x.args   # the residual add: same shapes, no broadcast
            weight = add_tensor(gm, f"{ln.name}_w", get_attr_tensor(gm, ln.args[2]).float() if ln.args[2] is not None
                                else torch.ones(d), ln)
            bias = add_tensor(gm, f"{ln.name}_b", get_attr_tensor(gm, ln.args[3]).float() if ln.args[3] is not None
                              else torch.zeros(d), ln)
            args = (x, residual, weight, bias, float(ln.args[4]), add_tensor(gm, f"{ln.name}_cmul", cm, ln),
                    add_tensor(gm, f"{ln.name}_qinv", inv, ln), add_tensor(gm, f"{ln.name}_qzero", zero, ln),
                    quant.args[3])
            with gm.graph.inserting_before(ln):
                new = gm.graph.call_function(LAYER_NORM_Q, args)
                y = gm.graph.call_function(operator.getitem, (new, 0))
                codes = gm.graph.call_function(operator.getitem, (new, 1))
            y.meta, codes.meta = dict(out.meta), dict(quant.meta)
            quant.replace_all_uses_with(codes)
            for node in (quant, mul):
                if node is not None:
                    gm.graph.erase_node(node)
            out.replace_all_uses_with(y)
            for node in dict.fromkeys((out, ln, ln.args[0] if residual is not None else None)):
                if node is not None:
                    gm.graph.erase_node(node)
            fused[ln.name] = LAYER_NORM_Q.name()
        return FuseResult.of(gm, fused, skipped)


FLANES = 16   # float32 lanes of a zmm register


def _lane_sum(buf, n: int):
    """``buf[0] + ... + buf[n-1]`` as a balanced tree of scalar loads (a short dependency chain)."""
    terms = [buf[i] for i in range(n)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


@functools.lru_cache(maxsize=None)   # parsing TVMScript takes seconds; a PrimFunc is immutable
def layer_norm_quantize_kernel(d: int, residual: bool, out_dtype: str, eps: float, ndim: int = 2):
    """The TIR ``PrimFunc`` of ``y = LayerNorm(x [+ r]) * gamma + beta`` over rows of ``d`` floats
    (``d`` a multiple of 32) writing both ``y`` (float32, for the residual path) and the codes of
    ``y * cm`` (:func:`requantize_expr`, for the next Linear), so the codes come from the row while
    it is in L1 instead of a second pass over ``y``.

    Arguments: ``x`` f32 ``[*lead, d]`` (``ndim - 1`` symbolic leading dims, so the caller needs no
    reshape), ``r`` (same shape; read only when ``residual``, pass ``x`` again otherwise),
    ``gamma``, ``beta``, ``cm`` f32 ``[d]``, ``qinv`` f32 ``[1]``, ``qz`` i32 ``[1]``, then the
    outputs ``y`` f32 and ``q`` of ``out_dtype``, both ``[*lead, d]``. Mean and variance in two
    passes over the row, each with two 16-lane partial sums (two independent add chains)."""
    if d % (2 * FLANES) or out_dtype not in ("uint8", "int8") or ndim not in (2, 3):
        raise ValueError(f"layer_norm_quantize_kernel: d={d} must be a multiple of {2 * FLANES}, codes uint8 or "
                         f"int8, rank 2 or 3 (got {ndim})")
    nv2 = d // (2 * FLANES)
    inv_d = 1.0 / d
    lead = [tirx.Var(f"n{i}", "int64") for i in range(ndim - 1)]
    rows = lead[0] if ndim == 2 else lead[0] * lead[1]

    @T.prim_func
    def ln_q(x: T.handle, r: T.handle, g: T.handle, b: T.handle, cm: T.handle, qi: T.handle, qz: T.handle,
             y: T.handle, q: T.handle):
        T.func_attr({"tir.noalias": True})
        Xn = T.match_buffer(x, (*lead, d), "float32")
        Rn = T.match_buffer(r, (*lead, d), "float32")
        G = T.match_buffer(g, (d,), "float32")
        B = T.match_buffer(b, (d,), "float32")
        CM = T.match_buffer(cm, (d,), "float32")
        QI = T.match_buffer(qi, (1,), "float32")
        QZ = T.match_buffer(qz, (1,), "int32")
        Yn = T.match_buffer(y, (*lead, d), "float32")
        Qn = T.match_buffer(q, (*lead, d), out_dtype)
        X = T.decl_buffer((rows * d,), "float32", data=Xn.data)
        R = T.decl_buffer((rows * d,), "float32", data=Rn.data)
        Y = T.decl_buffer((rows * d,), "float32", data=Yn.data)
        Q = T.decl_buffer((rows * d,), out_dtype, data=Qn.data)
        for i in range(rows):
            part = T.decl_buffer((2 * FLANES,), "float32", scope="global")
            stat = T.decl_buffer((2,), "float32", scope="global")   # mean, 1 / sqrt(var + eps)
            part[T.ramp(0, 1, 2 * FLANES)] = T.broadcast(T.float32(0), 2 * FLANES)
            for v in range(nv2):
                for h in T.unroll(2):
                    if residual:
                        Y[T.ramp(i * d + (2 * v + h) * FLANES, 1, FLANES)] = (
                            X.vload([i * d + (2 * v + h) * FLANES], "float32x16")
                            + R.vload([i * d + (2 * v + h) * FLANES], "float32x16"))
                    else:
                        Y[T.ramp(i * d + (2 * v + h) * FLANES, 1, FLANES)] = X.vload(
                            [i * d + (2 * v + h) * FLANES], "float32x16")
                    part[T.ramp(h * FLANES, 1, FLANES)] = part.vload([h * FLANES], "float32x16") + Y.vload(
                        [i * d + (2 * v + h) * FLANES], "float32x16")
            stat[0] = _lane_sum(part, 2 * FLANES) * T.float32(inv_d)
            part[T.ramp(0, 1, 2 * FLANES)] = T.broadcast(T.float32(0), 2 * FLANES)
            for v in range(nv2):
                for h in T.unroll(2):
                    part[T.ramp(h * FLANES, 1, FLANES)] = part.vload([h * FLANES], "float32x16") + (
                        Y.vload([i * d + (2 * v + h) * FLANES], "float32x16") - T.broadcast(stat[0], FLANES)) * (
                        Y.vload([i * d + (2 * v + h) * FLANES], "float32x16") - T.broadcast(stat[0], FLANES))
            stat[1] = T.float32(1) / T.sqrt(_lane_sum(part, 2 * FLANES) * T.float32(inv_d) + T.float32(eps))
            for v in range(d // FLANES):
                for j in T.vectorized(FLANES):
                    Y[i * d + v * FLANES + j] = (Y[i * d + v * FLANES + j] - stat[0]) * stat[1] * G[v * FLANES + j] \
                        + B[v * FLANES + j]
                for j in T.vectorized(FLANES):
                    Q[i * d + v * FLANES + j] = requantize_expr(Y[i * d + v * FLANES + j], CM[v * FLANES + j], QI[0],
                                                                QZ[0], out_dtype)

    return ln_q


class LayerNormQuantizeConverter:
    """Converter for ``qcompile_tvm::layer_norm_q``: a ``call_tir`` of
    :func:`layer_norm_quantize_kernel` returning ``(y, codes)``."""

    def __init__(self):
        self.kernels: dict[tuple, object] = {}

    def __call__(self, node, imp):
        op, bb = relax.op, imp.block_builder
        a = imp.env[node.args[0]]
        r = imp.env[node.args[1]] if node.args[1] is not None else None
        weight, bias, cm, qinv, qzero = (imp.env[x] for x in (node.args[2], node.args[3], *node.args[5:8]))
        eps, out_format = float(node.args[4]), node.args[8]
        d = int(weight.ty.shape[0])
        if a.ty.shape is None:   # the importer lost the shape: name its dims
            dims = [tirx.Var(f"{node.name}_d{i}", "int64") for i in range(a.ty.ndim - 1)]
            a = bb.match_cast(a, relax.TensorType([*dims, d], a.ty.dtype))
        ndim = a.ty.ndim if a.ty.ndim in (2, 3) else 2   # other ranks go through a reshape to rows
        lead = list(a.ty.shape.values[:-1])
        a2 = a if a.ty.ndim == ndim else bb.emit(op.reshape(a, (-1, d)))
        r2 = a2 if r is None else r if r.ty.ndim == ndim else bb.emit(op.reshape(r, (-1, d)))
        key = (d, r is not None, out_format, eps, ndim)
        if key not in self.kernels:
            # not named layer_norm*: pipeline.fuse_producers_into_norms would let FuseOps fuse producers
            # into this hand-written kernel; opaque, so FuseOps leaves it alone
            name = f"lnq_d{d}{'_res' if r is not None else ''}_{out_format}_{len(self.kernels)}"
            func = layer_norm_quantize_kernel(d, r is not None, out_format, eps, ndim)
            func = func.with_attr("global_symbol", name).with_attr("op_pattern", _OPAQUE_PATTERN)
            self.kernels[key] = bb.add_func(func, name)
        shape = list(a2.ty.shape.values)
        out = bb.emit(relax.call_tir(self.kernels[key], [a2, r2, weight, bias, cm, qinv, qzero],
                                     out_ty=[relax.TensorType(shape, "float32"), relax.TensorType(shape, out_format)]))
        y, q = bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))
        if a.ty.ndim != ndim:
            y, q = bb.emit(op.reshape(y, (*lead, d))), bb.emit(op.reshape(q, (*lead, d)))
        return y, q
