"""Immutable descriptors passes write into the graph, and the ``node.meta`` keys that carry them.

Nothing outside this module spells a meta key: use :data:`ANNOTATION`, :data:`LAYER`, ...
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .errors import RecipeError, closest
from .formats import get_format

# per_token_group: dynamic activations, one scale per token and per group of ``group_size`` along the
# last (reduction) axis: the int8 activation blocks of onnxruntime's MatMulNBits at accuracy level 4
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token", "per_token_group")
GROUPED = ("per_group", "per_token_group")   # granularities that take a group_size
# "int8": the weight's scales are themselves quantized (bitsandbytes' double quantization, see
# formats.double_quantize_scales); per_group weights only
# "kquant6" / "kquant8": llama.cpp's k-quant two-level scales, 6-bit (Q4_K/Q5_K) or 8-bit (Q6_K)
# codes against one float16 scale per 256 weights of a row (formats.two_level_quantize); "kquant4":
# 4-bit codes (Q2_K); "kquant6s": signed 6-bit codes (Q3_K)
SCALE_DTYPES = ("float32", "float16", "int8", "kquant6", "kquant8", "kquant4", "kquant6s")
# "code": the zero point is an integer code of the format, x = s (q - z) (the default). The others
# store a float zero point, x = s (q - z) = s q + m with the minimum m = -s z (llama.cpp's Q4_1 and
# K-quant form): "float32", "float16", or "int8" (double-quantized like int8 scales); asymmetric
# integer weights only. "float16" stores the minimum m itself and the ops compute s q + m (llama.cpp's
# Q4_1/Q5_1 bit for bit, formats.float16_minimum); the others store z and compute (q - z) s
# "kquant6": the minimum as a k-quant stores it (6-bit codes against a float16 dmin per 256 weights)
ZERO_POINT_DTYPES = ("code", "float32", "float16", "int8", "kquant6", "kquant4")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "histogram")
# scale rules for weights only (no activation observer): "signed_max", llama.cpp's Q4_0/Q5_0 scale
# (observers._signed_max)
WEIGHT_OBSERVERS = ("signed_max",)

# node.meta keys (namespaced so they never collide with torch's own)
ANNOTATION = "qcompile.annotation"    # NodeAnnotation on a quantizable op node
LAYER = "qcompile.layer"              # module path of the node's innermost module
LAYER_TYPE = "qcompile.layer_type"    # class name of that module
QPARAMS = "qcompile.qparams"          # on quantize/dequantize nodes: the QuantSpec they implement
ROLE = "qcompile.role"                # on inserted nodes: "weight", "activation", "smoothing", "qobs", "qstats",
                                      # ONLINE_ROTATION
ONLINE_ROTATION = "online_rotation"   # ROLE of the nodes of an online Hadamard (passes.rotate_inner): graph
                                      # ops, not folded weights, that a weights-only format cannot carry
WEIGHT_QPARAMS = "qcompile.weight_qparams"  # on an op node: WeightQParams solved by GPTQ/AWQ or trained by QAT


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Example::

        >>> QuantSpec("int8", "per_channel")                      # int8 weights, one scale per row
        >>> QuantSpec("uint8", "per_tensor", symmetric=False, observer="mse")
        >>> QuantSpec("uint4", "per_group", symmetric=False, group_size=64)
        >>> QuantSpec("int8", "per_token_group", group_size=64, dynamic=True)  # a scale per token per 64 of K
    """

    format: str
    granularity: str = "per_tensor"
    symmetric: bool = True
    group_size: Optional[int] = None
    dynamic: bool = False
    observer: str = "minmax"
    observer_args: dict = field(default_factory=dict, hash=False)  # compared, not hashed (a dict)
    scale_dtype: str = "float32"        # "float16": stored in fp16; "int8": double-quantized (SCALE_DTYPES)
    zero_point_dtype: str = "code"      # "code": an integer code; else a float zero point (ZERO_POINT_DTYPES)

    @property
    def float_zero_point(self) -> bool:
        """Whether the zero point is a float (a group minimum, ``x = s q + m``), not a code."""
        return self.zero_point_dtype != "code"

    @property
    def group(self) -> int:
        """The ``group_size`` the canonical ops take: the group for grouped granularities, else 0."""
        return self.group_size if self.granularity in GROUPED else 0

    @property
    def per_token(self) -> bool:
        """Dynamic scales computed per token (``choose_qparams(per_token=True)``), grouped or not."""
        return self.granularity in ("per_token", "per_token_group")

    @property
    def scale_torch_dtype(self):
        """The dtype scales are computed in (double-quantized scales start from float32)."""
        import torch

        return getattr(torch, self.scale_dtype) if self.scale_dtype in ("float32", "float16") else torch.float32

    def validate(self, where: str) -> "QuantSpec":
        fmt = get_format(self.format, f"{where}.format")
        if self.granularity not in GRANULARITIES:
            raise RecipeError(f"{where}.granularity",
                              f"unknown granularity '{self.granularity}'; {closest(self.granularity, GRANULARITIES)}")
        if self.observer not in OBSERVERS + WEIGHT_OBSERVERS:
            raise RecipeError(f"{where}.observer", f"unknown observer '{self.observer}'; "
                              f"{closest(self.observer, OBSERVERS + WEIGHT_OBSERVERS)}")
        if self.observer == "signed_max" and (fmt.kind != "int" or fmt.signed or not self.symmetric or self.dynamic):
            raise RecipeError(f"{where}.observer", "signed_max (llama.cpp's Q4_0/Q5_0 scale) is for static, symmetric "
                              f"unsigned integer weights (a middle-code zero point), not '{self.format}'"
                              f"{'' if self.symmetric else ' asymmetric'}")
        if self.granularity in GROUPED:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise RecipeError(f"{where}.group_size", f"{self.granularity} needs a positive integer group_size")
        elif self.group_size is not None:
            raise RecipeError(f"{where}.group_size",
                              f"group_size is only valid with {' or '.join(GROUPED)}, not {self.granularity}")
        args = self.observer_args
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise RecipeError(f"{where}.observer_args", f"expected a mapping of names to numbers, got {args!r}")
        for k, v in args.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RecipeError(f"{where}.observer_args.{k}", f"must be a finite number, got {v!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise RecipeError(f"{where}.scale_dtype",
                              f"unknown scale dtype '{self.scale_dtype}'; {closest(str(self.scale_dtype), SCALE_DTYPES)}")
        if self.scale_dtype != "float32" and self.dynamic:
            raise RecipeError(f"{where}.scale_dtype", f"{self.scale_dtype} scales are for weights (static qparams)")
        if self.scale_dtype == "int8" and self.granularity != "per_group":
            raise RecipeError(f"{where}.scale_dtype", "double-quantized (int8) scales need per_group weights")
        for name in ("scale_dtype", "zero_point_dtype"):
            divides = isinstance(self.group_size, int) and self.group_size > 0 and 256 % self.group_size == 0
            if str(getattr(self, name)).startswith("kquant") and not (self.granularity == "per_group" and divides):
                raise RecipeError(f"{where}.{name}", f"{getattr(self, name)} (k-quant two-level) values need "
                                  "per_group weights with a group size dividing 256 (llama.cpp's super-block)")
        if self.zero_point_dtype not in ZERO_POINT_DTYPES:
            raise RecipeError(f"{where}.zero_point_dtype", f"unknown zero point dtype '{self.zero_point_dtype}'; "
                              f"{closest(str(self.zero_point_dtype), ZERO_POINT_DTYPES)}")
        if self.float_zero_point and (self.symmetric or fmt.kind != "int" or self.dynamic
                                      or self.granularity not in ("per_channel", "per_group")):
            raise RecipeError(f"{where}.zero_point_dtype", f"a {self.zero_point_dtype} (float) zero point is for "
                              "asymmetric (symmetric: false) integer weights per channel or per group")
        if self.zero_point_dtype == "int8" and self.granularity != "per_group":
            raise RecipeError(f"{where}.zero_point_dtype", "double-quantized (int8) zero points need per_group weights")
        if not self.symmetric and not fmt.supports_asymmetric:
            raise RecipeError(f"{where}.symmetric", f"format '{self.format}' is symmetric only")
        if self.per_token and not self.dynamic:
            raise RecipeError(f"{where}.dynamic",
                              f"{self.granularity} scales are computed at run time: set dynamic: true")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["observer_args"]:
            del d["observer_args"]
        if d["scale_dtype"] == "float32":   # the default: keep recipe files as they were
            del d["scale_dtype"]
        if d["zero_point_dtype"] == "code":
            del d["zero_point_dtype"]
        return d


@dataclass(frozen=True)
class NodeAnnotation:
    """What the annotate pass decided for one op node (``node.meta[ANNOTATION]``)."""

    layer: str                          # module path, e.g. "encoder.layer.0.attention.self.query"
    op: str                             # "linear" | "conv" | "embedding"
    weight: Optional[QuantSpec]
    activation: Optional[QuantSpec]
    input_arg: Optional[int]            # index of the activation argument (None: no activation)
    weight_arg: int                     # index of the weight argument
    channel_axis: int                   # output-channel axis of the weight


@dataclass(frozen=True)
class WeightQParams:
    """Quantization parameters a weight algorithm (GPTQ, AWQ) solved, or QAT trained, for one op's weight
    (``node.meta[WEIGHT_QPARAMS]``): the convert pass uses them instead of recomputing min-max
    ones, because the new weight lies on exactly this grid. ``reference`` is the float weight the
    quantized one stands for (the report's float baseline)."""

    scale: Any
    zero_point: Any
    reference: Any
