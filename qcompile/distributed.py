"""Data-parallel calibration on ``torch.distributed`` (gloo on CPU, NCCL on GPU): the few
collectives the statistics use to agree across ranks, and the rule that rank 0 alone writes.

When a process group is active (the user ran ``torchrun --nproc-per-node N`` and called
``torch.distributed.init_process_group``, or passed ``process_group=`` to ``qcompile.quantize``)
and it has more than one rank, each rank calibrates on its own shard of the data and the
statistics are reduced where they live: observers (:meth:`qcompile.observers.Observer.all_reduce`),
SmoothQuant channel statistics, GPTQ/AWQ input statistics
(:meth:`qcompile.algorithms.common.InputStats.all_reduce`). Every rank then holds the statistics of
all the data and solves identically; only rank 0 writes artifacts (:func:`writes_on_rank_zero`).
With no group (or a group of one) every function here is a no-op, so one-process runs are
untouched.

Errors must reach every rank: a rank that fails alone (NaN in its calibration data) would leave
the others waiting in the next collective. :func:`agree` is called where ranks may diverge; it
raises the first failing rank's error, with that rank named, on every rank.

Example::

    >>> dist.init_process_group("gloo")
    >>> mine = qcompile.distributed.shard(batches)          # contiguous: rank 0 gets the first part
    >>> qmodel = qcompile.quantize(model, "w8a8", example, calibration=mine)
    >>> qmodel.save("out/m")                                 # rank 0 writes, the others wait for it

Imports only :mod:`qcompile.errors` (and torch).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from . import errors

_EXPLICIT: contextvars.ContextVar = contextvars.ContextVar("qcompile_process_group", default=None)


@contextlib.contextmanager
def using(process_group: Any) -> Iterator[None]:
    """Make ``process_group`` the group qcompile reduces over inside the block (``None``: the default,
    the world group when ``torch.distributed`` is initialized)."""
    token = _EXPLICIT.set(process_group)
    try:
        yield
    finally:
        _EXPLICIT.reset(token)


def group() -> Optional[Any]:
    """The active process group when it has more than one rank, else ``None`` (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    g = _EXPLICIT.get() or dist.group.WORLD
    return g if dist.get_world_size(g) > 1 else None


def rank() -> int:
    """This process's rank in the active group (0 with none)."""
    g = group()
    return 0 if g is None else dist.get_rank(g)


def world_size() -> int:
    """Ranks in the active group (1 with none)."""
    g = group()
    return 1 if g is None else dist.get_world_size(g)


def _device(g) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(g) == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over the active group (``op``: ``sum``, ``min`` or ``max``); a new tensor, same
    dtype and device as ``t``; ``t`` itself with no group."""
    g = group()
    if g is None:
        return t
    buf = t.detach().to(_device(g), copy=True)
    dist.all_reduce(buf, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=g)
    return buf.to(t.device)


def sum_int(n: int) -> int:
    """``n`` summed over the ranks."""
    return int(all_reduce(torch.tensor(n, dtype=torch.int64)))


def all_gather(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects, ``dist.all_gather_object``)."""
    g = group()
    if g is None:
        return [obj]
    out: list = [None] * dist.get_world_size(g)
    dist.all_gather_object(out, obj, group=g)
    return out


def agree(error: Optional[BaseException]) -> None:
    """Call on every rank with the error this rank hit (or ``None``): when any rank failed, every rank
    raises the first failing rank's error, same class and message, the rank named
    (``rank 1 of 2: ...``); the failing rank's own error is chained. No-op with no group."""
    g = group()
    if g is None:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    failed = [(r, e) for r, e in enumerate(all_gather(mine)) if e is not None]
    if not failed:
        return
    r, (cls_name, message) = failed[0]
    cls = getattr(errors, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.QCompileError)):
        cls, message = errors.QCompileError, f"{cls_name}: {message}"
    text = f"rank {r} of {dist.get_world_size(g)}: {message}"
    try:
        agreed = cls(text)
    except TypeError:   # a constructor taking more than a message (RecipeError: field, message)
        agreed = cls.__new__(cls)
        Exception.__init__(agreed, text)
    raise agreed from error


def owners(costs: Sequence[float], world: Optional[int] = None) -> list[int]:
    """The rank that does each job of ``costs`` (weight-parallel solves): longest job first to the
    least loaded rank (ties: the lower job index, then the lower rank), so every rank computes the
    same plan from the same costs. With no group: all rank 0.

    Example::

        >>> owners([4.0, 1.0, 1.0], world=2)
        [0, 1, 1]
    """
    w = world_size() if world is None else world
    load, plan = [0.0] * w, [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(w), key=lambda r: (load[r], r))
        plan[job] = r
        load[r] += costs[job]
    return plan


def broadcast(values: Optional[tuple], src: int) -> tuple:
    """The tuple ``values`` of rank ``src`` (a rank of the active group) on every rank; what the
    other ranks pass is ignored (``None``). Tensors are sent with ``dist.broadcast`` (no pickling: a
    weight can be hundreds of MB), the rest with ``broadcast_object_list``. No group: ``values``."""
    g = group()
    if g is None:
        return values
    me = dist.get_rank(g) == src
    items = values if me else ()
    shapes = [[(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in items] if me else None]
    dist.broadcast_object_list(shapes, group=g, group_src=src)
    rest = [[None if isinstance(t, torch.Tensor) else t for t in items] if me else None]
    dist.broadcast_object_list(rest, group=g, group_src=src)
    out = []
    for i, meta in enumerate(shapes[0]):
        if meta is None:
            out.append(rest[0][i])
            continue
        buf = items[i].detach().contiguous().to(_device(g)) if me else torch.empty(meta[0], dtype=meta[1], device=_device(g))
        dist.broadcast(buf, group=g, group_src=src)
        out.append(items[i] if me else buf.cpu())
    return tuple(out)


def barrier() -> None:
    """Wait for every rank (no-op with no group)."""
    g = group()
    if g is not None:
        dist.barrier(group=g)


def shard(items: Sequence, rank_: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's contiguous part of ``items`` (rank 0 the first ``ceil(n / world)``, ...): with
    contiguous shards the ranks' data in rank order is the one-process order, which the
    order-dependent SmoothQuant row sample relies on (see ``docs/distributed.md``)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(items)
    per = -(-n // w)
    return list(items[r * per:(r + 1) * per])


def writes_on_rank_zero(save: Callable) -> Callable:
    """Decorate a ``save(..., path, ...)`` function: under a process group only rank 0 runs it; the
    other ranks write nothing and return ``Path(path)`` once rank 0 has finished (a failure of rank
    0's save is raised on every rank, :func:`agree`). With no group: ``save`` unchanged."""
    signature = inspect.signature(save)

    @functools.wraps(save)
    def wrapper(*args, **kwargs):
        if group() is None:
            return save(*args, **kwargs)
        result, error = None, None
        if rank() == 0:
            try:
                result = save(*args, **kwargs)
            except Exception as e:   # noqa: BLE001 - raised again on every rank by agree()
                error = e
        agree(error)   # also the barrier: no rank returns before rank 0's write is complete
        return result if result is not None else Path(signature.bind(*args, **kwargs).arguments["path"])

    return wrapper
