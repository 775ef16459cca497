"""GPTQ and AWQ: choose quantized weights from calibration data instead of rounding to nearest.

:class:`ApplyWeightAlgorithmPass` walks the annotated graph in order with every calibration item
in lockstep (one environment per item, values freed after their last use), so each Linear is
quantized from the inputs produced by the layers already quantized before it ("sequential"
calibration: peak memory is the live activations of the items plus the model, never all layers'
inputs at once). At a Linear with a weight spec it:

* ``gptq``: builds ``H = XᵀX`` of the layer input and runs :func:`gptq_quantize`;
* ``awq``: for all Linears reading the same input, searches per input channel scales
  (:func:`awq_scale_search`), folds ``1/s`` into the preceding norm weight (or inserts a ``mul``),
  multiplies the weights by ``s`` and searches a clipping ratio per group (:func:`clip_search`).

The result is a new float weight tensor lying exactly on the quantization grid of the qparams it was
solved for; both go into ``node.meta[WEIGHT_QPARAMS]`` and :class:`~qcompile.passes.ConvertPass`
stores those codes as they are. Weights whose format is not an integer or code-book format (FP8)
keep round-to-nearest, recorded in :attr:`ApplyWeightAlgorithmPass.applied`.

Example::

    >>> cfg = WeightAlgorithmConfig("gptq")
    >>> PassManager([ApplyWeightAlgorithmPass(cfg, items, binder)])(gm)   # after AnnotatePass
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from ..calibration import iterate
from ..capture import check_inputs
from ..errors import CalibrationError
from ..formats import get_format, scale_grid, zero_point_grid
from ..observers import weight_qparams
from ..ops import DEQUANTIZE, QUANTIZE
from ..recipe import WeightAlgorithmConfig
from ..spec import ANNOTATION, LAYER, ROLE, WEIGHT_QPARAMS, QuantSpec, WeightQParams
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten


def _group(spec: QuantSpec) -> int:
    return spec.group_size if spec.granularity == "per_group" else 0


def fake_quantize(w: torch.Tensor, spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the canonical ops (the numerics the graph will run): with
    double-quantized scales or zero points (``scale_dtype``/``zero_point_dtype: int8``) on the grid
    of the values as convert stores them."""
    g = _group(spec)
    scale = scale_grid(scale, spec.scale_dtype)
    zero_point = zero_point_grid(zero_point, spec.zero_point_dtype)
    q = QUANTIZE(w, scale, zero_point, spec.format, g)
    return DEQUANTIZE(q, scale, zero_point, spec.format, g, torch.float32)


def unsupported(spec: Optional[QuantSpec]) -> Optional[str]:
    """Why GPTQ/AWQ cannot solve this weight spec (None when they can): they handle integer and
    code-book weights per channel or per group (double-quantized scales included: they solve against
    the grid of the scales as stored, :func:`~qcompile.formats.scale_grid`)."""
    if spec is None or get_format(spec.format).kind not in ("int", "codebook") \
            or spec.granularity not in ("per_channel", "per_group"):
        return "needs an int or code-book weight per channel/group"
    return None


def _column_qparams(spec: QuantSpec, scale: torch.Tensor, zp: Optional[torch.Tensor], k: int):
    """Per-column views ``[N, K]`` of per-channel or per-group qparams."""
    if spec.granularity == "per_channel":
        return scale.expand(-1, k), None if zp is None else zp.expand(-1, k)
    idx = torch.arange(k) // spec.group_size
    return scale[:, idx], None if zp is None else zp[:, idx]


def _inverse_hessian_chol(h: torch.Tensor, damping: float):
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) with damping raised ×10 until ``H`` is
    positive definite (a Hessian from few tokens or collinear channels is often only semi-definite).

    One factorisation and one triangular inverse, in float64: with ``J`` the reversal permutation
    and ``JHJ = LLᵀ``, ``U = J L⁻¹ J`` is upper triangular and ``UᵀU = H⁻¹``. (The textbook route,
    Cholesky of ``H``, ``cholesky_inverse``, Cholesky again, costs twice as much.)"""
    if not torch.isfinite(h).all():
        raise CalibrationError("GPTQ: the Hessian has NaN or Inf entries (the layer's calibration inputs do)")
    h = h.double()
    mean_diag = abs(float(torch.diag(h).mean())) or 1.0
    damp = damping
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    flipped = h.flip(0, 1)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(flipped + damp * mean_diag * eye)
        if int(info) == 0:
            u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if torch.isfinite(u).all():
                return u, damp
        damp *= 10
    raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:g}")


@dataclass
class GPTQHessian:
    """What GPTQ needs from one input Hessian, computed once and shared by every Linear reading
    that input (q/k/v, gate/up): the column order, the dead channels and the upper Cholesky factor
    of the damped inverse (float32, in that order). Build it with :meth:`of`."""

    perm: torch.Tensor
    dead: torch.Tensor
    hinv: torch.Tensor
    damping: float

    @classmethod
    def of(cls, h: torch.Tensor, damping: float = 0.01, act_order: bool = True) -> GPTQHessian:
        """Prepare ``h [K, K]`` (dead input channels, ``H_jj = 0``, get a unit diagonal)."""
        h = h.detach().double().clone()
        k = h.shape[0]
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
        u, damp = _inverse_hessian_chol(h[perm][:, perm], damping)
        return cls(perm, dead, u.float(), damp)


def gptq_quantize(w: torch.Tensor, h, spec: QuantSpec, damping: float = 0.01,
                  act_order: bool = True, block_size: int = 128):
    """GPTQ on one weight ``w [N, K]`` with input Hessian ``h [K, K]`` (or a :class:`GPTQHessian`
    prepared from it, to share one factorisation between the Linears that read the same input).

    Returns ``(w_q, scale, zero_point, damping_used)``: ``w_q`` is float and lies on the grid of
    ``scale``/``zero_point`` (computed from ``w`` before the error feedback, so groups stay
    contiguous under ``act_order``). Dead input channels (``H_jj = 0``) are zeroed first. With
    double-quantized scales (``scale_dtype: int8``) ``scale`` is the float scale before double
    quantization and ``w_q`` lies on the grid of its double-quantized values
    (:func:`~qcompile.formats.scale_grid`, what convert stores): the grid is fixed before the column
    loop, so GPTQ solves against exactly the scales the converted layer holds.

    The GPTQ paper's lazy batch updates: columns are solved one at a time inside blocks of
    ``block_size`` (a rank-1 update of the block only), and the rest of the weight gets the block's
    error in one matrix product. The error feedback runs in float32 on ``Wᵀ`` (a column is a
    contiguous row); the factorisation of the damped Hessian is done in float64.
    """
    prep = h if isinstance(h, GPTQHessian) else GPTQHessian.of(h, damping, act_order)
    fmt = get_format(spec.format)
    w = w.detach().float()
    k = w.shape[1]
    scale, zp = weight_qparams(w, spec, 0)
    s_col, z_col = _column_qparams(spec, scale_grid(scale, spec.scale_dtype), zero_point_grid(zp, spec.zero_point_dtype), k)
    perm = prep.perm
    # [K, N] in solve order: column j of W is row j here; per-column qparams precomputed once
    wt = w.t()[perm].contiguous()
    wt[prep.dead[perm]] = 0
    st = s_col.float().t()[perm].contiguous()
    zt = None if z_col is None else z_col.float().t()[perm].contiguous()
    fast = fmt.kind == "int"
    float_zp = spec.float_zero_point   # round(x/s + z): a float zero point shifts the grid by a fraction of a step
    inv_st = 1.0 / st if fast else None
    zf = torch.zeros_like(st) if (fast and zt is None) else zt
    qt = torch.empty_like(wt)
    hinv = prep.hinv
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]                  # a view: updated in place
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1).tolist()
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[i]
            if fast and float_zp:   # Format.quantize's float zero point formula
                q = torch.round(col * inv_st[j] + zf[j]).clamp_(fmt.qmin, fmt.qmax).sub_(zf[j]).mul_(st[j])
            elif fast:   # torchao's quantize_affine formula, inlined: this runs once per column
                q = torch.round(col * inv_st[j]).add_(zf[j]).clamp_(fmt.qmin, fmt.qmax).sub_(zf[j]).mul_(st[j])
            else:
                s1, z1 = st[j].unsqueeze(1), None if zt is None else zt[j].unsqueeze(1)
                q = fmt.dequantize(fmt.quantize(col.unsqueeze(1), s1, z1), s1, z1).squeeze(1)
            qt[j] = q
            e = err1[i]
            torch.sub(col, q, out=e).div_(diag[i])
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    inv = torch.argsort(perm)
    return qt[inv].t().contiguous(), scale, zp, prep.damping


def _grouped(w: torch.Tensor, group: int):
    """``w [N, K]`` as ``[N, G, g]`` zero-padded, and the padded input-channel count."""
    n, k = w.shape
    g = group or k
    groups = -(-k // g)
    return torch.nn.functional.pad(w, (0, groups * g - k)).reshape(n, groups, g), groups * g


@dataclass
class InputStats:
    """Running sums over the rows ``x [T, K]`` of one Linear input, added item by item: the Gram
    matrix ``XᵀX`` (float32 products, float64 sum) and ``Σ|x|`` per channel. GPTQ's Hessian is
    ``2 XᵀX / T``; AWQ's searches measure output errors as ``tr(D XᵀX Dᵀ)``, so neither needs the
    rows themselves, and the calibration rows are never concatenated."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @classmethod
    def of(cls, x: torch.Tensor) -> InputStats:
        """Statistics of the rows of ``x [..., K]``."""
        k = x.shape[-1]
        st = cls(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
        st.add(x)
        return st

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x [..., K]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += (x.t() @ x).double()
        self.abs_sum += x.abs().sum(0).double()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 XᵀX / T`` (float64)."""
        return self.gram * (2.0 / self.rows)

    def mean_gram(self) -> torch.Tensor:
        """``XᵀX / T`` (float32)."""
        return (self.gram / self.rows).float()

    def mean_abs(self) -> torch.Tensor:
        """``mean_t |x_t|`` per channel (float32)."""
        return (self.abs_sum / self.rows).float()


def _as_stats(x) -> InputStats:
    return x if isinstance(x, InputStats) else InputStats.of(x)


def clip_search(w: torch.Tensor, x, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5):
    """Per output row and group, the range shrink ratio in ``[1 - max_shrink, 1]`` (``grid`` steps)
    minimising that group's output error ``‖X_g (w_g - q(w_g))‖²`` on the input rows ``x [T, K]``
    (or their :class:`InputStats`). Returns ``(scale, zero_point)`` in the layout of
    :func:`~qcompile.observers.weight_qparams`."""
    fmt = get_format(spec.format)
    group = _group(spec)
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
            z = z.half()
        # each candidate on its stored grid (double-quantized scales: the whole candidate's scales
        # double-quantized together; the chosen mix is double-quantized again at convert)
        se = scale_grid(s, spec.scale_dtype).unsqueeze(-1)
        ze = None if z is None else zero_point_grid(z, spec.zero_point_dtype).unsqueeze(-1)
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


class _Lockstep:
    """Runs a graph node by node for several inputs at once (one fx Interpreter environment per
    item), so a pass can stop at a node, look at its inputs across all items and change the graph
    ahead before going on. Values are freed after their last use."""

    def __init__(self, gm, flat_inputs: list):
        self.gm = gm
        self.interps = []
        for flat in flat_inputs:
            it = torch.fx.Interpreter(gm, garbage_collect_values=False)
            it.env, it.args_iter = {}, iter(flat)
            self.interps.append(it)
        self.refresh()

    def refresh(self):
        """Recompute last uses after the graph changed."""
        self.last_use: dict = {}
        for node in self.gm.graph.nodes:
            for inp in node.all_input_nodes:
                self.last_use[inp] = node

    def run(self, node):
        for it in self.interps:
            it.env[node] = it.run_node(node)
        for inp in node.all_input_nodes:
            if self.last_use.get(inp) is node:
                for it in self.interps:
                    it.env.pop(inp, None)

    def values(self, node) -> list:
        return [it.env[node] for it in self.interps]

    def set(self, node, values: list):
        for it, v in zip(self.interps, values):
            it.env[node] = v


@dataclass
class WeightAlgorithmResult(PassResult):
    """``records``: per layer (per input tensor for AWQ's scales), how its weight was solved: the
    report's ``weight_algorithm``."""

    records: list = field(default_factory=list)


class ApplyWeightAlgorithmPass(Pass):
    """GPTQ or AWQ over every annotated Linear (see the module docstring). ``data``: calibration
    items, bound with ``binder`` (the captured model's :class:`~qcompile.capture.InputBinder`)."""

    name = "apply_weight_algorithm"

    def __init__(self, config: WeightAlgorithmConfig, data: Iterable, binder, max_samples: Optional[int] = None,
                 progress: bool = True):
        self.config, self.data, self.binder = config, data, binder
        self.max_samples, self.progress = max_samples, progress

    def call(self, gm):
        records: list[dict] = []   # one entry per layer (or per input tensor for AWQ scales)
        annotated = [n for n in gm.graph.nodes if n.meta.get(ANNOTATION) is not None]
        readers: dict = {}
        for n in annotated:
            readers.setdefault(n.args[n.meta[ANNOTATION].weight_arg].target, []).append(n)
        todo = []
        for n in annotated:
            ann = n.meta[ANNOTATION]
            if ann.op != "linear" or ann.weight is None:
                continue
            if unsupported(ann.weight):
                why = f"{self.config.method} {unsupported(ann.weight)}"
            elif len(readers[n.args[ann.weight_arg].target]) > 1:
                # a tied head sharing one quantized tensor with the embedding: solving it for the
                # Linear alone would untie it (two copies); keep it shared and round-to-nearest
                why = "weight shared with " + ", ".join(m.meta[ANNOTATION].layer for m in readers[
                    n.args[ann.weight_arg].target] if m is not n)
            else:
                todo.append(n)
                continue
            records.append({"layer": ann.layer, "method": "rtn", "why": why})
        if not todo:
            return WeightAlgorithmResult(gm, False, records=records)
        items = list(iterate(self.data, self.max_samples))
        if not items:
            raise CalibrationError(f"{self.config.method} needs calibration data: it is empty")
        flat = []
        for item in items:
            args, kwargs = self.binder.bind(item)
            flat.append(check_inputs(gm, args, kwargs, CalibrationError))
        from tqdm.auto import tqdm

        run = _Lockstep(gm, flat)
        pending = set(todo)
        bar = tqdm(total=len(todo), desc=self.config.method, disable=not self.progress, leave=False, unit="layer")
        with torch.no_grad():
            for node in list(gm.graph.nodes):
                if not pending:
                    break   # everything after the last quantized Linear (the logits) is not needed
                if node in pending:
                    group = self._consumers(node, pending)
                    if self.config.method == "gptq":
                        # one Hessian, and one factorisation of it, for all readers of the input
                        h = self._stats(run, node).hessian()
                        prep = GPTQHessian.of(h, self.config.damping, self.config.act_order)
                        for op in group:
                            records.append(self._gptq(gm, run, op, h, prep))
                    else:
                        records.append(self._awq(gm, run, node, group))
                    pending -= set(group)
                    bar.update(len(group))
                    run.refresh()
                run.run(node)
        bar.close()
        return WeightAlgorithmResult(gm, True, records=records)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _consumers(node, pending) -> list:
        """``node`` and the other pending Linears reading the same input (q/k/v, gate/up)."""
        src = node.args[node.meta[ANNOTATION].input_arg]
        return [u for u in src.users if u in pending and u.args[u.meta[ANNOTATION].input_arg] is src] or [node]

    @staticmethod
    def _stats(run, op, max_rows: Optional[int] = None) -> InputStats:
        """:class:`InputStats` of ``op``'s input, item by item. ``max_rows``: an evenly strided
        subset of every item's rows, about ``max_rows`` in all."""
        xs = run.values(op.args[op.meta[ANNOTATION].input_arg])
        total = sum(x.numel() // x.shape[-1] for x in xs)
        stride = 1 if not max_rows or total <= max_rows else -(-total // max_rows)
        st = None
        for x in xs:
            x = x.detach().reshape(-1, x.shape[-1])[::stride]
            if st is None:
                st = InputStats.of(x)
            else:
                st.add(x)
        return st

    def _set_weight(self, gm, run, op, w_new, scale, zp, reference):
        """Point ``op`` at a new weight tensor (never edit the old one in place: it may be tied
        to an embedding or shared) and record the qparams it was solved for."""
        ann = op.meta[ANNOTATION]
        old = op.args[ann.weight_arg]
        new = add_tensor(gm, f"{old.target}_{self.config.method}", w_new, op)
        new.meta[ROLE] = "weight"
        run.set(new, [w_new] * len(run.interps))
        args = list(op.args)
        args[ann.weight_arg] = new
        op.args = tuple(args)
        op.meta[WEIGHT_QPARAMS] = WeightQParams(scale, zp, reference)

    def _gptq(self, gm, run, op, h, prep):
        ann = op.meta[ANNOTATION]
        w = get_attr_tensor(gm, op.args[ann.weight_arg]).detach().float()
        w_q, scale, zp, damp = gptq_quantize(w, prep, ann.weight, block_size=self.config.block_size)
        # output errors from the Hessian: mean_t ‖x_t Dᵀ‖² = tr(D H Dᵀ) / 2, no pass over the rows;
        # a diagnostic only, so on at most 128 evenly spaced output rows (N·K² costs as much as H)
        rows = slice(None, None, max(1, w.shape[0] // 128))
        d = torch.stack([w[rows] - fake_quantize(w, ann.weight, scale, zp)[rows], w[rows] - w_q[rows]])
        err_rtn, err_gptq = ((d @ h.float()) * d).sum((1, 2)).tolist()
        self._set_weight(gm, run, op, w_q, scale, zp, w.detach().float())
        return {"layer": ann.layer, "method": "gptq", "damping": damp,
                "output_error_vs_rtn": err_gptq / err_rtn if err_rtn > 0 else 1.0}

    def _awq(self, gm, run, src_user, group):
        cfg = self.config
        ann0 = src_user.meta[ANNOTATION]
        src = src_user.args[ann0.input_arg]
        x = self._stats(run, src_user, cfg.sample_rows)
        weights = [get_attr_tensor(gm, op.args[op.meta[ANNOTATION].weight_arg]).detach().float() for op in group]
        specs = [op.meta[ANNOTATION].weight for op in group]
        s, alpha, ratio = awq_scale_search(x, weights, specs, cfg.grid)
        how = "none"
        if alpha > 0:
            how = self._divide_input(gm, run, src, group, s)
        sd = s.double()
        x_s = InputStats(x.gram / sd[:, None] / sd[None, :], x.abs_sum / sd, x.rows)   # stats of x / s
        for op, w, spec in zip(group, weights, specs):
            ws = w * s
            scale, zp = clip_search(ws, x_s, spec, cfg.clip_grid, cfg.max_shrink)
            w_q = fake_quantize(ws, spec, scale, zp)
            self._set_weight(gm, run, op, w_q, scale, zp, ws)
        return {"layers": [op.meta[ANNOTATION].layer for op in group], "method": "awq",
                "alpha": alpha, "scale_error_vs_rtn": ratio, "inverse_scale": how}

    def _divide_input(self, gm, run, src, group, s) -> str:
        """Make the consumers read ``src / s``: fold into a norm's weight when ``src`` is
        ``mul(h, norm_weight)`` read only by these Linears; else into the output channels of the
        Linear ``src`` comes from (:func:`~qcompile.passes.smooth.channel_source`: ``up_proj`` for
        ``down_proj``'s ``act(gate) * up``; a Llama ``o_proj``'s input is not followed back to
        ``v_proj`` by it, so that one keeps its ``mul``); else insert a ``mul``."""
        w_node = None
        if (src.op == "call_function" and src.target == aten.mul.Tensor and set(src.users) <= set(group)):
            for a in src.args:
                t = get_attr_tensor(gm, a)
                if t is not None and t.dim() == 1 and t.shape[0] == s.shape[0]:
                    w_node = a
        if w_node is not None:
            t = get_attr_tensor(gm, w_node)
            new = add_tensor(gm, f"{w_node.target}_awq", t.detach() / s, src)
            run.set(new, [get_attr_tensor(gm, new)] * len(run.interps))
            src.args = tuple(new if a is w_node else a for a in src.args)
            run.set(src, [v / s for v in run.values(src)])
            return "folded into " + src.meta.get(LAYER, src.name)
        from .smooth import channel_source

        up = channel_source(gm, src)
        if up is not None and set(src.users) <= set(group) and self._scale_output_channels(gm, up, 1.0 / s):
            # the chain from ``up`` to ``src`` has run and its values are freed (each is read once)
            run.set(src, [v / s for v in run.values(src)])
            ann = up.meta.get(ANNOTATION)
            return "folded into the output channels of " + (ann.layer if ann else up.meta.get(LAYER, up.name))
        inv = add_tensor(gm, f"{src.name}_awq_inv_scale", 1.0 / s, group[0])
        run.set(inv, [get_attr_tensor(gm, inv)] * len(run.interps))
        with gm.graph.inserting_before(group[0]):
            mul = gm.graph.call_function(aten.mul.Tensor, (src, inv))
        mul.meta.update({k: v for k, v in src.meta.items() if k == "val"})
        mul.meta[ROLE] = "smoothing"
        mul.meta[LAYER] = group[0].meta.get(LAYER)
        run.set(mul, [v / s for v in run.values(src)])
        for op in group:
            ann = op.meta[ANNOTATION]
            args = list(op.args)
            args[ann.input_arg] = mul
            op.args = tuple(args)
        return "mul inserted"

    def _scale_output_channels(self, gm, linear, factor) -> bool:
        """Scale the rows of ``linear``'s weight (and its bias) by ``factor``; False (nothing
        changed) when that cannot keep it exact. A weight already solved by this pass stays on its
        grid: row ``i`` scaled by ``f_i`` has the same codes with its scales times ``f_i``, true for
        float32 scales and any zero point; float16 or double-quantized scales would be re-rounded,
        so those keep the ``mul``. The weight must be read by ``linear`` alone (not tied)."""
        w_node = linear.args[1]
        w = get_attr_tensor(gm, w_node)
        if w is None or sum(1 for u in w_node.users) != 1 or \
                sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == w_node.target) != 1:
            return False
        bias = linear.args[2] if len(linear.args) > 2 else None
        if bias is not None and get_attr_tensor(gm, bias) is None:
            return False
        solved = linear.meta.get(WEIGHT_QPARAMS)
        ann = linear.meta.get(ANNOTATION)
        if solved is not None and (ann is None or ann.weight.scale_dtype != "float32"):
            return False
        from .smooth import scale_output_channels

        scale_output_channels(gm, linear, factor, "awq_out").meta[ROLE] = "weight"
        col = factor.to(w.dtype)[:, None]
        if solved is not None:
            linear.meta[WEIGHT_QPARAMS] = WeightQParams(solved.scale * col, solved.zero_point,
                                                        solved.reference * col)
        return True
