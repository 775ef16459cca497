"""Where the peak RSS of layer-by-layer quantization goes, stage by stage: a thread samples VmRSS
every 5 ms and labels it with the running stage (shard reads, capture, each pass, measure, save),
set by wrapping those functions; tracemalloc does not see torch's allocations. Prints each step's
own peak (from the manifest) and, per stage, the largest RSS sampled and the seconds spent.

Run on a directory written by ``blockwise_memory.write_synthetic`` (or any supported model dir)::

    python benchmarks/blockwise_stage_trace.py MODEL_DIR OUT_DIR 4 128 128256   # windows seq vocab
"""
import sys, time, threading, json, dataclasses, collections
import torch
torch.set_num_threads(1)
import qcompile
from qcompile import blockwise, pipeline, model as model_mod
from qcompile.passes import infra

label = ["imports"]
peaks = collections.OrderedDict()
def rss():
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1]) / 1024
def sampler():
    while True:
        r = rss(); k = label[0]
        if r > peaks.get(k, (0,))[0]:
            peaks[k] = (r, time.perf_counter())
        time.sleep(0.005)
threading.Thread(target=sampler, daemon=True).start()
step = ["pre"]
secs = collections.defaultdict(float)
def wrap(owner, name, tag):
    f = getattr(owner, name)
    def g(*a, **k):
        prev = label[0]; label[0] = f"{step[0]}:{tag(a) if callable(tag) else tag}"
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            secs[label[0]] += time.perf_counter() - t
            label[0] = prev
    setattr(owner, name, g)
wrap(blockwise.ShardReader, "load", lambda a: "load " + a[2])
wrap(blockwise, "capture", "capture")
wrap(infra.Pass, "__call__", lambda a: "pass " + a[0].name)
wrap(pipeline, "measure", "measure")
wrap(model_mod.QuantizedModel, "save", "save")
wrap(blockwise, "_save_resume", "save_resume")
wrap(blockwise, "_layer_inputs", "layer_inputs")
wrap(blockwise, "gather_rows", "gather_rows")
from qcompile import blockwise_tables
def rc_init(orig=blockwise_tables.RowCodes.__init__):
    def g(self, *a, **k):
        step[0] = "table " + a[1]; label[0] = step[0] + ":rowcodes"
        t = time.perf_counter(); orig(self, *a, **k); secs[label[0]] += time.perf_counter() - t
        label[0] = step[0] + ":other"
    return g
blockwise_tables.RowCodes.__init__ = rc_init()
wrap(blockwise, "table_step", "table_step")
orig_qs = blockwise._quantize_step
def qs(module, *a, **k):
    step[0] = type(module).__name__ + getattr(module, "index", "")
    label[0] = step[0] + ":other"
    r = orig_qs(module, *a, **k)
    label[0] = step[0] + ":after"
    return r
blockwise._quantize_step = qs
src, out, windows, seq, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
cal = [(torch.randint(0, vocab, (1, seq), generator=g),) for _ in range(windows)]
recipe = dataclasses.replace(qcompile.Recipe.preset("w4-g64-gptq"), calibration=qcompile.CalibrationConfig(progress=False))
t0 = time.perf_counter()
label[0] = "start"
blockwise.quantize_directory(src, recipe, cal, out, progress=False)
label[0] = "end"
time.sleep(0.05)
print("total s", round(time.perf_counter() - t0, 1), "loadavg", open("/proc/loadavg").read().split()[:3])
import json as _j
for st in _j.load(open(out + "/qcompile.json"))["report"]["steps"]:
    print("STEP", st["step"], round(st["seconds"], 1), "s peak", round(st["peak_rss_mb"]), "MiB load", st.get("loadavg_1m"))
for k, (r, t) in peaks.items():
    print(f"{k:45s} peak {r:8.0f} MiB   {secs.get(k, 0):7.1f} s")
