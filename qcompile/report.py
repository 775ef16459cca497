"""The quantization report: per layer (format, weight SQNR, the layer's own output SQNR, the
output SQNR accumulated up to it vs the float model) and whole model (stored bytes before and
after, linear-weight compression, float-vs-quantized output agreement). Printed as a table,
``to_dict()`` / ``to_json()`` for tools.

SQNR is ``10 log10(|ref|^2 / |ref - test|^2)`` in dB: 40 dB ≈ 1 % relative error."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch


SQNR_CHUNK = 1 << 22    # elements per chunk of sqnr's double-precision sums


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``inf`` only when identical, ``-inf`` when the
    reference is all zeros and the test is not.

    Example::

        >>> sqnr(torch.ones(4), torch.ones(4) * 1.01)    # 40.0: 1 % relative error
    """
    ref, test = ref.detach().flatten(), test.detach().flatten()
    # in double, a chunk at a time: a whole 128k-vocab embedding in double would take GBs
    signal = noise = torch.zeros((), dtype=torch.float64)
    for i in range(0, max(ref.numel(), 1), SQNR_CHUNK):
        r, t = ref[i:i + SQNR_CHUNK].double(), test[i:i + SQNR_CHUNK].double()
        signal, noise = signal + r.pow(2).sum(), noise + (r - t).pow(2).sum()
    if noise == 0 or signal == 0:
        return sqnr_from_energy(float(signal), float(noise))
    return float(10 * torch.log10(signal / noise))


def sqnr_from_energy(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` for summed energies: ``inf`` when there is no noise, ``-inf``
    when there is noise and no signal. Neither side is clamped: clamping only the signal turned a
    near-zero output quantized to all zeros into ~156 dB."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double().flatten(), test.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(ref, test, dim=0))


@dataclass
class LayerReport:
    layer: str
    op: str
    weight_format: Optional[str]
    activation_format: Optional[str]
    weight_sqnr: Optional[float] = None
    output_sqnr: Optional[float] = None       # this layer alone: float weights on the same input
    cumulative_sqnr: Optional[float] = None   # vs the float model's output of this module
    weight_bytes_float: int = 0
    weight_bytes_quantized: int = 0


@dataclass
class Report:
    recipe: str
    layers: list = field(default_factory=list)
    kept_float: dict = field(default_factory=dict)     # layer -> reason
    bytes_before: int = 0
    bytes_after: int = 0
    linear_weight_bytes_before: int = 0
    linear_weight_bytes_after: int = 0
    output_sqnr: Optional[float] = None
    output_cosine: Optional[float] = None
    output_max_abs_diff: Optional[float] = None
    calibration_samples: int = 0
    report_samples: int = 0
    smoothing: list = field(default_factory=list)
    tied_weights: dict = field(default_factory=dict)   # tied head layer -> shared or untied (AnnotatePass)
    weight_algorithm: list = field(default_factory=list)  # GPTQ/AWQ per layer (ApplyWeightAlgorithmPass)
    folded_batch_norms: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)        # task metrics on held-out data (set by the caller)
    mixed_precision: dict = field(default_factory=dict)  # what Recipe.auto measured and chose
    cumulative_sqnr_mask: Optional[str] = None          # the mask input whose 0 positions cumulative SQNR skips

    @property
    def compression(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    @property
    def linear_weight_compression(self) -> float:
        return self.linear_weight_bytes_before / max(self.linear_weight_bytes_after, 1)

    def summary(self) -> str:
        """One line: how many layers are quantized and how many modules stay float, with the
        reasons counted, e.g. ``7 layers quantized, 2 kept float (1 no quantized kernel for LSTM,
        1 no quantized kernel for LayerNorm)``. The CLI prints it after the table."""
        n = len(dict.fromkeys(r.layer for r in self.layers))
        line = f"{n} layer{'s' if n != 1 else ''} quantized, {len(self.kept_float)} kept float"
        if not self.kept_float:
            return line
        short = [why.split(" (kept float")[0].split(":")[0] for why in self.kept_float.values()]
        counts = {k: short.count(k) for k in dict.fromkeys(short)}
        return line + " (" + ", ".join(f"{c} {k}" for k, c in counts.items()) + ")"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        d["linear_weight_compression"] = self.linear_weight_compression
        return _finite(d)

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_dict(d: dict) -> "Report":
        d = {k: v for k, v in d.items() if k not in ("compression", "linear_weight_compression")}
        d["layers"] = [LayerReport(**layer) for layer in d.get("layers", [])]
        return Report(**d)

    def __str__(self) -> str:
        rows = [("layer", "op", "weight", "act", "W SQNR", "out SQNR", "cum SQNR", "bytes")]
        for r in self.layers:
            rows.append((r.layer, r.op, r.weight_format or "-", r.activation_format or "-", _db(r.weight_sqnr),
                         _db(r.output_sqnr), _db(r.cumulative_sqnr),
                         f"{_mb(r.weight_bytes_float)}->{_mb(r.weight_bytes_quantized)}"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = [f"qcompile report — recipe '{self.recipe}'"]
        for j, row in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(self.summary())
        if self.kept_float:
            lines.append(f"kept float: {len(self.kept_float)} layer(s): " +
                         "; ".join(f"{k} ({v})" for k, v in list(self.kept_float.items())[:8]) +
                         (" ..." if len(self.kept_float) > 8 else ""))
        lines.append(f"model size: {_mb(self.bytes_before)} MB -> {_mb(self.bytes_after)} MB "
                     f"({self.compression:.2f}x); quantized layer weights {_mb(self.linear_weight_bytes_before)} MB -> "
                     f"{_mb(self.linear_weight_bytes_after)} MB ({self.linear_weight_compression:.2f}x)")
        if self.output_sqnr is not None:
            lines.append(f"model output vs float on {self.report_samples} batch(es): SQNR {_db(self.output_sqnr)} dB, "
                         f"cosine {self.output_cosine:.5f}, max |diff| {self.output_max_abs_diff:.4g}")
        for layer, what in self.tied_weights.items():
            lines.append(f"tied: {layer}: {what}")
        if self.weight_algorithm:
            methods = sorted({str(e.get("method")) for e in self.weight_algorithm})
            lines.append(f"weight algorithm: {', '.join(methods)} on {len(self.weight_algorithm)} entries")
        if self.smoothing:
            chosen = [str(s.get("alpha")) for s in self.smoothing]
            counts = {c: chosen.count(c) for c in dict.fromkeys(chosen)}
            lines.append("smoothing (per tensor, measured): " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        if self.quality:
            lines.append("quality vs float on held-out data: " +
                         ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.quality.items()))
        return "\n".join(lines)


    def html(self) -> str:
        """The report as one self-contained HTML page (see :meth:`to_html`)."""
        from . import htmlpage as hp

        names = [r.layer for r in self.layers]
        rows = [[hp.cell(r.layer), hp.cell(r.op), hp.cell(r.weight_format or "-"), hp.cell(r.activation_format or "-"),
                 hp.db_cell(r.weight_sqnr), hp.db_cell(r.output_sqnr), hp.db_cell(r.cumulative_sqnr),
                 hp.cell(f"{r.weight_bytes_float:,}", sort=r.weight_bytes_float),
                 hp.cell(f"{r.weight_bytes_quantized:,}", sort=r.weight_bytes_quantized),
                 hp.cell(f"{r.weight_bytes_float / r.weight_bytes_quantized:.2f}x" if r.weight_bytes_quantized else "-",
                         sort=r.weight_bytes_float / r.weight_bytes_quantized if r.weight_bytes_quantized else "")]
                for r in self.layers]
        summary = [("model size", f"{_mb(self.bytes_before)} MB -> {_mb(self.bytes_after)} MB ({self.compression:.2f}x)"),
                   ("quantized layer weights", f"{_mb(self.linear_weight_bytes_before)} MB -> "
                                               f"{_mb(self.linear_weight_bytes_after)} MB "
                                               f"({self.linear_weight_compression:.2f}x)"),
                   ("quantized layers", str(len(self.layers))), ("kept float", str(len(self.kept_float))),
                   ("calibration samples", str(self.calibration_samples))]
        if self.output_sqnr is not None:
            summary.append((f"model output vs float ({self.report_samples} batches)",
                            f"SQNR {_db(self.output_sqnr)} dB, cosine {self.output_cosine:.5f}, "
                            f"max |diff| {self.output_max_abs_diff:.4g}"))
        summary += [(f"quality: {k}", f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in self.quality.items()]
        parts = [f"<h1>qcompile report: recipe {hp.html.escape(self.recipe)}</h1>", hp.definitions(summary),
                 hp.svg_bars([("model, float", self.bytes_before / 1e6), ("model, quantized", self.bytes_after / 1e6),
                              ("layer weights, float", self.linear_weight_bytes_before / 1e6),
                              ("layer weights, quantized", self.linear_weight_bytes_after / 1e6)],
                             unit="MB", title="Size before and after"),
                 hp.svg_lines(names, {"weight SQNR": [r.weight_sqnr for r in self.layers],
                                      "layer output SQNR": [r.output_sqnr for r in self.layers],
                                      "cumulative SQNR": [r.cumulative_sqnr for r in self.layers]},
                              y_label="dB", title="Quantization error per layer (SQNR, higher is better), in graph order"),
                 "<h2>Layers</h2><p>Click a column to sort. SQNR in dB: 40 dB is about 1 % relative error.</p>",
                 hp.table(["layer", "op", "weight", "activation", "weight SQNR", "output SQNR", "cumulative SQNR",
                           "bytes float", "bytes quantized", "compression"], rows, id="layers", row_keys=names)]
        if self.kept_float:
            parts += ["<h2>Kept float</h2>",
                      hp.table(["layer", "reason"], [[hp.cell(k), hp.cell(v)] for k, v in self.kept_float.items()],
                               id="kept-float", row_keys=list(self.kept_float))]
        details = {k: v for k, v in self.to_dict().items()
                   if k in ("smoothing", "tied_weights", "weight_algorithm", "folded_batch_norms", "timings_s",
                            "mixed_precision") and v}
        if details:
            parts.append("<h2>Details</h2><pre>" + hp.html.escape(json.dumps(details, indent=1)) + "</pre>")
        return hp.page(f"qcompile report: {self.recipe}", "".join(parts))

    def to_html(self, path) -> Path:
        """Write :meth:`html` to ``path``: one self-contained page (inline CSS, SVG and a few lines
        of JavaScript; no network) with the size before and after, the error plots and the
        sortable per-layer table.

        Example::

            >>> qmodel.report.to_html("out/report.html")
        """
        from .htmlpage import write

        return write(path, self.html())


def _db(v) -> str:
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.1f}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
