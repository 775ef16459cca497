"""Real English text for calibration and evaluation, taken offline from stdlib docstrings.

The standard library ships a few thousand prose sentences in its docstrings: they
are real, varied technical English, always available, and identical on every
machine running the same Python version. Modules are assigned to a split by a
stable hash of their top-level name, and any sentence that still turns up in
both splits (shared boilerplate) is dropped, so calibration and evaluation
never share text.

Example:
    >>> calib = docstring_sentences("calibration", limit=64)
    >>> evaluation = docstring_sentences("evaluation", limit=256)
    >>> set(calib).isdisjoint(evaluation)
    True
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import itertools
import random
import re
import sys
import warnings
import zlib
from functools import lru_cache
from types import ModuleType

SPLITS = ("calibration", "evaluation")

# Percentage of modules (by hash bucket) in the calibration split; evaluation gets the rest,
# since it benefits more from volume than calibration does.
_CALIBRATION_PERCENT = 40

# Skipped on purpose: side effects on import (a browser, printing, GUI/terminal setup) or test code.
_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "readline",
        "rlcompleter",
        "xxsubtype",
        "xxlimited",
        "xxlimited_35",
        "ensurepip",
        "pydoc_data",
        # setuptools hooks this import and substitutes its own copy, which varies by environment.
        "distutils",
    }
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_CHARS = set("()[]{}=<>_*#|\\`@$%^~;:/")
_MIN_WORDS, _MAX_WORDS = 6, 60
_PAIR_QUERY_MIN, _PAIR_PASSAGE_MIN, _PAIR_PASSAGE_MAX = 5, 8, 60


def module_split(name: str) -> str:
    """The split a stdlib module belongs to, from a stable hash of its top-level name.

    Example:
        >>> module_split("json") in SPLITS
        True
    """
    top = name.split(".", 1)[0]
    bucket = zlib.crc32(top.encode("utf-8")) % 100
    return "calibration" if bucket < _CALIBRATION_PERCENT else "evaluation"


def _module_names() -> list[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python < 3.10 has no list; builtin modules alone are still deterministic.
        names = sys.builtin_module_names
    return sorted(
        n
        for n in names
        if not n.startswith("_") and n not in _SKIP and not n.startswith(("turtle", "test"))
    )


def _quiet_import(name: str) -> ModuleType | None:
    # Some modules warn (deprecations) or print on import; neither must leak into callers' output.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return importlib.import_module(name)
            except (Exception, SystemExit):  # platform-specific or broken modules: skip them
                return None


def _own_doc(obj: object) -> str | None:
    # Not inspect.getdoc: it inherits docs from base classes, which would copy one text
    # into many modules (and across splits).
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _defined_in(obj: object, top: str) -> bool:
    mod = getattr(obj, "__module__", None)
    return isinstance(mod, str) and (mod == top or mod.startswith(top + "."))


def _module_docs(module: ModuleType, top: str) -> list[str]:
    docs = [_own_doc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _defined_in(obj, top):
            continue
        if inspect.isclass(obj):
            docs.append(_own_doc(obj))
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                # other libraries patch stdlib classes (transformers adds Logger.warning_once):
                # only text written for this module counts, whatever was imported before
                if isinstance(getattr(member, "__module__", None), str) and not _defined_in(member, top):
                    continue
                if callable(member) or isinstance(member, property):
                    docs.append(_own_doc(member))
        elif callable(obj):
            docs.append(_own_doc(obj))
    return [d for d in docs if d]


def _blocks(doc: str) -> list[str | None]:
    """Docstring paragraphs, whitespace-collapsed; code, tables and lists become None."""
    out: list[str | None] = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = block.splitlines()
        # Indented lines after cleandoc mean code samples, argument tables or nested lists.
        code_like = any(line.startswith((" ", "\t")) for line in lines)
        if not lines or code_like or ">>>" in block or "::" in block:
            out.append(None)
        else:
            out.append(" ".join(block.split()))
    return out


def _is_prose(sentence: str) -> bool:
    """Whether a sentence reads as English rather than code, a signature or a table row."""
    words = sentence.split()
    if not words or not sentence[0].isupper() or ">>>" in sentence:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    if letters < 0.85 * len(sentence):
        return False
    if sum(c in _CODE_CHARS for c in sentence) > max(2, len(sentence) // 40):
        return False
    # Most tokens should be ordinary words rather than identifiers like foo_bar or a.b.c.
    plain = sum(bool(_WORD.fullmatch(w.strip(".,;:!?\"'()"))) for w in words)
    return plain >= 0.8 * len(words)


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _n_words(text: str) -> int:
    return len(text.split())


def _passage(sentences: list[str]) -> str:
    """Whole sentences up to the word budget; cut mid-sentence only if the first is too long."""
    kept: list[str] = []
    for sentence in sentences:
        if kept and _n_words(" ".join(kept + [sentence])) > _PAIR_PASSAGE_MAX:
            break
        kept.append(sentence)
    return " ".join(" ".join(kept).split()[:_PAIR_PASSAGE_MAX])


def _doc_texts(doc: str) -> tuple[list[str], tuple[str, str] | None]:
    """The prose sentences of one docstring, and its (query, passage) pair if it has one."""
    blocks = _blocks(doc)
    sentences = [
        s
        for b in blocks
        if b is not None
        for s in _sentences(b)
        if _MIN_WORDS <= _n_words(s) <= _MAX_WORDS and _is_prose(s)
    ]
    # The query is the summary line proper; the passage is the prose directly after it,
    # stopping at the first code block or non-prose sentence so it stays coherent.
    if not blocks or blocks[0] is None:
        return sentences, None
    first = _sentences(blocks[0])
    if not _is_prose(first[0]) or _n_words(first[0]) < _PAIR_QUERY_MIN:
        return sentences, None
    rest: list[str] = []
    for candidate in [first[1:]] + [None if b is None else _sentences(b) for b in blocks[1:]]:
        if candidate is None:
            break
        prose_run = list(itertools.takewhile(_is_prose, candidate))
        rest.extend(prose_run)
        if len(prose_run) < len(candidate):
            break
    # A trailing "...as follows:" introduces a list that was dropped; it would dangle.
    while rest and rest[-1].endswith(":"):
        rest.pop()
    passage = _passage(rest)
    if _n_words(passage) < _PAIR_PASSAGE_MIN:
        return sentences, None
    return sentences, (first[0], passage)


@lru_cache(maxsize=1)
def _collect() -> dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    sentences: dict[str, set[str]] = {s: set() for s in SPLITS}
    pairs: dict[str, set[tuple[str, str]]] = {s: set() for s in SPLITS}
    for name in _module_names():
        module = _quiet_import(name)
        if module is None:
            continue
        split = module_split(name)
        for doc in _module_docs(module, name):
            doc_sentences, pair = _doc_texts(doc)
            sentences[split].update(doc_sentences)
            if pair is not None:
                pairs[split].add(pair)

    # Shared boilerplate ("Return a copy of ...") would leak between splits. Compare at the
    # sentence level, passages included, and drop whatever both splits contain.
    def atoms(pair: tuple[str, str]) -> set[str]:
        return {pair[0], *_sentences(pair[1])}

    split_atoms = [sentences[s].union(*(atoms(p) for p in pairs[s])) for s in SPLITS]
    shared = split_atoms[0] & split_atoms[1]
    result = {}
    for split in SPLITS:
        kept = [p for p in sorted(pairs[split]) if not atoms(p) & shared]
        result[split] = (tuple(sorted(sentences[split] - shared)), tuple(_unique_pairs(kept)))
    return result


def _unique_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # Retrieval is only well defined when each query and each passage occurs once.
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    out = []
    for query, passage in pairs:
        if query in seen_q or passage in seen_p:
            continue
        seen_q.add(query)
        seen_p.add(passage)
        out.append((query, passage))
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def docstring_sentences(split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Prose sentences (6-60 words) from stdlib docstrings of one split, shuffled by ``seed``.

    The result is deterministic for a given Python version, split, limit and seed.

    Example:
        >>> sents = docstring_sentences("evaluation", limit=100, seed=1)
        >>> len(sents)
        100
    """
    _check_split(split)
    items = list(_collect()[split][0])
    random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]


def module_sentences(name: str) -> list[str]:
    """Prose sentences (6-60 words) from the docstrings of one stdlib module (``"decimal"``,
    ``"email.message"``): the module's own and those of the classes and functions it defines,
    sorted. A labelled text source (sentence -> module) for sequence classifiers; empty when the
    module does not import here.

    Example:
        >>> len(module_sentences("decimal")) > 50
        True
    """
    module = _quiet_import(name)
    if module is None:
        return []
    found: set[str] = set()
    for doc in _module_docs(module, name):
        found.update(_doc_texts(doc)[0])
    return sorted(found)


def docstring_pairs(
    split: str, limit: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """(query, passage) pairs: a docstring's first sentence and the prose after it.

    Passages are cut to 60 words; queries have at least 5 words and passages at
    least 8. Every query and every passage is unique within a split.

    Example:
        >>> query, passage = docstring_pairs("calibration", limit=1)[0]
        >>> len(passage.split()) >= 8
        True
    """
    _check_split(split)
    items = list(_collect()[split][1])
    random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]
