"""Fake quantization for quantization-aware training: the modules :func:`qcompile.prepare_qat`
inserts on the edges the recipe annotates.

* :func:`fake_quantize` — quantize → dequantize in float, differentiable. The rounding passes its
  gradient straight through (STE); values clipped to the grid get none. When the scale and zero
  point require grad (LSQ / LSQ+), they get the LSQ gradients: ``round(x/s) - x/s`` inside the
  range, ``qmin - z`` / ``qmax - z`` outside, scaled by ``1/sqrt(n * qmax)``. A
  :class:`FakeQuantize` trains ``log(s)`` (so its gradient is ``s`` times that).
* :class:`FakeQuantize` — one weight or activation quantizer: observes ranges for a warm-up, then
  freezes (or trains) its scale; all state (scale, zero point, ranges, step count) is in
  ``state_dict``, so a checkpoint resumes exactly. Under ``torch.distributed`` the observed
  ranges are reduced over all ranks (min of mins, max of maxes) and batch-norm running statistics
  averaged, so every rank holds the same quantizer and folds the same weights.
* :class:`QATConvBn` — simulated conv + batch-norm folding: the weight that is fake-quantized is
  ``w * gamma / sqrt(running_var + eps)``, the one inference will use; batch statistics still
  drive the output (and the running statistics) until batch-norm is frozen.
* :class:`FixedQParamsObserver` — what a trained activation quantizer becomes at ``convert``: an
  ordinary :class:`~qcompile.observers.Observer` holding the trained qparams, so the PTQ
  :class:`~qcompile.passes.ConvertPass` turns it into the same quantize/dequantize pair.

Example::

    >>> fq = FakeQuantize(QuantSpec("int4", "per_channel"), ["fc"], QATConfig(), weight=w, channel_axis=0)
    >>> w_fq = fq(w)        # differentiable; fq.qparams() is what convert stores
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import CalibrationError, RecipeError
from .formats import Format, get_format
from .observers import Observer, weight_qparams
from .ops import CHOOSE_QPARAMS, _grouped, _ungroup
from .recipe import QATConfig
from .spec import QuantSpec

_EPS = torch.finfo(torch.float32).eps


def _round_ste(u: torch.Tensor) -> torch.Tensor:
    return u + (torch.round(u) - u).detach()


def _grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` in the forward pass, ``factor * grad`` in the backward pass (LSQ's gradient scale)."""
    return t * factor + (t - t * factor).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt: Format,
                  group_size: int = 0, grad_factor: Optional[float] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` with straight-through gradients (see the module docstring).

    ``scale``/``zero_point`` are laid out as :mod:`qcompile.ops` expects (0-d, per-channel with the
    rank of ``x``, or ``[N, G]`` groups); ``zero_point`` may be a float tensor (trained) and is
    rounded in the forward pass. ``grad_factor`` scales the gradient reaching ``scale`` and
    ``zero_point`` (LSQ); ``None`` leaves it as is.
    """
    if fmt.kind != "int":
        # float / code-book formats: the reference numerics, plain STE on x only
        q = fmt.dequantize(fmt.quantize(x.detach(), scale.detach(), zero_point), scale.detach(), zero_point, x.dtype)
        return x + (q - x).detach()
    k = None
    if group_size > 0:
        x, scale, k = _grouped(x, scale, group_size)
        zero_point = None if zero_point is None else zero_point.unsqueeze(-1)
    if grad_factor is not None:
        scale = _grad_scale(scale, grad_factor)
        zero_point = None if zero_point is None else _grad_scale(zero_point, grad_factor)
    scale = scale.clamp_min(_EPS)
    u = x * (1.0 / scale)  # the same expression as the reference quantize (torchao), so codes agree
    if zero_point is None:
        y = torch.clamp(_round_ste(u), fmt.qmin, fmt.qmax) * scale
    else:
        z = _round_ste(zero_point.to(x.dtype))
        y = (torch.clamp(_round_ste(u) + z, fmt.qmin, fmt.qmax) - z) * scale
    return _ungroup(y, k) if k is not None else y


def _has_zero_point(spec: QuantSpec) -> bool:
    _, zp = get_format(spec.format).choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec.symmetric)
    return zp is not None


def _distributed() -> bool:
    return distributed.group() is not None


class FakeQuantize(nn.Module):
    """Fake-quantizes one weight (``weight`` given: its example value sets the scale layout) or one
    activation edge (static or dynamic, per the spec).

    Training-mode calls count steps; the first ``config.observer_steps`` of them (all, when
    ``None``) update the range and the scale from it. Eval-mode calls never change state.
    """

    def __init__(self, spec: QuantSpec, layers: Sequence[str], config: QATConfig,
                 weight: Optional[torch.Tensor] = None, channel_axis: int = 0):
        super().__init__()
        self.spec, self.config, self.layers = spec, config, list(layers)
        self.fmt = get_format(spec.format)
        self.is_weight = weight is not None
        self.channel_axis = channel_axis
        self.group_size = spec.group
        learn = config.learn_scale and not spec.dynamic
        if learn and self.fmt.kind != "int":
            raise RecipeError("qat.learn_scale", f"learned scales need an integer format, not '{spec.format}' "
                                                 f"(layer(s) {', '.join(self.layers)})")
        self.has_zero_point = _has_zero_point(spec)
        if self.is_weight:
            scale, zp = weight_qparams(weight, spec, channel_axis)
        else:
            scale, zp = torch.tensor(1.0), (torch.tensor(0.0) if self.has_zero_point else None)
        scale = scale.detach().float().clone()
        zp = None if zp is None else zp.detach().float().clone()
        # learned per-tensor qparams are stored with one dim of size 1, used 0-d: FSDP2's fully_shard
        # refuses scalar parameters ("Change log_scale to a 1D tensor with numel equal to 1")
        self.qparam_shape = tuple(scale.shape)
        self.zero_point_shape = None if zp is None else tuple(zp.shape)
        if learn:
            # trained as log(scale): an optimizer step then changes a scale by a relative amount, so
            # one learning rate suits 8-bit (tiny) and 2-bit (large) scales alike, with Adam or SGD
            self.log_scale = nn.Parameter(_at_least_1d(scale.clamp_min(_EPS).log()))
        else:
            self.register_buffer("scale_", scale)
        if zp is not None and learn and config.learn_zero_point:
            self.zero_point = nn.Parameter(_at_least_1d(zp))
        else:
            self.register_buffer("zero_point", zp)
        self._register_load_state_dict_pre_hook(_load_scalar_qparams, with_module=True)
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        # weights are ready at once (their scale comes from the weight); activations need data
        self.register_buffer("initialized", torch.tensor(self.is_weight))

    @property
    def learned(self) -> bool:
        return "log_scale" in self._parameters

    @property
    def scale(self) -> torch.Tensor:
        """The current scale (differentiable when learned)."""
        return self.log_scale.exp().reshape(self.qparam_shape) if self.learned else self.scale_

    def zero_point_value(self) -> Optional[torch.Tensor]:
        """The current zero point in the scale's layout (float; differentiable when learned), ``None``
        when symmetric."""
        zp = self.zero_point
        return zp if zp is None else zp.reshape(self.zero_point_shape)

    def _observing(self) -> bool:
        n = self.config.observer_steps
        return not bool(self.initialized) or n is None or int(self.steps) < n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:  # per-token / per-tensor scales from the live tensor, as convert will do
            s, z = CHOOSE_QPARAMS(x.detach(), self.spec.format, self.spec.symmetric, self.spec.per_token,
                                  self.group_size)
            return fake_quantize(x, s, z.float() if self.has_zero_point else None, self.fmt, self.group_size)
        if self.training:
            if self._observing():
                self.observe(x)
            self.steps += 1
        if not bool(self.initialized):
            raise CalibrationError(f"activation quantizer of layer(s) {', '.join(self.layers)} has no range yet: "
                                   "run a training step or pass calibration= to prepare_qat before eval")
        if not self.training and self.is_weight and not self.learned and self._observing():
            # while observing, a weight's scale follows the weight: eval (and convert) use the current one
            scale, zp = weight_qparams(x, self.spec, self.channel_axis)
            return fake_quantize(x, scale, None if zp is None else zp.float(), self.fmt, self.group_size)
        factor = None
        if self.learned:
            # LSQ's gradient scale 1/sqrt(N * Qp), N the values one scale covers: a weight's, or one
            # example's activation features (not the batch's: the factor, and so a data-parallel
            # run, must not depend on how a batch is split over ranks)
            values = x.numel() if self.is_weight or x.dim() < 2 else x[0].numel()
            per_scale = max(values / self.scale.numel(), 1.0)
            factor = 1.0 / math.sqrt(per_scale * max(abs(self.fmt.qmax), 1.0))
        return fake_quantize(x, self.scale, self.zero_point_value(), self.fmt, self.group_size, factor)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range from ``x`` and set the scale (and zero point) from it."""
        if self.is_weight:  # a weight's range is the weight itself: identical on every rank
            scale, zp = weight_qparams(x, self.spec, self.channel_axis)
        else:
            xd = x.detach().float()
            if not torch.isfinite(xd).all():
                raise CalibrationError(f"NaN/Inf in the input of layer(s) {', '.join(self.layers)} at QAT step "
                                       f"{int(self.steps)}")
            lo, hi = xd.min(), xd.max()
            if self.config.sync_observers and _distributed():
                lo, hi = distributed.all_reduce(lo, "min"), distributed.all_reduce(hi, "max")
            if self.spec.observer == "minmax" or not bool(self.initialized):
                self.min_val.copy_(torch.minimum(self.min_val, lo))
                self.max_val.copy_(torch.maximum(self.max_val, hi))
            else:  # moving average (also the training-time tracker for histogram observers)
                c = float(self.spec.observer_args.get("momentum", 0.01))
                self.min_val.add_(c * (lo - self.min_val))
                self.max_val.add_(c * (hi - self.max_val))
            scale, zp = self.fmt.choose_qparams(self.min_val, self.max_val, self.spec.symmetric)
        self.set_qparams(scale, zp)

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                    value_range: Optional[tuple] = None) -> None:
        """Set the scale (and zero point), e.g. from a PTQ observer's calibration."""
        if self.learned:
            self.log_scale.copy_(scale.reshape(self.log_scale.shape).float().clamp_min(_EPS).log())
        else:
            self.scale_.copy_(scale.reshape(self.scale_.shape))
        if self.zero_point is not None and zero_point is not None:
            self.zero_point.copy_(zero_point.float().reshape(self.zero_point.shape))
        if value_range is not None:
            self.min_val.copy_(value_range[0])
            self.max_val.copy_(value_range[1])
        self.initialized.fill_(True)

    def qparams(self, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The scale and zero point convert stores, in the format's storage dtype and op layout.
        ``weight``: the current weight, for a weight quantizer that is still observing."""
        if weight is not None and self.is_weight and not self.learned and self._observing():
            return weight_qparams(weight, self.spec, self.channel_axis)
        if not bool(self.initialized):
            raise CalibrationError(f"activation quantizer of layer(s) {', '.join(self.layers)} never saw data: "
                                   "train (or calibrate) before convert")
        scale = self.scale.detach().clamp_min(_EPS).clone()
        zp = self.zero_point_value()
        if zp is not None:
            zp = torch.round(zp.detach()).clamp(self.fmt.qmin, self.fmt.qmax).to(self.fmt.storage)
        return scale, zp

    def extra_repr(self) -> str:
        kind = "weight" if self.is_weight else "activation"
        mode = "lsq" if self.learned else "ste"
        return f"{kind}, {self.spec.format}/{self.spec.granularity}, {mode}, layers={self.layers}"


def _at_least_1d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def _load_scalar_qparams(module, state_dict, prefix, *args) -> None:
    """State dicts written before learned per-tensor qparams had a dim (0-d ``log_scale`` and
    ``zero_point``) load into the current layout."""
    for name in ("log_scale", "zero_point"):
        value, own = state_dict.get(prefix + name), getattr(module, name, None)
        if isinstance(value, torch.Tensor) and own is not None and value.dim() == 0 and own.dim() == 1:
            state_dict[prefix + name] = value.reshape(1)


class FixedQParamsObserver(Observer):
    """An observer that already knows its qparams (from QAT): :class:`~qcompile.passes.ConvertPass`
    turns it into a quantize/dequantize pair like any calibrated observer."""

    def __init__(self, spec: QuantSpec, layers: Sequence[str], scale: torch.Tensor,
                 zero_point: Optional[torch.Tensor], batches: int):
        super().__init__(spec, layers)
        self.register_buffer("fixed_scale", scale.detach().clone())
        self.register_buffer("fixed_zero_point", None if zero_point is None else zero_point.detach().clone())
        self.batches = max(int(batches), 1)

    def qparams(self):
        return self.fixed_scale, self.fixed_zero_point


class GraphBatchNorm(nn.Module):
    """A captured training-mode ``aten.batch_norm`` as a module, so ``.train()/.eval()`` switch it
    between batch and running statistics (``torch.export`` bakes the mode into the op)."""

    def __init__(self, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                 sync: bool = True):
        super().__init__()
        self.sync = sync  # average the running statistics over ranks (every rank then folds the same)
        self.weight = weight if weight is None or isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)
        self.register_buffer("num_batches_tracked", num_batches_tracked if num_batches_tracked is not None
                             else torch.tensor(0, dtype=torch.int64))
        self.momentum, self.eps = momentum, float(eps)

    def _momentum(self) -> float:
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)

    def forward(self, x: torch.Tensor, use_batch_stats: Optional[bool] = None) -> torch.Tensor:
        batch = self.training if use_batch_stats is None else use_batch_stats
        if batch:
            self.num_batches_tracked.add_(1)
        if not (batch and self.sync and _distributed()):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch,
                                self._momentum(), self.eps)
        # update copies (autograd keeps the tensors batch_norm was given), average them, write back
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, self._momentum(), self.eps)
        with torch.no_grad():
            for t, dst in ((mean, self.running_mean), (var, self.running_var)):
                dst.copy_(distributed.all_reduce(t) / distributed.world_size())
        return y

    def folded_scale(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per channel."""
        g = self.weight if self.weight is not None else torch.ones_like(self.running_var)
        return g / torch.sqrt(self.running_var + self.eps)

    def folded_shift(self, conv_bias: Optional[torch.Tensor]) -> torch.Tensor:
        b = conv_bias if conv_bias is not None else torch.zeros_like(self.running_mean)
        beta = self.bias if self.bias is not None else torch.zeros_like(self.running_mean)
        return (b - self.running_mean) * self.folded_scale() + beta


class GraphAttention(nn.Module):
    """A captured ``aten.scaled_dot_product_attention`` whose ``dropout_p`` applies in training only
    (``torch.export`` bakes the training-mode value into the op)."""

    def __init__(self, dropout_p: float, is_causal: bool, kwargs: dict):
        super().__init__()
        self.dropout_p, self.is_causal, self.kwargs = float(dropout_p), bool(is_causal), dict(kwargs)

    def forward(self, q, k, v, attn_mask=None):
        p = self.dropout_p if self.training else 0.0
        return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, attn_mask, p, self.is_causal,
                                                                   **self.kwargs)


class QATConvBn(nn.Module):
    """conv → batch-norm trained with simulated folding (Krishnamoorthi 2018, §3.2; as in
    ``torch.ao.nn.intrinsic.qat``). While batch-norm is live (training, before ``freeze_bn_steps``)
    the output is ``BN_batch(conv(x, fq(w * g)) / g + b)`` with ``g = gamma / sqrt(running_var +
    eps)``: the quantized weight is the folded one, the batch statistics still normalise and the
    running statistics still update. Frozen or in eval mode it is exactly what convert produces:
    ``conv(x, fq(w * g), (b - mean) * g + beta)``."""

    def __init__(self, conv_op, weight: nn.Parameter, bias: Optional[nn.Parameter], conv_args: tuple,
                 bn: GraphBatchNorm, weight_fq: Optional[FakeQuantize], freeze_bn_steps: Optional[int]):
        super().__init__()
        self.conv_op, self.conv_args = conv_op, tuple(conv_args)
        self.weight, self.bias = weight, bias
        self.bn = bn
        self.weight_fq = weight_fq
        self.freeze_bn_steps = freeze_bn_steps
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def bn_frozen(self) -> bool:
        return self.freeze_bn_steps is not None and int(self.steps) >= self.freeze_bn_steps

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded float weight and bias (before weight fake-quant), with gradients."""
        return self.weight * self._shape(self.bn.folded_scale()), self.bn.folded_shift(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training and not self.bn_frozen()
        if self.training:
            self.steps += 1
        w_fold, b_fold = self.folded()
        w_q = self.weight_fq(w_fold) if self.weight_fq is not None else w_fold
        if not batch_stats:
            return self.conv_op(x, w_q, b_fold, *self.conv_args)
        y = self.conv_op(x, w_q, None, *self.conv_args)
        out_shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y / self.bn.folded_scale().reshape(out_shape)  # undo the fold: BN sees the unscaled conv
        if self.bias is not None:
            y = y + self.bias.reshape(out_shape)
        return self.bn(y, use_batch_stats=True)
