"""ONNX translations of qcompile's canonical ops for ``torch.onnx.export(dynamo=True)``.

Granularity comes from the shape of ``scale`` (see :mod:`qcompile.ops`): a 0-d or all-ones scale
is per-tensor, one dimension larger than 1 is per-axis, ``group_size > 0`` is a blocked
QuantizeLinear/DequantizeLinear (opset 21).

4- and 2-bit integer codes (``int4``/``uint4``/``int2``/``uint2``): qcompile stores them one per
int8/uint8 element, so a DequantizeLinear reads ``Cast(codes, INT4/UINT4)``; after export
:func:`qcompile.backends.onnx.lower.pack_low_bit_initializers` folds that Cast of a constant into a
packed INT4/UINT4 initializer (two codes a byte). ONNX 1.23 has INT2/UINT2 but onnxruntime 1.32
has no DequantizeLinear for them, so 2-bit codes are widened, losslessly, to INT4/UINT4 (4 bits a
code in the file, not 2). A 4-/2-bit QuantizeLinear (activations) is computed with the reference
formula and clipped to the format's own range, then Cast to the int8/uint8 storage."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op
from onnx.defs import OpSchema
from onnxscript.values import Opset

from ...errors import BackendError

_ONNX_TYPES = {"int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8}
# sub-byte codes: the ONNX type a DequantizeLinear reads them as (int2 widened: onnxruntime has no
# INT2 DequantizeLinear), and the int8/uint8 type qcompile stores them in
_LOW_BIT_TYPES = {"int4": ir.DataType.INT4, "uint4": ir.DataType.UINT4,
                  "int2": ir.DataType.INT4, "uint2": ir.DataType.UINT4}
_STORAGE_TYPES = {"int4": ir.DataType.INT8, "uint4": ir.DataType.UINT8,
                  "int2": ir.DataType.INT8, "uint2": ir.DataType.UINT8}
# formats standard QuantizeLinear/DequantizeLinear carry (sub-byte ones as INT4/UINT4)
STANDARD_FORMATS = frozenset(_ONNX_TYPES) | frozenset(_LOW_BIT_TYPES)
# formats choose_qparams / per-token QuantizeLinear produce at run time (an ONNX integer type each)
DYNAMIC_FORMATS = frozenset(_ONNX_TYPES)


def _onnx_type(format: str):
    if format not in _ONNX_TYPES:
        raise BackendError(f"the onnx backend has no standard Q/DQ for format '{format}' (it has int8/uint8, "
                           "and int4/uint4/int2/uint2 codes dequantized from INT4/UINT4; 4-/2-bit activations "
                           "quantized per tensor, not dynamically)")
    return _ONNX_TYPES[format]


def _broadcast(scale) -> bool:
    """Per-token (dynamic) scales ``[..., 1]``: written as elementwise math, not a per-axis Q/DQ.
    They vary on several dims (no Q/DQ attribute expresses that), or on one dim known only at run
    time: ``[B, 1, 1]`` when one position is quantized (the LM head after ``logits_to_keep=1``, a
    decode step). A per-axis DequantizeLinear there is right in ONNX, but onnxruntime fuses it with
    the weight's DequantizeLinear and the MatMul into a ``MatMulIntegerToFloat`` whose activation
    zero point must be a scalar: every batch above 1 then fails at run time. Weight and static
    scales are constants, whose dims are all known."""
    wide = [d for d in scale.shape if not (isinstance(d, int) and d == 1)]
    return len(wide) > 1 or any(not isinstance(d, int) for d in wide)


def _axis_and_scale(scale, zero_point, group_size: int):
    """(attributes, 1-D or same-rank scale, zero point) for Q/DQ from qcompile's scale shape."""
    shape = [d if isinstance(d, int) else -1 for d in scale.shape]
    wide = [i for i, d in enumerate(shape) if d != 1]
    if group_size > 0:
        return {"axis": len(shape) - 1, "block_size": group_size}, scale, zero_point
    if not wide:
        flat = op.Reshape(scale, _scalar_shape())
        zp = None if zero_point is None else op.Reshape(zero_point, _scalar_shape())
        return {}, flat, zp
    if len(wide) > 1:
        raise BackendError(f"a scale of shape {shape} is neither per-tensor nor per-axis")
    flat = op.Reshape(scale, op.Constant(value_ints=[-1]))
    zp = None if zero_point is None else op.Reshape(zero_point, op.Constant(value_ints=[-1]))
    return {"axis": wide[0]}, flat, zp


def _scalar_shape():
    # an explicit int64 tensor: an empty ``value_ints`` list leaves the attribute type ambiguous
    return op.Constant(value=ir.tensor(np.zeros((0,), dtype=np.int64)))


def _zero(format: str, like_scale):
    # ONNX takes the quantized type from the zero point: a symmetric spec still needs a typed zero
    # (an int32 zero: value_int is int64, and Mul needs both operands of one type)
    zero = op.Constant(value=ir.tensor(np.zeros((), dtype=np.int32)))
    return op.Cast(op.Mul(op.Cast(like_scale, to=ir.DataType.INT32), zero), to=_onnx_type(format))


def _bounds(format: str):
    if format in _LOW_BIT_TYPES:
        from ...formats import get_format

        fmt = get_format(format)
        return float(fmt.qmin), float(fmt.qmax)
    return (0.0, 255.0) if format == "uint8" else (-128.0, 127.0)


def _reference_quantize(x, scale, zero_point, format: str, out_type):
    """``clip(round(x / s) + z, qmin, qmax)`` with broadcasting elementwise ops, as the reference."""
    lo, hi = _bounds(format)
    q = op.Round(op.Div(x, scale))
    if zero_point is not None:
        q = op.Add(q, op.Cast(zero_point, to=ir.DataType.FLOAT))
    return op.Cast(op.Clip(q, op.Constant(value_float=lo), op.Constant(value_float=hi)), to=out_type)


def quantize(x, scale, zero_point, format: str, group_size: int):
    if format in _LOW_BIT_TYPES:  # 4-/2-bit activations: int8/uint8 storage, the format's own range
        if group_size > 0:
            raise NotImplementedError(f"onnx: group-wise QuantizeLinear of runtime values to '{format}'")
        return _reference_quantize(x, scale, zero_point, format, _STORAGE_TYPES[format])
    if _broadcast(scale):  # per-token: the reference formula with broadcasting elementwise ops
        return _reference_quantize(x, scale, zero_point, format, _onnx_type(format))
    attrs, s, z = _axis_and_scale(scale, zero_point, group_size)
    if z is None:
        z = _zero(format, s)
    return op.QuantizeLinear(x, s, z, **attrs)


def dequantize(q, scale, zero_point, format: str, group_size: int, output_dtype=None):
    per_token = group_size == 0 and _broadcast(scale)  # [N, G] group scales are blocked DQ, not per-token
    if format in _LOW_BIT_TYPES and not per_token:
        # standard opset-21 DequantizeLinear on INT4/UINT4 codes (constant codes are packed after export)
        q = op.Cast(q, to=_LOW_BIT_TYPES[format])
        zero_point = None if zero_point is None else op.Cast(zero_point, to=_LOW_BIT_TYPES[format])
    elif format not in _LOW_BIT_TYPES:
        _onnx_type(format)
    if per_token:
        x = op.Cast(q, to=ir.DataType.FLOAT)
        if zero_point is not None:
            x = op.Sub(x, op.Cast(zero_point, to=ir.DataType.FLOAT))
        return op.Mul(x, scale)
    attrs, s, z = _axis_and_scale(scale, zero_point, group_size)
    if z is None:
        return op.DequantizeLinear(q, s, **attrs)
    return op.DequantizeLinear(q, s, z, **attrs)


def choose_qparams(x, format: str, symmetric: bool, per_token: bool):
    """Dynamic scale/zero point with the reference formula (qcompile.formats.Format.choose_qparams)."""
    fmt_type = _onnx_type(format)
    qmin, qmax = _bounds(format)
    axes = op.Constant(value_ints=[-1])
    keep = 1 if per_token else 0
    lo = op.ReduceMin(x, axes, keepdims=keep) if per_token else op.ReduceMin(x, keepdims=0)
    hi = op.ReduceMax(x, axes, keepdims=keep) if per_token else op.ReduceMax(x, keepdims=0)
    zero = op.Constant(value_float=0.0)
    lo, hi = op.Min(lo, zero), op.Max(hi, zero)
    eps = op.Constant(value_float=1.1920928955078125e-07)
    if symmetric:
        amax = op.Max(op.Neg(lo), hi)
        if format == "uint8":
            scale = op.Max(op.Div(amax, op.Constant(value_float=127.5)), eps)
            zp = op.Cast(op.Add(op.Mul(scale, zero), op.Constant(value_float=128.0)), to=fmt_type)
        else:
            scale = op.Max(op.Div(amax, op.Constant(value_float=qmax)), eps)
            zp = op.Cast(op.Mul(scale, zero), to=fmt_type)
        return scale, zp
    scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=qmax - qmin)), eps)
    zp = op.Clip(op.Sub(op.Constant(value_float=qmin), op.Round(op.Div(lo, scale))),
                 op.Constant(value_float=qmin), op.Constant(value_float=qmax))
    return scale, op.Cast(zp, to=fmt_type)


def _register_contrib_schemas() -> Opset:
    """onnxscript builds nodes from ONNX schemas; onnxruntime's contrib kernels have none in the onnx
    package, so declare the two qcompile emits (their signatures from onnxruntime's ContribOperators.md)."""
    import onnx

    domain = "com.microsoft"
    inp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    ints = ["tensor(int8)", "tensor(uint8)"]
    schemas = [
        OpSchema("MatMulIntegerToFloat", domain, 1,
                 inputs=[inp("A", "T1"), inp("B", "T2"), inp("a_scale", "T3"), inp("b_scale", "T3"),
                         inp("a_zero_point", "T1", param_option=opt), inp("b_zero_point", "T2", param_option=opt),
                         inp("bias", "T3", param_option=opt)],
                 outputs=[inp("Y", "T3")],
                 type_constraints=[("T1", ints, ""), ("T2", ints, ""), ("T3", ["tensor(float)"], "")]),
        OpSchema("MatMulNBits", domain, 1,
                 inputs=[inp("A", "T1"), inp("B", "T2"), inp("scales", "T1"),
                         inp("zero_points", "T3", param_option=opt), inp("g_idx", "T4", param_option=opt),
                         inp("bias", "T1", param_option=opt)],
                 outputs=[inp("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                                   ("T3", ["tensor(uint8)", "tensor(float)"], ""), ("T4", ["tensor(int32)"], "")],
                 attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=a in ("K", "N"))
                             for a in ("K", "N", "bits", "block_size", "accuracy_level")]),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, 1, domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
    return Opset(domain, 1)


_MSFT = _register_contrib_schemas()


def matmul_integer_to_float(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias):
    return _MSFT.MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)


def matmul_nbits(a, b_packed, scales, zero_points, k: int, n: int, bits: int, block_size: int, accuracy_level: int):
    return _MSFT.MatMulNBits(a, b_packed, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
