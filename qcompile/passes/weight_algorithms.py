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
from typing import Iterable, Optional

import torch

from ..calibration import iterate
from ..capture import check_inputs
from ..errors import CalibrationError
from ..formats import get_format
from ..observers import weight_qparams
from ..ops import DEQUANTIZE, QUANTIZE
from ..recipe import WeightAlgorithmConfig
from ..spec import ANNOTATION, LAYER, ROLE, WEIGHT_QPARAMS, QuantSpec, WeightQParams
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten


def _group(spec: QuantSpec) -> int:
    return spec.group_size if spec.granularity == "per_group" else 0


def fake_quantize(w: torch.Tensor, spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the canonical ops (the numerics the graph will run)."""
    g = _group(spec)
    q = QUANTIZE(w, scale, zero_point, spec.format, g)
    return DEQUANTIZE(q, scale, zero_point, spec.format, g, torch.float32)


def unsupported(spec: Optional[QuantSpec]) -> Optional[str]:
    """Why GPTQ/AWQ cannot solve this weight spec (None when they can): they handle integer and
    code-book weights per channel or per group, with float scales."""
    if spec is None or get_format(spec.format).kind not in ("int", "codebook") \
            or spec.granularity not in ("per_channel", "per_group"):
        return "needs an int or code-book weight per channel/group"
    if spec.scale_dtype == "int8":
        return "double-quantized scales are not supported by GPTQ/AWQ yet (round-to-nearest used)"
    return None


def _column_qparams(spec: QuantSpec, scale: torch.Tensor, zp: Optional[torch.Tensor], k: int):
    """Per-column views ``[N, K]`` of per-channel or per-group qparams."""
    if spec.granularity == "per_channel":
        return scale.expand(-1, k), None if zp is None else zp.expand(-1, k)
    idx = torch.arange(k) // spec.group_size
    return scale[:, idx], None if zp is None else zp[:, idx]


def _quantize_columns(w: torch.Tensor, fmt, s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    """Fake-quantize columns ``w[:, j]`` with per-element qparams ``s, z`` of the same shape."""
    if fmt.kind == "int":  # torchao's quantize_affine formula, inlined: this runs once per column
        zf = 0.0 if z is None else z.float()
        s = s.float()
        q = torch.clamp(torch.round(w * (1.0 / s)) + zf, fmt.qmin, fmt.qmax)
        return (q - zf) * s
    return fmt.dequantize(fmt.quantize(w, s, z), s, z)


def _inverse_hessian_chol(h: torch.Tensor, damping: float):
    """Upper Cholesky factor of ``H⁻¹`` with damping raised ×10 until ``H`` is positive definite
    (a Hessian from few tokens or collinear channels is often only semi-definite)."""
    if not torch.isfinite(h).all():
        raise CalibrationError("GPTQ: the Hessian has NaN or Inf entries (the layer's calibration inputs do)")
    mean_diag = abs(float(torch.diag(h).mean())) or 1.0
    damp = damping
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(8):
        hd = h + damp * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u, damp
        damp *= 10
    raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damping: float = 0.01,
                  act_order: bool = True, block_size: int = 128):
    """GPTQ on one weight ``w [N, K]`` with input Hessian ``h [K, K]``.

    Returns ``(w_q, scale, zero_point, damping_used)``: ``w_q`` is float and lies on the grid of
    ``scale``/``zero_point`` (computed from ``w`` before the error feedback, so groups stay
    contiguous under ``act_order``). Dead input channels (``H_jj = 0``) are zeroed first.
    """
    fmt = get_format(spec.format)
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    n, k = w.shape
    scale, zp = weight_qparams(w.float(), spec, 0)
    s_col, z_col = _column_qparams(spec, scale, zp, k)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    s_col = s_col[:, perm]
    z_col = None if z_col is None else z_col[:, perm]
    hinv, damp = _inverse_hessian_chol(h, damping)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        # one column at a time, but the fake-quant of the whole block's columns is vectorised
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            qc = _quantize_columns(col.float(), fmt, s_col[:, i1 + i:i1 + i + 1],
                                   None if z_col is None else z_col[:, i1 + i:i1 + i + 1]).double()
            q[:, i1 + i:i1 + i + 1] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q[:, inv].float(), scale, zp, damp


def _grouped(w: torch.Tensor, group: int):
    """``w [N, K]`` as ``[N, G, g]`` zero-padded, and the padded input-channel count."""
    n, k = w.shape
    g = group or k
    groups = -(-k // g)
    return torch.nn.functional.pad(w, (0, groups * g - k)).reshape(n, groups, g), groups * g


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5):
    """Per output row and group, the range shrink ratio in ``[1 - max_shrink, 1]`` (``grid`` steps)
    minimising that group's output error ``‖X_g (w_g - q(w_g))‖²`` on the sample rows ``x [T, K]``.
    Returns ``(scale, zero_point)`` in the layout of :func:`~qcompile.observers.weight_qparams`."""
    fmt = get_format(spec.format)
    group = _group(spec)
    n, k = w.shape
    wg, kp = _grouped(w.float(), group)
    xg, _ = _grouped(x.float(), group)                      # [T, G, g]
    gram = torch.einsum("tgi,tgj->gij", xg, xg)               # per-group input Gram matrix
    valid, _ = _grouped(torch.ones(1, k), group)
    valid = valid[0].bool()                                    # [G, g]
    lo = torch.where(valid, wg, torch.full_like(wg, math.inf)).amin(-1)
    hi = torch.where(valid, wg, torch.full_like(wg, -math.inf)).amax(-1)
    best_err = torch.full(lo.shape, math.inf)
    best_s = best_z = None
    for step in range(grid):
        r = 1.0 - max_shrink * step / grid
        s, z = fmt.choose_qparams(lo * r, hi * r, spec.symmetric, spec.scale_torch_dtype)
        se = s.unsqueeze(-1)
        ze = None if z is None else z.unsqueeze(-1)
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


def awq_scale_search(x: torch.Tensor, weights: list, specs: list, grid: int = 20):
    """AWQ's activation-aware per input channel scale for Linears sharing the input ``x [T, K]``:
    ``s = mean|x|^alpha`` normalised, alpha on a grid in [0, 1) (alpha 0: no scaling), chosen by the
    summed output error of all consumers. Returns ``(s, alpha, error_ratio_vs_no_scaling)``."""
    x = x.float()
    x_mean = x.abs().mean(0).clamp_min(1e-8)
    ref = [x @ w.float().t() for w in weights]
    errors = []
    best = (math.inf, None, None)
    for step in range(grid):
        alpha = step / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, spec, y in zip(weights, specs, ref):
            ws = w.float() * s
            scale, zp = weight_qparams(ws, spec, 0)
            y_q = (x / s) @ fake_quantize(ws, spec, scale, zp).t()
            err += float((y - y_q).pow(2).mean())
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


class ApplyWeightAlgorithmPass(Pass):
    """GPTQ or AWQ over every annotated Linear (see the module docstring). ``data``: calibration
    items, bound with ``binder`` (the captured model's :class:`~qcompile.capture.InputBinder`)."""

    name = "apply_weight_algorithm"

    def __init__(self, config: WeightAlgorithmConfig, data: Iterable, binder, max_samples: Optional[int] = None,
                 progress: bool = True):
        self.config, self.data, self.binder = config, data, binder
        self.max_samples, self.progress = max_samples, progress
        self.applied: list[dict] = []   # one entry per layer (or per input tensor for AWQ scales)

    def call(self, gm):
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
            self.applied.append({"layer": ann.layer, "method": "rtn", "why": why})
        if not todo:
            return PassResult(gm, False)
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
                        x = self._inputs(run, node).double()
                        h = 2 * x.t() @ x / x.shape[0]     # one Hessian for all readers of the input
                        xs = self._sample(x.float())
                        del x
                        for op in group:
                            self._gptq(gm, run, op, h, xs)
                    else:
                        self._awq(gm, run, node, group)
                    pending -= set(group)
                    bar.update(len(group))
                    run.refresh()
                run.run(node)
        bar.close()
        return PassResult(gm, True)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _consumers(node, pending) -> list:
        """``node`` and the other pending Linears reading the same input (q/k/v, gate/up)."""
        src = node.args[node.meta[ANNOTATION].input_arg]
        return [u for u in src.users if u in pending and u.args[u.meta[ANNOTATION].input_arg] is src] or [node]

    def _inputs(self, run, op) -> torch.Tensor:
        ann = op.meta[ANNOTATION]
        xs = run.values(op.args[ann.input_arg])
        return torch.cat([x.detach().reshape(-1, x.shape[-1]).float() for x in xs])

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        n = self.config.sample_rows
        if x.shape[0] <= n:
            return x
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
        return x[idx]

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

    def _gptq(self, gm, run, op, h, xs):
        ann = op.meta[ANNOTATION]
        w = get_attr_tensor(gm, op.args[ann.weight_arg])
        cfg = self.config
        w_q, scale, zp, damp = gptq_quantize(w, h, ann.weight, cfg.damping, cfg.act_order, cfg.block_size)
        rtn = fake_quantize(w.float(), ann.weight, scale, zp)
        err_rtn = float((xs @ (w.float() - rtn).t()).pow(2).mean())
        err_gptq = float((xs @ (w.float() - w_q).t()).pow(2).mean())
        self._set_weight(gm, run, op, w_q, scale, zp, w.detach().float())
        self.applied.append({"layer": ann.layer, "method": "gptq", "damping": damp,
                             "output_error_vs_rtn": err_gptq / err_rtn if err_rtn > 0 else 1.0})

    def _awq(self, gm, run, src_user, group):
        cfg = self.config
        ann0 = src_user.meta[ANNOTATION]
        src = src_user.args[ann0.input_arg]
        x = self._sample(self._inputs(run, src_user))
        weights = [get_attr_tensor(gm, op.args[op.meta[ANNOTATION].weight_arg]).detach().float() for op in group]
        specs = [op.meta[ANNOTATION].weight for op in group]
        s, alpha, ratio = awq_scale_search(x, weights, specs, cfg.grid)
        how = "none"
        if alpha > 0:
            how = self._divide_input(gm, run, src, group, s)
        x_s = x / s
        for op, w, spec in zip(group, weights, specs):
            ws = w * s
            scale, zp = clip_search(ws, x_s, spec, cfg.clip_grid, cfg.max_shrink)
            w_q = fake_quantize(ws, spec, scale, zp)
            self._set_weight(gm, run, op, w_q, scale, zp, ws)
        self.applied.append({"layers": [op.meta[ANNOTATION].layer for op in group], "method": "awq",
                             "alpha": alpha, "scale_error_vs_rtn": ratio, "inverse_scale": how})

    def _divide_input(self, gm, run, src, group, s) -> str:
        """Make the consumers read ``src / s``: fold into a norm's weight when ``src`` is
        ``mul(h, norm_weight)`` read only by these Linears, else insert a ``mul``."""
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
