"""Wall-clock budgets for work that can hang in Python (torch.export's symbolic-shape reasoning):
:func:`time_budget` and the :class:`BudgetExceeded` it raises."""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Optional


class BudgetExceeded(BaseException):
    """Raised inside a :func:`time_budget` block that ran out of time. A ``BaseException``, so the
    ``except Exception`` clauses inside torch.export and sympy do not swallow it.

    ``original``: when the timer's exception came back out of the block as another exception (a C++
    boundary converted it, e.g. pybind's argument parser into a ``TypeError``), the exception the
    timer raised; ``__cause__`` is then the converted one."""

    original: "Optional[BudgetExceeded]" = None

    def frames(self) -> list:
        """The frames this stop went through, innermost first: the timer's own exception's, then (when
        it was converted on the way out) the converted exception's and this one's."""
        chain = [e for e in (self.original, self.__cause__ if self.original else None, self) if e is not None]
        out = []
        for exc in chain:
            tb, frames = exc.__traceback__, []
            while tb is not None:
                frames.append(tb.tb_frame)
                tb = tb.tb_next
            out.extend(reversed(frames))
        return out


BUDGET_RETRY_S = 0.5   # after the budget ran out, raise again this often until the block has exited


@contextmanager
def time_budget(seconds: Optional[float]):
    """Raise :class:`BudgetExceeded` inside the block after ``seconds`` of wall-clock time.

    ``torch.export`` cannot be stopped safely from another thread, so this is a ``SIGALRM`` timer
    whose handler raises in the main thread at the next Python instruction (the sympy work that
    makes a capture hang is Python), unwinding the export through its own ``finally`` blocks. It is
    installed only in the main thread of a platform with ``setitimer``; elsewhere the block runs
    without a budget. An outer timer (``pytest-timeout``, a user's alarm) due first is left alone;
    one due later gets its handler back and is re-armed with its remaining time.

    The exception can be lost or changed on its way out of torch's C++ frames (a weakref callback
    drops it, pybind's argument parser makes it a ``TypeError``): it is raised again every
    :data:`BUDGET_RETRY_S` until the block exits, and an exception that leaves the block after the
    budget ran out comes out as :class:`BudgetExceeded` (``original`` and ``__cause__`` keep both).

    Example::

        >>> with time_budget(60):
        ...     ep = torch.export.export(model, args)
    """
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:
        yield
        return
    state = {"active": True, "raised": None}

    def _raise(signum, frame):
        if not state["active"]:
            return
        if _importing(frame):   # an import cut halfway leaves a broken module in sys.modules: wait for it
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        # the exception can be lost on its way out: a weakref callback prints and drops it, a C++
        # argument parser turns it into a TypeError that a fallback path catches. Raise again until
        # the block has exited (measured: 6 of 150 budgets cut at random points were lost so).
        signal.setitimer(signal.ITIMER_REAL, BUDGET_RETRY_S)
        state["raised"] = BudgetExceeded(seconds)
        raise state["raised"]

    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except BaseException as converted:
        state["active"] = False
        if isinstance(converted, BudgetExceeded) or state["raised"] is None:
            raise
        stop = BudgetExceeded(seconds)   # the timer's exception, come back as another one
        stop.original = state["raised"]
        raise stop from converted
    finally:
        state["active"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def _importing(frame) -> bool:
    """Whether ``frame`` or a caller runs inside an import (torch.export imports lazily on first use)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False
