"""The report's SQNR figures: ``sqnr()`` on zero and near-zero references, and cumulative SQNR that
leaves out the positions an attention mask pads."""
import math

import pytest
import torch
from conftest import TinyBlock
from torch import nn

import qcompile
from qcompile.htmlpage import db_cell, sqnr_colour
from qcompile.report import Report, sqnr, sqnr_from_energy


def test_sqnr_identical_is_inf_and_only_then():
    assert sqnr(torch.zeros(5), torch.zeros(5)) == math.inf
    assert sqnr(torch.ones(5), torch.ones(5)) == math.inf
    assert sqnr(torch.ones(100), torch.ones(100) * 1.01) == pytest.approx(40.0, abs=1e-3)


def test_sqnr_all_zero_reference_with_noise_is_minus_inf():
    """A zero output quantized to something nonzero: no signal, some noise. The old code clamped the
    signal power to 1e-30 and reported a large positive figure."""
    assert sqnr(torch.zeros(8), torch.full((8,), 1e-3)) == -math.inf
    assert sqnr_from_energy(0.0, 1e-12) == -math.inf


def test_sqnr_near_zero_output_quantized_to_zeros():
    """A near-zero output that quantizes to all zeros: the noise equals the signal, 0 dB (not ~156 dB)."""
    ref = torch.full((16,), 1e-20)
    assert sqnr(ref, torch.zeros(16)) == pytest.approx(0.0, abs=1e-9)
    assert sqnr(ref, ref * 0.5) == pytest.approx(20 * math.log10(2), abs=1e-6)


def test_minus_inf_survives_json_and_html():
    r = Report("x", output_sqnr=-math.inf)
    assert r.to_dict()["output_sqnr"] == "-inf"
    cell = db_cell(-math.inf)
    assert cell.html == "-inf" and cell.sort < -1e8
    assert sqnr_colour(-math.inf) == sqnr_colour(0.0)   # red, not green


def _padded_batches(pad_ids_seed):
    """TinyBlock's batches (row 0 padded from position 5), the padded ids drawn from ``pad_ids_seed``."""
    g, pad = torch.Generator().manual_seed(2), torch.Generator().manual_seed(pad_ids_seed)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 50, (3, 7), generator=g)
        ids[0, 5:] = torch.randint(0, 50, (2,), generator=pad)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 5:] = 0
        batches.append((ids, mask))
    return batches


class RenamedMask(nn.Module):
    """TinyBlock whose mask input is called ``m``: not recognised, every position counts."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, ids, m):
        return self.block(ids, m)


def _cumulative(model, batches):
    q = qcompile.quantize(model, "w8", batches[0], calibration=batches)   # weight-only: data only reports
    return q.report, {r.layer.removeprefix("block."): r.cumulative_sqnr for r in q.report.layers}


def test_cumulative_sqnr_leaves_out_padded_positions():
    """Changing only the token ids at padded positions changes the hidden states there; the masked
    cumulative SQNR does not move, the unmasked one (a model whose mask is not recognised) does."""
    torch.manual_seed(0)
    model = TinyBlock().eval()
    report_a, cum_a = _cumulative(model, _padded_batches(10))
    report_b, cum_b = _cumulative(model, _padded_batches(11))
    assert report_a.cumulative_sqnr_mask == "mask"
    for layer in ("emb", "q", "up", "down", "head"):
        assert cum_a[layer] == pytest.approx(cum_b[layer], abs=1e-6), layer
    plain_a, all_a = _cumulative(RenamedMask(model), _padded_batches(10))
    _, all_b = _cumulative(RenamedMask(model), _padded_batches(11))
    assert plain_a.cumulative_sqnr_mask is None
    assert any(abs(all_a[k] - all_b[k]) > 1e-3 for k in ("emb", "up", "down", "head"))


def test_float_or_non_binary_mask_is_not_used():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    batches = _padded_batches(10)
    with_float_mask = [(ids, mask.float()) for ids, mask in batches]

    class FloatMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = model

        def forward(self, ids, mask):
            return self.block(ids, mask.long())

    q = qcompile.quantize(FloatMask().eval(), "w8", with_float_mask[0], calibration=with_float_mask)
    assert q.report.cumulative_sqnr_mask is None
