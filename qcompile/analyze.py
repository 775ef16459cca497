"""Sensitivity analysis: how much does quantizing *one* layer with *one* candidate recipe hurt?

``qcompile.analyze(model, candidates, example_inputs, calibration)`` measures, for every quantizable
layer (Linear, Conv, Embedding) and every candidate (a preset name or a :class:`Recipe`):

* ``output_sqnr_db`` / ``output_cosine``: the model's output with only that layer quantized (its
  weight, and its input activation when the candidate quantizes activations), against float, on the
  calibration samples;
* ``layer_sqnr_db``: that layer's own output error (what the report calls the layer's SQNR);
* ``hessian_proxy``: a second-order estimate that needs no extra forward pass of the model: the
  weight error weighted by the layer's input energy per channel, ``sum_j ||dW[:, j]||^2 E[x_j^2]``
  (the diagonal of the layer-output Hessian ``X^T X``), relative to the layer's output energy;
* ``bits_per_weight`` and ``weight_bytes``: what the candidate costs for that layer, scales and zero
  points included.

The config a candidate gives a layer is :func:`qcompile.scope.resolve_layer_config`'s, as quantize
would apply it: overrides, ``keep_float``, ``tied_head`` and ``keep_first``/``keep_last`` included (a
layer the candidate keeps float is a float row: no noise, float bytes). ``table.sites`` records
where each quantizable layer sits (type, kind, tied, first/last) so the allocator resolves the same.

It runs the user's float model eagerly with hooks, one layer perturbed at a time and restored bit
for bit afterwards: ``layers x candidates`` forward passes over ``max_samples`` calibration items.
The result is the table mixed precision chooses from.

Example::

    >>> table = qcompile.analyze(model, ["w8", "w4-g64"], (ids, mask), calibration=batches)
    >>> for row in table.most_sensitive(5): print(row.layer, row.output_sqnr_db)
    >>> table.to_json("sensitivity.json"); table.to_html("sensitivity.html")
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .algorithms.common import InputStats, unsupported
from .algorithms.gptq import GPTQHessian, gptq_quantize
from .calibration import iterate
from .capture import input_binder
from .errors import CalibrationError, RecipeError
from .formats import get_format
from .observers import weight_qparams
from .ops import choose_qparams, dequantize, quantize
from .recipe import LayerConfig, WeightAlgorithmConfig, resolve_recipe
from .report import cosine, sqnr
from .scope import check_patterns, resolve_layer_config

_KINDS = ((nn.Linear, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"),
          (nn.Embedding, "embedding"))


@dataclass
class Sensitivity:
    layer: str
    op: str
    candidate: str
    output_sqnr_db: float
    output_cosine: float
    layer_sqnr_db: float
    hessian_proxy: float
    bits_per_weight: float
    weight_bytes: int
    params: int
    # the layer's own output error after GPTQ (analyze(gptq=True)), relative like hessian_proxy; NaN if not measured
    gptq_proxy: float = math.nan
    # how much of this layer's own error reaches the model output: output noise / hessian_proxy of one
    # probe candidate, on the first calibration item (analyze(gptq=True)); NaN if not measured
    output_gain: float = math.nan


@dataclass
class SensitivityTable:
    """Rows of :class:`Sensitivity`, one per (layer, candidate)."""

    candidates: list
    rows: list = field(default_factory=list)
    samples: int = 0
    model_output: bool = True   # False: output_sqnr_db/output_cosine not measured (NaN); see analyze()
    excluded: dict = field(default_factory=dict)   # layer path -> why it has no rows (see analyze())
    # every quantizable layer of the model, analysed or not -> the keyword arguments of
    # scope.resolve_layer_config that place it (layer_sites()); empty in tables saved before it existed
    sites: dict = field(default_factory=dict)
    gptq: bool = False          # True: gptq_proxy measured (analyze(gptq=True))

    def get(self, layer: str, candidate: str) -> Sensitivity:
        for r in self.rows:
            if r.layer == layer and r.candidate == candidate:
                return r
        raise KeyError((layer, candidate))

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def most_sensitive(self, n: int = 5, candidate: Optional[str] = None) -> list[Sensitivity]:
        """The ``n`` rows with the lowest :meth:`cost_db` (the output SQNR, or the Hessian-proxy SQNR
        when the model output was not measured) for ``candidate`` (default: the last one, usually
        the most aggressive)."""
        cand = candidate or self.candidates[-1]
        return sorted((r for r in self.rows if r.candidate == cand), key=self.cost_db)[:n]

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {"candidates": list(self.candidates), "samples": self.samples, "model_output": self.model_output,
                "gptq": self.gptq,
                "excluded": dict(self.excluded), "sites": {k: dict(v) for k, v in self.sites.items()},
                "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows]}

    @staticmethod
    def from_dict(data: dict) -> "SensitivityTable":
        """The inverse of :meth:`to_dict` (a saved table, reused without measuring again)."""
        def num(v):
            return math.nan if v is None else v

        rows = [Sensitivity(**{k: num(v) for k, v in r.items()}) for r in data["rows"]]
        return SensitivityTable(list(data["candidates"]), rows, data.get("samples", 0), data.get("model_output", True),
                                dict(data.get("excluded", {})), {k: dict(v) for k, v in data.get("sites", {}).items()},
                                bool(data.get("gptq", False)))

    def cost_db(self, row: Sensitivity) -> float:
        """The damage shown in the HTML/PNG views, in dB (higher is better): the model-output SQNR,
        or ``-10 log10(hessian_proxy)`` (the layer's own estimated SQNR) when the model output was
        not measured."""
        if self.model_output:
            return row.output_sqnr_db
        proxy = row.gptq_proxy if self.gptq else row.hessian_proxy
        return math.inf if proxy <= 0 else -10 * math.log10(proxy)

    @property
    def cost_label(self) -> str:
        """What :meth:`cost_db` measures, in words."""
        if self.model_output:
            return "model output SQNR with one layer quantized"
        return (f"{'GPTQ' if self.gptq else 'Hessian-proxy'} SQNR of each layer's own output (model output not measured)")

    def to_png(self, path: Union[str, Path], dpi: int = 110) -> Path:
        """A heat map layer x candidate of :meth:`cost_db` (red: <= 10 dB, green: >= 40 dB), each cell
        labelled with its bits per weight when they fit. Needs matplotlib (the ``plot`` extra)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(f"SensitivityTable.to_png needs matplotlib: pip install qcompile[plot] ({e})") from e
        import numpy as np

        layers = self.layers
        grid = np.array([[self.cost_db(self.get(layer, c)) for c in self.candidates] for layer in layers], dtype=float)
        grid = np.where(np.isfinite(grid), grid, 60.0)  # a layer kept float: off the top of the scale
        fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(self.candidates), 1.2 + 0.16 * len(layers)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=10, vmax=40, aspect="auto")
        ax.set_xticks(range(len(self.candidates)), self.candidates)
        ax.set_yticks(range(len(layers)), layers, fontsize=6 if len(layers) > 40 else 8)
        ax.xaxis.tick_top()
        if len(layers) <= 60:  # cell labels stay legible
            for i, layer in enumerate(layers):
                for j, c in enumerate(self.candidates):
                    ax.text(j, i, f"{grid[i, j]:.0f} dB, {self.get(layer, c).bits_per_weight:.2f} bpw",
                            ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label="dB (higher is better)")
        ax.set_title(f"Sensitivity: {self.cost_label}; {self.samples} calibration samples", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_html(self, path: Union[str, Path]) -> Path:
        """A self-contained page: layer x candidate, the measured cost in dB (model-output SQNR, or
        the layer-local proxy when the output was not measured) coloured from red (<= 10 dB) to
        green (>= 40 dB), bits per weight under it; click a column to sort."""
        from . import htmlpage as hp

        rows = [[hp.cell(layer)] + [
            hp.cell(f"{self.cost_db(r):.1f} dB<br><small>{r.bits_per_weight:.2f} bpw</small>", raw=True,
                    sort=self.cost_db(r) if math.isfinite(self.cost_db(r)) else 1e9,
                    background=hp.sqnr_colour(self.cost_db(r)))
            for r in (self.get(layer, c) for c in self.candidates)] for layer in self.layers]
        body = (f"<h1>Sensitivity: {html.escape(self.cost_label)}</h1>"
                f"<p>{self.samples} calibration samples; higher is better.</p>"
                + hp.table(["layer", *self.candidates], rows, id="sensitivity", row_keys=self.layers))
        return hp.write(path, hp.page("qcompile sensitivity", body))

    def __str__(self) -> str:
        lines = [f"{'layer':50s} {'candidate':10s} {'out SQNR':>9s} {'layer SQNR':>10s} {'hessian':>9s} {'bpw':>5s}"]
        lines += [f"{r.layer[:50]:50s} {r.candidate[:10]:10s} {r.output_sqnr_db:9.2f} {r.layer_sqnr_db:10.2f} "
                  f"{r.hessian_proxy:9.2e} {r.bits_per_weight:5.2f}" for r in self.rows]
        return "\n".join(lines)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) for every Linear/Conv/Embedding, in module order."""
    return [(name, mod, kind) for name, mod in model.named_modules() for cls, kind in _KINDS if type(mod) is cls]


def tied_layers(model: nn.Module) -> dict[str, str]:
    """``{path: why}`` for the quantizable layers whose weight is one tensor shared with another
    module (a tied embedding and ``lm_head``): quantizing one quantizes both, so they are not
    chosen layer by layer (the recipe's ``embedding`` and ``tied_head`` decide them)."""
    owners: dict[int, list[str]] = {}
    for name, mod, _ in quantizable_layers(model):
        owners.setdefault(id(mod.weight), []).append(name)
    return {name: f"weight tied with {', '.join(n for n in names if n != name)}: the recipe's embedding / "
                  "tied_head decide it" for names in owners.values() if len(names) > 1 for name in names}


def layer_sites(model: nn.Module) -> dict[str, dict]:
    """``{path: site}`` for every quantizable layer, where ``site`` holds the keyword arguments of
    :func:`qcompile.scope.resolve_layer_config` that place it: ``layer_type`` (class name), ``kind``,
    ``tied_to`` (the embedding whose weight a Linear/Conv reads), ``first``/``last`` (the first/last
    non-embedding layer, in module order: the order the captured graph runs them in for the usual
    models, where annotate decides ``keep_first``/``keep_last``)."""
    layers = quantizable_layers(model)
    emb_weight = {id(mod.weight): name for name, mod, kind in layers if kind == "embedding"}
    weighted = [name for name, _, kind in layers if kind != "embedding"]
    return {name: {"layer_type": type(mod).__name__, "kind": kind,
                   "tied_to": emb_weight.get(id(mod.weight)) if kind != "embedding" else None,
                   "first": bool(weighted) and name == weighted[0], "last": bool(weighted) and name == weighted[-1]}
            for name, mod, kind in layers}


def fake_quant_weight(w: torch.Tensor, spec) -> tuple[torch.Tensor, int]:
    """(dequantized weight, bytes its codes + scales + zero points take)."""
    scale, zp = weight_qparams(w, spec, 0)
    group = spec.group_size if spec.granularity == "per_group" else 0
    codes = quantize(w.detach().float(), scale, zp, spec.format, group)
    nbytes = get_format(spec.format).packed_nbytes(codes.numel()) + scale.numel() * scale.element_size()
    nbytes += 0 if zp is None else zp.numel() * zp.element_size()
    return dequantize(codes, scale, zp, spec.format, group, w.dtype), int(nbytes)


def _fake_quant_activation(x: torch.Tensor, spec, lo, hi) -> torch.Tensor:
    if spec.dynamic:
        s, z = choose_qparams(x, spec.format, spec.symmetric, spec.per_token, spec.group)
    else:
        s, z = get_format(spec.format).choose_qparams(lo, hi, spec.symmetric)
    return dequantize(quantize(x, s, z, spec.format, spec.group), s, z, spec.format, spec.group, x.dtype)


def _float_leaves(out) -> torch.Tensor:
    leaves = [t.detach().float().flatten() for t in pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(leaves)


def analyze(model: nn.Module, candidates: Sequence, example_inputs: tuple, calibration: Iterable, *,
            example_kwargs: Optional[dict] = None, max_samples: int = 8,
            layers: Optional[Sequence[str]] = None, model_output: bool = True,
            gptq: bool = False, progress: bool = False) -> SensitivityTable:
    """Per-layer, per-candidate sensitivity of ``model`` (see the module docstring).

    ``candidates``: preset names or :class:`Recipe` objects; each layer is measured with the config
    the candidate gives it when quantizing (:func:`qcompile.scope.resolve_layer_config`).
    ``layers``: restrict to these module paths; by default every Linear/Conv/Embedding except those
    whose weight is tied to another module's (a tied embedding and ``lm_head``: the recipe decides
    them together), which are named in ``table.excluded``. The model's parameters are restored bit
    for bit, and its train/eval mode too.

    ``model_output=False`` skips the ``layers x candidates`` forward passes of the whole model (the
    expensive part: 840 passes for SmolLM2's 210 Linears and 4 candidates) and measures only the
    layer-local columns (``hessian_proxy`` over every item, ``layer_sqnr_db`` over the first item
    only, so memory holds one item's activations per layer); ``output_sqnr_db`` and
    ``output_cosine`` are then NaN.

    ``gptq=True`` also measures ``gptq_proxy``: each Linear's output error on the calibration inputs
    after GPTQ (:func:`~qcompile.algorithms.gptq.gptq_quantize` on the layer's input Hessian, with the
    candidate's ``weight_algorithm`` settings or GPTQ's defaults), relative to its output energy like
    ``hessian_proxy`` — what a recipe solved with GPTQ will have, where the Hessian proxy measures
    round-to-nearest. It holds each input's Gram matrix (one per input shared by q/k/v or gate/up:
    ~0.8 GB float64 for SmolLM2's 30 blocks); layers GPTQ does not solve (embeddings, convolutions,
    formats it does not take) get their ``hessian_proxy``. It also measures each layer's
    ``output_gain``: one forward pass per layer on the first calibration item with that layer's
    weight rounded by its coarsest candidate (largest ``hessian_proxy``), the model output's noise-to-signal
    ratio over that candidate's ``hessian_proxy`` — how much of the layer's own error reaches the
    output (``layers`` passes, not ``layers x candidates``); ``allocate(cost="gptq")`` minimises
    ``gptq_proxy x output_gain``. ``progress``: a progress bar over the layers on stderr."""
    recipes = [resolve_recipe(c) for c in candidates]
    for recipe in recipes:
        check_patterns(recipe)
    names = [c if isinstance(c, str) else r.name for c, r in zip(candidates, recipes)]
    binder = input_binder(model, tuple(example_inputs), example_kwargs)
    items = [binder.bind(it) for it in iterate(calibration, max_samples)]
    if not items:
        raise CalibrationError("analyze needs calibration data: pass a non-empty iterable of inputs")
    targets = quantizable_layers(model)
    excluded = {}
    if layers is not None:
        unknown = sorted(set(layers) - {name for name, _, _ in targets})
        if unknown:
            raise RecipeError("layers", f"not quantizable layers of this model: {unknown}")
        targets = [t for t in targets if t[0] in set(layers)]
    else:   # tied layers are decided together by the recipe, never by a per-layer allocation
        excluded = tied_layers(model)
        targets = [t for t in targets if t[0] not in excluded]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sites = layer_sites(model)
            table = _analyze(model, targets, sites, recipes, names, items, model_output, gptq, progress)
            table.excluded, table.sites, table.gptq = excluded, sites, gptq
            return table
    finally:
        model.train(was_training)


class _LayerStats:
    """What the float pass records at one layer: its inputs and outputs, the input range and the
    mean squared input per channel (over every call; the inputs and outputs of the first ``keep``
    calls only, which the layer-local SQNR is measured on). With ``last`` (a one-slot list shared by
    every layer's stats: the input the previous layer read), a Linear also keeps the Gram matrix of
    its input, as :class:`~qcompile.algorithms.common.InputStats` in ``gram_owner``: its own, or that
    of the layer called just before it on the same input tensor (q/k/v, gate/up share one)."""

    def __init__(self, kind: str, keep: int, last: Optional[list] = None):
        self.kind, self.inputs, self.outputs, self.keep, self.calls = kind, [], [], keep, 0
        self.lo = self.hi = self.x2 = None
        self.y2, self.y_count = 0.0, 0     # the output energy over every call (the proxy's denominator)
        self.last, self.gram_owner, self.gram = last if kind == "linear" else None, None, None

    def __call__(self, module, args, out):
        x = args[0].detach()
        self.calls += 1
        if self.last is not None:
            if self.gram_owner is None:   # first call: share the Gram of the layer that read this same tensor
                prev = self.last[0]
                self.gram_owner = prev[1].gram_owner if prev is not None and prev[0] is args[0] else self
            if self.gram_owner is self:
                if self.gram is None:
                    self.gram = InputStats.of(x)
                else:
                    self.gram.add(x)
            self.last[0] = (args[0], self)
        y = out.detach().float()
        self.y2, self.y_count = self.y2 + float(y.pow(2).sum()), self.y_count + y.numel()
        if len(self.inputs) < self.keep:
            self.inputs.append(x)
            self.outputs.append(y)
        if self.kind == "embedding":
            return
        xf = x.float()
        self.lo = xf.min() if self.lo is None else torch.minimum(self.lo, xf.min())
        self.hi = xf.max() if self.hi is None else torch.maximum(self.hi, xf.max())
        ch = xf.movedim(1, -1) if self.kind == "conv" else xf
        e = ch.reshape(-1, ch.shape[-1]).pow(2).mean(0)
        self.x2 = e if self.x2 is None else self.x2 + e


def _analyze(model, targets, sites, recipes, names, items, model_output=True, gptq=False,
             progress=False) -> SensitivityTable:
    from tqdm.auto import tqdm

    # Without the model-output cost, the layer-local SQNR is measured on the first item only: keeping
    # every layer's inputs and outputs for every item was most of the 6.5 GB peak on SmolLM2 (210
    # Linears x 8 windows of 512 tokens); the Hessian proxy reads only the per-channel x^2 sums.
    keep = len(items) if model_output else 1
    last = [None] if gptq else None
    stats = {name: _LayerStats(kind, keep, last) for name, _, kind in targets}
    handles = [mod.register_forward_hook(stats[name]) for name, mod, _ in targets]
    try:
        outs = [model(*a, **k) for a, k in items]
        ref = torch.cat([_float_leaves(o) for o in outs]) if model_output else None
        ref_first = _float_leaves(outs[0]) if gptq else None
        del outs
    finally:
        for h in handles:
            h.remove()
        if last is not None:
            last.clear()
    solver = _GPTQCost(stats) if gptq else None
    table = SensitivityTable(candidates=names, samples=len(items), model_output=model_output)
    for name, mod, kind in tqdm(targets, desc="sensitivity", unit="layer", disable=not progress):
        rows = []
        for cand, recipe in zip(names, recipes):
            cfg: Optional[LayerConfig] = resolve_layer_config(recipe, name, **sites[name])[0]
            row = _measure_layer(model, mod, kind, cfg, stats[name], items, ref)
            if solver is not None:
                row["gptq_proxy"] = solver.proxy(mod, cfg, recipe, stats[name], row["hessian_proxy"])
            rows.append((Sensitivity(name, kind, cand, **row), cfg))
        if gptq:
            gain = _output_gain(model, mod, rows, items[0], ref_first)
            for r, _ in rows:
                r.output_gain = gain
        table.rows.extend(r for r, _ in rows)
        stats[name].inputs.clear()
        stats[name].outputs.clear()
        if solver is not None:
            solver.done(stats[name])
    return table


def _output_gain(model, mod, rows, item, ref_first) -> float:
    """The ``output_gain`` of :func:`analyze` (NaN when no candidate quantizes the layer)."""
    probes = sorted(((r, cfg) for r, cfg in rows if cfg is not None and cfg.weight is not None
                     and r.hessian_proxy > 0), key=lambda rc: rc[0].hessian_proxy)
    if not probes:
        return math.nan
    row, cfg = probes[-1]   # the coarsest: its reach is what decides whether to pay for it (SmolLM2, docs/mixed.md)
    w = mod.weight
    original = w.detach().clone()
    w.data.copy_(fake_quant_weight(original, cfg.weight)[0])
    try:
        out = _float_leaves(model(*item[0], **item[1]))
    finally:
        w.data.copy_(original)
    noise = float((out - ref_first).pow(2).sum() / ref_first.pow(2).sum().clamp_min(1e-30))
    return noise / row.hessian_proxy


class _GPTQCost:
    """The GPTQ-aware cost of :func:`analyze` (``gptq=True``): each Linear's output error on its
    calibration inputs after :func:`~qcompile.algorithms.gptq.gptq_quantize`, ``mean_t ||x_t ΔWᵀ||²``
    from the Gram matrix (``tr(ΔW XᵀX ΔWᵀ) / T``, no pass over the rows), per output element, over the
    layer's mean squared output: the Hessian proxy's normalisation with the full Hessian and the
    weight GPTQ gives. One factorisation per shared input and GPTQ setting; a Gram matrix is freed
    once every layer reading it has been measured."""

    def __init__(self, stats: dict):
        self.readers: dict = {}
        for st in stats.values():
            if st.gram_owner is not None:
                self.readers[id(st.gram_owner)] = self.readers.get(id(st.gram_owner), 0) + 1
        self.preps: dict = {}

    def proxy(self, mod, cfg, recipe, st: _LayerStats, rtn_proxy: float) -> float:
        if cfg is None or cfg.weight is None:
            return 0.0
        owner = st.gram_owner
        if owner is None or owner.gram is None or unsupported(cfg.weight) is not None:
            return rtn_proxy   # not a Linear GPTQ solves: the weight-algorithm pass rounds it to nearest
        algo = recipe.weight_algorithm if recipe.weight_algorithm is not None and \
            recipe.weight_algorithm.method == "gptq" else WeightAlgorithmConfig("gptq")
        key = (id(owner), algo.damping, algo.act_order)
        if key not in self.preps:
            self.preps[key] = GPTQHessian.of(owner.gram.hessian(), algo.damping, algo.act_order)
        w = mod.weight.detach().float()
        w_q = gptq_quantize(w, self.preps[key], cfg.weight, block_size=algo.block_size)[0]
        d = (w_q - w).double()
        err = float(((d @ owner.gram.gram) * d).sum()) / owner.gram.rows / w.shape[0]
        return err / max(st.y2 / max(st.y_count, 1), 1e-30)

    def done(self, st: _LayerStats) -> None:
        owner = st.gram_owner
        if owner is None:
            return
        self.readers[id(owner)] -= 1
        if self.readers[id(owner)] == 0:
            owner.gram = None
            self.preps = {k: v for k, v in self.preps.items() if k[0] != id(owner)}


def _measure_layer(model, mod, kind, cfg, st: _LayerStats, items, ref) -> dict:
    w = mod.weight
    params = w.numel()
    if cfg is None or cfg.weight is None:  # the candidate keeps this layer float
        return dict(output_sqnr_db=math.inf, output_cosine=1.0, layer_sqnr_db=math.inf, hessian_proxy=0.0,
                    bits_per_weight=8.0 * w.element_size(), weight_bytes=params * w.element_size(), params=params)
    original = w.detach().clone()
    wq, nbytes = fake_quant_weight(original, cfg.weight)
    act = cfg.activation if kind != "embedding" else None
    handle = None
    if act is not None:
        handle = mod.register_forward_pre_hook(
            lambda m, args: (_fake_quant_activation(args[0], act, st.lo, st.hi), *args[1:]))
    w.data.copy_(wq)
    try:
        out = None if ref is None else torch.cat([_float_leaves(model(*a, **k)) for a, k in items])
        layer_out = torch.cat([mod(x).float().flatten() for x in st.inputs])
    finally:
        w.data.copy_(original)
        if handle is not None:
            handle.remove()
    layer_ref = torch.cat([o.flatten() for o in st.outputs])
    dw = (wq.float() - original.float())
    if kind == "embedding" or st.x2 is None:
        proxy = float(dw.pow(2).sum() / original.float().pow(2).sum().clamp_min(1e-30))
    else:
        per_in = dw.reshape(w.shape[0], w.shape[1], -1).pow(2).sum((0, 2))  # [in channels]
        proxy = float((per_in * st.x2 / st.calls).sum() / w.shape[0]
                      / max(st.y2 / max(st.y_count, 1), 1e-30))
    return dict(output_sqnr_db=math.nan if out is None else sqnr(ref, out),
                output_cosine=math.nan if out is None else cosine(ref, out),
                layer_sqnr_db=sqnr(layer_ref, layer_out), hessian_proxy=proxy,
                bits_per_weight=8.0 * nbytes / params, weight_bytes=nbytes, params=params)
