"""How far float rounding alone moves MiniLM w8a8: the reference graph run again with LayerNorm,
softmax and GELU computed in float64 (cast back to float32), compared to the plain reference by
cosine. An int8 model flips codes wherever a float op rounds differently next to a rounding
boundary, so a backend whose float ops are *more* accurate than torch's float32 still differs from
the reference by about this much: a floor for "cosine vs reference" of any backend. Run::

    python benchmarks/minilm_rounding_sensitivity.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

aten = torch.ops.aten
F64_OPS = {"layer_norm": aten.layer_norm.default, "softmax": aten.softmax.int, "gelu": aten.gelu.default}


class Float64Ops(torch.fx.Interpreter):
    """Runs a graph with the ops in ``which`` computed in float64, their outputs cast back to float32."""

    def __init__(self, gm, which):
        super().__init__(gm)
        self.which = which

    def call_function(self, target, args, kwargs):
        if target not in self.which:
            return super().call_function(target, args, kwargs)
        up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return target(*up, **kwargs).float()


def main():
    torch.set_num_threads(1)
    from test_minilm import _calibration_batches, _fixed_inputs, _quantize

    from qcompile.models import load_minilm
    from qcompile.report import cosine

    minilm = load_minilm()
    qmodel = _quantize(minilm, _calibration_batches(minilm))
    cases = [("same graph, no change", set()), ("all three in float64", set(F64_OPS.values()))]
    cases += [(f"{name} in float64", {op}) for name, op in F64_OPS.items()]
    for batch in (1, 32):
        ids, mask = _fixed_inputs(minilm, batch)
        with torch.inference_mode():
            ref = qmodel(ids, mask)
            args, kwargs = qmodel.binder.call((ids, mask), {})
            flat = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for name, which in cases:
                out = Float64Ops(qmodel.graph_module, which).run(*flat)
                out = out[0] if isinstance(out, (tuple, list)) else out
                print(f"batch {batch:2d}  {name:26s} cosine vs reference {float(cosine(ref, out)):.6f}", flush=True)


if __name__ == "__main__":
    main()
