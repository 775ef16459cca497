"""Per-layer kernel times for latency budgets (issue 9): ``Recipe.auto(candidates,
budget={"latency_ms": 20, "backend": "onnx"})``; the search that allocates against them and checks
the result end to end is :mod:`qcompile.search`'s.

For every quantizable layer and every candidate, the time of the kernels the backend's real lowering
emits for that layer (with the config that candidate gives it: :mod:`qcompile.scope`), on the input
shape the layer sees when the model runs on ``example_inputs``. All layer shapes of one candidate are
quantized and lowered together as independent branches of one model (one export per candidate),
then each branch is cut out of the lowered file and timed alone (:mod:`qcompile.backends.onnx.timing`).
Times are cached on disk (``$QCOMPILE_CACHE_DIR/latency.json``, default ``~/.cache/qcompile``) keyed by
backend, target, runtime version, host CPU (model and feature flags), layer (type and shape), input
shape and the candidate's layer config: a second search measures nothing.

The budget's keys are documented in :mod:`qcompile.auto_recipe`; :func:`check_budget` adds the checks
that need a backend (which exist, their targets).

What a per-layer time does not see (the end-to-end check does): kernels the lowering fuses across
layers (Q/K/V reading one quantized input become one GEMM), and a smoothing multiply that folds into
the LayerNorm before a layer (alone, a layer's smoothing is an explicit ``Mul``).

Imports: ``errors``, ``recipe``, ``scope``, ``auto_recipe``, ``cpu``, and a backend's timing module
through the backend contract (:func:`qcompile.backends.base.timing_module`); never ``api`` or the
allocator: quantizing the branch models is the caller's ``quantize`` argument.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .auto_recipe import latency_budget
from .backends.base import timing_module
from .errors import BackendError, RecipeError
from .recipe import Recipe
from .scope import resolve_layer_config



def check_budget(budget: dict) -> dict:
    """The latency budget with defaults filled in; :class:`RecipeError` naming the field otherwise
    (``NotImplementedError`` for a backend that exists but has no latency timing yet). The shape is
    :func:`qcompile.auto_recipe.latency_budget`'s (checked by ``Recipe.auto`` already); the backend
    and its target are checked here, when the search starts."""
    out = latency_budget(budget)
    backend = out.get("backend")
    if backend is None:
        raise RecipeError("budget.backend", "latency is measured on a backend: give backend='onnx'")
    try:
        timer = timing_module(backend)   # NotImplementedError (why) for a backend without timing
    except BackendError as e:
        raise RecipeError("budget.backend", str(e)) from None
    targets = getattr(timer, "TARGETS", None)
    if targets is not None and out["target"] not in targets:
        raise RecipeError("budget.target", f"unknown {backend} target {out['target']!r}; use one of {targets}")
    return out


def host_id() -> str:
    """A short hash of the host CPU (model name and feature flags): timings from another processor
    are never reused (these machines change from day to day: see shared/README.md)."""
    from .cpu import cpu_info

    info = cpu_info()
    model, flags = info.model, " ".join(sorted(info.flags))
    if not model and not flags:  # no /proc/cpuinfo
        import platform

        model = platform.processor() or platform.machine()
    cap = torch.backends.cpu.get_cpu_capability()
    return hashlib.sha256(f"{model}|{flags}|{cap}".encode()).hexdigest()[:16]


def cache_path() -> Path:
    root = os.environ.get("QCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "qcompile"
    return Path(root) / "latency.json"


class LatencyCache:
    """Per-layer kernel times on disk: ``{key: {"wall": ms, "cpu": ms}}`` in one JSON file, written
    atomically (two searches at once may each lose the other's new entries, never corrupt the file)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else cache_path()
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> Optional[dict]:
        return self.entries.get(key)

    def put(self, key: str, ms: dict) -> None:
        self.entries[key] = dict(ms)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


FLOAT = "float"


def _layer_config(recipe, layer: str, site: dict):
    """The config ``recipe`` gives ``layer`` (:func:`~qcompile.scope.resolve_layer_config`; ``site``:
    its keyword arguments), ``None`` when the layer's weight stays float."""
    cfg = resolve_layer_config(recipe, layer, **site)[0]
    return None if cfg is None or cfg.weight is None else cfg


def _candidate_id(recipe, layer: str, site: dict) -> str:
    """What of a candidate decides the kernels of one layer: the config it gives that layer, and
    whether a smoothing multiply precedes an activation-quantized input."""
    cfg = _layer_config(recipe, layer, site)
    if cfg is None:
        return FLOAT
    smooth = cfg.activation is not None and site["kind"] != "embedding" and recipe.smoothing is not None
    return json.dumps({"config": dataclasses.asdict(cfg), "smoothing": smooth}, sort_keys=True, default=str)


@dataclass
class LayerLatency:
    """Measured per-layer kernel times on one clock: ``ms[(layer, candidate)]`` and the float time
    per layer (the baseline the float remainder is computed from, whether or not float is a candidate)."""

    ms: dict
    float_ms: dict
    measured: int = 0          # distinct (layer shape, input shape, candidate) entries timed in this call
    cached: int = 0            # distinct entries read from the cache
    host: str = ""
    runtime: str = ""
    cache: str = ""
    shapes: dict = field(default_factory=dict)   # layer -> input shape


class _Branches(torch.nn.Module):
    """Independent layers side by side: input ``i`` → layer ``i`` → output ``i``."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, *xs):
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


def _layer_inputs(model, layers: dict, example_inputs: tuple, example_kwargs: Optional[dict]) -> dict:
    """The first input each layer sees when the model runs on the examples."""
    seen: dict = {}

    def hook(name):
        def record(module, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, (mod, _) in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def measure_layers(model, layers: dict, recipes: dict, example_inputs: tuple, example_kwargs: Optional[dict],
                   budget: dict, quantize: Callable, cache: Optional[LatencyCache] = None) -> LayerLatency:
    """Kernel time of every layer under every candidate (``layers``: name -> (module, site), the site
    as in :func:`qcompile.analyze.layer_sites`; ``recipes``: candidate name -> Recipe), measured on
    ``budget["backend"]`` or read from the cache, on ``budget["clock"]``. Each layer is timed with
    the config its candidate gives it (overrides and ``keep_float`` included). ``quantize``:
    :func:`qcompile.quantize` (it quantizes the branch models, on ``budget["backend"]``)."""
    timer = timing_module(budget["backend"])
    cache = cache or LatencyCache()
    host, runtime = host_id(), timer.version()
    inputs = _layer_inputs(model, layers, example_inputs, example_kwargs)
    plain = {FLOAT: Recipe.preset(FLOAT), **recipes}

    def key(name, cand):
        mod, site = layers[name]
        x = inputs[name]
        return json.dumps([timer.ID, budget["target"], runtime, host, repr(mod), mod.bias is not None
                           if hasattr(mod, "bias") else None, list(x.shape), str(x.dtype),
                           _candidate_id(plain[cand], name, site)])

    out = LayerLatency({}, {}, host=host, runtime=runtime, cache=str(cache.path),
                       shapes={n: list(x.shape) for n, x in inputs.items()})
    before, used = set(cache.entries), set()
    for cand, recipe in plain.items():
        todo: dict = {}  # key -> a representative layer
        used |= {key(name, cand) for name in layers if name in inputs}
        for name in layers:
            if name in inputs and cache.get(key(name, cand)) is None:
                todo.setdefault(key(name, cand), name)
        if todo:
            reps = list(todo.values())
            branches = _Branches([layers[n][0] for n in reps]).eval()
            xs = tuple(inputs[n] for n in reps)
            # branch i is layer reps[i] with the config the candidate gives that layer in the user's
            # model (its own patterns name the user's layers, not these branches)
            one = dataclasses.replace(recipe, keep_float=(), keep_first=False, keep_last=False, tied_head="default",
                                      overrides={f"layers.{i}": _layer_config(recipe, n, layers[n][1])
                                                 for i, n in enumerate(reps)},
                                      backend=budget["backend"],
                                      calibration=dataclasses.replace(recipe.calibration, progress=False))
            qmodel = quantize(branches, one, xs, calibration=[xs], report_samples=0, backend=budget["backend"])
            times = timer.time_branches(timer.lower(qmodel, budget["target"]), xs, runs=5)
            for k, ms in zip(todo, times):
                cache.put(k, ms)
            out.measured += len(todo)
        for name in layers:
            # a layer the examples never run costs nothing
            ms = cache.get(key(name, cand))[budget["clock"]] if name in inputs else 0.0
            if cand == FLOAT:
                out.float_ms[name] = ms
            if cand in recipes:
                out.ms[(name, cand)] = ms
    out.cached = len(used & before)
    cache.save()
    return out


__all__ = ["check_budget", "measure_layers", "LayerLatency", "LatencyCache", "host_id", "FLOAT"]
