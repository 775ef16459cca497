"""The reference backend: runs the explicit quantize/dequantize graph in PyTorch. It defines the
numerics every other backend is checked against, and it is what ``quantize()`` returns."""
from __future__ import annotations

from ...formats import FORMATS
from ...spec import GRANULARITIES
from ..base import Capabilities


class ReferenceBackend:
    id = "reference"
    capabilities = Capabilities(formats=frozenset(FORMATS), granularities=frozenset(GRANULARITIES),
                                ops=frozenset({"linear", "conv", "embedding"}), dynamic_activations=True)

    def lower(self, qmodel, **options):
        if options:
            raise TypeError(f"the reference backend takes no options, got {sorted(options)}")
        return qmodel
