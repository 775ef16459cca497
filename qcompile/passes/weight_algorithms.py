"""GPTQ and AWQ on a graph: choose quantized weights from calibration data instead of rounding to
nearest. The math is in :mod:`qcompile.algorithms`; this pass feeds it each Linear's inputs and
edits the graph with what it returns.

:class:`ApplyWeightAlgorithmPass` walks the annotated graph in order with every calibration item
in lockstep (one environment per item, values freed after their last use), so each Linear is
quantized from the inputs produced by the layers already quantized before it ("sequential"
calibration: peak memory is the live activations of the items plus the model, never all layers'
inputs at once). At a Linear with a weight spec it:

* ``gptq``: builds ``H = XᵀX`` of the layer input and runs
  :func:`~qcompile.algorithms.gptq.gptq_quantize`;
* ``awq``: for all Linears reading the same input, searches per input channel scales
  (:func:`~qcompile.algorithms.awq.awq_scale_search`), folds ``1/s`` into the preceding norm
  weight (or inserts a ``mul``), multiplies the weights by ``s`` and searches a clipping ratio per
  group (:func:`~qcompile.algorithms.awq.clip_search`).

Under data-parallel calibration (:mod:`qcompile.distributed`) each rank runs its own items and each
Linear's :class:`~qcompile.algorithms.common.InputStats` are summed over the ranks before it is
solved, so every rank sees the same statistics; GPTQ's solves of the Linears reading one input
(q/k/v, gate/up) are then spread over the ranks (weight-parallel) and broadcast from each owner.

The result is a new float weight tensor lying exactly on the quantization grid of the qparams it was
solved for; both go into ``node.meta[WEIGHT_QPARAMS]`` and :class:`~qcompile.passes.ConvertPass`
stores those codes as they are. Weights whose format is not an integer or code-book format (FP8)
keep round-to-nearest, recorded in :attr:`ApplyWeightAlgorithmPass.applied`.

Example::

    >>> cfg = WeightAlgorithmConfig("gptq")
    >>> PassManager([ApplyWeightAlgorithmPass(cfg, items, binder)])(gm)   # after AnnotatePass
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .. import distributed
from ..algorithms.awq import awq_scale_search, clip_search
from ..algorithms.common import InputStats, fake_quantize, quantize_input, unsupported
from ..algorithms.gptq import GPTQHessian, gptq_quantize
from ..calibration import iterate
from ..capture import check_inputs
from ..errors import CalibrationError, RecipeError
from ..recipe import CalibrationConfig, WeightAlgorithmConfig
from ..spec import ANNOTATION, LAYER, ROLE, WEIGHT_QPARAMS, QuantSpec, WeightQParams
from .infra import Pass, PassResult, add_tensor, get_attr_tensor

aten = torch.ops.aten


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

    def __init__(self, config: WeightAlgorithmConfig, data: Iterable, binder,
                 calibration: CalibrationConfig = CalibrationConfig()):
        self.config, self.data, self.binder, self.calibration = config, data, binder, calibration
        if config.quantized_inputs is not False and (config.quantized_inputs is not True or config.method != "gptq"):
            # AWQ scales the input before its quantizer: its search would need x/s quantized per alpha
            raise RecipeError("weight_algorithm.quantized_inputs", "is GPTQ's only (its Hessian of the quantized "
                              f"input), got {config.quantized_inputs!r} with method '{config.method}'")

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
        flat, error = [], None
        try:   # under data-parallel calibration every rank must see the same error (qcompile.distributed)
            items = list(iterate(self.data, self.calibration.max_samples))
            if not items:
                raise CalibrationError(f"{self.config.method} needs calibration data: it is empty")
            for item in items:
                args, kwargs = self.binder.bind(item)
                flat.append(check_inputs(gm, args, kwargs, CalibrationError))
        except CalibrationError as e:
            if distributed.group() is None:
                raise
            error = e
        distributed.agree(error)
        from tqdm.auto import tqdm

        run = _Lockstep(gm, flat)
        pending = set(todo)
        bar = tqdm(total=len(todo), desc=self.config.method, disable=not self.calibration.progress, leave=False, unit="layer")
        with torch.no_grad():
            for node in list(gm.graph.nodes):
                if not pending:
                    break   # everything after the last quantized Linear (the logits) is not needed
                if node in pending:
                    group = self._consumers(node, pending)
                    if self.config.method == "gptq":
                        # one Hessian, and one factorisation of it, for all readers of the input
                        prep = GPTQHessian.of_stats(self._stats(run, node, quantized=self._input_spec(group)),
                                                    self.config.damping, self.config.act_order)
                        records.extend(self._gptq_group(gm, run, group, prep))
                        del prep
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

    def _input_spec(self, group) -> Optional[QuantSpec]:
        """With ``quantized_inputs``, the dynamic activation spec the Linears of ``group`` (one
        input) quantize it with, which GPTQ's Hessian then sees; else None (the float input)."""
        if not self.config.quantized_inputs:
            return None
        found = {op.meta[ANNOTATION].activation for op in group}
        spec = next(iter(found)) if len(found) == 1 else None
        if spec is None or not spec.dynamic:
            layers = ", ".join(op.meta[ANNOTATION].layer for op in group)
            raise RecipeError("weight_algorithm.quantized_inputs",
                              f"layer(s) {layers} quantize their input with {[str(s) for s in found]}: GPTQ's "
                              "Hessian of the quantized input needs one dynamic activation spec")
        return spec

    @staticmethod
    def _stats(run, op, max_rows: Optional[int] = None, quantized: Optional[QuantSpec] = None) -> InputStats:
        """:class:`InputStats` of ``op``'s input, item by item. ``max_rows``: an evenly strided
        subset of every item's rows, about ``max_rows`` in all. ``quantized``: of the input as this
        dynamic activation spec quantizes it (``dequantize(quantize(x))``, per item)."""
        xs = run.values(op.args[op.meta[ANNOTATION].input_arg])
        if quantized is not None:
            xs = [quantize_input(x, quantized) for x in xs]
        total = distributed.sum_int(sum(x.numel() // x.shape[-1] for x in xs))   # all ranks' rows
        stride = 1 if not max_rows or total <= max_rows else -(-total // max_rows)
        st = None
        for x in xs:
            x = x.detach().reshape(-1, x.shape[-1])[::stride]
            if st is None:
                st = InputStats.of(x)
            else:
                st.add(x)
        st.all_reduce()   # data-parallel calibration: the statistics of every rank's items
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

    def _gptq_group(self, gm, run, group, prep) -> list:
        """GPTQ on the Linears of ``group`` (all read one input, so they share ``prep``), spread over
        the ranks (weight-parallel): each rank solves its share (:func:`~qcompile.distributed.owners`,
        balanced by the cost K²·N of a solve), then every result is broadcast from its owner, so
        every rank holds the owner's bits (one process: rank 0 solves all, nothing is sent). A
        failing solve raises on every rank, its rank and layer named, before anything is sent."""
        weights = [get_attr_tensor(gm, op.args[op.meta[ANNOTATION].weight_arg]).detach().float() for op in group]
        plan = distributed.owners([float(w.shape[1]) ** 2 * w.shape[0] for w in weights])
        mine, error = {}, None
        for i, (op, w) in enumerate(zip(group, weights)):
            if plan[i] == distributed.rank():
                try:
                    mine[i] = self._gptq(op, w, prep)
                except Exception as e:   # noqa: BLE001 - raised on every rank by agree()
                    if distributed.group() is None:
                        raise
                    error = e
                    break
        distributed.agree(error)
        records = []
        for i, (op, w) in enumerate(zip(group, weights)):
            w_q, scale, zp, record = distributed.broadcast(mine.get(i), plan[i])
            self._set_weight(gm, run, op, w_q, scale, zp, w)
            records.append({**record, "rank": plan[i]} if distributed.group() is not None else record)
        return records

    def _gptq(self, op, w, prep) -> tuple:
        """(solved weight, scale, zero point, report record) of Linear ``op`` with float weight ``w``."""
        ann = op.meta[ANNOTATION]
        if not torch.isfinite(w).all():
            raise CalibrationError(f"GPTQ: the weight of layer '{ann.layer}' has NaN or Inf entries")
        try:
            w_q, scale, zp, damp = gptq_quantize(w, prep, ann.weight, block_size=self.config.block_size)
        except CalibrationError as e:
            raise CalibrationError(f"layer '{ann.layer}': {e}") from e
        # output errors from the Hessian: mean_t ‖x_t Dᵀ‖² = tr(D H Dᵀ) / 2, no pass over the rows;
        # a diagnostic only, so on at most 128 evenly spaced output rows (N·K² costs as much as H)
        rows = slice(None, None, max(1, w.shape[0] // 128))
        d = torch.stack([w[rows] - fake_quantize(w, ann.weight, scale, zp)[rows], w[rows] - w_q[rows]])
        err_rtn, err_gptq = ((d @ prep.hessian32) * d).sum((1, 2)).tolist()
        return w_q, scale, zp, {"layer": ann.layer, "method": "gptq", "damping": damp,
                                "output_error_vs_rtn": err_gptq / err_rtn if err_rtn > 0 else 1.0}

    def _awq(self, gm, run, src_user, group):
        cfg = self.config
        ann0 = src_user.meta[ANNOTATION]
        src = src_user.args[ann0.input_arg]
        x = self._stats(run, src_user, cfg.sample_rows)
        weights = [get_attr_tensor(gm, op.args[op.meta[ANNOTATION].weight_arg]).detach().float() for op in group]
        specs = [op.meta[ANNOTATION].weight for op in group]
        skip = cfg.fold_only and _norm_weight(gm, src, group, weights[0].shape[1]) is None
        if skip:   # no norm absorbs 1/s (o_proj, down_proj): clipping only, no inserted mul
            s, alpha, ratio = torch.ones(weights[0].shape[1]), 0.0, 1.0
        else:
            s, alpha, ratio = awq_scale_search(x, weights, specs, cfg.grid)
        how = "none (fold_only: no norm absorbs 1/s)" if skip else "none"
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
        w_node = _norm_weight(gm, src, group, s.shape[0])
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


def _norm_weight(gm, src, group, channels: int):
    """The 1-D weight node of ``src = mul(h, norm_weight)`` (``channels`` long) when only the
    Linears of ``group`` read ``src``, so ``1/s`` can fold into it; else None."""
    w_node = None
    if src.op == "call_function" and src.target == aten.mul.Tensor and set(src.users) <= set(group):
        for a in src.args:
            t = get_attr_tensor(gm, a)
            if t is not None and t.dim() == 1 and t.shape[0] == channels:
                w_node = a
    return w_node
