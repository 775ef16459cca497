"""Drive calibration data through an observed graph: a progress bar, an error for empty data,
and (from the observers) an error naming the layer where NaN/Inf appears. Under data-parallel
calibration (:mod:`qcompile.distributed`) an error on one rank is raised on every rank, and the
count is of all ranks' items."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch

from . import distributed
from .errors import CalibrationError


def iterate(data: Iterable, max_samples: Optional[int] = None):
    """Items of ``data`` (a list, generator or DataLoader), at most ``max_samples``."""
    if data is None:
        raise CalibrationError("no calibration data given: pass calibration=<iterable of inputs>")
    if isinstance(data, (torch.Tensor, str, bytes)):
        raise CalibrationError(f"calibration must be an iterable of inputs (tuples or dicts), got a {type(data).__name__}")
    try:
        it = iter(data)
    except TypeError:
        raise CalibrationError(f"calibration must be iterable, got {type(data).__name__}") from None
    return itertools.islice(it, max_samples) if max_samples else it


def run_calibration(call: Callable, data: Iterable, max_samples: Optional[int] = None,
                    progress: bool = True, desc: str = "calibrating") -> int:
    """Call ``call(item)`` on every item under ``torch.no_grad()``; returns the count (summed over
    the ranks of the active process group, whose errors every rank raises: :func:`~qcompile.distributed.agree`)."""
    from tqdm.auto import tqdm

    total = None
    if hasattr(data, "__len__"):
        total = len(data) if not max_samples else min(len(data), max_samples)
    count, error = 0, None
    try:
        with torch.no_grad():
            for item in tqdm(iterate(data, max_samples), total=total, desc=desc, disable=not progress,
                             leave=False, unit="batch"):
                call(item)
                count += 1
    except Exception as e:   # a rank failing alone must not leave the others in the next collective
        if distributed.group() is None:
            raise
        error = e
    distributed.agree(error)
    count = distributed.sum_int(count)
    if count == 0:
        raise CalibrationError("calibration data is empty: static activation scales need at least one batch")
    return count


def reiterable(data: Iterable, needed_passes: int):
    """``data`` as something that can be iterated ``needed_passes`` times: a one-shot iterator
    (a generator) is materialised into a list only when more than one pass is needed."""
    if needed_passes <= 1 or data is None:
        return data
    if iter(data) is data:
        return list(data)
    return data
