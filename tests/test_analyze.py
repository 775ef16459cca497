"""qcompile.analyze: per-layer sensitivity table (structure, numerics, model untouched, errors)."""
import json

import pytest
import torch

import qcompile
from conftest import TinyBlock


def _setup():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(4)]
    return model, batches


def test_one_row_per_layer_and_candidate_and_fewer_bits_hurt_more(tmp_path):
    model, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    table = qcompile.analyze(model, ["w8", "w4-g64"], batches[0], batches)
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert table.layers == ["emb", "q", "k", "v", "up", "down", "head"]
    assert len(table.rows) == 7 * 2 and table.samples == 4
    for layer in ["q", "k", "v", "up", "down", "head"]:
        w8, w4 = table.get(layer, "w8"), table.get(layer, "w4-g64")
        assert w4.output_sqnr_db < w8.output_sqnr_db and w4.layer_sqnr_db < w8.layer_sqnr_db
        assert w4.bits_per_weight < w8.bits_per_weight and w4.hessian_proxy > w8.hessian_proxy
        assert 20 < w4.layer_sqnr_db < 30 and 44 < w8.layer_sqnr_db < 52  # ~6 dB per bit
    assert table.get("emb", "w4-g64").bits_per_weight == table.get("emb", "w8").bits_per_weight  # int8 embeddings
    worst = table.most_sensitive(2, "w4-g64")
    assert worst[0].output_sqnr_db <= worst[1].output_sqnr_db
    data = json.loads(table.to_json(tmp_path / "s.json"))
    assert len(data["rows"]) == 14
    page = table.to_html(tmp_path / "s.html").read_text()
    assert page.count("<tr") == 8 and "w4-g64" in page and 'class="sortable"' in page


def test_second_order_estimate_ranks_layers_like_the_measurement():
    model, batches = _setup()
    table = qcompile.analyze(model, ["w4-g64"], batches[0], batches)
    rows = [r for r in table.rows if r.op == "linear"]
    by_proxy = sorted(rows, key=lambda r: r.hessian_proxy)
    by_sqnr = sorted(rows, key=lambda r: -r.layer_sqnr_db)
    agree = sum(a.layer == b.layer for a, b in zip(by_proxy, by_sqnr))
    assert agree >= 3, ([r.layer for r in by_proxy], [r.layer for r in by_sqnr])


def test_activation_candidates_quantize_the_input_too():
    model, batches = _setup()
    table = qcompile.analyze(model, ["w8", "w8a8-dynamic"], batches[0], batches, layers=["up"])
    assert table.layers == ["up"]
    assert table.get("up", "w8a8-dynamic").layer_sqnr_db < table.get("up", "w8").layer_sqnr_db


def test_tied_embedding_and_head_are_left_to_the_recipe(tmp_path):
    model, batches = _setup()
    model.head = torch.nn.Linear(model.emb.embedding_dim, model.emb.num_embeddings, bias=False)
    model.head.weight = model.emb.weight   # tied, as a causal LM's lm_head and embedding
    table = qcompile.analyze(model, ["w8", "w4-g64"], batches[0], batches)
    assert table.layers == ["q", "k", "v", "up", "down"]
    assert set(table.excluded) == {"emb", "head"} and "tied with head" in table.excluded["emb"]
    again = qcompile.SensitivityTable.from_dict(json.loads(table.to_json(tmp_path / "t.json")))
    assert again.excluded == table.excluded
    # named explicitly, a tied layer is measured (the caller takes the responsibility)
    assert qcompile.analyze(model, ["w8"], batches[0], batches, layers=["head"]).layers == ["head"]


def test_errors_name_what_is_wrong():
    model, batches = _setup()
    with pytest.raises(qcompile.RecipeError, match="layers"):
        qcompile.analyze(model, ["w8"], batches[0], batches, layers=["nope"])
    with pytest.raises(qcompile.CalibrationError, match="calibration data"):
        qcompile.analyze(model, ["w8"], batches[0], [])
    with pytest.raises(qcompile.RecipeError, match="w8a9"):
        qcompile.analyze(model, ["w8a9"], batches[0], batches)
