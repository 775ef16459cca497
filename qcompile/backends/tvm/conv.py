"""Integer conv2d: ``conv2d(dequantize(a_codes), dequantize(W_int8), bias)`` as im2col + integer GEMM.

:class:`FuseInt8ConvPass` runs on a copy of the converted graph, next to
:class:`~.fuse.FuseInt8LinearPass`. It replaces each matching ``aten.conv2d`` by
``qcompile_tvm::int8_conv2d``, whose weights ``[Cout, Cin, KH, KW]`` are flattened to
``[Cout, KH·KW·Cin]`` (``k = (ky·KW + kx)·Cin + c``: a tap's channels together), ``K`` padded to a
multiple of 4 with zero weights, and packed once for the GEMM kernels (:func:`~.int8_gemm.pack_weights`),
with their column sums for the activation zero point. The op has a PyTorch implementation (the same arithmetic:
im2col of the codes, then :func:`~.fuse.int8_linear`), so the pass is tested without TVM.

The kernels (:class:`Int8Conv2dConverter`), three steps:

1. :func:`im2col_kernel`, a TIR ``PrimFunc``: the u8/s8 codes, transposed to NHWC (``permute_dims``,
   which TVM fuses into the kernel that quantizes them), to rows ``[N, OH, OW, Kp]`` of uint8: per
   tap one vector copy of ``C`` contiguous bytes (reading NCHW, every byte was a scalar load and
   store: 7x slower at 32 channels). Padding is filled with the activation *zero point*, so a padded
   tap contributes ``za·w`` to the product and the column-sum compensation ``- za·colsum`` removes
   it exactly, as it does for real taps; int8 codes get their +128 shift here (``vpdpbusd`` is
   u8 × s8), and the ``Kp - K`` padding columns meet zero weights. One TIR kernel rather than Relax
   ops because Relax would spell it as a pad (whose value, the zero point, is a run-time tensor
   for dynamic activations), ``KH·KW`` strided slices, a concat and a transpose: several kernels and
   temporaries where TIR writes each row once, with the shift and the zero-point padding fused in.
2. :func:`~.int8_gemm.gemm_kernel`, unchanged: ``[N·OH·OW, Kp] x [Kp, Np]`` with the float epilogue
   (``(acc - za·colsum)·sa·sw + bias``) in the kernel.
3. Relax ``reshape`` + ``permute_dims`` back to NCHW; TVM fuses that transpose with what follows
   (ReLU, the next quantize, the next conv's NHWC transpose), so it costs no pass of its own.

What fuses: ``aten.conv2d`` with ``groups=1``, activations ``uint8``/``int8`` quantized per tensor
(static, or dynamic per tensor), weights ``int8`` symmetric per channel or per tensor, constant
weights and bias; any stride, padding, dilation, spatial size (symbolic too) and ``Cin·KH·KW``.
Everything else stays a float conv on dequantized values, and the pass result's ``skipped``
says why: grouped/depthwise convs, conv1d/conv3d, transposed convs, string padding, per-token
activation scales (one scale per row of the last dim: an im2col row mixes rows), asymmetric or
non-constant weights.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tvm import relax, sym, tirx
from tvm.script import tirx as T

from ...passes.infra import Pass, add_tensor, get_attr_tensor
from ...passes.lowering import FuseResult
from . import int8_gemm
from .fuse import int8_linear, int8_operands_reason, pack_int8_weights, padded_bias, replace_linear, variable_bias

aten = torch.ops.aten

# convs this pass sees and cannot take, with the reason (conv2d itself is checked node by node)
_OTHER_CONVS = {
    aten.conv1d.default: "conv1d has no integer kernel (only conv2d is built)",
    aten.conv3d.default: "conv3d has no integer kernel (only conv2d is built)",
    aten.conv2d.padding: "conv2d with string padding ('same'/'valid') is not fused (only explicit padding)",
    aten.conv_transpose1d.default: "transposed conv has no integer kernel",
    aten.conv_transpose2d.input: "transposed conv has no integer kernel",
    aten.conv_transpose3d.input: "transposed conv has no integer kernel",
    aten.convolution.default: "aten.convolution (transposed or generic form) is not fused (only aten.conv2d)",
}


def _pair(v, default: int) -> list[int]:
    v = default if v is None else v
    v = [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]
    return v * 2 if len(v) == 1 else v


def conv_geometry(node) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups) of an ``aten.conv2d.default`` node, defaults filled in."""
    args = list(node.args) + [None] * (7 - len(node.args))
    stride = _pair(node.kwargs.get("stride", args[3]), 1)
    padding = _pair(node.kwargs.get("padding", args[4]), 0)
    dilation = _pair(node.kwargs.get("dilation", args[5]), 1)
    groups = node.kwargs.get("groups", args[6])
    return stride, padding, dilation, 1 if groups is None else int(groups)


def out_size(size, k: int, stride: int, pad: int, dilation: int):
    """Output extent of one spatial dim (works on ints, SymInts and TIR expressions alike)."""
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def k_padded(cin: int, kh: int, kw: int) -> int:
    """The GEMM's reduction length: ``Cin·KH·KW`` rounded up to a multiple of 4 (``vpdpbusd``)."""
    return (cin * kh * kw + 3) // 4 * 4


def im2col_codes(a: torch.Tensor, a_zero: Optional[torch.Tensor], kernel: list[int], stride: list[int],
                 padding: list[int], dilation: list[int], a_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch im2col of activation codes, as :func:`im2col_kernel` computes it:
    (uint8 rows ``[N·OH·OW, Kp]``, the uint8-domain zero point ``[1]`` int32). Padding holds the
    zero point; int8 codes and their zero point are shifted by +128."""
    kh, kw = kernel
    n, c = a.shape[:2]
    za = 0 if a_zero is None else int(a_zero.reshape(-1)[0])
    x = a.to(torch.int32)
    if a_format == "int8":
        x, za = x + 128, za + 128
    kp = k_padded(c, kh, kw)
    xp = torch.nn.functional.pad(x.float(), (padding[1], padding[1], padding[0], padding[0]), value=float(za))
    cols = torch.nn.functional.unfold(xp, (kh, kw), dilation=dilation, stride=stride)   # exact: codes < 2**24
    cols = cols.reshape(n, c, kh * kw, -1).transpose(1, 2)   # k = (ky·KW + kx)·C + c, as the weights
    rows = torch.zeros(n * cols.shape[-1], kp, dtype=torch.uint8)
    rows[:, :c * kh * kw] = cols.reshape(n, c * kh * kw, -1).transpose(1, 2).reshape(-1, c * kh * kw).to(torch.uint8)
    return rows, torch.tensor([za], dtype=torch.int32)


@torch.library.custom_op("qcompile_tvm::int8_conv2d", mutates_args=())
def int8_conv2d(a: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w_packed: torch.Tensor,
                colsum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, n: int, kernel: list[int],
                stride: list[int], padding: list[int], dilation: list[int], a_format: str) -> torch.Tensor:
    """``conv2d(dequantize(a), dequantize(W), bias)`` on integer codes: ``a`` u8/s8 ``[N, C, H, W]``
    with a per-tensor ``a_scale``/``a_zero``, ``w_packed`` the ``[n, Kp]`` flattened weights from
    :func:`~.int8_gemm.pack_weights`. Returns float32 ``[N, n, OH, OW]``."""
    rows, za = im2col_codes(a, a_zero, kernel, stride, padding, dilation, a_format)
    out = int8_linear(rows, a_scale.reshape(-1)[:1], za, w_packed, colsum, w_scale, bias, n, "uint8")
    oh, ow = (out_size(a.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return out.reshape(a.shape[0], oh, ow, n).permute(0, 3, 1, 2).contiguous()


@int8_conv2d.register_fake
def _(a, a_scale, a_zero, w_packed, colsum, w_scale, bias, n, kernel, stride, padding, dilation, a_format):
    oh, ow = (out_size(a.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return a.new_empty((a.shape[0], n, oh, ow), dtype=torch.float32)


INT8_CONV2D = torch.ops.qcompile_tvm.int8_conv2d.default


def pack_conv_weights(w: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 weights ``[Cout, Cin, KH, KW]`` and their per-channel or per-tensor scale → the constants
    of :func:`int8_conv2d` (:func:`~.fuse.pack_int8_weights` of the flattened weights): ``(packed
    [Np/16, Kp/4, 64], colsum i32 [Np], w_scale f32 [Np])``, ``K = KH·KW·Cin`` padded to ``Kp``
    with zero weights."""
    cout, cin, kh, kw = w.shape
    wflat = np.zeros((cout, k_padded(cin, kh, kw)), np.int8)
    wflat[:, :cin * kh * kw] = w.permute(0, 2, 3, 1).reshape(cout, -1).numpy()   # k = (ky·KW + kx)·Cin + c
    return pack_int8_weights(wflat, w_scale)


class FuseInt8ConvPass(Pass):
    """``conv2d(dequantize(a), dequantize(Wq), b)`` ⇒ ``int8_conv2d(a, ..., packed Wq, ...)``.

    Example::

        >>> r = FuseInt8ConvPass()(gm)           # gm: a copy of a converted graph
        >>> r.fused, r.skipped                   # {'conv2d': 'qcompile_tvm::int8_conv2d', ...}, {'conv2d_2': 'groups=8 ...'}
    """

    name = "fuse_int8_conv"

    def _why_not(self, gm, node) -> Optional[str]:
        if node.target in _OTHER_CONVS:
            return _OTHER_CONVS[node.target]
        if len(node.args) < 2:
            return "conv2d without a weight argument"
        groups = conv_geometry(node)[3]
        if groups != 1:
            return f"groups={groups} (grouped or depthwise conv) has no integer kernel (only groups=1)"
        return int8_operands_reason(gm, node, weight_dim=4, per_token=(
            "activation scale is per_token: an im2col row mixes rows of the input, so only per-tensor "
            "activations fuse")) or variable_bias(gm, node)

    def call(self, gm):
        fused: dict[str, str] = {}     # conv node -> the op that replaced it
        skipped: dict[str, str] = {}   # conv node -> why it was not fused
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or (node.target != aten.conv2d.default and node.target not in _OTHER_CONVS):
                continue
            reason = self._why_not(gm, node)
            if reason:
                skipped[node.name] = reason
                continue
            dqa, dqw = node.args[0], node.args[1]
            stride, padding, dilation, _ = conv_geometry(node)
            w = get_attr_tensor(gm, dqw.args[0])
            cout, _, kh, kw = w.shape
            packed, colsum, sw = pack_conv_weights(w, get_attr_tensor(gm, dqw.args[1]))
            bias = padded_bias(gm, node, cout, int8_gemm.padded_n(cout))
            base = dqw.args[0].target
            args = [dqa.args[0], dqa.args[1], dqa.args[2],
                    add_tensor(gm, f"{base}_packed", packed, node), add_tensor(gm, f"{base}_colsum", colsum, node),
                    add_tensor(gm, f"{base}_wscale", sw, node), add_tensor(gm, f"{base}_bias", bias, node)]
            replace_linear(gm, node, INT8_CONV2D, (*args, cout, [kh, kw], stride, padding, dilation, dqa.args[3]))
            fused[node.name] = INT8_CONV2D.name()
        return FuseResult.of(gm, fused, skipped)


def im2col_kernel(c: int, kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
                  in_dtype: str):
    """The TIR ``PrimFunc`` of the im2col: ``a`` ``[n, h, w, c]`` (NHWC) of ``in_dtype``
    (``uint8``/``int8``; ``n``, ``h``, ``w`` symbolic), ``za`` int32 ``[1]`` (the zero point, already
    in the uint8 domain), ``out`` uint8 ``[n, oh, ow, Kp]`` with ``out[b, y, x, (ky·kw + kx)·c + ci]``
    the code of channel ``ci`` under tap ``(ky, kx)`` of output pixel ``(y, x)``, ``za`` where the
    tap falls in the padding, and 0 in the ``Kp - kh·kw·c`` padding columns. The caller gives
    ``oh``/``ow`` (:func:`out_size`)."""
    kk, kp = c * kh * kw, k_padded(c, kh, kw)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    shift = 128 if in_dtype == "int8" else 0

    @T.prim_func
    def im2col(a: T.handle, za: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True})
        n = T.int64()
        h = T.int64()
        w = T.int64()
        oh = T.int64()
        ow = T.int64()
        A = T.match_buffer(a, (n, h, w, c), in_dtype)
        ZA = T.match_buffer(za, (1,), "int32")
        O = T.match_buffer(o, (n, oh, ow, kp), "uint8")
        for b, y, x in T.grid(n, oh, ow):
            for ky, kx in T.grid(kh, kw):
                if (y * sh + ky * dh >= ph and y * sh + ky * dh < h + ph
                        and x * sw + kx * dw >= pw and x * sw + kx * dw < w + pw):
                    for ci in T.vectorized(c):   # contiguous on both sides: one vector copy per tap
                        O[b, y, x, (ky * kw + kx) * c + ci] = T.Cast("uint8", T.Cast(
                            "int32", A[b, y * sh + ky * dh - ph, x * sw + kx * dw - pw, ci]) + shift)
                else:
                    for ci in T.vectorized(c):
                        O[b, y, x, (ky * kw + kx) * c + ci] = T.Cast("uint8", ZA[0])
            for j in range(kp - kk):
                O[b, y, x, kk + j] = T.uint8(0)

    return im2col


class Int8Conv2dConverter:
    """Relax converter for ``qcompile_tvm::int8_conv2d``: ``call_tir`` of :func:`im2col_kernel`, then
    of :func:`~.int8_gemm.gemm_kernel` (one ``PrimFunc`` per geometry and per weight shape), then the
    layout back to NCHW."""

    def __init__(self, family: str, parallel: bool = False):
        self.family, self.parallel = family, parallel
        self.kernels: dict[tuple, object] = {}

    def _func(self, bb, key, name, make):
        if key not in self.kernels:
            self.kernels[key] = bb.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]

    def __call__(self, node, imp):
        op, bb = relax.op, imp.block_builder
        a, sa = imp.env[node.args[0]], imp.env[node.args[1]]
        za = imp.env[node.args[2]] if node.args[2] is not None else None
        packed, colsum, sw, bias = (imp.env[x] for x in node.args[3:7])
        n, (kh, kw), stride, padding, dilation, a_format = node.args[7:13]
        kp, np_ = int(packed.ty.shape[1]) * 4, int(packed.ty.shape[0]) * 16
        packed = int8_gemm.family_weights(packed, imp.lifted_value(node.args[3]), self.family)
        cin = node.args[0].meta["val"].shape[1]
        if a.ty.shape is None:  # the importer lost the shape: name its dims
            dims = [tirx.Var(f"{node.name}_d{i}", "int64") for i in (0, 2, 3)]
            a = bb.match_cast(a, relax.TensorType([dims[0], cin, dims[1], dims[2]], a.ty.dtype))
        batch, _, h, w = a.ty.shape.values
        # simplified, so a 3x3 conv with padding 1 keeps the input's own symbol (TVM 0.27 has crashed
        # on shapes that are unsimplified expressions of a symbol: see lower.py's importer repairs)
        oh, ow = (sym.Analyzer().simplify(out_size(s, k, st, p, d))
                  for s, k, st, p, d in zip((h, w), (kh, kw), stride, padding, dilation))
        za = relax.const(0, "int32") if za is None else bb.emit(op.astype(za, "int32"))
        if a_format == "int8":  # the im2col shifts the codes by 128; the zero point moves with them
            za = bb.emit(op.add(za, relax.const(128, "int32")))
        za1 = bb.emit(op.reshape(za, (1,)))
        sa1 = bb.emit(op.reshape(sa, (1,)))
        geometry = (cin, kh, kw, *stride, *padding, *dilation)
        im2col = self._func(bb, ("im2col", geometry, a_format), "qconv_im2col_" + "_".join(map(str, geometry))
                            + f"_{a_format}", lambda: im2col_kernel(cin, kh, kw, stride, padding, dilation, a_format))
        nhwc = bb.emit(op.permute_dims(a, [0, 2, 3, 1]))   # fused into the kernel that wrote the codes
        rows = bb.emit(relax.call_tir(im2col, [nhwc, za1], out_ty=relax.TensorType((batch, oh, ow, kp), "uint8")))
        rows = bb.emit(op.reshape(rows, (-1, kp)))
        # named qgemm_* so the float-kernel scheduler leaves it alone; "conv" keeps it apart from a
        # Linear's kernel of the same shape (two functions may not share a global symbol)
        gemm = self._func(bb, ("gemm", kp, np_), f"qgemm_conv_{self.family.replace('-', '_')}_k{kp}_n{np_}",
                          lambda: int8_gemm.gemm_kernel(kp, np_, False, self.family, None, self.parallel))
        out = bb.emit(relax.call_tir(gemm, [rows, packed, colsum, sa1, za1, sw, bias],
                                     out_ty=relax.TensorType((rows.ty.shape[0], np_), "float32")))
        if np_ != n:
            out = bb.emit(op.strided_slice(out, axes=[1], begin=[0], end=[n]))
        out = bb.emit(op.reshape(out, (batch, oh, ow, n)))
        return bb.emit(op.permute_dims(out, [0, 3, 1, 2]))

