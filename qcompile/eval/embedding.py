"""Quality metrics for sentence embeddings: a reference model versus a quantized one.

All metrics take ``[n, d]`` tensors. Inputs are L2-normalised here again (cheap, and
it makes the metrics valid for models that skip the final normalisation).

Example:
    >>> import torch
    >>> ref = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    >>> mean_cosine(ref, ref) > 0.9999
    True
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Encoder = Callable[[list[str]], torch.Tensor]


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected an [n, d] tensor, got shape {tuple(x.shape)}")
    # Metrics in float64: a quantized model's drift can be below float32 cosine resolution.
    return F.normalize(x.detach().to(torch.float64), p=2, dim=1)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("need at least one row")


def row_cosine(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``ref`` with the same row of ``test``, shape ``[n]``.

    Example:
        >>> row_cosine(torch.eye(2), -torch.eye(2)).tolist()
        [-1.0, -1.0]
    """
    _check_same_shape(ref, test)
    return (_unit(ref) * _unit(test)).sum(dim=1)


def mean_cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean row-wise cosine similarity between two embedding matrices.

    Example:
        >>> mean_cosine(torch.eye(3), torch.eye(3))
        1.0
    """
    return float(row_cosine(ref, test).mean())


def min_cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Worst row-wise cosine similarity: the single most damaged embedding.

    Example:
        >>> min_cosine(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        0.0
    """
    return float(row_cosine(ref, test).min())


def retrieval_recall_at_1(query_emb: torch.Tensor, passage_emb: torch.Tensor) -> float:
    """Fraction of queries whose nearest passage (by cosine) is their own: row i pairs with row i.

    Ties count as misses unless the own passage is the first of the tied maxima, as argmax picks.

    Example:
        >>> retrieval_recall_at_1(torch.eye(3), torch.eye(3))
        1.0
        >>> retrieval_recall_at_1(torch.eye(3), torch.eye(3)[[1, 2, 0]])
        0.0
    """
    _check_same_shape(query_emb, passage_emb)
    sims = _unit(query_emb) @ _unit(passage_emb).T
    hits = sims.argmax(dim=1) == torch.arange(sims.shape[0])
    return float(hits.double().mean())


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 neighbour among the other rows, and the gap between best and second best."""
    sims = _unit(x) @ _unit(x).T
    sims.fill_diagonal_(float("-inf"))
    top = sims.topk(min(2, sims.shape[0] - 1), dim=1)
    best = top.values[:, 0]
    # With two rows there is no runner-up, so the single neighbour is unambiguous.
    second = top.values[:, 1] if top.values.shape[1] == 2 else torch.full_like(best, float("-inf"))
    return top.indices[:, 0], best - second


def neighbour_agreement(
    ref: torch.Tensor, test: torch.Tensor, margin: float = 0.02
) -> dict[str, float | int]:
    """How often each row keeps the same nearest neighbour (self excluded) under ``test``.

    Rows whose reference best and second-best neighbours are closer than ``margin``
    are near-ties that any tiny perturbation may flip, so ``agreement`` counts only
    the other rows (``rows`` of them); ``agreement_all`` counts every row. With no
    row above the margin, ``agreement`` is 1.0 (nothing that should be stable changed).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> neighbour_agreement(x, x)["agreement"]
        1.0
    """
    _check_same_shape(ref, test)
    if ref.shape[0] < 2:
        raise ValueError("neighbour_agreement needs at least two rows")
    ref_nn, ref_margin = _neighbours(ref)
    test_nn, _ = _neighbours(test)
    same = ref_nn == test_nn
    confident = ref_margin >= margin
    rows = int(confident.sum())
    return {
        "agreement": float(same[confident].double().mean()) if rows else 1.0,
        "rows": rows,
        "agreement_all": float(same.double().mean()),
    }


def encode_texts(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer_fn: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    texts: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Embed ``texts`` in batches with ``model(input_ids, attention_mask)``, in input order.

    Texts are batched by length so that padding (wasted compute) stays small.

    Example:
        >>> m = load_minilm()                                        # doctest: +SKIP
        >>> encode_texts(m.model, m.encode_batch, ["a", "b c"]).shape  # doctest: +SKIP
        torch.Size([2, 384])
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a sequence of strings, not a single string")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    texts = list(texts)
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = tokenizer_fn([texts[i] for i in idx])
            chunks.append(model(ids, mask))
    sorted_emb = torch.cat(chunks)
    out = torch.empty_like(sorted_emb)
    out[torch.tensor(order)] = sorted_emb
    return out


def _batched(encode: Encoder, texts: list[str], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        chunks = [encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def embedding_quality(
    encode_ref: Encoder,
    encode_test: Encoder,
    sentences: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> dict[str, float]:
    """Compare two encoders (``list[str] -> [n, d]``) on sentences and retrieval pairs.

    Returns ``mean_cosine``, ``min_cosine``, ``neighbour_agreement`` and
    ``neighbour_rows`` (on ``sentences``) and ``recall_at_1_ref``,
    ``recall_at_1_test`` and ``recall_at_1_drop_points`` (ref minus test, in
    percentage points, on ``pairs``).

    Example:
        >>> enc = lambda texts: torch.nn.functional.one_hot(
        ...     torch.tensor([len(t) for t in texts]), 64).float()
        >>> q = embedding_quality(enc, enc, ["a", "bb", "ccc"], [("x", "x"), ("yy", "yy")])
        >>> q["mean_cosine"], q["recall_at_1_drop_points"]
        (1.0, 0.0)
    """
    sentences = list(sentences)
    if len(sentences) < 2 or not pairs:
        raise ValueError("embedding_quality needs at least two sentences and one pair")
    queries = [q for q, _ in pairs]
    passages = [p for _, p in pairs]

    ref_s = _batched(encode_ref, sentences, batch_size)
    test_s = _batched(encode_test, sentences, batch_size)
    agreement = neighbour_agreement(ref_s, test_s)
    recall_ref = retrieval_recall_at_1(
        _batched(encode_ref, queries, batch_size), _batched(encode_ref, passages, batch_size)
    )
    recall_test = retrieval_recall_at_1(
        _batched(encode_test, queries, batch_size), _batched(encode_test, passages, batch_size)
    )
    return {
        "mean_cosine": mean_cosine(ref_s, test_s),
        "min_cosine": min_cosine(ref_s, test_s),
        "neighbour_agreement": float(agreement["agreement"]),
        "neighbour_rows": float(agreement["rows"]),
        "neighbour_agreement_all": float(agreement["agreement_all"]),
        "recall_at_1_ref": recall_ref,
        "recall_at_1_test": recall_test,
        "recall_at_1_drop_points": 100.0 * (recall_ref - recall_test),
    }


__all__ = [
    "encode_texts",
    "embedding_quality",
    "mean_cosine",
    "min_cosine",
    "neighbour_agreement",
    "retrieval_recall_at_1",
    "row_cosine",
]
