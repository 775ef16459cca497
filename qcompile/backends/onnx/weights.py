"""Which integer type int8 weights take in the ONNX file: onnxruntime's u8 x s8 kernels are wrong on
x86 CPUs without VNNI.

onnxruntime's x86 kernels for uint8 activations x **int8** weights (MLAS U8S8, behind
MatMulInteger, MatMulIntegerToFloat, QLinearConv, QLinearMatMul, QGemm, DynamicQuantizeMatMul)
multiply with ``vpmaddubsw`` unless the CPU has a 32-bit dot product (``avx512_vnni``,
``avx_vnni``, AMX): it adds two u8 x s8 products into a **saturating int16**, so full-range codes
give wrong sums (measured on an AMD Zen 3, AVX2: 99.998 % of a 128x768x3072 product wrong, max
error 156,770; docs/onnx.md). Its u8 x **u8** kernels widen to 16 bits first and are exact
everywhere. So on such a host the weights are written as uint8 with their zero point moved by
128 (:class:`Int8WeightsAsUint8Pass`): ``(q + 128) - (z + 128) = q - z``, the same dequantized
values bit for bit, onnxruntime then runs its exact u8 x u8 kernel (~15 % slower there).

onnxruntime's own switch, the session option ``session.x64quantprecision``, does the same rewrite
inside a session, but only for sessions that set it (not a plain ``InferenceSession`` of the saved
file), and in onnxruntime 1.32 it fails on per-channel weights without a zero point (the
``DequantizeLinear`` it writes gets a scalar zero point: "x_zero_point must be null or 1D tensor
with size 8"), which is every qcompile int8 conv and the ``qdq`` target's Linears.

Example::

    >>> from qcompile.cpu import cpu_info
    >>> choose_int8_weights(cpu_info())          # on an AVX2-only x86 host
    ('uint8', 'host lacks avx512_vnni, avx_vnni and amx_int8: ...')
"""
from __future__ import annotations

import torch

from ...cpu import CpuInfo
from ...errors import BackendError
from ...ops import DEQUANTIZE
from ...passes.annotate import QUANTIZABLE_OPS
from ...passes.infra import Pass, PassResult, add_tensor, constant_value, get_attr_tensor

INT8_WEIGHTS = ("auto", "int8", "uint8")
# a 32-bit u8 x s8 dot product: onnxruntime's u8 x s8 kernels are exact with any of these
EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def choose_int8_weights(cpu: CpuInfo) -> tuple[str, str]:
    """``("int8" | "uint8", why)``: the weight type whose onnxruntime kernels are exact on ``cpu``."""
    if not cpu.x86:
        return "int8", f"{cpu.machine or 'unknown'} host: the u8 x s8 saturation is an x86 (vpmaddubsw) issue"
    exact = [f for f in EXACT_U8S8_FLAGS if f in cpu.flags]
    if exact:
        return "int8", f"host has {exact[0]}: onnxruntime's u8 x s8 kernels accumulate in 32 bits (exact)"
    return "uint8", (f"host lacks {', '.join(EXACT_U8S8_FLAGS[:-1])} and {EXACT_U8S8_FLAGS[-1]}: onnxruntime's "
                     "u8 x s8 kernels saturate 16-bit sums (vpmaddubsw); int8 weights written as uint8 with "
                     "zero point + 128 run its exact u8 x u8 kernels")


def resolve_int8_weights(int8_weights: str, cpu: CpuInfo) -> tuple[str, str]:
    """``int8_weights`` (``"auto"``, ``"int8"`` or ``"uint8"``) → ``(type, why)``; ``auto`` asks
    :func:`choose_int8_weights` about ``cpu``."""
    if int8_weights not in INT8_WEIGHTS:
        raise BackendError(f"unknown int8_weights '{int8_weights}'; choose one of {', '.join(INT8_WEIGHTS)}")
    if int8_weights == "auto":
        return choose_int8_weights(cpu)
    return int8_weights, "requested (int8_weights='" + int8_weights + "')"


class Int8WeightsAsUint8Pass(Pass):
    """``op(dequantize(x_q uint8), dequantize(W_q int8, s, z))`` ⇒ ``op(..., dequantize(W_q + 128
    as uint8, s, z + 128))`` for the Linears and convs onnxruntime runs as u8-activation integer
    kernels. Exact: each weight dequantizes to the same value. Its result's ``changed`` lists the op
    nodes whose weight is now uint8, ``skipped`` says why an int8 weight stays int8 (the negative
    cases tests pin)."""

    name = "int8_weights_as_uint8"

    def call(self, gm):
        converted: list[str] = []     # op nodes whose weight is now uint8
        skipped: dict[str, str] = {}  # op node -> why its int8 weight stays
        done: dict = {}  # int8 dequantize -> its uint8 twin (a tied weight is converted once)
        for node in list(gm.graph.nodes):
            info = QUANTIZABLE_OPS.get(node.target)
            if info is None or info.input_arg is None:
                continue
            w = node.args[info.weight_arg]
            if getattr(w, "target", None) != DEQUANTIZE or w.args[3] != "int8":
                continue
            reason = self._why_not(gm, node.args[info.input_arg], w)
            if reason:
                skipped[node.name] = reason
                continue
            if w not in done:
                done[w] = self._as_uint8(gm, w)
            node.replace_input_with(w, done[w])
            if not w.users:
                gm.graph.erase_node(w)
            converted.append(node.name)
        return PassResult(gm, bool(converted), converted, skipped)

    @staticmethod
    def _why_not(gm, x, w):
        if getattr(x, "target", None) != DEQUANTIZE or x.args[3] != "uint8":
            return "activation is not uint8 codes (onnxruntime's kernels for int8 or float activations do not saturate)"
        if get_attr_tensor(gm, w.args[0]) is None:
            return "weight codes are not a constant"
        if w.args[2] is None and _shape(gm, w.args[1]) is None:
            return "weight scale has no known shape (for the zero point 128 to take)"
        z = w.args[2]
        if z is not None:
            zv = constant_value(gm, z)
            if zv is None or zv.is_floating_point():
                return "weight zero point is not a constant integer"
        return None

    @staticmethod
    def _as_uint8(gm, w):
        codes = get_attr_tensor(gm, w.args[0])
        q = add_tensor(gm, f"{w.args[0].target}_u8", (codes.to(torch.int16) + 128).to(torch.uint8), w)
        if w.args[2] is None:  # symmetric: zero point 128, shaped like the scale
            zero = torch.full(_shape(gm, w.args[1]), 128, dtype=torch.uint8)
        else:
            zero = (constant_value(gm, w.args[2]).to(torch.int16) + 128).to(torch.uint8)
        z = add_tensor(gm, f"{w.args[0].target}_u8_zero_point", zero, w)
        with gm.graph.inserting_before(w):
            new = gm.graph.call_function(DEQUANTIZE, (q, w.args[1], z, "uint8", *w.args[4:]))
        new.meta = dict(w.meta)
        return new


def _shape(gm, node):
    """The shape of a tensor node: from export's fake value, else from its constant value; None if neither."""
    if "val" in node.meta:
        return tuple(node.meta["val"].shape)
    value = constant_value(gm, node)
    return None if value is None else tuple(value.shape)
