import json

import pytest
import torch

import qcompile
from qcompile import CalibrationError, CaptureError, LayerConfig, QuantSpec, Recipe, RecipeError

from conftest import assert_state_equal, cosine, state_copy


def _quiet(recipe):
    r = qcompile.resolve_recipe(recipe)
    import dataclasses

    return dataclasses.replace(r, calibration=qcompile.CalibrationConfig(progress=False))


def test_quantize_w8a8_returns_module_close_to_float_and_keeps_user_model(tiny_block):
    model, batches = tiny_block
    before = state_copy(model)
    q = qcompile.quantize(model, _quiet("w8a8"), batches[0], calibration=batches)
    assert isinstance(q, torch.nn.Module) and q.recipe.name == "w8a8"
    assert_state_equal(model, before)
    ids, mask = torch.randint(0, 50, (5, 11)), torch.ones(5, 11, dtype=torch.long)  # other batch/seq sizes
    with torch.no_grad():
        assert cosine(q(ids, mask), model(ids, mask)) > 0.99
    r = q.report
    assert {row.layer for row in r.layers} == {"emb", "q", "k", "v", "up", "down", "head"}
    assert r.bytes_after < r.bytes_before and r.linear_weight_compression > 3.0
    assert r.output_cosine > 0.99 and r.calibration_samples == len(batches)
    d = json.loads(r.to_json())
    assert d["recipe"] == "w8a8" and len(d["layers"]) == 7
    assert "qcompile report" in str(r) and "model size" in str(r)


def test_two_step_form_matches_one_step(tiny_block):
    model, batches = tiny_block
    recipe = _quiet("w8a8")
    one = qcompile.quantize(model, recipe, batches[0], calibration=batches)
    prepared = qcompile.prepare(model, recipe, batches[0], calibration=batches)
    for b in batches:
        prepared(*b)
    two = qcompile.convert(prepared)
    with torch.no_grad():
        torch.testing.assert_close(one(*batches[1]), two(*batches[1]))


def test_calibration_forms_generator_dicts_dataloader(tiny_block):
    model, batches = tiny_block
    recipe = _quiet("w8a8")
    ref = qcompile.quantize(model, recipe, batches[0], calibration=batches)
    gen = qcompile.quantize(model, recipe, batches[0], calibration=(b for b in batches))
    dicts = qcompile.quantize(model, recipe, batches[0],
                              calibration=[{"ids": i, "mask": m} for i, m in batches])
    loader = torch.utils.data.DataLoader(list(zip(*[torch.cat(t) for t in zip(*batches)])), batch_size=3)
    dl = qcompile.quantize(model, recipe, batches[0], calibration=loader)
    with torch.no_grad():
        out = ref(*batches[2])
        for other in (gen, dicts, dl):
            torch.testing.assert_close(other(*batches[2]), out)


def test_weight_only_needs_no_calibration(tiny_block):
    model, batches = tiny_block
    q = qcompile.quantize(model, "w8", batches[0])
    assert all(row.activation_format is None for row in q.report.layers)
    with torch.no_grad():
        assert cosine(q(*batches[1]), model(*batches[1])) > 0.999


@pytest.mark.parametrize("calibration, match", [
    (None, "static activation scales: pass calibration"),
    ([], "calibration data is empty"),
    (torch.zeros(3), "iterable of inputs"),
    ([(torch.zeros(3, 7, dtype=torch.long),)], "1 inputs; the model was captured with 2"),
    ([{"ids": torch.zeros(3, 7, dtype=torch.long), "maks": None}], "unknown key"),
])
def test_bad_calibration_errors(tiny_block, calibration, match):
    model, batches = tiny_block
    before = state_copy(model)
    recipe = dataclasses_replace_no_smoothing(_quiet("w8a8"))
    with pytest.raises(CalibrationError, match=match):
        qcompile.quantize(model, recipe, batches[0], calibration=calibration)
    assert_state_equal(model, before)


def dataclasses_replace_no_smoothing(recipe):
    import dataclasses

    return dataclasses.replace(recipe, smoothing=None)


def test_smoothing_recipe_without_data_says_so(tiny_block):
    model, batches = tiny_block
    with pytest.raises(CalibrationError, match="uses smoothing"):
        qcompile.prepare(model, "w8a8", batches[0])


def test_nan_in_calibration_names_the_layer(tiny_block):
    model, batches = tiny_block
    with torch.no_grad():
        model.up.bias[0] = float("nan")  # NaN enters at 'up': 'down' is the first observed input to see it
    before = state_copy(model)
    with pytest.raises(CalibrationError) as e:
        qcompile.quantize(model, dataclasses_replace_no_smoothing(_quiet("w8a8")), batches[0], calibration=batches)
    assert "NaN" in str(e.value) and "down" in str(e.value)
    assert_state_equal(model, before)


def test_recipe_forms(tiny_block, tmp_path):
    model, batches = tiny_block
    recipe = Recipe(name="mine", default=LayerConfig(QuantSpec("int8", "per_channel")),
                    overrides={"head": None})
    path = tmp_path / "r.yaml"
    recipe.save(path)
    for form in (recipe, str(path), recipe.to_dict()):
        q = qcompile.quantize(model, form, batches[0])
        assert q.recipe == recipe and "head" in q.report.kept_float
    with pytest.raises(RecipeError, match="did you mean 'w8a8'"):
        qcompile.quantize(model, "w8a9", batches[0])


def test_capture_error_names_module_and_hint():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.inner(x))

    model = DataDependent()
    before = state_copy(model)
    with pytest.raises(CaptureError) as e:
        qcompile.quantize(model, "w8", (torch.randn(3, 4),))
    assert "'gate' (Gate)" in str(e.value) and "hint:" in str(e.value)
    assert_state_equal(model, before)


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be captured
            return x
        return -x


def test_save_load_bit_identical_and_packed(tiny_block, tmp_path):
    model, batches = tiny_block
    q = qcompile.quantize(model, "w4-g64", batches[0])
    path = q.save(tmp_path / "m")
    loaded = qcompile.load(path)
    with torch.no_grad():
        for b in batches:
            assert torch.equal(q(*b), loaded(*b))
    meta = json.loads((path / "qcompile.json").read_text())
    assert meta["packed"] and all(e["format"] in ("uint4", "int8") for e in meta["packed"].values())
    assert loaded.recipe == q.recipe and loaded.report.recipe == "w4-g64"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() for k in f.keys()}
    up = next(k for k in meta["packed"] if "up_weight" in k)
    assert sizes[up] == 64 * 32 // 2  # two 4-bit codes per byte on disk


def test_load_rejects_corruption_and_future_versions(tiny_block, tmp_path):
    model, batches = tiny_block
    path = qcompile.quantize(model, "w8", batches[0]).save(tmp_path / "m")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(qcompile.ArtifactError, match="checksum"):
        qcompile.load(path)
    meta = json.loads((path / "qcompile.json").read_text())
    meta["artifact_version"] = 99
    (path / "qcompile.json").write_text(json.dumps(meta))
    with pytest.raises(qcompile.ArtifactError, match="version 99"):
        qcompile.load(path)
    with pytest.raises(qcompile.ArtifactError, match="not a qcompile artifact"):
        qcompile.load(tmp_path)


def test_lower_reference_and_unknown_backend(tiny_block):
    model, batches = tiny_block
    q = qcompile.quantize(model, "w8", batches[0])
    assert qcompile.lower(q, backend="reference") is q
    with pytest.raises(qcompile.BackendError, match="unknown backend 'refrence'; did you mean 'reference'"):
        qcompile.lower(q, backend="refrence")


def test_cnn_w8a8_folds_bn_and_quantizes_convs(tiny_cnn):
    model, batches = tiny_cnn
    q = qcompile.quantize(model, _quiet("w8a8"), batches[0], calibration=batches)
    assert q.report.folded_batch_norms == ["conv1", "conv2"]
    assert {r.layer: r.op for r in q.report.layers} == {"conv1": "conv", "conv2": "conv", "fc": "linear"}
    with torch.no_grad():
        assert cosine(q(*batches[0]), model(*batches[0])) > 0.99


def test_cli_recipes_and_unknown_model(capsys):
    from qcompile.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "w8a8 " in out and "w4-g128" in out
    assert main(["quantize", "--model", "minilmm"]) == 2
    assert "did you mean 'minilm'" in capsys.readouterr().err
