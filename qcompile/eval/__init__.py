"""Evaluation data and metrics: offline English text and embedding-quality measures.

Example:
    >>> from qcompile.eval import docstring_sentences, mean_cosine
    >>> len(docstring_sentences("calibration", limit=32))
    32
"""

from qcompile.eval.embedding import (
    embedding_quality,
    encode_texts,
    mean_cosine,
    min_cosine,
    neighbour_agreement,
    retrieval_recall_at_1,
    row_cosine,
)
from qcompile.eval.text import SPLITS, docstring_pairs, docstring_sentences, module_split

__all__ = [
    "SPLITS",
    "docstring_pairs",
    "docstring_sentences",
    "embedding_quality",
    "encode_texts",
    "mean_cosine",
    "min_cosine",
    "module_split",
    "neighbour_agreement",
    "retrieval_recall_at_1",
    "row_cosine",
]
