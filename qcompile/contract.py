"""The contract that travels with a saved artifact: the recipe, the measured quality (metric, value,
the data it was measured on), the parity of its backend against the reference backend, and a few
smoke inputs with the reference outputs on them (``smoke.safetensors``, small), so
:func:`qcompile.check` can reload the artifact in its runtime, run the smoke inputs again and
compare with the recorded figures.

Every save path writes the record through :func:`record` (into its manifest) and the smoke tensors
through :func:`smoke_bytes`; :func:`parity_of` measures outputs the one way every check reads them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils import _pytree as pytree

from .errors import ArtifactError, ParityError

CONTRACT_VERSION = 1
SMOKE_FILE = "smoke.safetensors"
# a check passes when the reloaded artifact is this close to the recorded reference outputs, relative
# to the largest |output|: the parity measured at save time (x2, for run-to-run noise of threaded
# runtimes), and never tighter than float32 noise. A flipped weight block moves outputs by far more.
PARITY_SLACK, PARITY_FLOOR = 2.0, 1e-6


def smoke_tensors(args: tuple, kwargs: dict, outputs) -> dict:
    """``input.<i>`` (positional), ``kwarg.<name>`` and ``output.<i>`` (the output's tensor leaves)."""
    out = {f"input.{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    out.update({f"kwarg.{k}": v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    out.update({f"output.{i}": t for i, t in enumerate(leaves)})
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def smoke_bytes(tensors: dict) -> bytes:
    """The smoke tensors as safetensors bytes (an extra file of the artifact)."""
    from safetensors.torch import save

    return save(tensors)


def split_smoke(tensors: dict) -> tuple[tuple, dict, list]:
    """(args, kwargs, reference output leaves) of :func:`smoke_tensors`' dict."""
    def indexed(prefix):
        keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
        return [tensors[k] for k in keys]
    kwargs = {k[len("kwarg."):]: v for k, v in tensors.items() if k.startswith("kwarg.")}
    return tuple(indexed("input.")), kwargs, indexed("output.")


def parity_of(outputs, reference: list) -> dict:
    """``{"max_abs", "max_rel"}`` of ``outputs``' tensor leaves against ``reference`` (leaves),
    relative to the largest |reference|; an :class:`ArtifactError` when the shapes differ."""
    got = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if len(got) < len(reference):
        raise ArtifactError(f"the artifact returned {len(got)} output tensor(s), {len(reference)} were recorded")
    max_abs = max_rel = 0.0
    for o, r in zip(got, reference):
        if tuple(o.shape) != tuple(r.shape):
            raise ArtifactError(f"output shape {tuple(o.shape)} differs from the recorded {tuple(r.shape)}")
        d = (o.detach().float() - r.float()).abs().max().item() if r.numel() else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / max(r.float().abs().max().item(), 1e-12))
    return {"max_abs": max_abs, "max_rel": max_rel}


def quality(report) -> Optional[dict]:
    """The report's measured quality as a record: output SQNR (dB) and cosine against the float
    model on the report inputs. None when the report measured none."""
    if report is None or getattr(report, "output_sqnr", None) is None:
        return None
    return {"metric": "output SQNR vs the float model (dB)", "value": float(report.output_sqnr),
            "cosine": None if report.output_cosine is None else float(report.output_cosine),
            "data": f"{report.report_samples} report input(s): quantize()'s example and calibration batches"}


def record(recipe, report, backend: str, parity: dict, runtime: str, smoke_samples: int = 1) -> dict:
    """The contract record a manifest holds (``contract``): recipe, quality, parity, runtime."""
    return {"contract_version": CONTRACT_VERSION, "backend": backend, "runtime": runtime,
            "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
            "quality": quality(report),
            "parity": dict(parity, against="qcompile's reference backend on the smoke inputs",
                           samples=smoke_samples, file=SMOKE_FILE)}


def check_parity(where: str, recorded: dict, measured: dict) -> dict:
    """Compare a re-measured parity with the recorded one; :class:`ParityError` naming the artifact,
    both figures and the allowed one when it is worse. Returns the check's result record."""
    if not isinstance(recorded, dict) or "max_rel" not in recorded:
        raise ArtifactError(f"'{where}': its contract record has no parity figures (wrong or missing metadata)")
    allowed = max(PARITY_SLACK * float(recorded["max_rel"]), PARITY_FLOOR)
    result = {"recorded": {k: recorded[k] for k in ("max_abs", "max_rel") if k in recorded}, "measured": measured,
              "allowed_max_rel": allowed, "passed": measured["max_rel"] <= allowed}
    if not result["passed"]:
        raise ParityError(f"'{where}': its outputs on the recorded smoke inputs differ from the recorded reference "
                          f"outputs by {measured['max_rel']:.3g} (relative; max |diff| {measured['max_abs']:.3g}), "
                          f"the artifact recorded {float(recorded['max_rel']):.3g} (allowed {allowed:.3g}): the "
                          "weights or metadata do not match what was saved")
    return result
