"""Crash-safe, checksummed directories and files: every save path in qcompile writes through here
(the program artifact, the TVM, Triton and ONNX artifacts, ``Recipe.save``, the HTML pages).

The promises kept:

- **Atomic.** Files are written into a temporary sibling directory ``.<name>.tmp-<pid>-*``, flushed
  to disk, and swapped into place in one rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so a
  save killed at any point leaves either the previous artifact or the new one, never a mix. The
  manifest is written last, so an interrupted temporary directory never loads; stale ones from
  dead processes are removed by the next save to the same path.
- **Versioned and checksummed.** The manifest holds a format version (a newer one is refused by
  name), each file's byte count (a short file is reported as truncated) and sha256 (a flipped byte
  is reported as a checksum mismatch), and a sha256 of its own content.

Imports only the standard library and :mod:`qcompile.errors` (no torch): it knows files, not what
they hold.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

from .errors import ArtifactError

# The manifest of a saved program (qcompile.artifact), and the default name of a manifest.
MANIFEST = "qcompile.json"
# Files whose presence marks a directory as something a qcompile save may replace.
MANIFESTS = ("qcompile.json", "tvm.json")


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
