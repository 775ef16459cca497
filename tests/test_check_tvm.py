"""qcompile.check on TVM artifacts: the contract record (recipe, quality, TVM's parity against the
reference, smoke inputs) travels in ``tvm.json`` and ``smoke.safetensors``; a reload passes; a
flipped byte of the library fails its checksum; another model's library under the same record
(re-signed) and a record whose outputs were edited fail the parity; a directory saved without the
record is named."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile
from qcompile.errors import ArtifactError, ParityError
from test_check import resign

pytest.importorskip("tvm")


def _lowered(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    torch.manual_seed(0)   # the same example input for both models
    q = qcompile.quantize(model, "w8", (torch.randn(4, 32),), report_samples=1)
    return qcompile.lower(q, backend="tvm")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _lowered(0).save(tmp_path_factory.mktemp("tvm") / "m")


def test_record_travels_and_check_passes(saved):
    meta = json.loads((saved / "tvm.json").read_text())
    contract = meta["contract"]
    assert contract["backend"] == "tvm" and contract["recipe"]["name"] == "w8"
    assert contract["runtime"].startswith("TVM ") and contract["quality"]["value"] > 20
    assert contract["parity"]["max_rel"] < 1e-4 and set(meta["files"]) == {"model.so", "smoke.safetensors"}
    result = qcompile.check(saved)
    assert result.passed and result.kind == "tvm"
    assert result.parity["measured"]["max_rel"] <= result.parity["allowed_max_rel"]


def test_flipped_library_byte_fails_the_checksum(saved, tmp_path):
    path = shutil.copytree(saved, tmp_path / "m")
    raw = bytearray((path / "model.so").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (path / "model.so").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        qcompile.check(path)


def test_another_models_library_fails_the_parity(saved, tmp_path):
    other = _lowered(1).save(tmp_path / "other")
    path = shutil.copytree(saved, tmp_path / "m")
    shutil.copy(other / "model.so", path / "model.so")   # same signature, other weights
    resign(path, name="tvm.json")
    with pytest.raises(ParityError, match="differ from the recorded reference outputs"):
        qcompile.check(path)


def test_edited_reference_outputs_fail_the_parity(saved, tmp_path):
    path = shutil.copytree(saved, tmp_path / "m")
    smoke = load_file(str(path / "smoke.safetensors"))
    smoke["output.0"] = smoke["output.0"] * 1.5
    save_file(smoke, str(path / "smoke.safetensors"))
    resign(path, name="tvm.json")
    with pytest.raises(ParityError):
        qcompile.check(path)


def test_missing_record_is_named(saved, tmp_path):
    path = shutil.copytree(saved, tmp_path / "m")
    resign(path, name="tvm.json", edit=lambda body: body.pop("contract"))
    with pytest.raises(ArtifactError, match="no contract record"):
        qcompile.check(path)
