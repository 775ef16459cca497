"""The issue's real task, asserted: a conv-BN-ReLU x2 CNN on scikit-learn's digits (fixed split),
qcompile QAT (LSQ from the PTQ start) recovers >= 95 % of the w2a8 PTQ gap and lands within 0.5
points of float at w4a4. One data order (the docs table averages three); about 40 s."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="load_digits needs scikit-learn (the 'dev' extra)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import qat_digits  # noqa: E402


def test_digits_qat_meets_the_issue_targets(capsys):
    rows = {r["preset"]: r for r in qat_digits.main(["--presets", "w2a8,w4a4", "--variants", "lsq"])}
    w2, w4 = rows["w2a8"], rows["w4a4"]
    assert w2["float"] >= 98.5
    assert w2["ptq"] < 90                      # 2-bit weights lose a lot without training
    assert w2["recovered"][0] >= 95.0, w2
    assert w4["float"] - w4["lsq"][0] <= 0.5, w4
