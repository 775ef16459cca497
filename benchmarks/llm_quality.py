"""The SmolLM2-135M quality table (docs/llm.md): perplexity, size and bits per weight per recipe,
next to llama.cpp's reference quantizers (the ``gguf`` package) applied to the same Linear weights.

``--llamacpp Q4_K_M ...`` adds llama.cpp's own quantizer (k-quants included) through
``llama-cpp-python`` (the ``gguf`` extra; it compiles llama.cpp); ``mb`` is
then the GGUF file's size.

One protocol, one run, one process (one thread)::

    PYTHONPATH=. python benchmarks/llm_quality.py --out out/llm_quality.json
    PYTHONPATH=. python benchmarks/llm_quality.py --markdown out/llm_quality.json   # the docs table

Protocol: :class:`qcompile.eval.perplexity.PerplexityProtocol` defaults (8 disjoint windows of 512
tokens of held-out standard-library docstrings); calibration for every recipe: 8 windows of 512
tokens from the calibration split. Bits per weight count codes, scales and zero points of the 210
decoder Linear weights (the tied embedding / lm_head is reported in the size, not in bpw).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

import qcompile
from qcompile.eval.perplexity import PerplexityProtocol, calibration_windows, perplexity
from qcompile.models.smollm2 import load_smollm2
from qcompile.recipe import WeightAlgorithmConfig

RECIPES = ["w8", "w4-g64", "w4-g128", "w4-g64-gptq", "w4-g64-awq", "w4-g128-gptq", "w4-g128-awq", "nf4",
           "w3-g64", "w3-g64-gptq", "w2-g64", "w2-g64-gptq", "fp8-e4m3", "q4_k_m"]
GGUF_TYPES = ["Q8_0", "Q5_0", "Q4_0"]
LLAMACPP_TYPES = ["Q6_K", "Q5_0", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]
LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def recipe_for(name: str):
    """Presets by name, exactly as a user gets them (every preset keeps the tied head on the int8
    embedding, so the rows differ only in their Linear weights); ``w3-g64-gptq``/``w2-g64-gptq``
    are the presets with GPTQ switched on (``w4-g32``: the w4-g64 preset at groups of 32); ``<preset>-float-head`` keeps the embedding and the tied
    head float (the setting of the issue's own measurements); ``<name>-fp16`` stores the Linear
    weights' scales as float16; ``<name>-min`` stores their zero points as double-quantized floats
    (``zero_point_dtype: int8``, llama.cpp's scale + minimum form); ``<preset>-norot``: a rotated
    preset (``w4a8-rot``) with the rotation off, everything else equal; ``<preset>-r1`` / ``-r12``:
    only the residual stream's rotation (R1) / and the per-head V/O rotation (R2), no online Hadamard."""
    for suffix, per_head in (("-r1", False), ("-r12", True)):
        if name.endswith(suffix):   # a rotated preset with fewer of QuaRot's rotations
            base = recipe_for(name[: -len(suffix)])
            return dataclasses.replace(base, name=name, rotation=dataclasses.replace(base.rotation, per_head=per_head,
                                                                                     online=False))
    if name.endswith("-norot"):   # the rotated preset with the rotation switched off (same specs)
        base = recipe_for(name[: -len("-norot")])
        return dataclasses.replace(base, name=name, rotation=None)
    if name.endswith("-min"):   # the recipe with double-quantized float zero points (x = s*q + min)
        base = recipe_for(name[: -len("-min")])

        def with_min(cfg):
            if cfg is None or cfg.weight is None or cfg.weight.symmetric:
                return cfg
            return dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, zero_point_dtype="int8"))
        return dataclasses.replace(base, name=name, default=with_min(base.default),
                                   overrides={k: with_min(v) for k, v in base.overrides.items()})
    if name.endswith("-fp16"):   # the preset with float16 scales (QuantSpec.scale_dtype)
        base = recipe_for(name[: -len("-fp16")])
        w = dataclasses.replace(base.default.weight, scale_dtype="float16")
        return dataclasses.replace(base, name=name, default=dataclasses.replace(base.default, weight=w))
    if name.endswith("-float-head"):   # the issue author's setting: embedding and tied head float
        base = qcompile.Recipe.preset(name[: -len("-float-head")])
        return dataclasses.replace(base, name=name, embedding=None, keep_float=("lm_head",))
    if name.endswith("-gptq") and name not in qcompile.recipes():
        base = recipe_for(name[: -len("-gptq")])
        return dataclasses.replace(base, name=name, weight_algorithm=WeightAlgorithmConfig("gptq"))
    m = re.fullmatch(r"w(\d)-g(\d+)", name)
    if m and name not in qcompile.recipes():   # any other width/group: w4-g64 with that spec
        base = qcompile.Recipe.preset("w4-g64")
        w = dataclasses.replace(base.default.weight, format=f"uint{m[1]}", group_size=int(m[2]))
        return dataclasses.replace(base, name=name, default=dataclasses.replace(base.default, weight=w))
    return qcompile.Recipe.preset(name)


def linear_bpw(report) -> tuple[float, int]:
    """Bits per weight over the decoder Linear weights (codes + scales + zero points)."""
    bits = numel = 0
    for row in report.layers:
        if row.op == "linear" and row.layer != "lm_head" and row.weight_bytes_float:
            bits += 8 * row.weight_bytes_quantized
            numel += row.weight_bytes_float // 4
    return bits / numel, numel


def gguf_model(model, type_name: str):
    """A copy of ``model`` whose decoder Linear weights went through gguf's quantize/dequantize of
    ``type_name``; the tied embedding/head through Q8_0 (int8 in the qcompile rows)."""
    import gguf
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    m = copy.deepcopy(model)
    bits = numel = 0
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                w = mod.weight.detach().numpy().astype(np.float32)
                q = gguf.quants.quantize(w, qtype)
                mod.weight.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)))
                bits += 8 * q.nbytes
                numel += w.size
        emb = m.model.embed_tokens.weight
        q8 = gguf.GGMLQuantizationType.Q8_0
        emb.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(emb.numpy(), q8), q8)))
    return m, bits / numel


def llamacpp_quantize(src: Path, type_name: str, out_dir: Path) -> Path:
    """llama.cpp's own quantizer (``llama-cpp-python``'s ``llama_model_quantize``, one thread) from
    the shipped GGUF to ``type_name`` (``Q4_K_M`` ...); ``allow_requantize`` because the source is
    Q4_1 (its dequantized weights are exactly the float model every row starts from)."""
    import ctypes

    import llama_cpp

    out = out_dir / f"SmolLM2-135M-Instruct.{type_name}.gguf"
    if not out.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
        params.allow_requantize = True
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")
    return out


def gguf_linear_bits(path: Path) -> tuple[float, dict, str]:
    """Bits per weight spent on the 210 decoder Linear weights of a GGUF file (tensor bytes / elements,
    read with the ``gguf`` package), the count of each tensor type among them, and the embedding's."""
    import gguf

    bits = numel = 0
    types: dict = {}
    emb = "?"
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "token_embd.weight":
            emb = t.tensor_type.name
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_TENSORS:
            bits += 8 * int(t.n_bytes)
            numel += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return bits / numel, types, emb


def llamacpp_model(type_name: str, out_dir: Path):
    """The model as transformers loads llama.cpp's ``type_name`` file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    from qcompile.models.smollm2 import GGUF_NAME, model_dir

    path = llamacpp_quantize(model_dir() / GGUF_NAME, type_name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.config.use_cache = False
    bpw, types, emb = gguf_linear_bits(path)
    return model.eval(), bpw, types, emb, path.stat().st_size


def markdown(paths) -> str:
    """The docs table from one or more JSON outputs (rows in file order, float once)."""
    rows, seen = [], set()
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["recipe"] not in seen:
                seen.add(row["recipe"])
                rows.append(row)
    base = next(r["ppl"] for r in rows if r["recipe"] == "float")
    out = ["| recipe | size (MB) | bits per Linear weight | perplexity | Δ vs float | quantize (s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mb = "–" if r.get("mb") is None else f"{r['mb']:.1f}"
        tq = f"{r['quantize_s']:.0f}" if r.get("quantize_s") else "–"
        out.append(f"| {r['recipe']} | {mb} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['ppl'] - base:+.2f} | {tq} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/llm_quality.json")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--gguf", nargs="*", default=GGUF_TYPES)
    ap.add_argument("--llamacpp", nargs="*", default=[],
                    help="llama.cpp's own quantizer (needs llama-cpp-python: the gguf extra), e.g. "
                         + " ".join(LLAMACPP_TYPES))
    ap.add_argument("--llamacpp-dir", default="out/llamacpp", help="where the quantized GGUF files are written")
    ap.add_argument("--no-float", action="store_true", help="skip the float row (measured by another run)")
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--markdown", nargs="*", help="print the docs table from these JSON outputs and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return True
    torch.set_num_threads(1)
    torch.manual_seed(0)
    protocol = PerplexityProtocol()
    lm = load_smollm2()
    cal = calibration_windows(lm.tokenizer, n=args.calibration_windows, length=protocol.window)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"protocol": dataclasses.asdict(protocol),
                                              "calibration_windows": args.calibration_windows,
                                              "torch": torch.__version__, "rows": rows}, indent=1))

    t = time.perf_counter()
    if not args.no_float:
        res = perplexity(lm.model, lm.tokenizer, protocol)
        emit({"recipe": "float", "ppl": res.perplexity, "mb": res.model_bytes / 1e6, "bpw": 32.0,
              "eval_s": time.perf_counter() - t})
    for name in args.recipes:
        recipe = recipe_for(name)
        t = time.perf_counter()
        q = qcompile.quantize(lm.model, recipe, cal[0], calibration=cal, example_kwargs={"use_cache": False},
                              report_samples=1)
        tq = time.perf_counter() - t
        t = time.perf_counter()
        res = perplexity(q, lm.tokenizer, protocol)
        bpw, _ = linear_bpw(q.report)
        emit({"recipe": name, "ppl": res.perplexity, "mb": res.model_bytes / 1e6, "bpw": bpw,
              "quantize_s": tq, "algorithm_s": q.report.timings_s.get(recipe.weight_algorithm.method)
              if recipe.weight_algorithm else 0.0, "eval_s": time.perf_counter() - t})
        del q
    for type_name in args.gguf:
        m, bpw = gguf_model(lm.model, type_name)
        res = perplexity(m, lm.tokenizer, protocol)
        emit({"recipe": f"gguf {type_name}", "ppl": res.perplexity, "mb": None, "bpw": bpw})
        del m
    for type_name in args.llamacpp:
        import llama_cpp

        t = time.perf_counter()
        m, bpw, types, emb, nbytes = llamacpp_model(type_name, Path(args.llamacpp_dir))
        tq = time.perf_counter() - t
        res = perplexity(m, lm.tokenizer, protocol)
        emit({"recipe": f"llama.cpp {type_name}", "ppl": res.perplexity, "mb": nbytes / 1e6, "bpw": bpw,
              "linear_tensor_types": types, "embedding_type": emb, "llama_cpp_python": llama_cpp.__version__,
              "quantize_and_load_s": tq})
        del m
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
