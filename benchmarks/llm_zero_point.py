"""Why round-to-nearest ``q4_k_m`` loses so much on SmolLM2 (docs/llm.md, "Zero point or minimum"):
the relative weight error ``‖W - Ŵ‖² / ‖W‖²`` over the 210 decoder Linear weights, 4-bit groups of
32 (the Q4_1 grid the shipped weights sit on) and 64, for each way of storing a group's offset:

* ``zp``: qcompile's asymmetric integer zero point, ``x = s (q - z)``, ``z`` an integer code
  (float32 scales, then int8 double-quantized scales as ``q4_k_m`` stores them);
* ``min``: llama.cpp's Q4_1 / K-quant form, ``x = d q + m`` with a float minimum ``m``
  (float32, float16 as Q4_1 stores it, and both ``d`` and ``m`` double-quantized to int8 codes
  with :func:`qcompile.formats.scale_grid`, the same code ``q4_k_m`` uses for its scales).

Weights only, no calibration, no perplexity (a few seconds per row)::

    PYTHONPATH=. python benchmarks/llm_zero_point.py --out benchmarks/results/llm_zero_point.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qcompile.formats import double_quantize_scales, get_format, rebuild_scales, scale_grid
from qcompile.models.smollm2 import load_smollm2

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _groups(w, g):
    return w.float().reshape(w.shape[0], -1, g)


def zero_point_form(w, g, scale_dtype):
    """qcompile's form: min/max over the range widened to include 0, integer zero point."""
    fmt = get_format("uint4")
    x = _groups(w, g)
    s, z = fmt.choose_qparams(x.amin(-1), x.amax(-1), False)
    s = scale_grid(s, scale_dtype).unsqueeze(-1)
    z = z.float().unsqueeze(-1)
    q = (torch.round(x / s) + z).clamp(0, 15)
    return ((q - z) * s).reshape(w.shape)


def min_form(w, g, scale_dtype):
    """llama.cpp's form: ``x = d q + m``, ``m`` the group minimum (no widening to 0)."""
    x = _groups(w, g)
    lo, hi = x.amin(-1), x.amax(-1)
    d = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).eps)
    if scale_dtype == "float16":
        d, lo = d.half().float(), lo.half().float()
    elif scale_dtype == "int8":
        # the minimum may be negative: double-quantized like the scales, without their > 0 floor
        d, lo = scale_grid(d, scale_dtype), rebuild_scales(*double_quantize_scales(lo), lo.shape, floor=None)
    d, m = d.unsqueeze(-1), lo.unsqueeze(-1)
    q = torch.round((x - m) / d).clamp(0, 15)
    return (d * q + m).reshape(w.shape)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/llm_zero_point.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_smollm2()
    weights = [m.weight.detach() for name, m in lm.model.named_modules() if name.endswith(LINEARS)]
    rows = []
    for g in (32, 64):
        for form, fn, dtypes in (("zp", zero_point_form, ("float32", "int8")),
                                 ("min", min_form, ("float32", "float16", "int8"))):
            for dt in dtypes:
                num = den = 0.0
                exact = total = 0
                for w in weights:
                    w_hat = fn(w, g, dt)
                    num += float((w - w_hat).double().pow(2).sum())
                    den += float(w.double().pow(2).sum())
                    exact += int(((w - w_hat).abs() <= 1e-6 * w.abs().amax()).sum())
                    total += w.numel()
                row = {"group": g, "form": form, "scale_dtype": dt, "rel_error": num / den,
                       "exact_fraction": exact / total}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"linears": len(weights), "rows": rows}, indent=1))
    return True


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
