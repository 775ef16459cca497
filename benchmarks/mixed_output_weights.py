"""SmolLM2-135M: how much each decoder Linear's own error reaches the logits (issue 25, an experiment
beside the GPTQ-aware cost). For every Linear, the model runs on a few calibration tokens with only
that layer's weight rounded to ``--probe`` (round-to-nearest, the candidate's own spec) and the
logits' noise-to-signal ratio is divided by the same perturbation's layer-local Hessian proxy: a
per-layer *transfer factor* (one forward pass per layer, not per layer and candidate). A copy of the
GPTQ-cost table is written with ``gptq_proxy`` multiplied by each layer's factor, so that
``benchmarks/mixed_pareto.py --cost gptq --table <that copy>`` allocates on the predicted *logit*
noise after GPTQ::

    PYTHONPATH=. python benchmarks/mixed_output_weights.py \\
        --table benchmarks/results/mixed_smollm2_gptq_sensitivity.json \\
        --out benchmarks/results/mixed_smollm2_gptqout_sensitivity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_quality import recipe_for


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", default="w4-g64-fp16", help="the candidate whose rounding probes each layer")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    from qcompile.analyze import SensitivityTable, fake_quant_weight
    from qcompile.eval.perplexity import calibration_windows
    from qcompile.models.smollm2 import load_smollm2
    from qcompile.scope import resolve_layer_config

    torch.set_num_threads(1)
    data = json.loads(Path(args.table).read_text())
    table = SensitivityTable.from_dict(data)
    lm = load_smollm2()
    model = lm.model.eval()
    ids = calibration_windows(lm.tokenizer, n=1, length=args.tokens)[0][0]
    probe = recipe_for(args.probe)
    modules = dict(model.named_modules())
    factors, t0 = {}, time.perf_counter()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
        energy = float(ref.pow(2).mean())
        for layer in table.layers:
            w = modules[layer].weight
            cfg = resolve_layer_config(probe, layer, **table.sites[layer])[0]
            original = w.detach().clone()
            wq, _ = fake_quant_weight(original, cfg.weight)
            w.data.copy_(wq)
            try:
                out = model(ids, use_cache=False).logits.float()
            finally:
                w.data.copy_(original)
            noise = float((out - ref).pow(2).mean()) / energy
            factors[layer] = noise / max(table.get(layer, args.probe).hessian_proxy, 1e-30)
    elapsed = time.perf_counter() - t0
    for r in data["rows"]:
        r["gptq_proxy"] = r["gptq_proxy"] * factors[r["layer"]]
    data["transfer_factors"] = {"probe": args.probe, "tokens": args.tokens, "seconds": elapsed, "factors": factors}
    Path(args.out).write_text(json.dumps(data, indent=1))
    top = sorted(factors.items(), key=lambda kv: -kv[1])
    print(f"{len(factors)} layers in {elapsed:.0f} s; largest factors:", top[:8], "smallest:", top[-4:])


if __name__ == "__main__":
    main()
