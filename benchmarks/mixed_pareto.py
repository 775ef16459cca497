"""SmolLM2-135M: mixed precision searched by :func:`qcompile.mixed.allocate` against uniform recipes,
perplexity vs bits per Linear weight (docs/mixed.md, issue 9).

Candidates: int8 per channel, uint4 / uint3 / uint2 in groups of 64, all with float16 scales, all
solved by GPTQ (the weight algorithm of the LLM table). The sensitivity table is measured once on
one calibration window; each budget's allocation becomes a concrete recipe (one override per
Linear) that is quantized and scored with the perplexity protocol of ``benchmarks/llm_quality.py``.
Every row is written to the JSON file as soon as it is measured; rows already there are skipped, so
an interrupted run resumes::

    PYTHONPATH=. python benchmarks/mixed_pareto.py --out benchmarks/results/mixed_smollm2.json \\
        --budgets 4.5 3.5 --uniform w3-g64-gptq-fp16
    PYTHONPATH=. python benchmarks/mixed_pareto.py --render benchmarks/results/mixed_smollm2.json \\
        --png docs/img/mixed_pareto.png            # the plot, and the markdown table on stdout

``--cost gptq`` allocates on each layer's own output error after GPTQ (the weight algorithm these
rows are solved with); ``--cost hessian`` (the default) allocates on the layer-local Hessian proxy: the model-output
SQNR of 210 Linears x 4 candidates needs 840 forward passes of the whole model, too slow on the
shared 2-core machine this was measured on (see docs/mixed.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_quality import linear_bpw, recipe_for  # the LLM table's recipes and its bits-per-weight count

CANDIDATES = ["w8-fp16", "w4-g64-fp16", "w3-g64-fp16", "w2-g64-fp16"]
# uniform reference rows measured by benchmarks/llm_quality.py (docs/llm.md), same protocol
LLM_TABLE = sorted(Path(__file__).parent.glob("results/llm_quality_*.json"))


def decoder_linears(model) -> list[str]:
    """The 210 decoder Linears the bits-per-weight figure counts (the tied head excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def searched_recipe(table, recipes: dict, bpw: float, cost: str):
    """The allocation at ``bpw`` as a concrete recipe with GPTQ, and the allocation itself."""
    from qcompile.mixed import allocate
    from qcompile.recipe import WeightAlgorithmConfig

    alloc = allocate(table, {"bits_per_weight": bpw}, cost=cost)
    recipe = dataclasses.replace(alloc.recipe(recipes, name=f"auto-{bpw:g}"),
                                 weight_algorithm=WeightAlgorithmConfig("gptq"))
    return recipe.validate(), alloc


def run(args) -> None:
    import qcompile
    from qcompile.analyze import SensitivityTable
    from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, perplexity
    from qcompile.models.smollm2 import load_smollm2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    protocol = PerplexityProtocol()
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {
        "protocol": dataclasses.asdict(protocol), "calibration_windows": args.calibration_windows,
        "candidates": CANDIDATES, "cost": args.cost, "torch": torch.__version__, "rows": []}
    done = {r["recipe"] for r in state["rows"]}

    def emit(row):
        state["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(state, indent=1))

    lm = load_smollm2()
    cal = calibration_windows(lm.tokenizer, n=args.calibration_windows, length=protocol.window)
    recipes = {name: recipe_for(name) for name in CANDIDATES}
    table_path = Path(args.table)
    if table_path.exists():
        table = SensitivityTable.from_dict(json.loads(table_path.read_text()))
    else:
        t = time.perf_counter()
        table = qcompile.analyze(lm.model, list(recipes.values()), cal[0], cal[:args.analyze_windows],
                                 example_kwargs={"use_cache": False}, max_samples=args.analyze_windows,
                                 layers=decoder_linears(lm.model), model_output=args.cost == "output",
                                 gptq=args.cost == "gptq", progress=True)
        state["analyze_s"] = time.perf_counter() - t
        table.to_json(table_path)
        print(f"analyze: {state['analyze_s']:.0f} s", flush=True)
    if args.heatmap:
        table.to_png(args.heatmap)

    def measure(name, recipe, extra):
        t = time.perf_counter()
        q = qcompile.quantize(lm.model, recipe, cal[0], calibration=cal, example_kwargs={"use_cache": False},
                              report_samples=1)
        tq = time.perf_counter() - t
        res = perplexity(q, lm.tokenizer, protocol)
        bpw, _ = linear_bpw(q.report)
        # the logits' SQNR on one calibration window (report_samples=1): what predicted_sqnr_db predicts
        emit({"recipe": name, "ppl": res.perplexity, "mb": res.model_bytes / 1e6, "bpw": bpw, "quantize_s": tq,
              "measured_sqnr_db": q.report.output_sqnr, **extra})
        if args.save_recipes:
            Path(args.save_recipes).mkdir(parents=True, exist_ok=True)
            recipe.save(Path(args.save_recipes) / f"{name}.yaml")

    for item in args.order:
        kind, _, value = item.partition(":")
        if kind == "auto":
            bpw = float(value)
            name = f"auto-{bpw:g}"
            if name in done:
                continue
            recipe, alloc = searched_recipe(table, recipes, bpw, args.cost)
            counts = {c: list(alloc.choice.values()).count(c) for c in CANDIDATES}
            measure(name, recipe, {"kind": "searched", "budget_bpw": bpw, "predicted_bpw": alloc.bits_per_weight,
                                   "cost": args.cost, "predicted_noise": alloc.predicted_noise,
                                   "predicted_sqnr_db": alloc.predicted_sqnr_db,
                                   "layers_per_candidate": counts, "solver": alloc.solver,
                                   "choice": alloc.choice})
        elif item not in done:
            measure(item, recipe_for(item), {"kind": "uniform"})


def _rows(paths) -> list[dict]:
    rows, seen = [], set()
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            if r["recipe"] not in seen and r["recipe"] != "float":
                seen.add(r["recipe"])
                rows.append({**r, "kind": r.get("kind", "uniform"), "source": Path(path).name})
    return rows


def render(path: str, png: str) -> str:
    """The plot (bits per Linear weight vs perplexity, searched front and uniform rows) and the
    markdown table with, for each searched row, the best uniform GPTQ/RTN row at no more bits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows([path, *LLM_TABLE])
    floats = [r["ppl"] for p in LLM_TABLE for r in json.loads(p.read_text())["rows"] if r["recipe"] == "float"]
    searched = sorted((r for r in rows if r["kind"] == "searched"), key=lambda r: r["bpw"])
    uniform = [r for r in rows if r["kind"] == "uniform" and not r["recipe"].startswith("gguf")
               and r["recipe"] not in ("fp8-e4m3", "w4-g64-float-head")]
    gguf = [r for r in rows if r["recipe"].startswith("gguf")]
    # the zoom shows every searched row and the GPTQ/AWQ rows up to 60 (RTN int3/int2 are far above)
    top = min(60.0, max(r["ppl"] for r in searched + uniform if "gptq" in r["recipe"] or r["kind"] == "searched")) + 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    for ax, zoom in zip(axes, (False, True)):
        ax.plot([r["bpw"] for r in searched], [r["ppl"] for r in searched], "o-", color="C3", label="searched (GPTQ)",
                zorder=3)
        for r in uniform:
            gptq = "gptq" in r["recipe"] or "awq" in r["recipe"]
            ax.plot(r["bpw"], r["ppl"], "s" if gptq else "^", color="C0" if gptq else "C7")
        for r in gguf:
            ax.plot(r["bpw"], r["ppl"], "x", color="C2")
        if zoom:  # labels only where they can be read
            for i, r in enumerate(searched + uniform + gguf):
                if r["ppl"] < top:
                    ax.annotate(r["recipe"], (r["bpw"], r["ppl"]), textcoords="offset points",
                                xytext=(5, 5 if i % 2 else -10), fontsize=7)
            ax.set_ylim(floats[0] - 0.5 if floats else None, top)
            ax.set_xlim(2.8, 8.3)
            ax.set_title(f"zoom: perplexity < {top:.0f}", fontsize=9)
        else:
            ax.plot([], [], "s", color="C0", label="uniform, GPTQ/AWQ")
            ax.plot([], [], "^", color="C7", label="uniform, round-to-nearest")
            ax.plot([], [], "x", color="C2", label="llama.cpp reference (gguf)")
            ax.set_yscale("log")
            ax.set_ylim(floats[0] * 0.95 if floats else None, 150)  # w2-g64 RTN (~5e5) is off the chart
            ax.set_title("SmolLM2-135M: searched mixed precision vs uniform", fontsize=9)
            for r in searched + uniform:
                if top <= r["ppl"] < 150:
                    ax.annotate(r["recipe"], (r["bpw"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if floats:
            ax.axhline(floats[0], color="k", lw=0.8, ls="--", label=f"float {floats[0]:.2f}")
        ax.set_xlabel("bits per Linear weight (codes + scales + zero points)")
        ax.set_ylabel("perplexity (8 x 512 held-out tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)

    lines = [("| recipe | bits per Linear weight | perplexity | layers int8 / int4 / int3 / int2 | "
              "best uniform at ≤ these bits (± 0.001) | its perplexity |"), "| --- | ---: | ---: | --- | --- | ---: |"]
    for r in searched:
        # equal to the third decimal counts as equal: a budget of 4.375 lands a few 1e-5 under 4.375
        ref = [u for u in uniform if u["bpw"] <= r["bpw"] + 1e-3]
        best = min(ref, key=lambda u: u["ppl"]) if ref else None
        counts = " / ".join(str(v) for v in r["layers_per_candidate"].values())
        lines.append(f"| {r['recipe']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {counts} | "
                     f"{best['recipe'] if best else '–'} ({best['bpw']:.3f}) | {best['ppl']:.2f} |" if best else
                     f"| {r['recipe']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {counts} | – | – |")
    lines += ["", "| uniform recipe | bits per Linear weight | perplexity | measured in |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {u['recipe']} | {u['bpw']:.3f} | {u['ppl']:.2f} | {u['source']} |"
              for u in sorted(uniform + gguf, key=lambda u: u["bpw"])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/mixed_smollm2.json")
    ap.add_argument("--table", default="benchmarks/results/mixed_smollm2_sensitivity.json",
                    help="the sensitivity table: read when it exists, else measured and written")
    ap.add_argument("--heatmap", default=None, help="write the sensitivity heat map (PNG) here")
    ap.add_argument("--order", nargs="*", default=["auto:4.5", "w3-g64-gptq-fp16", "auto:3.5", "auto:5.5",
                                                    "auto:3.0", "auto:4.0", "w2-g64-gptq-fp16"],
                    help="rows to measure in this order: auto:<bits per weight> or a uniform recipe name")
    ap.add_argument("--cost", default="hessian", choices=["hessian", "output", "gptq"])
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--analyze-windows", type=int, default=1)
    ap.add_argument("--save-recipes", default=None, help="write each measured recipe as YAML into this folder")
    ap.add_argument("--render", default=None, help="render the plot and the markdown table from this JSON and exit")
    ap.add_argument("--png", default="docs/img/mixed_pareto.png")
    args = ap.parse_args(argv)
    if args.render:
        print(render(args.render, args.png))
        return
    run(args)


if __name__ == "__main__":
    main()
