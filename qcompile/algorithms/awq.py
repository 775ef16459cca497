"""AWQ (Lin et al., 2023): a per input channel scale ``s`` chosen from the activations so that the
salient channels lose less to rounding (:func:`awq_scale_search`), and a per group clipping ratio of
the weight range (:func:`clip_search`). Both measure output errors from the input's ``XᵀX``
(:class:`~qcompile.algorithms.common.InputStats`), never from the rows.

Imports only :mod:`~qcompile.formats`, :mod:`~qcompile.observers`, :mod:`~qcompile.spec` and
:mod:`qcompile.algorithms.common`.
"""
from __future__ import annotations

import math

import torch

from ..formats import TWO_LEVEL, float16_minimum, get_format, kquant_minimum, scale_grid, zero_point_grid
from ..observers import weight_qparams
from ..spec import QuantSpec
from .common import InputStats, fake_quantize, op_group_size


def _grouped(w: torch.Tensor, group: int):
    """``w [N, K]`` as ``[N, G, g]`` zero-padded, and the padded input-channel count."""
    n, k = w.shape
    g = group or k
    groups = -(-k // g)
    return torch.nn.functional.pad(w, (0, groups * g - k)).reshape(n, groups, g), groups * g


def _as_stats(x) -> InputStats:
    return x if isinstance(x, InputStats) else InputStats.of(x)


def clip_search(w: torch.Tensor, x, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5):
    """Per output row and group, the range shrink ratio in ``[1 - max_shrink, 1]`` (``grid`` steps)
    minimising that group's output error ``‖X_g (w_g - q(w_g))‖²`` on the input rows ``x [T, K]``
    (or their :class:`InputStats`). Returns ``(scale, zero_point)`` in the layout of
    :func:`~qcompile.observers.weight_qparams`."""
    fmt = get_format(spec.format)
    group = op_group_size(spec)
    n, k = w.shape
    wg, kp = _grouped(w.float(), group)
    # per-group input Gram matrices [G, g, g]: the diagonal blocks of XᵀX / T, zero-padded
    gm = torch.nn.functional.pad(_as_stats(x).mean_gram(), (0, kp - k, 0, kp - k))
    gs = group or k
    gram = gm.reshape(kp // gs, gs, kp // gs, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    valid, _ = _grouped(torch.ones(1, k), group)
    valid = valid[0].bool()                                    # [G, g]
    lo = torch.where(valid, wg, torch.full_like(wg, math.inf)).amin(-1)
    hi = torch.where(valid, wg, torch.full_like(wg, -math.inf)).amax(-1)
    best_err = torch.full(lo.shape, math.inf)
    best_s = best_z = None
    for step in range(grid):
        r = 1.0 - max_shrink * step / grid
        s, z = fmt.choose_qparams(lo * r, hi * r, spec.symmetric, spec.scale_torch_dtype, spec.float_zero_point)
        if spec.zero_point_dtype == "float16":
            z = float16_minimum(s, z)
        elif spec.zero_point_dtype in TWO_LEVEL:
            s, z = kquant_minimum(s, z, fmt)
        # each candidate on its stored grid (double-quantized scales: the whole candidate's scales
        # double-quantized together; the chosen mix is double-quantized again at convert)
        se = scale_grid(s, spec.scale_dtype, spec.group_size).unsqueeze(-1)
        ze = None if z is None else zero_point_grid(z, spec.zero_point_dtype, spec.group_size).unsqueeze(-1)
        d = wg - fmt.dequantize(fmt.quantize(wg, se, ze), se, ze)
        d = d * valid
        err = torch.einsum("ngi,gij,ngj->ng", d, gram, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        if z is not None:
            best_z = z if best_z is None else torch.where(better, z, best_z)
    best_s = best_s.to(spec.scale_torch_dtype)
    if spec.granularity == "per_channel":
        return best_s.reshape(n, 1), None if best_z is None else best_z.reshape(n, 1)
    return best_s, best_z


def awq_scale_search(x, weights: list, specs: list, grid: int = 20):
    """AWQ's activation-aware per input channel scale for Linears sharing the input ``x [T, K]`` (or
    its :class:`InputStats`): ``s = mean|x|^alpha`` normalised, alpha on a grid in [0, 1) (alpha 0:
    no scaling), chosen by the summed output error of all consumers. Returns
    ``(s, alpha, error_ratio_vs_no_scaling)``.

    The output error of ``y = xWᵀ`` against ``(x/s) q(Ws)ᵀ = x (q(Ws)/s)ᵀ`` is
    ``tr(D XᵀX Dᵀ) / T`` with ``D = W - q(Ws)/s``: ``N·K²`` per candidate from the Gram matrix
    instead of ``T·N·K`` from the rows."""
    st = _as_stats(x)
    gram = st.mean_gram()
    x_mean = st.mean_abs().clamp_min(1e-8)
    errors = []
    best = (math.inf, None, None)
    for step in range(grid):
        alpha = step / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, spec in zip(weights, specs):
            w = w.float()
            ws = w * s
            scale, zp = weight_qparams(ws, spec, 0)
            d = w - fake_quantize(ws, spec, scale, zp) / s
            err += float(((d @ gram) * d).sum()) / d.shape[0]
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], best[0] / errors[0] if errors[0] > 0 else 1.0
