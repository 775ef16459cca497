"""Wall-clock timing of lowered ONNX models in onnxruntime, for latency budgets (:mod:`qcompile.latency`).

Two measurements, both on the bytes :func:`~.lower.export_onnx` produced (the real lowering, not an
estimate), one intra-op thread, the artifact's own session options:

* :func:`time_branches`: a model whose graph is several independent branches (input ``i`` →
  output ``i``) is cut into one sub-model per branch (``onnx.utils.Extractor``: exactly the nodes
  and initializers the lowering emitted for it) and each is timed in its own session: one export
  times every layer shape of one candidate.
* :func:`time_artifact`: the whole lowered model, end to end.

Both return medians over ``runs`` timed ``session.run`` calls after two warm-up calls, on two clocks:
``wall`` (what a user waits) and ``cpu`` (the CPU time of the calling thread, which runs every kernel
with one intra-op thread: unlike wall time it does not grow when other processes share the cores)."""
from __future__ import annotations

import statistics
import time

from .lower import TARGETS  # noqa: F401  - the lowering targets a latency budget may name

ID = "onnx"


def version() -> str:
    """What the cache key records about the runtime (a new onnxruntime may pick other kernels) and
    the int8 weight type lowering picks on this host (u8 x u8 kernels time differently; timings
    cached before that choice existed were of the saturating u8 x s8 kernels)."""
    import onnxruntime

    from ...cpu import cpu_info
    from .weights import choose_int8_weights

    return f"onnxruntime-{onnxruntime.__version__}-weights-{choose_int8_weights(cpu_info())[0]}"


def lower(qmodel, target: str):
    """The artifact the user would run: one intra-op thread (timings on a shared host are only
    comparable with one: see docs/benchmarks.md)."""
    from ..base import lower as lower_to

    return lower_to(qmodel, backend=ID, threads=1, target=target)


def median_ms(fn, runs: int, min_seconds: float = 0.0) -> dict:
    """``{"wall": ms, "cpu": ms}``: medians of ``fn()`` over at least ``runs`` calls (more, up to 10x,
    until ``min_seconds`` have passed: short kernels get more samples), after two warm-up calls."""
    fn()
    fn()
    wall, cpu, start = [], [], time.perf_counter()
    while len(wall) < runs or (time.perf_counter() - start < min_seconds and len(wall) < 10 * runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {"wall": 1e3 * statistics.median(wall), "cpu": 1e3 * statistics.median(cpu)}


def time_artifact(artifact, args: tuple, kwargs: dict, runs: int) -> dict:
    """Median ms (both clocks) of one ``session.run`` of the whole model on ``args``/``kwargs`` (bound and
    converted to numpy once, outside the timed region)."""
    feed = artifact._feed(args, kwargs)
    return median_ms(lambda: artifact.session.run(None, feed), runs)


def time_branches(artifact, args: tuple, runs: int, min_seconds: float = 0.2) -> list[dict]:
    """Median ms (both clocks) of each branch of a multi-branch model (graph input ``i`` feeds only output ``i``)."""
    import onnx
    import onnxruntime as ort

    from .runtime import session_options

    model = onnx.load_from_string(artifact.model_bytes)
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != len(artifact.input_names):
        raise ValueError(f"{len(artifact.input_names)} inputs but {len(outputs)} outputs: not one branch per input")
    feed = artifact._feed(args, {})
    extractor = onnx.utils.Extractor(model)
    times = []
    for name, out in zip(artifact.input_names, outputs):
        sub = extractor.extract_model([name], [out])
        session = ort.InferenceSession(sub.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
        one = {name: feed[name]}
        times.append(median_ms(lambda: session.run(None, one), runs, min_seconds))
    return times
