"""Saving and loading quantized models without pickle: the graph as torch.export's JSON schema,
tensors in safetensors (sub-byte codes really packed), metadata and checksums in JSON.

Layout of a saved directory::

    model.safetensors   every tensor; quantized codes packed to their format's bits
    program.json        the converted graph (torch.export serialized schema, JSON)
    qcompile.json       format version, recipe, input binding, packed-tensor table, report, sha256s

Saving writes a temporary directory and renames it into place, so an interrupted save never
leaves something that loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

from .errors import ArtifactError
from .formats import get_format
from .ops import DEQUANTIZE

ARTIFACT_VERSION = 1
FILES = ("model.safetensors", "program.json")


def code_tensors(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Attribute name → format id, for every tensor holding quantized codes (a dequantize input)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == DEQUANTIZE and node.args[0].op == "get_attr":
            out[node.args[0].target] = node.args[3]
    return out


def pack_state(state: dict[str, torch.Tensor], codes: dict[str, str]):
    """(tensors to store, table of packed entries). Codes are packed; everything else is stored
    as it is (cloned, so no two entries share storage)."""
    tensors, packed = {}, {}
    for name, t in state.items():
        fmt_name = codes.get(name)
        if fmt_name is not None:
            fmt = get_format(fmt_name)
            tensors[name] = fmt.pack(t.detach().cpu())
            packed[name] = {"format": fmt_name, "shape": list(t.shape)}
        else:
            tensors[name] = t.detach().cpu().contiguous().clone()
    return tensors, packed


def unpack_state(tensors: dict[str, torch.Tensor], packed: dict) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, entry in packed.items():
        if name not in out:
            raise ArtifactError(f"packed tensor '{name}' is listed in qcompile.json but missing from model.safetensors")
        out[name] = get_format(entry["format"]).unpack(out[name], tuple(entry["shape"]))
    return out


def stored_nbytes(gm: torch.fx.GraphModule) -> int:
    """The bytes the tensors of ``gm`` take in a saved artifact (packed codes, real sizes)."""
    codes = code_tensors(gm)
    total = 0
    for name, t in _unique_state(gm).items():
        total += get_format(codes[name]).packed_nbytes(t.numel()) if name in codes else t.nbytes
    return total


def _unique_state(gm) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict(keep_vars=False))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_program(ep: torch.export.ExportedProgram, codes: dict[str, str], meta: dict,
                 path: Union[str, Path]) -> Path:
    """Write an exported converted program and its metadata to the directory ``path`` atomically."""
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    state = {f"state.{k}": v for k, v in ep.state_dict.items()}
    state.update({f"const.{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    tensors, packed = pack_state(state, {f"state.{k}": v for k, v in codes.items()}
                                 | {f"const.{k}": v for k, v in codes.items()})
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"qcompile_artifact_version": str(ARTIFACT_VERSION)})
        (tmp / "program.json").write_bytes(artifact.exported_program)
        info = dict(meta, artifact_version=ARTIFACT_VERSION, packed=packed,
                    parameters=list(ep.graph_signature.parameters),
                    sha256={f: _sha256(tmp / f) for f in FILES})
        (tmp / "qcompile.json").write_text(json.dumps(info, indent=1, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_program(path: Union[str, Path]) -> tuple[torch.export.ExportedProgram, dict]:
    """Read what :func:`save_program` wrote: (exported program, metadata). Checks the version and
    the checksums before reading any tensor."""
    from safetensors.torch import load_file
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    from . import ops  # noqa: F401  - registers torch.ops.qcompile.* before the graph is rebuilt

    path = Path(path)
    meta_file = path / "qcompile.json"
    if not meta_file.exists():
        raise ArtifactError(f"'{path}' is not a qcompile artifact: qcompile.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"'{meta_file}' is corrupted: {e}") from None
    version = meta.get("artifact_version")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"'{path}' has artifact version {version!r}; this qcompile reads version "
                            f"{ARTIFACT_VERSION} (upgrade qcompile to load newer artifacts)")
    for f in FILES:
        if not (path / f).exists():
            raise ArtifactError(f"'{path / f}' is missing")
        if _sha256(path / f) != meta.get("sha256", {}).get(f):
            raise ArtifactError(f"'{path / f}' does not match its checksum: the file is truncated or corrupted")
    tensors = unpack_state(load_file(str(path / "model.safetensors")), meta.get("packed", {}))
    params = set(meta.get("parameters", ()))
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    state = {k: torch.nn.Parameter(v, requires_grad=False) if k in params else v for k, v in state.items()}
    consts = {k[len("const."):]: v for k, v in tensors.items() if k.startswith("const.")}
    sep = _bytes_to_dataclass(schema.ExportedProgram, (path / "program.json").read_bytes())
    ep = ExportedProgramDeserializer().deserialize(sep, state, consts, None)
    return ep, meta
