"""The peers qcompile's CPU backends are measured against, built the way their users build them.

* :func:`torch_compiled` — the float model under ``torch.compile`` (inductor, ``freezing=True``).
* :func:`torchao_pt2e_x86` — torchao's PT2E int8 path for x86: ``torch.export``, the
  ``X86InductorQuantizer`` default config (static u8 activations per tensor, s8 weights per
  channel), calibration, ``convert_pt2e``, then ``torch.compile`` with freezing so inductor lowers
  the Q/DQ pattern to oneDNN int8 kernels (the path torchao documents for x86 CPUs).

Both are compiled for one fixed input shape (torch.compile specializes on it), so a benchmark
builds one per batch size and times the first call (the compile) separately from the rest.
"""
from __future__ import annotations

import time

import torch


def _frozen_compile(model):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True   # weights become constants: inductor can pack them for oneDNN
    return torch.compile(model)


def torch_compiled(model: torch.nn.Module, example: tuple):
    """``(compiled, compile_seconds)``: float ``model`` under inductor with freezing, compiled on
    ``example`` (its first call)."""
    compiled = _frozen_compile(model)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*example)
    return compiled, time.perf_counter() - start


def torchao_pt2e_x86(model: torch.nn.Module, example: tuple, calibration):
    """``(compiled, seconds)``: ``model`` quantized by torchao's PT2E ``X86InductorQuantizer``
    (default static config), calibrated on the batches of ``calibration`` (tuples of the model's
    positional inputs), compiled on ``example``. ``seconds`` is export + calibration + compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    start = time.perf_counter()
    with torch.no_grad():
        # captured on a calibration batch (size > 1: a size-1 dim specializes) with every dim
        # dynamic, so calibration batches of any shape and the example all pass through it
        calibration = list(calibration)
        dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in calibration[0])
        captured = torch.export.export(model, tuple(calibration[0]), dynamic_shapes=dynamic).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(captured, quantizer)
        for batch in calibration:
            prepared(*batch)
        converted = convert_pt2e(prepared)
        compiled = _frozen_compile(converted)
        compiled(*example)
    return compiled, time.perf_counter() - start
