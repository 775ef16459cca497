"""Perplexity of a causal LM with a fixed protocol, and the size of the model measured.

The text is held-out standard-library docstrings (:func:`qcompile.eval.docstring_pairs`,
``"evaluation"`` split: modules the calibration split never sees): each docstring's summary line
and the prose after it, one docstring per paragraph (coherent text, unlike shuffled sentences),
tokenized once. :class:`PerplexityProtocol` fixes the window, the stride and the number of
tokens; with ``stride < window`` each window after the first scores only its last ``stride``
tokens (the others are context), so no token is scored twice; disjoint windows (the default,
``stride == window``) score all but their first token.

Example:
    >>> from qcompile.models.smollm2 import load_smollm2                  # doctest: +SKIP
    >>> lm = load_smollm2()                                               # doctest: +SKIP
    >>> res = perplexity(lm.model, lm.tokenizer)                          # doctest: +SKIP
    >>> round(res.perplexity, 2), res.tokens_scored                       # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from qcompile.eval.text import docstring_pairs


@dataclass(frozen=True)
class PerplexityProtocol:
    """What is measured: ``tokens`` tokens of ``split`` text cut into windows of ``window``
    tokens every ``stride`` tokens (default: 8 disjoint windows of 512)."""

    window: int = 512
    stride: int = 512
    tokens: int = 4096
    split: str = "evaluation"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.stride <= self.window:
            raise ValueError(f"stride must be in (0, window], got stride={self.stride}, window={self.window}")
        if self.tokens < self.window:
            raise ValueError(f"tokens ({self.tokens}) must cover at least one window ({self.window})")


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity, mean negative log-likelihood (nats/token), tokens scored and model bytes."""

    perplexity: float
    nll: float
    tokens_scored: int
    model_bytes: int
    protocol: PerplexityProtocol

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": asdict(self.protocol)}


def text_tokens(tokenizer: Any, protocol: PerplexityProtocol = PerplexityProtocol(),
                calibration: bool = False) -> torch.Tensor:
    """``protocol.tokens`` token ids (1-D int64) of held-out docstring text, or of the
    calibration split when ``calibration`` (the text GPTQ/AWQ calibrate on)."""
    split = "calibration" if calibration else protocol.split
    docs = [f"{query} {passage}" for query, passage in docstring_pairs(split, seed=protocol.seed)]
    ids: list[int] = []
    chunk = 64
    for start in range(0, len(docs), chunk):   # tokenize in pieces: only the first tokens are used
        ids += tokenizer("\n\n".join(docs[start:start + chunk]) + "\n\n")["input_ids"]
        if len(ids) >= protocol.tokens:
            break
    if len(ids) < protocol.tokens:
        raise ValueError(f"the {split} split has only {len(ids)} tokens, protocol asks {protocol.tokens}")
    return torch.tensor(ids[: protocol.tokens], dtype=torch.int64)


def calibration_windows(tokenizer: Any, n: int = 16, length: int = 512) -> list[tuple[torch.Tensor]]:
    """``n`` calibration items ``(ids[1, length],)`` from the calibration split (disjoint from
    the evaluation text), for ``qcompile.quantize(..., calibration=...)``."""
    ids = text_tokens(tokenizer, PerplexityProtocol(window=length, stride=length, tokens=n * length),
                      calibration=True)
    return [(w.unsqueeze(0),) for w in ids.view(n, length)]


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes the model's tensors take: a quantized model's packed artifact size, or the float
    model's unique parameters and buffers (a tied weight counted once)."""
    gm = getattr(model, "graph_module", None)
    if gm is not None:
        from qcompile.artifact import stored_nbytes

        return stored_nbytes(gm)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def perplexity(model: torch.nn.Module, tokenizer: Any, protocol: PerplexityProtocol = PerplexityProtocol(),
               tokens: Optional[torch.Tensor] = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` (float, or a ``QuantizedModel`` called like it) under ``protocol``.

    ``model(ids, use_cache=False)`` must return logits (a tensor or an object with ``.logits``).
    ``tokens`` overrides the text (1-D ids); by default :func:`text_tokens` of the protocol.
    """
    ids = text_tokens(tokenizer, protocol) if tokens is None else tokens
    starts = list(range(0, len(ids) - protocol.window + 1, protocol.stride))
    nll_sum, scored = 0.0, 0
    from tqdm.auto import tqdm

    with torch.no_grad():
        for i, s in enumerate(tqdm(starts, desc="perplexity", disable=not progress, leave=False)):
            window = ids[s:s + protocol.window].unsqueeze(0)
            logits = _logits(model(window, use_cache=False)).float()
            # the first window scores all it can (window - 1 tokens); later overlapping windows only
            # their last `stride` tokens (the rest is context); disjoint windows (stride == window)
            # score window - 1 tokens each: their first token has no context
            start = 1 if i == 0 or protocol.stride == protocol.window else protocol.window - protocol.stride
            pred, target = logits[0, start - 1:-1], window[0, start:]
            nll_sum += float(F.cross_entropy(pred, target, reduction="sum"))
            scored += target.numel()
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), nll, scored, model_nbytes(model), protocol)
