"""The reference backend: runs the explicit quantize/dequantize graph in PyTorch. It defines the
numerics every other backend is checked against, and it is what ``quantize()`` returns."""
from __future__ import annotations

from ...formats import FORMATS
from ..base import ACTIVATION_MODES, WEIGHT_GRANULARITIES, Capabilities


class ReferenceBackend:
    id = "reference"
    # every row of the format table, every granularity: it runs the canonical ops themselves
    capabilities = Capabilities(
        weights={fmt: WEIGHT_GRANULARITIES for fmt in FORMATS},
        activations={fmt: ACTIVATION_MODES for fmt in FORMATS},
        float_zero_points=True, ops={"linear", "conv", "embedding"},
        timing_missing="latency budgets on the reference backend: it is the PyTorch Q/DQ ground truth, not a "
                       "deployment runtime; use backend='onnx'")

    def lower(self, qmodel, **options):
        if options:
            raise TypeError(f"the reference backend takes no options, got {sorted(options)}")
        return qmodel
