"""The perplexity harness (qcompile/eval/perplexity.py): protocol checks, exact values on models
whose perplexity is known, every token scored once whatever the stride, and model sizes."""
import math

import pytest
import torch
from torch import nn

from qcompile.eval.perplexity import (PerplexityProtocol, calibration_windows, model_nbytes, perplexity,
                                      text_tokens)


class ByteTokenizer:
    """A real (if tiny) tokenizer: UTF-8 bytes as ids, called like a transformers tokenizer."""

    def __call__(self, text):
        return {"input_ids": list(text.encode("utf-8"))}


class Uniform(nn.Module):
    """Equal logits over ``vocab`` tokens: perplexity is exactly ``vocab``."""

    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab
        self.seen = []

    def forward(self, ids, use_cache=True):
        assert use_cache is False                      # the harness never asks for a KV cache
        self.seen.append(ids.shape[1])
        return torch.zeros(*ids.shape, self.vocab)


class Oracle(nn.Module):
    """Knows the text: puts all its mass on the true next token (perplexity ~1)."""

    def __init__(self, ids, vocab=256):
        super().__init__()
        self.ids, self.vocab = ids, vocab

    def forward(self, window, use_cache=True):
        # find the window in the text and predict its continuation
        n = window.shape[1]
        for s in range(len(self.ids) - n + 1):
            if torch.equal(self.ids[s:s + n], window[0]):
                break
        nxt = torch.cat([self.ids[s + 1:s + n + 1], torch.zeros(1, dtype=torch.long)])[:n]
        out = torch.full((1, n, self.vocab), -30.0)
        out[0, torch.arange(n), nxt] = 30.0
        return type("Out", (), {"logits": out})()     # an object with .logits, like transformers'


def test_uniform_model_has_perplexity_vocab_and_every_token_scored_once():
    tok = ByteTokenizer()
    for stride in (128, 64, 100):
        p = PerplexityProtocol(window=128, stride=stride, tokens=1024)
        m = Uniform()
        res = perplexity(m, tok, p)
        assert res.perplexity == pytest.approx(256, rel=1e-5)
        starts = len(range(0, 1024 - 128 + 1, stride))
        per_window = 127 if stride == 128 else stride                 # disjoint: all but the first token
        assert res.tokens_scored == 127 + (starts - 1) * per_window    # no token scored twice
        assert set(m.seen) == {128}


def test_oracle_has_perplexity_one_on_held_out_text():
    tok = ByteTokenizer()
    p = PerplexityProtocol(window=64, stride=32, tokens=512)
    ids = text_tokens(tok, p)
    assert perplexity(Oracle(ids), tok, p).perplexity == pytest.approx(1.0, abs=1e-6)


def test_calibration_text_is_disjoint_from_evaluation_text():
    tok = ByteTokenizer()
    p = PerplexityProtocol(window=256, stride=256, tokens=4096)
    ev = bytes(text_tokens(tok, p).tolist()).decode()
    cal = calibration_windows(tok, n=4, length=256)
    assert len(cal) == 4 and cal[0][0].shape == (1, 256)
    cal_text = bytes(torch.cat([c[0][0] for c in cal]).tolist()).decode(errors="ignore")
    assert ev[:200] not in cal_text


@pytest.mark.parametrize("kw", [dict(window=512, stride=0), dict(window=128, stride=256), dict(window=512, tokens=100)])
def test_bad_protocols_are_rejected(kw):
    with pytest.raises(ValueError):
        PerplexityProtocol(**kw)


def test_model_nbytes_counts_a_tied_weight_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    assert model_nbytes(m) == 100 * 16 * 4
    assert math.isclose(model_nbytes(nn.Linear(16, 8)), (16 * 8 + 8) * 4)
