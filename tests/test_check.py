"""qcompile.check on qcompile's own saved program: the contract record (recipe, quality, parity,
smoke inputs) travels with the artifact; a reload passes; a flipped byte fails its checksum, a
re-signed artifact with another weight fails the parity, an artifact without the record is named."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile
from qcompile.atomic import write_manifest
from qcompile.cli import main
from qcompile.errors import ArtifactError, ParityError


def resign(path, name="qcompile.json", edit=None):
    """Rewrite a manifest over the directory's current files (what a tool that rewrites an artifact
    without qcompile would leave: consistent checksums, other content)."""
    body = json.loads((path / name).read_text())
    files = list(body.pop("files"))
    body.pop("manifest_sha256")
    if edit:
        edit(body)
    write_manifest(path, body, files, name=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    q = qcompile.quantize(model, "w8a8-dynamic", (x,), report_samples=1)
    return q.save(tmp_path_factory.mktemp("check") / "m")


def copy(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "copy")


def test_record_travels_and_check_passes(saved, capsys):
    contract = json.loads((saved / "qcompile.json").read_text())["contract"]
    assert contract["recipe"]["name"] == "w8a8-dynamic"
    assert contract["quality"]["metric"].startswith("output SQNR") and contract["quality"]["value"] > 20
    assert contract["parity"]["max_rel"] == 0.0 and (saved / "smoke.safetensors").is_file()
    result = qcompile.check(saved)
    assert result.passed and result.parity["measured"]["max_rel"] == 0.0
    assert main(["check", str(saved)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_flipped_byte_fails_the_checksum(saved, tmp_path):
    path = copy(saved, tmp_path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-5] ^= 0x10
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        qcompile.check(path)


def test_other_weights_fail_the_parity(saved, tmp_path, capsys):
    path = copy(saved, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    codes = next(k for k, v in tensors.items() if v.dtype == torch.uint8 or v.dtype == torch.int8)
    block = tensors[codes].clone().view(torch.uint8)
    block[:16] ^= 0x40   # a flipped block of int8 weight codes
    tensors[codes] = block.view(tensors[codes].dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"qcompile_artifact_version": "2"})
    resign(path)
    with pytest.raises(ParityError, match="differ from the recorded reference outputs"):
        qcompile.check(path)
    assert main(["check", str(path)]) == 1
    assert "ParityError" in capsys.readouterr().err


def test_missing_record_is_named(saved, tmp_path):
    path = copy(saved, tmp_path)
    resign(path, edit=lambda body: body.pop("contract"))
    with pytest.raises(ArtifactError, match="no contract record"):
        qcompile.check(path)


def test_single_file_artifacts_not_checked_yet(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(NotImplementedError, match="contract record"):
        qcompile.check(f)


@pytest.fixture(scope="module")
def saved_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    q = qcompile.quantize(model, "w8", (x,), report_samples=1)
    return qcompile.lower(q, backend="onnx").save(tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_onnx_record_and_check(saved_onnx):
    from qcompile.backends.onnx.runtime import read_contract

    contract, smoke = read_contract(saved_onnx)
    assert contract["runtime"].startswith("onnxruntime") and contract["recipe"]["name"] == "w8"
    assert contract["parity"]["max_rel"] < 1e-4 and any(k.startswith("feed.") for k in smoke)
    result = qcompile.check(saved_onnx)
    assert result.passed and result.kind == "onnx"


def test_onnx_flipped_weights_fail(saved_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    from qcompile.backends.onnx.runtime import seal_onnx

    model = onnx.load(str(saved_onnx))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).dtype.itemsize == 1
                and numpy_helper.to_array(i).size >= 64)
    codes = numpy_helper.to_array(init).copy()
    codes.reshape(-1)[:16] ^= 0x40   # a flipped block of int8 weight codes
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match="checksum"):   # the seal no longer matches
        qcompile.check(path)
    path.write_bytes(seal_onnx(model.SerializeToString()))   # re-sealed: only the parity can tell
    with pytest.raises(ParityError):
        qcompile.check(path)
