"""Saving and loading quantized models without pickle: the graph as torch.export's JSON schema,
tensors in safetensors (sub-byte codes really packed), metadata and checksums in JSON.

Layout of a saved directory::

    model.safetensors   every tensor; quantized codes packed to their format's bits
    program.json        the converted graph (torch.export serialized schema, JSON)
    qcompile.json       the manifest, written last: format version, recipe, input binding,
                        packed-tensor table, report, and the size and sha256 of every other file

The promises every save path in qcompile keeps (backends reuse :func:`atomic_directory`,
:func:`write_manifest` and :func:`read_manifest`):

- **Atomic.** Files are written into a temporary sibling directory ``.<name>.tmp-<pid>-*``, flushed
  to disk, and swapped into place in one rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so a
  save killed at any point leaves either the previous artifact or the new one, never a mix. The
  manifest is written last, so an interrupted temporary directory never loads; stale ones from
  dead processes are removed by the next save to the same path.
- **Versioned and checksummed.** The manifest holds a format version (a newer one is refused by
  name), each file's byte count (a short file is reported as truncated) and sha256 (a flipped byte
  is reported as a checksum mismatch), and a sha256 of its own content.
- **No pickle, bounded allocation.** Tensors are read from safetensors only after the header
  length, the header JSON, every dtype, shape and byte range have been checked against the file's
  size (:func:`read_safetensors`), so a corrupted header cannot make the loader allocate more than
  the file holds.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from .errors import ArtifactError, RecipeError
from .formats import get_format
from .ops import DEQUANTIZE

ARTIFACT_VERSION = 2
MANIFEST = "qcompile.json"
FILES = ("model.safetensors", "program.json")
# Files whose presence marks a directory as something a qcompile save may replace.
MANIFESTS = ("qcompile.json", "tvm.json")
# safetensors' own reader refuses headers above 100 MB; a header that size would already describe
# millions of tensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype name -> torch dtype (the itemsize comes from torch)
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic directories


@contextlib.contextmanager
def atomic_directory(path: Union[str, Path]) -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary directory next to ``path``; when
    the block ends without error its files are flushed to disk and it replaces ``path`` in one
    rename. On error (or a kill) ``path`` is untouched.

    An existing ``path`` is replaced only if it is empty or holds a qcompile manifest (never a
    user's unrelated directory).

    Example::

        >>> with atomic_directory("out/model") as tmp:
        ...     (tmp / "data.bin").write_bytes(payload)
        ...     write_manifest(tmp, {"format_version": 1}, ["data.bin"])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(path)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact gets the usual mode
        yield tmp
        _fsync_tree(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):
            # No atomic swap here (not Linux, or the filesystem lacks it): two renames. A crash
            # between them leaves the previous artifact as .<name>.old-<pid>-*, which the next
            # save restores (remove_stale_temporaries).
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        # after the swap, tmp holds the previous artifact; after an error, the partial one
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file: yields a temporary path next to ``path``
    to write; it is flushed and renamed over ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ArtifactError(f"'{path}' is a directory; refusing to replace it with a file")
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the usual mode
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Union[str, Path]) -> list[Path]:
    """Remove what interrupted saves to ``path`` left behind (``.<name>.tmp-<pid>-*`` of processes
    that are no longer running), and restore a previous artifact a crash left as
    ``.<name>.old-<pid>-*`` when ``path`` itself is missing. Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("old", "tmp"):
        for p in sorted(path.parent.glob(f".{path.name}.{kind}-*")):
            pid = p.name[len(f".{path.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not path.exists() and any((p / m).is_file() for m in MANIFESTS):
                os.replace(p, path)
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ArtifactError(f"'{path}' exists and is a file, not a saved artifact; refusing to replace it")
    if any(path.iterdir()) and not any((path / m).is_file() for m in MANIFESTS):
        raise ArtifactError(f"'{path}' exists and is not a qcompile artifact (no {' or '.join(MANIFESTS)}); "
                            f"refusing to replace it")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# Manifests: format version, sizes and checksums


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Union[str, Path], body: dict, files: Sequence[str], name: str = MANIFEST) -> dict:
    """Write ``body`` as the JSON manifest ``name`` in ``directory``, adding the byte count and
    sha256 of each of ``files`` (paths relative to ``directory``) and a sha256 of the manifest
    itself. Write it after every listed file: its presence marks the directory complete."""
    directory = Path(directory)
    body = dict(body, files={f: {"bytes": (directory / f).stat().st_size, "sha256": _sha256(directory / f)}
                             for f in files})
    body = json.loads(json.dumps(body, default=str))  # exactly what a reader will parse
    body["manifest_sha256"] = _digest(body)
    (directory / name).write_text(json.dumps(body, indent=1))
    return body


def read_manifest(directory: Union[str, Path], *, version_key: str, version: int, kind: str,
                  name: str = MANIFEST, required: Sequence[str] = ()) -> dict:
    """Read and check what :func:`write_manifest` wrote: the version first (a newer one is refused
    by name), then the manifest's own checksum, then each listed file's size (truncated?) and
    sha256 (corrupted?). ``required``: files that must be listed. Raises :class:`ArtifactError`
    naming the file and what is wrong."""
    directory = Path(directory)
    mf = directory / name
    if not mf.is_file():
        raise ArtifactError(f"'{directory}' is not a {kind}: {name} is missing")
    try:
        body = json.loads(mf.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{mf}' is truncated or corrupted (not valid JSON: {e})") from None
    if not isinstance(body, dict):
        raise ArtifactError(f"'{mf}' is corrupted: a JSON object was expected")
    found = body.get(version_key)
    if isinstance(found, int) and not isinstance(found, bool) and found > version:
        raise ArtifactError(f"'{directory}' has {kind} version {found}, newer than this qcompile reads "
                            f"(version {version}): it was written by a future qcompile; upgrade qcompile to load it")
    if found != version:
        raise ArtifactError(f"'{directory}' has {kind} version {found!r}; this qcompile reads version {version} "
                            f"(save it again with this qcompile)")
    claimed = body.pop("manifest_sha256", None)
    if claimed != _digest(body):
        raise ArtifactError(f"'{mf}' does not match its own checksum (sha256): the manifest is corrupted")
    files = body.get("files")
    if not isinstance(files, dict) or any(f not in files for f in required):
        raise ArtifactError(f"'{mf}' is corrupted: its file table does not list {', '.join(required)}")
    for f, entry in files.items():
        p = directory / f
        if Path(f).is_absolute() or ".." in Path(f).parts or not isinstance(entry, dict):
            raise ArtifactError(f"'{mf}' is corrupted: unreadable file entry '{f}' (outside the artifact, or not "
                                f"a size and checksum)")
        if not p.is_file():
            raise ArtifactError(f"'{p}' is missing")
        size, expected = p.stat().st_size, entry.get("bytes")
        if size != expected:
            what = "truncated" if isinstance(expected, int) and size < expected else "corrupted"
            raise ArtifactError(f"'{p}' is {what}: it has {size} bytes, {expected} expected")
        if _sha256(p) != entry.get("sha256"):
            raise ArtifactError(f"'{p}' does not match its checksum (sha256 mismatch): the file is corrupted")
    return body


# ---------------------------------------------------------------------------------------------
# safetensors, validated before anything is allocated


def read_safetensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against its size: the 8-byte header length
    (bounded by :data:`MAX_HEADER_BYTES` and the file), the header JSON, and for every tensor a
    known dtype, a shape whose element count × item size equals its byte range, and byte ranges
    that tile the data exactly. Only then are tensors allocated (by safetensors, no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"'{path}' is truncated: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise ArtifactError(f"'{path}': the safetensors header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte "
                                f"limit (header too large): the file is corrupted")
        if 8 + n > size:
            raise ArtifactError(f"'{path}' is truncated: its safetensors header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{path}': the safetensors header is corrupted (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"'{path}': the safetensors header is corrupted (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise ArtifactError(f"'{path}': tensor '{name}' has an unknown dtype {entry.get('dtype')!r}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ArtifactError(f"'{path}': tensor '{name}' has an unreadable shape {shape!r} or byte range {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ArtifactError(f"'{path}': tensor '{name}' of shape {shape} and dtype {entry['dtype']} needs {nbytes} "
                                f"bytes but spans {end - begin} (shape mismatch)")
        if end > data_len:
            raise ArtifactError(f"'{path}' is truncated: tensor '{name}' ends at byte {end} of data, the file holds "
                                f"{data_len}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ArtifactError(f"'{path}': tensor '{name}' starts at byte {begin}, expected {pos} (overlapping or "
                                f"missing data): the file is corrupted")
        pos = end
    if pos != data_len:
        raise ArtifactError(f"'{path}': {data_len - pos} bytes after the last tensor: the file is corrupted")
    return load_file(str(path))


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


# ---------------------------------------------------------------------------------------------
# The quantized model's artifact


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
