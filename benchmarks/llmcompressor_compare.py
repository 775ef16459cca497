"""qcompile's layer-by-layer GPTQ against llm-compressor's sequential ``oneshot`` GPTQ on the same
synthetic Llama (real shapes, random bf16 weights written as safetensors shards by
:func:`blockwise_memory.write_synthetic`), the same calibration token ids, int4 symmetric weights in
groups of 64, one thread each: peak RSS (Linux ``VmHWM`` of each child process) and wall time.

llm-compressor pins another transformers and compressed-tensors than qcompile's environment, so it
runs from its own virtual environment (``--llmcompressor-python``; make one with
``python -m venv V && V/bin/pip install torch==2.13.0 llmcompressor``). Both children run one after
the other on one machine; ratios are what to compare.

What each side does: qcompile ``quantize_directory(dir, "w4-g64-gptq")`` streams blocks from the
shards and writes its artifact (embedding and tied head at int8, as the preset says); llm-compressor
loads the model with ``from_pretrained`` (bf16), runs ``oneshot(pipeline="sequential")`` with
``GPTQModifier`` (W4 group 64 symmetric, ``lm_head`` ignored, its default damping 0.01, block 128)
and saves the compressed-tensors checkpoint.

Run::

    python benchmarks/llmcompressor_compare.py --shapes 1b --llmcompressor-python /work/lcvenv/bin/python
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blockwise_memory import CHILD as QCOMPILE_CHILD, SHAPES, write_synthetic  # noqa: E402

LLMCOMPRESSOR_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
src, out, windows, seq, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
import llmcompressor
base = hwm()
g = torch.Generator().manual_seed(0)   # the same ids as qcompile's child: one window per draw
ids = [torch.randint(0, vocab, (1, seq), generator=g)[0].tolist() for _ in range(windows)]
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq for _ in ids]})
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
# the dataset is token ids already; oneshot still wants a processor object when given a dataset
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
oneshot(model=model, processor=processor, dataset=ds, recipe=recipe, num_calibration_samples=windows, max_seq_length=seq,
        pipeline="sequential", shuffle_calibration_samples=False, output_dir=out)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "rss_after_imports_mb": base,
      "peak_rss_mb": hwm(), "version": llmcompressor.__version__}))
"""


def run_child(python: str, code: str, src: Path, out: Path, windows: int, seq: int, vocab: int,
              pythonpath: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", code, str(src), str(out), str(windows), str(seq), str(vocab)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    result.update(wall_seconds=time.perf_counter() - t0,
                  artifact_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
                  loadavg=[float(v) for v in Path("/proc/loadavg").read_text().split()[:3]])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--llmcompressor-python", required=True)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="append the result as one JSON line here")
    args = p.parse_args(argv)
    shape = dict(SHAPES[args.shapes])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    repo = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src = Path(work) / "model"
        params = write_synthetic(src, shape)
        row = {"shapes": args.shapes, "layers": shape["num_hidden_layers"], "params": params,
               "windows": args.windows, "seq": args.seq}
        for name, python, code, path in (("qcompile", sys.executable, QCOMPILE_CHILD, repo),
                                         ("llmcompressor", args.llmcompressor_python, LLMCOMPRESSOR_CHILD, None)):
            out = Path(work) / f"out-{name}"
            row[name] = run_child(python, code, src, out, args.windows, args.seq, shape["vocab_size"], path)
            row[name].pop("steps", None)
            shutil.rmtree(out, ignore_errors=True)
            print(name, json.dumps(row[name]), flush=True)
    q, l = row["qcompile"], row["llmcompressor"]
    row["peak_ratio_llmcompressor_over_qcompile"] = l["peak_rss_mb"] / q["peak_rss_mb"]
    row["time_ratio_llmcompressor_over_qcompile"] = l["seconds"] / q["seconds"]
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
