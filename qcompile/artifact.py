"""The saved program: a quantized model as a directory, without pickle. The graph is stored as
torch.export's JSON schema, tensors in safetensors (sub-byte codes really packed), metadata and
checksums in JSON.

Layout of a saved directory::

    model.safetensors   every tensor; quantized codes packed to their format's bits
    program.json        the converted graph (torch.export serialized schema, JSON)
    smoke.safetensors   the contract's smoke inputs and reference outputs (qcompile.check; qcompile.contract)
    qcompile.json       the manifest, written last: format version, recipe, input binding,
                        packed-tensor table, report, and the size and sha256 of every other file

The directory is written and checked by :mod:`qcompile.atomic` (atomic replacement, version, sizes
and checksums); tensors are read by :func:`~qcompile.safetensors_io.read_safetensors`, which checks
every header against the file before allocating, and packed codes are checked against their format
and shape before they are unpacked (:func:`unpack_state`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import torch

from .atomic import MANIFEST, atomic_directory, read_manifest, write_manifest
from .distributed import writes_on_rank_zero
from .errors import ArtifactError, RecipeError
from .formats import get_format
from .ops import DEQUANTIZE
from .safetensors_io import read_safetensors

ARTIFACT_VERSION = 2
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


def unpack_state(tensors: dict[str, torch.Tensor], packed: dict, source: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`. Each packed entry's format and shape are checked against the
    stored bytes before the unpacked tensor is allocated."""
    out = dict(tensors)
    for name, entry in packed.items():
        if name not in out:
            raise ArtifactError(f"packed tensor '{name}' is listed in qcompile.json but missing from {source}")
        try:
            fmt = get_format(entry["format"])
            shape = [int(d) for d in entry["shape"]]
        except (RecipeError, KeyError, TypeError, ValueError):
            raise ArtifactError(f"qcompile.json: packed tensor '{name}' has an unreadable entry {entry!r}") from None
        stored = out[name]
        if any(d < 0 for d in shape) or stored.dtype != torch.uint8 or \
                stored.numel() != fmt.packed_nbytes(math.prod(shape)):
            raise ArtifactError(f"{source}: packed tensor '{name}' holds {stored.numel()} {stored.dtype} values, but "
                                f"{fmt.name} codes of shape {shape} take {fmt.packed_nbytes(math.prod(shape))} bytes: "
                                f"shape mismatch")
        out[name] = fmt.unpack(stored, tuple(shape))
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


@writes_on_rank_zero
def save_program(ep: torch.export.ExportedProgram, codes: dict[str, str], meta: dict,
                 path: Union[str, Path], extra_files: dict | None = None) -> Path:
    """Write an exported converted program and its metadata to the directory ``path`` atomically.
    ``extra_files``: name → bytes or text written (and checksummed) alongside, e.g. a report."""
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    path = Path(path)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in FILES or name == MANIFEST or Path(name).name != name:
            raise ArtifactError(f"extra file name '{name}' is reserved or not a plain file name")
    artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    state = {f"state.{k}": v for k, v in ep.state_dict.items()}
    state.update({f"const.{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    tensors, packed = pack_state(state, {f"state.{k}": v for k, v in codes.items()}
                                 | {f"const.{k}": v for k, v in codes.items()})
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"qcompile_artifact_version": str(ARTIFACT_VERSION)})
        (tmp / "program.json").write_bytes(artifact.exported_program)
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        info = dict(meta, artifact_version=ARTIFACT_VERSION, packed=packed,
                    parameters=list(ep.graph_signature.parameters))
        write_manifest(tmp, info, [*FILES, *extra_files])
    return path


def load_program(path: Union[str, Path]) -> tuple[torch.export.ExportedProgram, dict]:
    """Read what :func:`save_program` wrote: (exported program, metadata). Checks the version,
    sizes and checksums of every file and the safetensors header before reading any tensor."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    from . import ops  # noqa: F401  - registers torch.ops.qcompile.* before the graph is rebuilt

    path = Path(path)
    meta = read_manifest(path, version_key="artifact_version", version=ARTIFACT_VERSION,
                         kind="qcompile artifact", required=FILES)
    tensors = unpack_state(read_safetensors(path / "model.safetensors"), meta.get("packed", {}),
                           str(path / "model.safetensors"))
    params = set(meta.get("parameters", ()))
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    state = {k: torch.nn.Parameter(v, requires_grad=False) if k in params else v for k, v in state.items()}
    consts = {k[len("const."):]: v for k, v in tensors.items() if k.startswith("const.")}
    sep = _bytes_to_dataclass(schema.ExportedProgram, (path / "program.json").read_bytes())
    ep = ExportedProgramDeserializer().deserialize(sep, state, consts, None)
    return ep, meta
