"""Quantization-aware training: :func:`prepare_qat` returns a trainable module with fake-quant on
the edges the recipe annotates; train it with any optimizer and loss (``DistributedDataParallel``
included), then :func:`qcompile.convert` gives the same kind of :class:`~qcompile.QuantizedModel`
as :func:`qcompile.quantize`, lowering to every backend unchanged.

Example::

    >>> qat = qcompile.prepare_qat(model, "w4a4", (x[:2],), calibration=[(x[:256],)])
    >>> opt = torch.optim.Adam(qat.parameters(), 1e-3)
    >>> for xb, yb in loader:
    ...     loss = F.cross_entropy(qat(xb), yb); opt.zero_grad(); loss.backward(); opt.step()
    >>> qmodel = qcompile.convert(qat.eval())
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .calibration import run_calibration
from .capture import capture
from .fake_quant import FakeQuantize, GraphAttention
from .model import PreparedModel
from .observers import all_reduce_statistics, make_observer
from .passes import AnnotatePass, FreezeQATPass, InsertFakeQuantPass, NormalizeLinearPass, TrainEvalOpsPass
from .passes.infra import PassManager, PassResult, Stage, tensor_owner
from .pipeline import CALIBRATE, CAPTURE, convert_stages
from .errors import RecipeError
from .recipe import QATConfig, RecipeLike, resolve_recipe


class QATModel(PreparedModel):
    """The trainable model :func:`prepare_qat` returns: called like the original, ``train()`` /
    ``eval()`` switch batch-norm, dropout and the quantizers' observation, ``state_dict()`` holds
    every parameter and quantizer state (resume is exact). ``qcompile.convert(qat)`` works on a copy,
    so training can go on afterwards."""

    def forward(self, *args, **kwargs):
        if self.training:
            self._check_sharded_observers()
        args, kwargs = self._captured.binder.call(args, dict(kwargs))
        return self.graph_module(*args, **kwargs)

    def _check_sharded_observers(self) -> None:
        """A learned scale that still observes sets itself inside the forward pass; under FSDP2
        (``fully_shard``) that writes the gathered copy of the parameter, which is dropped after
        the forward, so the sharded scale would silently keep its old value."""
        observing = [fq.layers[0] if fq.layers else name for name, fq in self.fake_quantizers().items()
                     if fq.learned and fq._observing()]
        if not observing:
            return
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in self.modules()):
            raise RecipeError("qat.observer_steps",
                              f"learned scales of layer(s) {', '.join(sorted(set(observing))[:4])} would still observe "
                              "under fully_shard, which drops what a forward pass writes into a parameter: "
                              "calibrate before sharding (prepare_qat(..., calibration=...)) with observer_steps: 0")

    def train(self, mode: bool = True, *, dropout: bool = True) -> "QATModel":
        """``nn.Module.train``, plus ``dropout=False``: training mode for the quantizers and
        batch-norm, but every dropout (``nn.Dropout`` and attention's ``dropout_p`` in
        :class:`GraphAttention`) in eval, so the forward pass is deterministic. Wanted when the
        loss has no noise of its own to regularise against, e.g. distilling a float teacher's
        outputs, where live dropout only adds noise to the target. Lasts until the next
        ``train()``/``eval()`` call."""
        super().train(mode)
        if mode and not dropout:
            for m in self.graph_module.modules():
                if isinstance(m, (nn.Dropout, GraphAttention)):
                    m.eval()
        return self

    def fake_quantizers(self) -> dict[str, FakeQuantize]:
        """Module path → :class:`FakeQuantize` (weights and activations)."""
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, FakeQuantize)}

    def to_prepared(self, dump_dir: Optional[str] = None) -> PreparedModel:
        """A :class:`PreparedModel` holding a frozen copy: the graph PTQ's convert takes. Its
        pipeline continues this model's (the log so far, one dump numbering) with the freeze and
        conversion stages; this model's own pipeline is left as it is, so training can go on."""
        gm = copy.deepcopy(self.graph_module)
        gm.eval()
        run = PassManager([Stage(FreezeQATPass(), "freeze"), *convert_stages()], dump_dir or self.pipeline.dump_dir)
        run.records = list(self.pipeline.records)
        run.run(gm, until=convert_stages()[0].phase)
        steps = max((int(m.steps) for m in self.fake_quantizers().values()), default=0)
        prepared = PreparedModel(gm, self._captured, self.recipe, self._float_model[0], run)
        prepared.calibrated_batches = steps
        return prepared


def prepare_qat(model: nn.Module, recipe: RecipeLike, example_inputs: tuple, calibration: Optional[Iterable] = None,
                *, example_kwargs: Optional[dict] = None, dynamic_shapes: Any = "auto",
                dump_dir: Optional[str] = None) -> QATModel:
    """Capture ``model`` in training mode and insert fake-quant per ``recipe`` (the recipe's
    ``qat`` section, or :class:`~qcompile.QATConfig` defaults, sets STE vs learned scales,
    observer warm-up, batch-norm folding and freezing). ``calibration`` (optional): initialise the
    activation scales from it with the recipe's PTQ observers, so training starts from the PTQ
    model. ``model`` is never modified: the result owns copies of its parameters.
    """
    recipe = resolve_recipe(recipe)
    config = recipe.qat or QATConfig()
    if recipe.smoothing is not None:
        raise NotImplementedError(f"QAT with smoothing (recipe '{recipe.name}') is not built: smoothed weights would "
                                  "be constants, not trained parameters; use a recipe with smoothing: null "
                                  "(dataclasses.replace(recipe, smoothing=None)) — QAT trains the ranges itself")
    t0 = time.perf_counter()
    float_ref = copy.deepcopy(model).eval()  # the report's float reference, safe from later training
    cap = capture(model, example_inputs, example_kwargs, dynamic_shapes, training=True)
    gm = cap.graph_module
    _own_trainable(gm)
    run = PassManager([Stage(p, CAPTURE) for p in (NormalizeLinearPass(), AnnotatePass(recipe),
                                                    InsertFakeQuantPass(config), TrainEvalOpsPass(config.sync_observers))],
                      dump_dir)
    run.record("capture", CAPTURE, time.perf_counter() - t0, PassResult(gm, False))
    run.run(gm)
    qat = QATModel(gm, cap, recipe, float_ref, run)
    if calibration is not None:
        t1 = time.perf_counter()
        calibrate_qat(qat, calibration)
        # not a CalibrationResult: a QAT model's report counts training steps, not these items
        run.record("calibrate_qat", CALIBRATE, time.perf_counter() - t1, PassResult(gm, False))
    return qat.train()


@torch.no_grad()
def calibrate_qat(qat: QATModel, data: Iterable) -> int:
    """Set every static activation quantizer from a PTQ observer (the spec's ``observer``) run on
    ``data`` with float weights and float activations upstream, as :func:`qcompile.prepare` does;
    at step 0 the QAT model then equals the PTQ model. Returns the number of items."""
    fqs = list(qat.fake_quantizers().values())
    observers = {}
    was_training = qat.training
    for fq in fqs:
        if not fq.is_weight and not fq.spec.dynamic:
            observers[fq] = make_observer(fq.spec, fq.layers)
    hooks = [fq.register_forward_hook(_calibration_hook(observers.get(fq))) for fq in fqs]
    qat.eval()
    try:
        for fq in fqs:
            fq.initialized.fill_(True)  # the hook returns the float input, so no range is needed yet
        cfg = qat.recipe.calibration
        n = run_calibration(lambda item: qat._captured.binder.apply(qat, item), data, cfg.max_samples, cfg.progress,
                            desc="QAT calibration")
    finally:
        for h in hooks:
            h.remove()
        qat.train(was_training)
    # data-parallel calibration: every rank's ranges become those of all ranks' data (in the
    # quantizers' graph order, the same on every rank); a no-op in one process
    all_reduce_statistics(nn.ModuleList(observers.values()))
    for fq, obs in observers.items():
        scale, zp = obs.qparams()
        fq.set_qparams(scale, zp, obs.range())
    return n


def _calibration_hook(observer):
    def hook(module, args, _out):
        x = args[0]
        if observer is not None:
            observer(x)
        return x  # float through: PTQ calibrates with float weights and activations
    return hook


def _own_trainable(gm: torch.fx.GraphModule) -> None:
    """Give the captured graph its own parameters (trainable) and buffers: ``torch.export`` shares
    them with the user's model, which training must not change. Also lets ``train()``/``eval()``
    through: ``ExportedProgram.module()`` disables them because the captured ops carry a fixed
    mode; :class:`TrainEvalOpsPass` and the QAT modules make the mode live again."""
    gm.__dict__.pop("train", None)
    gm.__dict__.pop("eval", None)
    for name, p in list(gm.named_parameters()):
        owner, attr = tensor_owner(gm, name)
        owner._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for name, b in list(gm.named_buffers()):
        owner, attr = tensor_owner(gm, name)
        owner._buffers[attr] = b.detach().clone()
