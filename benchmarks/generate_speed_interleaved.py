"""Interleaved side by side in one process: llama.cpp Q4_0 / Q4_K_M / Q8_0 against a qcompile SmolLM2
ONNX file (``causal_lm(max_context=256)``, written by ``benchmarks/generate_speed.py --artifacts``)
decoded through ``OnnxDecoder`` (onnxruntime IOBinding), rounds alternating implementation by
implementation so that each sees the same load: for a shared host, where the full benchmark's rows
run minutes apart. The session sets ``session.qdq_matmulnbits_accuracy_level=4``, so an int8
head left as ``DequantizeLinear -> MatMul`` in the file (a level-0 lowering) runs on MLAS's int8
kernel too. Prefill: the 128-token prompt; decode: ``N - 1`` greedy tokens after it. Best of
``ROUNDS`` (default 3) by decode. Several ONNX files (comma-separated) run side by side (an A/B of
a lowering change); ``GGUF=Q4_0,Q8_0`` picks the llama.cpp types (default Q4_0, Q4_K_M, Q8_0);
``TORCH=1`` adds PyTorch float ``generate`` with its own KV cache as a row.

Run::

    PYTHONPATH=$PWD python benchmarks/generate_speed_interleaved.py /tmp/gen-artifacts/w4-g128-a8-l4.onnx 32 1 \
        [/tmp/gen-artifacts]   # ONNX file(s), N, threads, directory of the GGUF files
"""
import sys, time, os, json, torch, onnxruntime as ort, llama_cpp
sys.path.insert(0, os.getcwd())
from qcompile.backends.onnx.runtime import session_options, DISABLED_OPTIMIZERS
from qcompile.backends.onnx.decode import OnnxDecoder
from qcompile.llm.cache import CacheLayout
N = int(sys.argv[2]); onnx_paths = sys.argv[1].split(","); threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
store = sys.argv[4] if len(sys.argv) > 4 else "/tmp/gen-artifacts"
from qcompile.eval.perplexity import PerplexityProtocol, text_tokens
from qcompile.models.smollm2 import load_smollm2
torch.set_num_threads(threads)
bundle = load_smollm2()
ids = text_tokens(bundle.tokenizer, PerplexityProtocol(window=128, stride=128, tokens=128))[None]
layout = CacheLayout(30, 3, 64, 256, 49152, 2)
o = session_options(threads); o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
sessions = {p: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))
            for p in onnx_paths}
def qc(s):
    d = OnnxDecoder(s, layout, 1)
    t0 = time.perf_counter(); lg = d(ids, torch.arange(128)); tok = lg[:, -1].argmax(-1)[:, None]; t1 = time.perf_counter()
    for i in range(N - 1):
        tok = d(tok, torch.tensor([128 + i]))[:, -1].argmax(-1)[:, None]
    t2 = time.perf_counter(); return 128 / (t1 - t0), (N - 1) / (t2 - t1)
GGUF = os.environ.get("GGUF", "Q4_0,Q4_K_M,Q8_0").split(",")
lls = {k: llama_cpp.Llama(f"{store}/SmolLM2-135M-Instruct.{k}.gguf", n_threads=threads, n_threads_batch=threads, n_ctx=300, n_batch=128, verbose=False) for k in GGUF}
def cpp(llm):
    llm.reset(); t0 = time.perf_counter(); llm.eval(ids[0].tolist()); tok = llm.sample(temp=0.0); t1 = time.perf_counter()
    for _ in range(N - 1):
        llm.eval([tok]); tok = llm.sample(temp=0.0)
    t2 = time.perf_counter(); return 128 / (t1 - t0), (N - 1) / (t2 - t1)
def torch_float():
    """PyTorch float ``generate`` with its own KV cache: prefill = a 1-token generate, decode = the rest."""
    m = bundle.model
    m.config.use_cache = True
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0); t1 = time.perf_counter()
    m.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0); t2 = time.perf_counter()
    return 128 / (t1 - t0), (N - 1) / ((t2 - t1) - (t1 - t0))
best = {}
for r in range(int(os.environ.get("ROUNDS", 3))):
    for name, f in [("qcompile " + os.path.basename(p), (lambda s: (lambda: qc(s)))(s)) for p, s in sessions.items()] + [(f"llama.cpp {k}", (lambda l: (lambda: cpp(l)))(l)) for k, l in lls.items()] + \
            ([("torch float generate", torch_float)] if os.environ.get("TORCH") else []):
        load = os.getloadavg()[0]; p, d = f()
        b = best.get(name)
        if b is None or d > b["decode"]: best[name] = {"prefill": p, "decode": d, "load": load}
        print(r, name, f"prefill {p:.1f} decode {d:.1f} tok/s load {load:.1f}", flush=True)
print(json.dumps({"threads": threads, "new_tokens": N, "best": best,
                  "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
