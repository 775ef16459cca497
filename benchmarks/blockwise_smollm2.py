"""Layer-by-layer quantization (:func:`qcompile.blockwise.quantize_directory`) of SmolLM2-135M
against the whole-model path (:func:`qcompile.quantize`) on the same calibration: the quantized
weights compared layer by layer (codes, scales, zero points), the logits on one window, and the
perplexity of both (docs/llm.md protocol, fewer windows).

Run::

    python benchmarks/blockwise_smollm2.py --recipe w4-g64-gptq --windows 4 --eval-tokens 2048
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def quantized_weights(gm) -> list:
    """(op, codes, scale, zero point) of every quantized weight of a whole-model graph, in order."""
    from qcompile.ops import DEQUANTIZE

    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.ops.aten.embedding.default):
            w = node.args[1] if node.target == torch.ops.aten.linear.default else node.args[0]
            if getattr(w, "target", None) == DEQUANTIZE:
                out.append((node.target.__name__, *[getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a
                                                    for a in w.args[:3]]))
    return out


def program_weights(out: Path) -> list:
    """The same list from a blockwise artifact: table programs hold their codes as buffers."""
    from qcompile.artifact import load_program

    got = []
    for p in json.loads((out / "qcompile.json").read_text())["programs"]:
        ep, _ = load_program(out / p)
        state = ep.state_dict
        tables = [("embedding.default" if "embed_tokens" in k else "linear.default", state[k],
                   state[k[:-1] + "scale"], state.get(k[:-1] + "zero_point")) for k in state if k.endswith(".weight_q")]
        got += tables or quantized_weights(ep.module())
    return got


def save_directory(model, path: Path) -> None:
    """``model`` as a transformers directory (config + one safetensors file). ``save_pretrained``
    refuses a model read from GGUF (the bundled SmolLM2), so the state dict is written directly;
    a tied head's weight is the embedding's and is not stored twice."""
    import copy

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w4-g64-gptq")
    p.add_argument("--windows", type=int, default=4, help="calibration windows of 512 tokens")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens (windows of 512); 0: no perplexity")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first N decoder layers (real weights, a shorter model: codes compared, "
                        "perplexity not meaningful)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import qcompile
    from qcompile.blockwise import quantize_directory
    from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, perplexity
    from qcompile.models.smollm2 import load_smollm2

    lm = load_smollm2()
    lm.model.config.use_cache = False
    if args.layers:
        lm.model.model.layers = lm.model.model.layers[:args.layers]
        lm.model.config.num_hidden_layers = args.layers
    cal = calibration_windows(lm.tokenizer, n=args.windows)
    recipe = dataclasses.replace(qcompile.Recipe.preset(args.recipe), calibration=qcompile.CalibrationConfig(progress=False))
    protocol = PerplexityProtocol(tokens=args.eval_tokens) if args.eval_tokens else None
    result = {"recipe": args.recipe, "calibration_windows": args.windows, "eval_tokens": args.eval_tokens,
              "layers": lm.model.config.num_hidden_layers}
    with tempfile.TemporaryDirectory() as work:
        src, out = Path(work) / "smollm2", Path(work) / "out"
        save_directory(lm.model, src)
        t0 = time.perf_counter()
        quantize_directory(src, recipe, cal, out)
        result["blockwise_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        whole = qcompile.quantize(lm.model, recipe, cal[0], calibration=cal, example_kwargs={"use_cache": False},
                                  report_samples=1)
        result["whole_seconds"] = time.perf_counter() - t0
        ref, got = quantized_weights(whole.graph_module), program_weights(out)
        result["ops_match"] = [r[0] for r in ref] == [g[0] for g in got]
        per_layer = []
        for r, g in zip(ref, got):
            same = [a is None and b is None or torch.equal(a, b) for a, b in zip(r[1:], g[1:])]
            per_layer.append({"op": r[0], "codes": r[1].numel(), "identical_codes": int((r[1] == g[1]).sum()),
                              "scale_equal": same[1], "zero_point_equal": same[2]})
        result["layers_compared"] = len(per_layer)
        result["layers_with_identical_codes"] = sum(x["identical_codes"] == x["codes"] for x in per_layer)
        result["codes_total"] = sum(x["codes"] for x in per_layer)
        result["codes_identical"] = sum(x["identical_codes"] for x in per_layer)
        result["layers_differing"] = [dict(x, index=i) for i, x in enumerate(per_layer)
                                      if x["identical_codes"] != x["codes"] or not (x["scale_equal"] and x["zero_point_equal"])]
        bw = qcompile.load(out)
        ids = cal[0][0]
        with torch.no_grad():
            a, b = bw(ids), whole(ids, use_cache=False).logits
        result["logits_equal"] = bool(torch.equal(a, b))
        result["logits_max_abs_diff"] = float((a - b).abs().max())
        if args.eval_tokens:
            result["ppl_blockwise"] = perplexity(lambda x, **_: bw(x), lm.tokenizer, protocol).perplexity
            result["ppl_whole"] = perplexity(whole, lm.tokenizer, protocol).perplexity
    result["loadavg"] = list(os.getloadavg())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
