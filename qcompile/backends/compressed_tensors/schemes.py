"""qcompile's quantized Linears as compressed-tensors schemes: each layer's weight grid (and input
activation quantizer) becomes a ``QuantizationScheme`` of the ``compressed-tensors`` package, its
codes the tensors that package's compressors decompress (``weight_packed`` / ``weight``,
``weight_scale``, ``weight_zero_point``, ``weight_shape``, ``input_scale``, ``input_zero_point``).

What maps, bit for bit (compressed-tensors dequantizes ``(q - z) * s`` in the scale's dtype,
float32 here, as qcompile's reference does):

=========================================  ===================================================
qcompile                                   compressed-tensors
=========================================  ===================================================
int2..int8 codes, no zero point            ``type int``, ``symmetric true``, codes as they are
uint2..uint8 codes, integer zero point     ``type int``, ``symmetric false``; codes and zero
                                           points shifted by ``-2^(bits-1)`` (same ``q - z``)
per_channel / one group spanning K         ``strategy channel``
per_group (K a multiple of the group)      ``strategy group``, ``group_size``
per_tensor                                 ``strategy tensor``
dynamic per_token / per_tensor, asymmetric ``input_activations`` ``dynamic true``, ``token`` / ``tensor``
(int8/uint8)                               (equal but at exact rounding ties: it rounds ``x/s + z``,
                                           qcompile ``round(x/s) + z``)
static per_tensor int8/uint8               ``input_activations`` ``tensor``, ``input_scale`` (+ zero point)
=========================================  ===================================================

Refused with a :class:`~qcompile.errors.BackendError` naming the layer: float zero points
(``x = s q + min``), double-quantized scales (``scale_dtype: int8``), code books (``nf4``), fp8,
a group that does not divide K, per-token-group activations, SmoothQuant factors left in the graph
(``w8a8``'s smoothing), symmetric dynamic activations (its
scale is ``max|x| / 127.5``, qcompile's ``max|x| / 127``), quantized convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from ...errors import BackendError
from ...formats import get_format
from ...ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ...passes.infra import get_attr_tensor
from ...spec import ROLE

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default
PACK_QUANTIZED, INT_QUANTIZED = "pack-quantized", "int-quantized"


@dataclass
class LayerPlan:
    """One quantized Linear as compressed-tensors stores it."""

    layer: str
    scheme: QuantizationScheme
    codes: torch.Tensor                 # int8, signed (shifted when qcompile's are unsigned)
    scale: torch.Tensor                 # float32, CT's shape for the strategy
    zero_point: Optional[torch.Tensor]  # int8, signed; None when symmetric
    input_scale: Optional[torch.Tensor] = None
    input_zero_point: Optional[torch.Tensor] = None


def _refuse(layer: str, what: str) -> BackendError:
    return BackendError(f"layer '{layer}': compressed-tensors cannot hold {what}; keep that layer float with an "
                        "override, or choose another recipe (w4-g128, w8, w8a8-dynamic map) or backend")


def _int_format(layer: str, fmt_name: str, role: str):
    fmt = get_format(fmt_name)
    if fmt.kind != "int":
        raise _refuse(layer, f"{role}s in format '{fmt_name}' ({fmt.description}): its schemes written here are "
                             "integer grids (type int); fp8 and code books (nf4) are not written")
    return fmt


def _signed(fmt, codes: torch.Tensor) -> torch.Tensor:
    """Codes in compressed-tensors' signed range: unsigned codes shift by -2^(bits-1), which keeps q - z."""
    offset = 0 if fmt.signed else 1 << (fmt.bits - 1)
    return (codes.to(torch.int16) - offset).to(torch.int8)


def weight_plan(gm, layer: str, deq) -> LayerPlan:
    """The plan of one Linear whose weight is ``deq`` (a dequantize of stored codes)."""
    codes_node, scale_node, zp_node, fmt_name, group = deq.args[:5]
    fmt = _int_format(layer, fmt_name, "weight")
    codes, scale = get_attr_tensor(gm, codes_node), get_attr_tensor(gm, scale_node)
    zp = None if zp_node is None else get_attr_tensor(gm, zp_node)
    if codes is None or scale is None or (zp_node is not None and zp is None):
        raise _refuse(layer, f"double-quantized scales or zero points ({fmt_name}, groups of {group}): its scales "
                             "are stored float, one per group")
    if zp is not None and zp.is_floating_point():
        raise _refuse(layer, f"a float zero point ({fmt_name}, x = s*q + min): its zero points are integer codes "
                             "(use zero_point_dtype: code)")
    if not fmt.signed and zp is None:
        raise _refuse(layer, f"unsigned {fmt_name} codes without a zero point")
    n, k = codes.shape
    if scale.dim() == 0 or scale.numel() == 1:
        strategy, group_size, scale = "tensor", None, scale.reshape(1)
    elif group and k % group == 0:
        strategy, group_size = "group", int(group)
    elif scale.shape[-1] == 1:   # per channel, or one group longer than K: the same grid
        strategy, group_size = "channel", None
    else:
        raise _refuse(layer, f"groups of {group} over K={k}: its group strategy needs K to be a multiple of the "
                             "group (vLLM's kernels too)")
    args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=zp is None, strategy=strategy,
                            group_size=group_size)
    return LayerPlan(layer, QuantizationScheme(targets=[layer], weights=args), _signed(fmt, codes),
                     scale.detach().float().contiguous(),
                     None if zp is None else _signed(fmt, zp).reshape(scale.shape).contiguous())


def _dynamic_source(scale_node):
    if getattr(scale_node, "target", None) is not None and scale_node.op == "call_function" and \
            getattr(scale_node.args[0], "target", None) == CHOOSE_QPARAMS:
        return scale_node.args[0]
    return None


def activation_args(gm, plan: LayerPlan, x) -> None:
    """Set ``plan``'s input activation quantizer from the Linear's input ``x`` (nothing when it is float)."""
    if getattr(x, "target", None) != DEQUANTIZE or getattr(x.args[0], "target", None) != QUANTIZE:
        return
    q = x.args[0]
    if getattr(q.args[0], "meta", {}).get(ROLE) == "smoothing":
        # measured: written without it, the tiny Llama's w8a8 logits moved by 99 % of their range
        raise _refuse(plan.layer, "an input multiplied by SmoothQuant factors (smoothing in the recipe): a "
                                  "transformers model has no tensor for them and folding them into the preceding "
                                  "norm is not built; use a recipe without smoothing (smoothing: null)")
    fmt = _int_format(plan.layer, q.args[3], "activation")
    if fmt.bits != 8:
        raise _refuse(plan.layer, f"{fmt.bits}-bit activations ({fmt.name}): vLLM's integer activation kernels "
                                  "take 8 bits")
    chooser = _dynamic_source(q.args[1])
    if chooser is not None:
        _, _, symmetric, per_token = chooser.args[:4]
        group = chooser.args[4] if len(chooser.args) > 4 else 0
        if group:
            raise _refuse(plan.layer, f"per-token-group activations (groups of {group})")
        if symmetric:
            # measured: its symmetric dynamic scale is max|x| / 127.5 (codes -128..127), qcompile's max|x| / 127
            raise _refuse(plan.layer, "symmetric dynamic activations with qcompile's scale (max|x| / 127): it "
                                      "computes max|x| / 127.5; use asymmetric dynamic activations (w8a8-dynamic)")
        act = QuantizationArgs(num_bits=8, type="int", symmetric=bool(symmetric),
                               strategy="token" if per_token else "tensor", dynamic=True)
    else:
        scale, zp = get_attr_tensor(gm, q.args[1]), None if q.args[2] is None else get_attr_tensor(gm, q.args[2])
        if scale is None or scale.numel() != 1:
            raise _refuse(plan.layer, "static activations quantized other than per tensor")
        act = QuantizationArgs(num_bits=8, type="int", symmetric=zp is None, strategy="tensor", dynamic=False)
        plan.input_scale = scale.detach().float().reshape(1)
        if zp is not None:
            if zp.is_floating_point():
                raise _refuse(plan.layer, "a float activation zero point")
            plan.input_zero_point = _signed(fmt, zp).reshape(1)
    plan.scheme = QuantizationScheme(targets=plan.scheme.targets, weights=plan.scheme.weights, input_activations=act)


def compressed_tensors(plan: LayerPlan, format: str) -> dict:
    """The tensors of one layer (names local to the module) in compressed-tensors' ``format``:
    codes packed by the package's own packer (``pack_to_int32``) for ``pack-quantized``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_scale": plan.scale}
    if format == PACK_QUANTIZED:
        bits = plan.scheme.weights.num_bits
        out["weight_packed"] = pack_to_int32(plan.codes, bits).contiguous()
        out["weight_shape"] = torch.tensor(list(plan.codes.shape))
        if plan.zero_point is not None:
            out["weight_zero_point"] = pack_to_int32(plan.zero_point, bits, packed_dim=0).contiguous()
    else:
        out["weight"] = plan.codes.contiguous()
        if plan.zero_point is not None:
            out["weight_zero_point"] = plan.zero_point
    if plan.input_scale is not None:
        out["input_scale"] = plan.input_scale
    if plan.input_zero_point is not None:
        out["input_zero_point"] = plan.input_zero_point
    return out


def storage_format(scheme: QuantizationScheme) -> str:
    """``int-quantized`` for 8-bit weights with quantized activations (W8A8, what vLLM's int8 GEMMs
    read), else ``pack-quantized`` (weight-only, 2..8 bits in int32 words: vLLM's WNA16 kernels)."""
    return INT_QUANTIZED if scheme.input_activations is not None and scheme.weights.num_bits == 8 else PACK_QUANTIZED
