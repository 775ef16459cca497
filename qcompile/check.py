"""``qcompile.check(path)``: reload a saved artifact in its own runtime, run its recorded smoke inputs
again and compare the outputs with the recorded reference outputs against the recorded parity
(:mod:`qcompile.contract`). A corrupted file fails its checksum (:class:`ArtifactError`); an artifact
whose weights or metadata do not match what was recorded fails the parity (:class:`ParityError`).

Kinds checked: qcompile's own saved program (``QuantizedModel.save``), ONNX files (the record in
their ``metadata_props``), GGUF files (the record in their metadata, run by llama.cpp) and
compressed-tensors directories, TVM artifact directories (the record in ``tvm.json``, run by TVM's
runtime).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .atomic import MANIFEST
from .contract import SMOKE_FILE, check_parity, parity_of, split_smoke
from .errors import ArtifactError
from .model import load
from .safetensors_io import read_safetensors


@dataclass
class CheckResult:
    """What :func:`check` measured: the artifact's kind and runtime, its recorded recipe and quality,
    and the parity re-measured against the recorded one."""

    path: str
    kind: str
    runtime: str
    recipe: str
    quality: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.parity.get("passed"))

    def __str__(self) -> str:
        q = self.quality or {}
        quality = f"{q.get('metric')}: {q.get('value'):.4g} on {q.get('data')}" if q.get("value") is not None \
            else "no quality recorded"
        m, r = self.parity["measured"], self.parity["recorded"]
        return (f"{self.path}: {'PASS' if self.passed else 'FAIL'} ({self.kind}, recipe '{self.recipe}', runtime "
                f"{self.runtime})\n  recorded quality: {quality}\n  parity on the smoke inputs: max rel "
                f"{m['max_rel']:.3g} (recorded {float(r['max_rel']):.3g}, allowed {self.parity['allowed_max_rel']:.3g})")


def _contract(path: Path, meta: dict) -> dict:
    contract = meta.get("contract")
    if not isinstance(contract, dict) or "parity" not in contract:
        raise ArtifactError(f"'{path}' carries no contract record (saved by a qcompile before the record, or its "
                            "metadata was replaced): save it again with this qcompile")
    return contract


def _smoke(path: Path):
    return split_smoke(read_safetensors(path / SMOKE_FILE))


def check(path: Union[str, Path]) -> CheckResult:
    """Reload the artifact at ``path`` in its runtime, re-run its recorded smoke inputs and compare
    the outputs with the recorded reference outputs against the recorded parity.

    Raises :class:`~qcompile.errors.ArtifactError` for a missing, truncated or corrupted file (the
    manifest's checksums), :class:`~qcompile.errors.ParityError` when the outputs moved further than
    recorded (mismatched weights or metadata).

    Example::

        >>> qmodel.save("out/m"); print(qcompile.check("out/m"))
        out/m: PASS (qcompile, recipe 'w8', runtime qcompile reference) ...
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return _check_onnx(path)
    if path.is_file() and path.suffix == ".gguf":
        return _check_gguf(path)
    if path.is_file():
        raise NotImplementedError(f"'{path}': checking '{path.suffix}' files is not built: only .onnx and .gguf "
                                  "files carry the contract record (recipe, quality, parity, smoke inputs)")
    if not (path / MANIFEST).is_file():
        if (path / "tvm.json").is_file():
            return _check_tvm(path)
        raise ArtifactError(f"'{path}' is not a qcompile artifact: {MANIFEST} is missing")
    try:
        kind = json.loads((path / MANIFEST).read_text()).get("kind", "qcompile")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ArtifactError(f"'{path / MANIFEST}' is truncated or corrupted ({e})") from None
    if kind == "compressed-tensors":
        return _check_compressed_tensors(path)
    return _check_program(path)


def _result(path: Path, kind: str, contract: dict, measured: dict, recipe: Optional[str] = None) -> CheckResult:
    """The verdict every format shares: the recorded contract against the parity just measured."""
    recipe = recipe or (contract.get("recipe") or {}).get("name", "?")
    return CheckResult(str(path), kind, contract.get("runtime", ""), recipe, contract.get("quality") or {},
                       check_parity(str(path), contract["parity"], measured))


def _check_program(path: Path) -> CheckResult:
    from .artifact import load_program

    _, meta = load_program(path)   # checksums, version
    contract = _contract(path, meta)
    qmodel = load(path)
    args, kwargs, reference = _smoke(path)
    with torch.no_grad():
        measured = parity_of(qmodel(*args, **kwargs), reference)
    return _result(path, "qcompile", contract, measured, qmodel.recipe.name)


def _check_onnx(path: Path) -> CheckResult:
    try:
        from .backends.onnx.runtime import read_contract, run_smoke
    except ImportError as e:
        raise ArtifactError(f"checking '{path}' needs onnxruntime: pip install 'qcompile[onnx]' ({e.name})") from e
    contract, smoke = read_contract(path)   # format version and checksum first
    contract = _contract(path, {"contract": contract})
    feed = {k[len("feed."):]: v for k, v in smoke.items() if k.startswith("feed.")}
    measured = parity_of(run_smoke(path, feed), split_smoke(smoke)[2])
    return _result(path, "onnx", contract, measured)


def _check_gguf(path: Path) -> CheckResult:
    try:
        from .backends.gguf.runtime import GgufArtifact, read_contract
    except ImportError as e:
        raise ArtifactError(f"checking '{path}' needs the gguf package: pip install 'qcompile[gguf]' ({e.name})") from e
    try:
        contract, smoke = read_contract(path)
    except (ValueError, OSError) as e:   # the gguf reader's refusal of a truncated or corrupted file
        raise ArtifactError(f"'{path}' is truncated or corrupted (not a readable GGUF file: {e})") from None
    contract = _contract(path, {"contract": contract})
    args, _, reference = split_smoke(smoke)
    measured = parity_of(GgufArtifact.load(path)(args[0]), reference)
    return _result(path, "gguf", contract, measured)


def _check_tvm(path: Path) -> CheckResult:
    try:
        from .backends.tvm.runtime import load as load_tvm
    except ImportError as e:
        raise ArtifactError(f"checking '{path}' needs TVM: pip install 'qcompile[tvm]' ({e.name})") from e
    art = load_tvm(path)   # sizes and checksums of model.so, smoke.safetensors and tvm.json first
    contract = _contract(path, art.meta)
    args, kwargs, reference = _smoke(path)
    with torch.no_grad():
        measured = parity_of(art(*args, **kwargs), reference)
    return _result(path, "tvm", contract, measured)


def _check_compressed_tensors(path: Path) -> CheckResult:
    try:
        from .backends.compressed_tensors import load_model, read, run_model
    except ImportError as e:
        raise ArtifactError(f"checking '{path}' needs compressed-tensors: pip install 'qcompile[ct]' ({e.name})") from e
    meta = read(path)   # checksums, version
    contract = _contract(path, meta)
    args, kwargs, reference = _smoke(path)
    measured = parity_of(run_model(load_model(path, quantized=True), *args, **kwargs), reference)
    return _result(path, "compressed-tensors", contract, measured)


__all__ = ["CheckResult", "check"]
