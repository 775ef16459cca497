"""Embedding metrics on hand-made tensors with known answers."""

from __future__ import annotations

import pytest
import torch

from qcompile.eval import (
    embedding_quality,
    encode_texts,
    mean_cosine,
    min_cosine,
    neighbour_agreement,
    retrieval_recall_at_1,
)


def _random_unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_cosine_identical_opposite_and_orthogonal() -> None:
    x = _random_unit(16, 8)
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert min_cosine(x, x) == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)
    # Scale must not matter: inputs are re-normalised.
    assert mean_cosine(x, 3.0 * x) == pytest.approx(1.0)
    assert mean_cosine(torch.eye(4), torch.eye(4)[[1, 0, 3, 2]]) == pytest.approx(0.0)


def test_min_cosine_finds_the_one_bad_row() -> None:
    x = _random_unit(10, 6)
    y = x.clone()
    y[3] = -y[3]
    assert min_cosine(x, y) == pytest.approx(-1.0)
    assert mean_cosine(x, y) == pytest.approx(0.8)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        mean_cosine(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError):
        retrieval_recall_at_1(torch.ones(4), torch.ones(4))


def test_recall_identical_is_one_and_permutation_drops() -> None:
    q = _random_unit(20, 32, seed=1)
    assert retrieval_recall_at_1(q, q) == 1.0
    # Passages close to their queries still retrieve perfectly.
    p = torch.nn.functional.normalize(q + 0.05 * _random_unit(20, 32, seed=2), dim=1)
    assert retrieval_recall_at_1(q, p) == 1.0
    # Swapping half of the passages breaks exactly those rows.
    perm = torch.arange(20)
    perm[:10] = perm[:10].roll(1)
    assert retrieval_recall_at_1(q, p[perm]) == pytest.approx(0.5)
    assert retrieval_recall_at_1(q, p[perm.roll(1)]) == 0.0


def test_neighbour_agreement_identity_and_disruption() -> None:
    x = _random_unit(30, 16, seed=3)
    same = neighbour_agreement(x, x)
    assert same["agreement"] == 1.0 and same["agreement_all"] == 1.0
    assert 0 < same["rows"] <= 30
    # Unrelated embeddings keep almost no neighbour.
    other = neighbour_agreement(x, _random_unit(30, 16, seed=4))
    assert other["agreement_all"] < 0.5


def test_neighbour_agreement_margin_excludes_near_ties() -> None:
    # Row 0 is equally close to rows 1 and 2 (a tie), so its neighbour is not counted.
    ref = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.2, 1.0]])
    res = neighbour_agreement(ref, ref, margin=0.02)
    assert res["rows"] == 3
    assert neighbour_agreement(ref, ref, margin=0.0)["rows"] == 4
    with pytest.raises(ValueError):
        neighbour_agreement(torch.ones(1, 3), torch.ones(1, 3))


def _fake_tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), longest, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor([ord(c) for c in t])
        mask[i, : len(t)] = 1
    return ids, mask


def _fake_model(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Embedding = (length, first char code): identifies each text.
    return torch.stack([mask.sum(1).float(), ids[:, 0].float()], dim=1)


def test_encode_texts_returns_input_order() -> None:
    texts = ["ccc", "a", "bbbbb", "dd", "eeee"]
    emb = encode_texts(_fake_model, _fake_tokenizer, texts, batch_size=2)
    assert emb[:, 0].tolist() == [3.0, 1.0, 5.0, 2.0, 4.0]
    assert emb[:, 1].tolist() == [float(ord(t[0])) for t in texts]
    with pytest.raises(TypeError):
        encode_texts(_fake_model, _fake_tokenizer, "abc")


def _index_encoder(texts: list[str]) -> torch.Tensor:
    # "q 3" and "p 3" both map to direction 3: each query's own passage is its exact match.
    index = torch.tensor([int(t.split()[-1]) for t in texts])
    return torch.nn.functional.one_hot(index, 32).float()


def _passages_shifted(texts: list[str]) -> torch.Tensor:
    emb = _index_encoder(texts)
    return -emb if texts[0].startswith("p") else emb


def test_embedding_quality_identical_and_broken() -> None:
    sentences = [f"sentence {i}" for i in range(12)]
    pairs = [(f"q {i}", f"p {i}") for i in range(9)]
    same = embedding_quality(_index_encoder, _index_encoder, sentences, pairs, batch_size=4)
    assert same["mean_cosine"] == pytest.approx(1.0)
    assert same["min_cosine"] == pytest.approx(1.0)
    assert same["recall_at_1_ref"] == same["recall_at_1_test"] == 1.0
    assert same["recall_at_1_drop_points"] == 0.0
    assert set(same) >= {
        "mean_cosine",
        "min_cosine",
        "recall_at_1_ref",
        "recall_at_1_test",
        "recall_at_1_drop_points",
        "neighbour_agreement",
        "neighbour_rows",
    }
    assert all(isinstance(v, float) for v in same.values())

    broken = embedding_quality(_index_encoder, _passages_shifted, sentences, pairs, batch_size=4)
    assert broken["recall_at_1_ref"] == 1.0 and broken["recall_at_1_test"] == 0.0
    assert broken["recall_at_1_drop_points"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        embedding_quality(_index_encoder, _index_encoder, ["sentence 1"], pairs)
