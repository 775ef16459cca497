"""Saved artifacts: atomic replacement (a save SIGKILLed mid-write leaves the previous artifact),
format versions, sizes and checksums on every file, and safetensors headers validated before any
tensor is allocated. Real saves and loads; the fault injection kills a real child process."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile.atomic import atomic_directory, read_manifest, remove_stale_temporaries, write_manifest
from qcompile.errors import ArtifactError
from qcompile.safetensors_io import MAX_HEADER_BYTES, read_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _mlp(seed: int, width: int = 256, depth: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


X = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(quantized model, its saved directory, a second, different model's saved directory)."""
    root = tmp_path_factory.mktemp("artifacts")
    a = qcompile.quantize(_mlp(0), "w4-g64", (X,))
    b = qcompile.quantize(_mlp(1, depth=6), "w8", (X,))
    return a, a.save(root / "a"), b.save(root / "b")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _reseal(path: Path, edit=lambda body: None) -> None:
    """Rewrite qcompile.json with fresh sizes and checksums, as a writer that is wrong (not a
    disk fault) would: what the checks after the checksums must still catch."""
    body = json.loads((path / "qcompile.json").read_text())
    files = list(body.pop("files"))
    body.pop("manifest_sha256")
    edit(body)
    write_manifest(path, body, files)


def test_round_trip_records_version_sizes_and_checksums(saved, tmp_path):
    q, a, _ = saved
    loaded = qcompile.load(a)
    with torch.no_grad():
        assert torch.equal(loaded(X), q(X))
    meta = json.loads((a / "qcompile.json").read_text())
    assert meta["artifact_version"] == qcompile.artifact.ARTIFACT_VERSION
    assert set(meta["files"]) == {"model.safetensors", "program.json", "smoke.safetensors"}
    assert meta["files"]["model.safetensors"]["bytes"] == (a / "model.safetensors").stat().st_size
    # extra files are saved in the same atomic step and checksummed like the rest
    path = q.save(tmp_path / "x", extra_files={"report.json": q.report.to_json()})
    assert json.loads((path / "report.json").read_text())["recipe"] == "w4-g64"
    assert "report.json" in json.loads((path / "qcompile.json").read_text())["files"]
    (path / "report.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"report.json' is truncated: it has 2 bytes"):
        qcompile.load(path)


@pytest.mark.parametrize("where", [0.5, -1])
def test_flipped_tensor_byte_is_a_checksum_mismatch(saved, tmp_path, where):
    p = _copy(saved[1], tmp_path / "m")
    data = bytearray((p / "model.safetensors").read_bytes())
    data[int(len(data) * where)] ^= 0x01  # one bit, in the middle of the tensor data or its last byte
    (p / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.safetensors' does not match its checksum \(sha256 mismatch\)"):
        qcompile.load(p)


def test_truncated_and_corrupted_files_are_named(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "m")
    full = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(full[: len(full) // 2])
    with pytest.raises(ArtifactError, match=rf"model.safetensors' is truncated: it has {len(full) // 2} bytes, "
                                            rf"{len(full)} expected"):
        qcompile.load(p)
    (p / "model.safetensors").write_bytes(full)
    qcompile.load(p)
    prog = (p / "program.json").read_bytes()
    (p / "program.json").write_bytes(prog.replace(b'"', b"'", 1))
    with pytest.raises(ArtifactError, match=r"program.json' does not match its checksum"):
        qcompile.load(p)
    (p / "program.json").write_bytes(prog)
    manifest = (p / "qcompile.json").read_text()
    (p / "qcompile.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(ArtifactError, match=r"qcompile.json' is truncated or corrupted \(not valid JSON"):
        qcompile.load(p)
    # an edit that keeps the JSON valid is caught by the manifest's own checksum
    edited = json.loads(manifest)
    edited["report"]["bytes_after"] //= 2
    (p / "qcompile.json").write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match=r"qcompile.json' does not match its own checksum"):
        qcompile.load(p)
    (p / "qcompile.json").write_text(manifest)
    (p / "program.json").unlink()
    with pytest.raises(ArtifactError, match=r"program.json' is missing"):
        qcompile.load(p)


def test_future_and_old_versions_are_refused_by_name(saved, tmp_path):
    p = _copy(saved[1], tmp_path / "m")
    meta = json.loads((p / "qcompile.json").read_text())
    for version, message in [(99, r"version 99, newer than this qcompile reads \(version 2\).*future qcompile"),
                             (1, r"version 1; this qcompile reads version 2 \(save it again")]:
        (p / "qcompile.json").write_text(json.dumps(dict(meta, artifact_version=version)))
        with pytest.raises(ArtifactError, match=message):
            qcompile.load(p)


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_header_is_validated_before_allocation(tmp_path):
    f = tmp_path / "t.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    assert torch.equal(read_safetensors(_safetensors(f, good, bytes(16)))["w"], torch.zeros(2, 2))
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(ArtifactError, match="header too large"):
        read_safetensors(f)
    f.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(ArtifactError, match=r"is truncated: its safetensors header claims 1048576 bytes"):
        read_safetensors(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ArtifactError, match="is truncated: 2 bytes"):
        read_safetensors(f)
    # a shape that would need a terabyte, in a 16-byte file: refused from the header alone
    huge = {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 18], "data_offsets": [0, 16]}}
    with pytest.raises(ArtifactError, match=r"tensor 'w' of shape \[1048576, 262144\] and dtype F32 needs "
                                            r"1099511627776 bytes but spans 16 \(shape mismatch\)"):
        read_safetensors(_safetensors(f, huge, bytes(16)))
    with pytest.raises(ArtifactError, match=r"tensor 'w' ends at byte 16 of data, the file holds 8"):
        read_safetensors(_safetensors(f, good, bytes(8)))
    gap = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
           "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}
    with pytest.raises(ArtifactError, match=r"tensor 'b' starts at byte 8, expected 4"):
        read_safetensors(_safetensors(f, gap, bytes(12)))
    with pytest.raises(ArtifactError, match=r"4 bytes after the last tensor"):
        read_safetensors(_safetensors(f, good, bytes(20)))
    with pytest.raises(ArtifactError, match=r"unknown dtype 'F128'"):
        read_safetensors(_safetensors(f, {"w": dict(good["w"], dtype="F128")}, bytes(16)))
    with pytest.raises(ArtifactError, match=r"unreadable shape \[-1, 2\]"):
        read_safetensors(_safetensors(f, {"w": dict(good["w"], shape=[-1, 2])}, bytes(16)))


def test_loader_checks_shapes_even_when_checksums_match(saved, tmp_path):
    """A writer bug (not a disk fault) that seals a wrong header or packed-table shape: caught
    after the checksums, before allocating."""
    p = _copy(saved[1], tmp_path / "m")
    meta = json.loads((p / "qcompile.json").read_text())
    name = next(iter(meta["packed"]))
    _reseal(p, lambda body: body["packed"][name].update(shape=[1 << 30, 1 << 10]))
    with pytest.raises(ArtifactError, match=rf"packed tensor '{name}' holds \d+ torch.uint8 values, but \w+ codes "
                                            rf"of shape \[1073741824, 1024\] take \d+ bytes: shape mismatch"):
        qcompile.load(p)
    p = _copy(saved[1], tmp_path / "n")
    raw = (p / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2)
    header[key]["shape"] = [header[key]["shape"][0] * 2, header[key]["shape"][1]]
    _safetensors(p / "model.safetensors", header, raw[8 + n:])
    _reseal(p)
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' of shape .* \(shape mismatch\)"):
        qcompile.load(p)


def test_atomic_directory_replaces_only_artifacts(tmp_path):
    user = tmp_path / "home"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not a qcompile artifact .* refusing to replace it"):
        with atomic_directory(user):
            pass
    assert (user / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        with atomic_directory(tmp_path / "file"):
            pass
    # an error inside the block leaves the previous artifact and no temporary directory
    target = tmp_path / "art"
    with atomic_directory(target) as tmp:
        (tmp / "data").write_text("v1")
        write_manifest(tmp, {"format_version": 1}, ["data"], name="tvm.json")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "data").write_text("v2")
            raise RuntimeError("interrupted")
    assert (target / "data").read_text() == "v1"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask  # not the private mode of a temporary directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    body = read_manifest(target, version_key="format_version", version=1, kind="test", name="tvm.json")
    assert body["files"]["data"]["bytes"] == 2
    # a manifest that points outside its directory is refused even with a valid self-checksum
    body["files"]["../home/notes.txt"] = {"bytes": 4, "sha256": "0" * 64}
    body["manifest_sha256"] = qcompile.atomic._digest(body)
    (target / "tvm.json").write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match=r"unreadable file entry '../home/notes.txt' \(outside the artifact"):
        read_manifest(target, version_key="format_version", version=1, kind="test", name="tvm.json")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "art"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".art.tmp-{dead}-abc"
    live = tmp_path / f".art.tmp-{os.getppid()}-abc"
    stale.mkdir(), live.mkdir()
    old = tmp_path / f".art.old-{dead}-abc"   # a crash between the two renames of the fallback
    old.mkdir()
    (old / "qcompile.json").write_text("{}")
    assert remove_stale_temporaries(target) == [stale]
    assert live.exists() and not old.exists() and (target / "qcompile.json").exists()


CHILD = textwrap.dedent("""
    import os, sys, time
    import safetensors.torch
    import qcompile
    from qcompile import artifact, atomic

    source, target, where = sys.argv[1], sys.argv[2], sys.argv[3]
    model = qcompile.load(source)

    def pause(stage):
        print("paused", stage, flush=True)
        time.sleep(600)   # the parent SIGKILLs us here

    real_save_file = safetensors.torch.save_file

    def half_written(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        pause(f"{len(data) // 2}/{len(data)}")

    real_write_manifest = artifact.write_manifest

    def before_manifest(directory, body, files, name=atomic.MANIFEST):
        pause("manifest")

    if where == "tensors":
        safetensors.torch.save_file = half_written
    else:
        artifact.write_manifest = before_manifest
    model.save(target)
    print("saved", flush=True)
""")


@pytest.mark.parametrize("where", ["tensors", "manifest"])
def test_save_killed_midway_leaves_previous_artifact(saved, tmp_path, where):
    """A child process saves a different model over an existing artifact and is SIGKILLed while
    writing (half of model.safetensors written / every file but the manifest written)."""
    q, a, b = saved
    target = _copy(a, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(b), str(target), where], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("paused"), (line, child.stderr.read() if child.poll() is not None else "")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    # the previous artifact is untouched and loads to the same model
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    with torch.no_grad():
        assert torch.equal(qcompile.load(target)(X), q(X))
    # the partial save is left under a temporary name, and does not load
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".m.tmp-{child.pid}-")
    if where == "tensors":
        size = (leftovers[0] / "model.safetensors").stat().st_size
        assert line.split()[1] == f"{size}/{(b / 'model.safetensors').stat().st_size}"
    with pytest.raises(ArtifactError, match="is not a qcompile artifact: qcompile.json is missing"):
        qcompile.load(leftovers[0])
    # the next save to the same path cleans it up
    q.save(target)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".m.")] == []


def test_onnx_file_is_versioned_and_checksummed(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from qcompile.backends.onnx.runtime import read_onnx, seal_onnx

    w = numpy_helper.from_array(torch.arange(12, dtype=torch.float32).reshape(3, 4).numpy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"author": "test"})
    f = tmp_path / "m.onnx"
    f.write_bytes(seal_onnx(model.SerializeToString()))
    session = ort.InferenceSession(read_onnx(f), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": torch.ones(2, 3).numpy()})[0]
    assert out.tolist() == [[12.0, 15.0, 18.0, 21.0]] * 2
    assert {p.key for p in onnx.load(str(f)).metadata_props} >= {"author", "qcompile.sha256"}
    data = bytearray(f.read_bytes())
    data[data.index(numpy_helper.from_array(torch.tensor([5.0]).numpy()).raw_data)] ^= 0x01  # a weight's byte
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"m.onnx' does not match its checksum"):
        read_onnx(f)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match=r"m.onnx' (is truncated or corrupted|carries no qcompile onnx format version: it is truncated)"):
        read_onnx(f)
    f.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match="carries no qcompile onnx format version"):
        read_onnx(f)
    future = onnx.load_from_string(seal_onnx(model.SerializeToString()))
    for p in future.metadata_props:
        if p.key == "qcompile.onnx_format_version":
            p.value = "7"
    f.write_bytes(future.SerializeToString())
    with pytest.raises(ArtifactError, match="onnx format version 7, newer than the version this qcompile reads"):
        read_onnx(f)
