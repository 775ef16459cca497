"""Observers: modules inserted on graph edges during calibration that watch a tensor's range and
turn it into a scale and zero point.

==================  ================================================================================
``minmax``          running min / max
``moving_average``  exponential moving average of each batch's min / max (robust to one odd batch)
``percentile``      the ``p`` and ``1 - p`` quantiles of everything seen (``observer_args: {p: 1e-4}``)
``mse``             the clipping range that minimises the expected squared quantization error
``histogram``       the clipping range that minimises the KL divergence between the float and the
                    quantized distributions (TensorRT's entropy calibration, for both ends)
==================  ================================================================================

``percentile``, ``mse`` and ``histogram`` share one streaming histogram (2048 bins, widened as new
data arrives), so calibration data is never held in memory.

Under data-parallel calibration (:mod:`qcompile.distributed`) each rank observes its own shard and
:func:`all_reduce_statistics` merges them: min/max by MIN/MAX (exactly one process's result), the
histograms summed over the common range (each rank's counts re-binned at their bin centres into
it, as widening does). One process widens in another order, so the counts agree within a bin and
the range chosen from them may move (``tests/test_distributed.py`` measures it: within 2 % of the
range for ``mse``/``percentile``, 9 % for ``histogram``'s KL search on ~4k values). ``moving_average``
depends on the order of the batches and is refused there.

Weights need no observer: :func:`weight_qparams` computes their scales directly (min-max or MSE).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import distributed
from .errors import CalibrationError
from .formats import TWO_LEVEL, Format, float16_minimum, get_format, kquant_minimum
from .spec import QuantSpec


def check_finite(x: torch.Tensor, layers: Sequence[str], when: str) -> None:
    """A :class:`CalibrationError` naming ``layers`` (whose input ``x`` is) when ``x`` has NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise CalibrationError(f"calibration produced {bad} in the input of layer(s) {', '.join(layers) or '?'} "
                               f"({when}); check the calibration data and the float model on it")


class Observer(nn.Module):
    """Base observer: checks values are finite (naming the layers that consume them) and records.

    ``layers`` are the module paths of the layers whose input this observer watches.
    """

    def __init__(self, spec: QuantSpec, layers: Sequence[str] = ()):
        super().__init__()
        self.spec = spec
        self.fmt: Format = get_format(spec.format)
        self.layers = list(layers)
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.detach()
        if xd.is_floating_point():
            check_finite(xd, self.layers, f"batch {self.batches}")
        if xd.numel():
            self.update(xd.float())
            self.batches += 1
        return x

    def update(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.min())
        self.max_val = torch.maximum(self.max_val, x.max())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def all_reduce(self) -> None:
        """Merge every rank's statistics into this one's (MIN of the minima, MAX of the maxima,
        the batch counts summed); no-op in one process."""
        if distributed.group() is None:
            return
        self.min_val = distributed.all_reduce(self.min_val, "min")
        self.max_val = distributed.all_reduce(self.max_val, "max")
        self.batches = distributed.sum_int(self.batches)

    def qparams(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.batches == 0:
            raise CalibrationError(f"observer of layer(s) {', '.join(self.layers)} saw no data: "
                                   "that part of the model never ran on the calibration inputs")
        lo, hi = self.range()
        return self.fmt.choose_qparams(lo, hi, self.spec.symmetric)

    def extra_repr(self) -> str:
        return f"{self.spec.observer}, {self.spec.format}, layers={self.layers}"


class MinMaxObserver(Observer):
    """Running min and max."""


class MovingAverageObserver(Observer):
    """EMA of per-batch min/max, ``observer_args: {momentum: 0.01}``."""

    def update(self, x):
        c = float(self.spec.observer_args.get("momentum", 0.01))
        lo, hi = x.min(), x.max()
        if self.batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)

    def all_reduce(self) -> None:
        if distributed.group() is not None:
            raise NotImplementedError(
                f"observer 'moving_average' of layer(s) {', '.join(self.layers)} under data-parallel calibration: "
                "an exponential moving average depends on the order of the batches, and the ranks' batches have "
                "no single order; use minmax, percentile, mse or histogram (or calibrate in one process)")


class HistogramObserver(Observer):
    """A streaming histogram; subclasses choose the clipping range from it."""

    BINS = 2048

    def __init__(self, spec, layers=()):
        super().__init__(spec, layers)
        self.register_buffer("hist", torch.zeros(self.BINS, dtype=torch.float64))

    def update(self, x):
        lo, hi = x.min(), x.max()
        new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        if new_hi <= new_lo:
            new_hi = new_lo + 1e-6
        if self.batches and (new_lo < self.min_val or new_hi > self.max_val):
            # re-bin the old counts at their bin centres into the wider range
            old_centres = self._centres()
            self.hist = _histogram(old_centres, new_lo, new_hi, self.BINS, weights=self.hist)
        self.min_val, self.max_val = new_lo, new_hi
        self.hist += _histogram(x.flatten().double(), new_lo, new_hi, self.BINS)

    def all_reduce(self) -> None:
        """The histograms of every rank summed over their common range (each rank's counts re-binned
        at their bin centres into it first, as :meth:`update` does when the range widens)."""
        if distributed.group() is None:
            return
        lo = distributed.all_reduce(self.min_val, "min")
        hi = distributed.all_reduce(self.max_val, "max")
        if hi <= lo:
            hi = lo + 1e-6
        if self.batches and bool(lo != self.min_val or hi != self.max_val):
            self.hist = _histogram(self._centres(), lo, hi, self.BINS, weights=self.hist)
        self.hist = distributed.all_reduce(self.hist, "sum")
        self.min_val, self.max_val = lo, hi
        self.batches = distributed.sum_int(self.batches)

    def _centres(self) -> torch.Tensor:
        width = (self.max_val - self.min_val).double() / self.BINS
        return self.min_val.double() + width * (torch.arange(self.BINS, dtype=torch.float64) + 0.5)

    def _candidates(self, n: int = 40):
        """Candidate clipping ranges: shrink each end independently towards 0."""
        ratios = torch.linspace(0.2, 1.0, n, dtype=torch.float64)
        lo, hi = self.min_val.double().clamp(max=0), self.max_val.double().clamp(min=0)
        if self.spec.symmetric:
            amax = torch.maximum(-lo, hi)
            return -amax * ratios, amax * ratios
        grid_lo, grid_hi = torch.meshgrid(lo * ratios, hi * ratios, indexing="ij")
        return grid_lo.flatten(), grid_hi.flatten()


class PercentileObserver(HistogramObserver):
    """Clip to the ``p`` / ``1 - p`` quantiles (``observer_args: {p: 1e-4}``)."""

    def range(self):
        p = float(self.spec.observer_args.get("p", 1e-4))
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        centres = self._centres()
        lo = centres[torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)).clamp(max=self.BINS - 1)]
        hi = centres[torch.searchsorted(cdf, torch.tensor([1 - p], dtype=torch.float64)).clamp(max=self.BINS - 1)]
        return lo.float().squeeze(), hi.float().squeeze()


class MSEObserver(HistogramObserver):
    """The range minimising the histogram-weighted squared error of quantize → dequantize."""

    def range(self):
        if self.fmt.kind != "int":  # the closed-form error below is for affine integer grids
            return super().range()
        lo, hi = self._candidates()
        x = self._centres()[None, :]
        scale, zp = self.fmt.choose_qparams(lo.float(), hi.float(), self.spec.symmetric)
        s, z = scale.double()[:, None], (0 if zp is None else zp.double()[:, None])
        q = torch.clamp(torch.round(x / s) + z, self.fmt.qmin, self.fmt.qmax)
        err = ((q - z) * s - x) ** 2 @ self.hist
        best = int(torch.argmin(err))
        return lo[best].float(), hi[best].float()


class KLObserver(HistogramObserver):
    """Entropy calibration: the range minimising KL(P || Q) between the clipped float histogram P
    and its quantized version Q (each quantization bin's mass spread over its non-empty bins)."""

    def range(self):
        lo_c, hi_c = self._candidates(40)
        centres = self._centres()
        levels = int(self.fmt.qmax - self.fmt.qmin + 1)
        best, best_kl = 0, math.inf
        for i in range(len(lo_c)):
            lo, hi = float(lo_c[i]), float(hi_c[i])
            inside = (centres >= lo) & (centres <= hi)
            if not inside.any():
                continue
            first, last = int(inside.nonzero()[0]), int(inside.nonzero()[-1])
            # P: the float distribution with outliers clipped onto the edge bins (what the
            # quantizer does to them); Q: the in-range histogram quantized to `levels` buckets.
            # Building Q from the *unclipped* slice is what makes clipping cost KL.
            kept = self.hist[first:last + 1]
            p = kept.clone()
            p[0] += self.hist[:first].sum()
            p[-1] += self.hist[last + 1:].sum()
            bucket = ((centres[first:last + 1] - lo) / max(hi - lo, 1e-12) * (levels - 1)).round().long()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, kept)
            nonzero = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, (kept > 0).double())
            q = torch.where(kept > 0, mass[bucket] / nonzero[bucket].clamp(min=1), torch.zeros_like(kept))
            pn, qn = p / p.sum(), q / q.sum()
            mask = pn > 0
            kl = float((pn[mask] * torch.log(pn[mask] / qn[mask].clamp(min=1e-12))).sum())
            if kl < best_kl:
                best, best_kl = i, kl
        return lo_c[best].float(), hi_c[best].float()


class ChannelAbsMaxObserver(nn.Module):
    """Per-channel (last dim) max |x|, plus a bounded random sample of rows (tokens): the
    statistics SmoothQuant needs, and the data its per-layer strength search is measured on.

    The sample: from each batch in turn, ``rows_per_batch`` rows drawn by one generator (seed 0)
    until ``max_rows`` are held. A batch of at most ``rows_per_batch`` rows is kept whole and its
    draw replayed by :meth:`sample`, so that under data-parallel calibration (:meth:`all_reduce`:
    the ranks' batches in rank order, the generator replayed over all of them) the sample is the
    one a single process on the concatenated shards draws. A longer batch keeps only its own draw;
    on ranks other than 0 that draw differs from one process's (same batch, another random
    subset): :attr:`redrawn_batches` counts those."""

    def __init__(self, layers: Sequence[str] = (), max_rows: int = 1024, rows_per_batch: int = 128):
        super().__init__()
        self.layers = list(layers)
        self.absmax: Optional[torch.Tensor] = None
        self.max_rows, self.rows_per_batch = max_rows, rows_per_batch
        # per batch while the sample has room: (rows in the batch, kept rows, kept whole?)
        self.batches: list[tuple[int, torch.Tensor, bool]] = []
        self.redrawn_batches = 0
        self._held = 0
        self._gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        a = flat.abs().amax(0)
        check_finite(a, self.layers, "smoothing statistics")
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        room = self.max_rows - self._held
        if room > 0:
            n = flat.shape[0]
            take = min(room, self.rows_per_batch, n)
            perm = torch.randperm(n, generator=self._gen)   # drawn here too: the generator's sequence is the sample's
            whole = n <= self.rows_per_batch
            self.batches.append((n, flat.clone() if whole else flat[perm[:take]].clone(), whole))
            self._held += take
        return x

    def sample(self) -> torch.Tensor:
        """The sampled rows ``[R, K]`` (replays the generator over :attr:`batches`)."""
        gen = torch.Generator().manual_seed(0)
        rows, room = [], self.max_rows
        for n, kept, whole in self.batches:
            if room <= 0:
                break
            perm = torch.randperm(n, generator=gen)
            take = min(room, self.rows_per_batch, n)
            rows.append(kept[perm[:take]] if whole else kept[:take])
            room -= take
        return torch.cat(rows) if rows else torch.empty(0)

    def all_reduce(self) -> None:
        """Every rank's statistics merged: the channel maxima by MAX, the sampled batches gathered
        in rank order (see the class docstring); no-op in one process."""
        if distributed.group() is None:
            return
        k = None if self.absmax is None else self.absmax.shape[0]
        ks = {n for n in distributed.all_gather(k) if n is not None}
        if len(ks) != 1:
            raise CalibrationError(f"smoothing statistics of layer(s) {', '.join(self.layers)}: the ranks saw "
                                   f"{sorted(ks) or 'no'} channel counts")
        absmax = torch.zeros(ks.pop()) if self.absmax is None else self.absmax   # |x| >= 0: zeros are neutral
        self.absmax = distributed.all_reduce(absmax, "max")
        merged, room = [], self.max_rows
        for r, batches in enumerate(distributed.all_gather(self.batches)):
            for n, kept, whole in batches:
                if room <= 0:
                    break
                merged.append((n, kept, whole))
                room -= min(room, self.rows_per_batch, n)
                self.redrawn_batches += r > 0 and not whole
        self.batches, self._held = merged, self.max_rows - max(room, 0)


OBSERVER_CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "histogram": KLObserver,
}


def all_reduce_statistics(module: nn.Module) -> None:
    """Merge the statistics of every observer in ``module`` across the ranks of the active process
    group (:mod:`qcompile.distributed`), in module order (the same on every rank); no-op in one
    process. Call it on every rank once calibration has run."""
    if distributed.group() is None:
        return
    for m in module.modules():
        if isinstance(m, (Observer, ChannelAbsMaxObserver)):
            m.all_reduce()


def make_observer(spec: QuantSpec, layers: Sequence[str] = ()) -> Observer:
    """The observer the spec names."""
    return OBSERVER_CLASSES[spec.observer](spec, layers)


def _histogram(x, lo, hi, bins, weights=None):
    idx = ((x - lo.double()) / (hi - lo).double() * bins).floor().long().clamp(0, bins - 1)
    w = torch.ones_like(x, dtype=torch.float64) if weights is None else weights.double()
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w)


# -- weights ---------------------------------------------------------------------------------------
def weight_qparams(w: torch.Tensor, spec: QuantSpec, channel_axis: int = 0):
    """Scale and zero point for a weight, shaped as :mod:`qcompile.ops` expects.

    ``per_channel`` reduces every dim but ``channel_axis``; ``per_group`` splits the last dim of a
    2-D weight into groups of ``group_size`` (the last group may be shorter). ``observer: mse``
    shrinks each channel's range to minimise its squared error.
    """
    scale, zp = _weight_qparams(w, spec, channel_axis, get_format(spec.format))
    if spec.zero_point_dtype == "float16":   # stored as the float16 group minimum m = -z s (x = s q + m)
        zp = float16_minimum(scale, zp)
    elif spec.zero_point_dtype in TWO_LEVEL:   # the minimum (<= 0) a k-quant stores, float64 until its two-level grid
        scale, zp = kquant_minimum(scale, zp, get_format(spec.format))
    return scale.to(spec.scale_torch_dtype), zp   # float16 scales: computed rounded, stored as float16


def _weight_qparams(w, spec, channel_axis, fmt):
    wf = w.detach().float()
    if spec.granularity == "per_tensor":
        view = wf.reshape(1, -1)
    elif spec.granularity == "per_channel":
        view = wf.movedim(channel_axis, 0).reshape(wf.shape[channel_axis], -1)
    else:  # per_group: [N, K] -> [N * G, g] rows (zero-padded last group)
        if wf.dim() != 2:
            raise ValueError(f"per_group needs a 2-D weight, got shape {tuple(wf.shape)}")
        g = spec.group_size
        groups = -(-wf.shape[1] // g)
        padded = torch.nn.functional.pad(wf, (0, groups * g - wf.shape[1]))
        view = padded.reshape(-1, g)
        # padding zeros must not widen a group's range: use the real values' min/max
        valid = torch.nn.functional.pad(torch.ones_like(wf, dtype=torch.bool), (0, groups * g - wf.shape[1])).reshape(-1, g)
        lo = torch.where(valid, view, torch.full_like(view, math.inf)).amin(1)
        hi = torch.where(valid, view, torch.full_like(view, -math.inf)).amax(1)
        scale, zp = _search_or_minmax(view, lo, hi, fmt, spec)
        shape = (wf.shape[0], groups)
        return scale.reshape(shape), None if zp is None else zp.reshape(shape)
    scale, zp = _search_or_minmax(view, view.amin(1), view.amax(1), fmt, spec)
    if spec.granularity == "per_tensor":
        return scale.reshape(()), None if zp is None else zp.reshape(())
    shape = [1] * wf.dim()
    shape[channel_axis] = wf.shape[channel_axis]
    return scale.reshape(shape), None if zp is None else zp.reshape(shape)


def _search_or_minmax(rows: torch.Tensor, lo, hi, fmt: Format, spec: QuantSpec):
    """Per-row qparams: min-max, or (``mse``) the best of 20 shrunken ranges per row."""
    dt, fz = spec.scale_torch_dtype, spec.float_zero_point
    if spec.observer == "signed_max":
        return _signed_max(lo, hi, fmt, dt)
    if spec.observer != "mse":
        return fmt.choose_qparams(lo, hi, spec.symmetric, dt, fz)
    best_scale, best_zp = fmt.choose_qparams(lo, hi, spec.symmetric, dt, fz)
    best_err = _row_error(rows, best_scale, best_zp, fmt)
    for r in torch.linspace(0.5, 0.95, 19):
        scale, zp = fmt.choose_qparams(lo * r, hi * r, spec.symmetric, dt, fz)
        err = _row_error(rows, scale, zp, fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _signed_max(lo, hi, fmt: Format, dtype):
    """llama.cpp's Q4_0/Q5_0 scale (``quantize_row_q4_0_ref``): the value of largest magnitude, with
    its sign, maps to the lowest code, ``d = max / -2^(bits-1)`` (negative when that value is
    positive), so one end of the grid is that value exactly and the range gets the whole lower half
    of the codes; unsigned symmetric formats (middle-code zero point) only. ``dtype`` float16: rounded
    to the nearest float16, as llama.cpp stores ``d``."""
    _, zp = fmt.choose_qparams(lo, hi, True)   # checks the range (NaN/Inf); zp: the middle code
    peak = torch.where(hi.abs() > lo.abs(), hi, lo).float()
    scale = peak / (fmt.qmin - zp.float())
    tiny = torch.finfo(dtype).smallest_normal if dtype != torch.float32 else torch.finfo(torch.float32).eps
    scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
    if dtype != torch.float32:
        scale = scale.to(dtype).float()
    return scale, zp


def _row_error(rows, scale, zp, fmt: Format):
    s = scale[:, None]
    z = None if zp is None else zp[:, None]
    return ((fmt.dequantize(fmt.quantize(rows, s, z), s, z) - rows) ** 2).sum(1)
