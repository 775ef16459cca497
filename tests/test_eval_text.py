"""The offline docstring corpus: disjoint, deterministic, large enough, and prose-like."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcompile.eval.text import SPLITS, docstring_pairs, docstring_sentences, module_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("split", SPLITS)
def test_counts_are_in_the_hundreds(split: str) -> None:
    assert len(docstring_sentences(split)) >= 500
    assert len(docstring_pairs(split)) >= 200


def test_splits_share_no_text() -> None:
    def texts(split: str) -> set[str]:
        pairs = docstring_pairs(split)
        return set(docstring_sentences(split)) | {q for q, _ in pairs} | {p for _, p in pairs}

    cal, ev = texts("calibration"), texts("evaluation")
    assert cal and ev and cal.isdisjoint(ev)
    # No evaluation passage quotes a calibration sentence either.
    cal_sentences = set(docstring_sentences("calibration"))
    long_ones = [s for s in cal_sentences if len(s) > 60]
    assert not any(s in p for _, p in docstring_pairs("evaluation") for s in long_ones)


def test_module_split_is_stable_and_uses_top_level_name() -> None:
    names = ["json", "os", "email", "asyncio", "collections", "re", "typing", "logging"]
    splits = [module_split(n) for n in names]
    assert set(splits) <= set(SPLITS)
    assert splits == [module_split(n) for n in names]
    assert module_split("email.message") == module_split("email")


def test_seed_and_limit() -> None:
    a = docstring_sentences("evaluation", seed=0)
    assert a == docstring_sentences("evaluation", seed=0)
    b = docstring_sentences("evaluation", seed=1)
    assert a != b and sorted(a) == sorted(b)
    assert docstring_sentences("evaluation", limit=10, seed=0) == a[:10]
    assert docstring_pairs("calibration", limit=7) == docstring_pairs("calibration")[:7]


def test_bad_split_raises() -> None:
    with pytest.raises(ValueError, match="split"):
        docstring_sentences("train")
    with pytest.raises(ValueError, match="split"):
        docstring_pairs("test")


def test_sentences_look_like_prose() -> None:
    for s in docstring_sentences("calibration") + docstring_sentences("evaluation"):
        assert 6 <= len(s.split()) <= 60, s
        assert ">>>" not in s and "\n" not in s and s == s.strip()
        assert s[0].isupper(), s
    sents = docstring_sentences("evaluation")
    assert len(sents) == len(set(sents))


def test_pairs_are_unique_and_long_enough() -> None:
    for split in SPLITS:
        pairs = docstring_pairs(split)
        assert len({q for q, _ in pairs}) == len(pairs)
        assert len({p for _, p in pairs}) == len(pairs)
        for query, passage in pairs:
            assert len(query.split()) >= 5
            assert 8 <= len(passage.split()) <= 60
            assert query not in passage


def test_deterministic_and_silent_across_processes() -> None:
    # A fresh interpreter, with another module imported first, must see the same corpus
    # and the collection must print nothing (imports are silenced).
    code = (
        "import email.mime.text, hashlib\n"
        "from qcompile.eval.text import docstring_sentences, docstring_pairs\n"
        "s = docstring_sentences('calibration', limit=200)\n"
        "p = docstring_pairs('evaluation', limit=50)\n"
        "print(hashlib.sha256(repr((s, p)).encode()).hexdigest())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env
    ).stdout
    expected = (
        docstring_sentences("calibration", limit=200),
        docstring_pairs("evaluation", limit=50),
    )
    assert out == hashlib.sha256(repr(expected).encode()).hexdigest() + "\n"
