"""qcompile.verify: the parity report, and that it catches a backend that is off."""
import pytest
import torch

import qcompile
from backend_conformance import _quantize
from conftest import TinyBlock


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 50, (4, 9), generator=g), torch.ones(4, 9, dtype=torch.long)) for _ in range(2)]
    return _quantize(TinyBlock().eval(), "w8a8", batches), batches


class _Shifted:
    """A 'backend' whose codes are off by two steps at one quantizer and whose output drifts."""
    backend = "shifted"

    def __init__(self, q, shift=2):
        self.q, self.shift = q, shift

    def __call__(self, *args, **kwargs):
        return self.q(*args, **kwargs) * 1.01

    def quantized_activations(self, *args, **kwargs):
        acts = self.q.quantized_activations(*args, **kwargs)
        s, c = acts[1]
        acts[1] = (s, (c.to(torch.int32) + self.shift).clamp(0, 255).to(c.dtype))
        return acts


def test_reference_against_itself_is_exact():
    q, batches = _setup()
    parity = qcompile.verify(q, q, batches)
    assert parity.passed and parity.max_steps == 0 and parity.output_max_abs == 0
    assert [p.layers for p in parity.points] == ["q,k,v", "up", "down", "head"]
    assert parity.to_dict()["passed"] is True


def test_a_backend_two_steps_off_fails_and_names_the_layer():
    q, batches = _setup()
    parity = qcompile.verify(_Shifted(q), q, batches)
    assert not parity.passed and parity.max_steps == 2
    assert [p.layers for p in parity.points if p.max_steps] == ["up"]
    assert parity.output_max_rel == pytest.approx(0.01, rel=1e-3)
    assert "FAIL" in str(parity) and "up" in str(parity)


def test_end_to_end_only_when_the_backend_exposes_nothing():
    q, batches = _setup()
    parity = qcompile.verify(lambda *a, **k: q(*a, **k), q, batches)
    assert parity.passed and not parity.points and "end-to-end parity only" in parity.note


def test_unpairable_quantizers_are_an_error():
    q, batches = _setup()
    short = _Shifted(q, 0)
    short.quantized_activations = lambda *a, **k: q.quantized_activations(*a, **k)[:2]
    with pytest.raises(qcompile.BackendError, match="exposes 2 activation quantizers"):
        qcompile.verify(short, q, batches)
