"""Peak memory and time of layer-by-layer quantization (:mod:`qcompile.blockwise`) on synthetic
Llama models with real shapes, written as bf16 safetensors shards (random weights: memory and time
behave as for the real model; the quality does not).

Each quantization runs in a fresh child process (one thread), so its peak RSS (Linux ``VmHWM``,
which includes the interpreter, torch and transformers) is its own; the RSS after the imports is
reported beside it. Each step's peak is its own too (the runner resets ``VmHWM`` at every step,
:mod:`qcompile.memory`), with the load average when it ended; the run's peak is the largest. (``getrusage``'s ``ru_maxrss`` would not do: Linux carries the parent's peak,
here the shard writer's, into the child across fork and exec.) The synthetic shards are written tensor by tensor (never the
whole model in memory) and deleted afterwards.

Run::

    python benchmarks/blockwise_memory.py --shapes 1b            # Llama-3.2-1B shapes, ~2.5 GB
    python benchmarks/blockwise_memory.py --shapes 3b            # Llama-3.2-3B shapes, ~6.4 GB
    python benchmarks/blockwise_memory.py --shapes small --layers 4 8 16   # peak vs depth
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
}


def write_synthetic(path: Path, shape: dict, shard_bytes: int = 500 << 20) -> int:
    """Write a random bf16 Llama with ``shape`` as safetensors shards + index + config; returns
    the parameter count. One tensor in memory at a time (plus the shard being filled)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, dtype="bfloat16", **shape)
    with torch.device("meta"):
        names = {k: (tuple(v.shape)) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard, size, weight_map, files, params = {}, 0, {}, [], 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard, size = {}, 0

    for name, shp in names.items():
        t = torch.ones(shp, dtype=torch.bfloat16) if len(shp) == 1 else \
            (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
        params += t.numel()
        if size + t.nbytes > shard_bytes:
            flush()
        shard[name], size = t, size + t.nbytes
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(path))
    return params


CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import qcompile, dataclasses
from qcompile.blockwise import peak_rss_mb, quantize_directory
base = peak_rss_mb()
src, out, windows, seq, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
cal = [(torch.randint(0, vocab, (1, seq), generator=g),) for _ in range(windows)]
recipe = dataclasses.replace(qcompile.Recipe.preset("w4-g64-gptq"), calibration=qcompile.CalibrationConfig(progress=False))
t0 = time.perf_counter()
quantize_directory(src, recipe, cal, out, progress=True)
manifest = json.load(open(out + "/qcompile.json"))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "rss_after_imports_mb": base,
      "peak_rss_mb": manifest["report"]["peak_rss_mb"],
      "steps": [{k: s[k] for k in ("step", "seconds", "peak_rss_mb", "loadavg_1m")} for s in manifest["report"]["steps"]]}))
"""


def run_one(shape: dict, work: Path, windows: int, seq: int) -> dict:
    src, out = work / "model", work / "out"
    t0 = time.perf_counter()
    params = write_synthetic(src, shape)
    disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    write_s = time.perf_counter() - t0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(windows), str(seq),
                           str(shape["vocab_size"])], env=env, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    result.update(params=params, shards_bytes=disk, artifact_bytes=out_bytes, write_seconds=write_s,
                  seconds_per_billion_params=result["seconds"] / (params / 1e9), windows=windows, seq=seq,
                  layers=shape["num_hidden_layers"],
                  loadavg=[float(v) for v in Path("/proc/loadavg").read_text().split()[:3]])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, nargs="*", help="override the number of layers (several: one run each)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows")
    p.add_argument("--seq", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--workdir", default=None, help="where the synthetic shards go (default: a temporary dir)")
    args = p.parse_args(argv)
    results = []
    for layers in args.layers or [SHAPES[args.shapes]["num_hidden_layers"]]:
        shape = dict(SHAPES[args.shapes], num_hidden_layers=layers)
        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            r = run_one(shape, Path(work), args.windows, args.seq)
        r["shapes"] = args.shapes
        results.append(r)
        print(json.dumps(r), flush=True)
    if len(results) > 1:
        peaks = [r["peak_rss_mb"] for r in results]
        print(f"peak RSS by layers {[r['layers'] for r in results]}: {peaks} MiB; max/min {max(peaks) / min(peaks):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
