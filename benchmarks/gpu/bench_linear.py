"""GPU benchmark of the triton backend's kernels on Llama-3-8B linear shapes, side by side with
cuBLAS (``torch.nn.functional.linear`` fp16/bf16) and a device-to-device copy in the same run.

Shapes (K x N): 4096 x 4096, 4096 x 14336, 14336 x 4096; fp16 activations; M in {1, 16, 64, 4096}.
Kernels: W4A16 (uint4 asymmetric, groups of 128), W8A16 (int8 per channel), NF4 (groups of 64),
W8A8 (int8 per-token dynamic activations: the fused quantize kernel + the integer GEMM, timed
together), our FP8 E4M3 GEMM and ``torch._scaled_mm`` (per-tensor scales, compute capability 8.9+),
cuBLAS fp16 and bf16. One table: shape, M, kernel, time (us), achieved GB/s on the bytes
the kernel must move (weights + scales + activations + output), TFLOP/s, that bandwidth as a
fraction of the measured copy bandwidth, speedup vs cuBLAS fp16, and the max relative error vs the
dequantized fp32 product (correctness on the GPU, not only under the interpreter).

Run on a CUDA machine (never under TRITON_INTERPRET)::

    python benchmarks/gpu/bench_linear.py [--autotune] [--m 1 16 64 4096] [--json out.json]

Without a GPU it prints why and exits 0 (``pytest benchmarks/gpu`` skips).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]   # (K, N) of Llama-3-8B's q/o, gate/up, down
MS = [1, 16, 64, 4096]


def no_gpu_reason():
    """Why this benchmark cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: this benchmark times the compiled GPU kernels"
    if not torch.cuda.is_available():
        return "no CUDA device (this benchmark needs an NVIDIA GPU; nothing was measured)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed: pip install 'qcompile[triton]'"
    return None


def bench_ms(fn, reps=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps)


def copy_bandwidth_gbs(nbytes=1 << 30, device="cuda", timer=bench_ms):
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _weights(fmt, group, n, k, g, device):
    """Random codes and scales in the canonical operand form, packed by the backend's own packer."""
    from qcompile.backends.triton.weight_only import pack_weight
    from qcompile.formats import get_format

    f = get_format(fmt)
    groups = -(-k // group) if group else 1
    q = torch.randint(int(f.qmin), int(f.qmax) + 1, (n, k), generator=g, dtype=torch.int16).to(f.storage)
    s = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    z = torch.randint(int(f.qmin), int(f.qmax) + 1, (n, groups), generator=g, dtype=torch.int16).to(f.storage) \
        if f.kind == "int" and not f.signed else None
    p = pack_weight(q, s, z, fmt, group)
    for name, t in p.tensors().items():
        if t is not None:
            setattr(p, name, t.to(device))
    from qcompile.ops import DEQUANTIZE  # noqa: F401  (registers the canonical ops)

    w_hat = torch.ops.qcompile.dequantize(q, s, z, fmt, group, torch.float32)
    return p, w_hat


def run(ms=MS, shapes=SHAPES, autotune=False, device="cuda", timer=bench_ms, copy_bytes=1 << 30):
    """The table's rows. ``device``/``timer``/``copy_bytes`` exist so the script itself can be
    smoke-tested on tiny shapes under the interpreter (tests/test_backend_triton.py); its
    numbers mean something only on a GPU."""
    from qcompile.backends.triton.activation_quant import quantize_per_token
    from qcompile.backends.triton.fp8 import fp8_linear, pack_fp8_weight
    from qcompile.backends.triton.w8a8 import pack_int8_weight, w8a8_linear
    from qcompile.backends.triton.weight_only import weight_only_linear

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(copy_bytes, device, timer)
    rows = [{"shape": f"copy {copy_bytes >> 20} MiB", "m": 0, "kernel": "device copy", "us": None, "gbs": copy_gbs}]
    for k, n in shapes:
        w16 = (torch.randn(n, k, generator=g) * 0.02).half().to(device)
        wbf = w16.bfloat16()
        packs = {"w4a16-g128": _weights("uint4", 128, n, k, g, device),
                 "w8a16": _weights("int8", 0, n, k, g, device), "nf4-g64": _weights("nf4", 64, n, k, g, device)}
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
        ws = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
        p8 = pack_int8_weight(wq, ws, None)
        p8.codes, p8.scale, p8.colsum = p8.codes.to(device), p8.scale.to(device), p8.colsum.to(device)
        w8_hat = (wq.float() * ws).to(device)
        for m in ms:
            x = torch.randn(m, k, generator=g).half().to(device)
            base = timer(lambda: torch.nn.functional.linear(x, w16))
            cases = {"cublas-fp16": (lambda: torch.nn.functional.linear(x, w16), n * k * 2, None),
                     "cublas-bf16": (lambda: torch.nn.functional.linear(x.bfloat16(), wbf), n * k * 2, None)}
            for name, (p, w_hat) in packs.items():
                wbytes = sum(t.numel() * t.element_size() for t in p.tensors().values() if t is not None)
                cases[name] = (lambda p=p: weight_only_linear(x, p, autotune=autotune), wbytes,
                               lambda p=p, w_hat=w_hat: (weight_only_linear(x, p).float(), x.float() @ w_hat.to(device).t()))

            def w8a8():
                codes, s, z = quantize_per_token(x, "int8", True)
                return w8a8_linear(codes, s, None, p8, None, torch.float16, autotune=autotune)

            def w8a8_check():
                xf = x.float()
                s = xf.abs().amax(1, keepdim=True) / 127
                xq = torch.clamp(torch.round(xf / s), -128, 127)
                return w8a8().float(), (xq * s) @ w8_hat.t()

            cases["w8a8-dyn"] = (w8a8, n * k + n * 8, w8a8_check)
            if device == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability() >= (8, 9):
                one = torch.ones((), device=device)
                x8 = x.to(torch.float8_e4m3fn)
                w8f = w16.to(torch.float8_e4m3fn)
                cases["torch-scaled_mm-fp8"] = (lambda: torch._scaled_mm(x8, w8f.t(), one, one, out_dtype=torch.bfloat16),
                                                n * k, None)
                pf8 = pack_fp8_weight(w8f.cpu(), torch.ones(n, 1))
                pf8.codes, pf8.scale = pf8.codes.to(device), pf8.scale.to(device)
                cases["fp8-e4m3 (ours)"] = (lambda: fp8_linear(x8, one, pf8, None, torch.bfloat16, autotune=autotune), n * k,
                                            lambda: (fp8_linear(x8, one, pf8, None, torch.float32), x8.float() @ w8f.float().t()))
            for name, (fn, wbytes, check) in cases.items():
                try:
                    t = base if name == "cublas-fp16" else timer(fn)
                except Exception as e:  # noqa: BLE001 - a kernel that fails on this GPU is a row, not a crash
                    rows.append({"shape": f"{k}x{n}", "m": m, "kernel": name, "error": str(e).splitlines()[0][:120]})
                    continue
                nbytes = wbytes + m * k * 2 + m * n * 2
                err = None
                if check is not None:
                    got, ref = check()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                rows.append({"shape": f"{k}x{n}", "m": m, "kernel": name, "us": t * 1e3,
                             "gbs": nbytes / (t * 1e-3) / 1e9, "tflops": 2 * m * n * k / (t * 1e-3) / 1e12,
                             "frac_copy": nbytes / (t * 1e-3) / 1e9 / copy_gbs, "vs_cublas_fp16": base / t,
                             "max_rel_err": err})
    return rows


def print_table(rows, device):
    print(f"# {device}, torch {torch.__version__}")
    print(f"{'shape KxN':>12} {'M':>5} {'kernel':>20} {'time us':>10} {'GB/s':>8} {'TFLOP/s':>8} "
          f"{'frac copy':>9} {'vs cuBLAS':>9} {'max rel err':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>12} {r['m']:>5} {r['kernel']:>20}  FAILED: {r['error']}")
            continue
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        print(f"{r['shape']:>12} {r['m']:>5} {r['kernel']:>20} {f(r.get('us'), '10.1f'):>10} {f(r.get('gbs'), '8.0f'):>8} "
              f"{f(r.get('tflops'), '8.1f'):>8} {f(r.get('frac_copy'), '9.2f'):>9} {f(r.get('vs_cublas_fp16'), '9.2f'):>9} "
              f"{f(r.get('max_rel_err'), '11.1e'):>11}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="*", default=MS)
    ap.add_argument("--autotune", action="store_true", help="time the config table's candidates per shape bucket")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    rows = run(a.m, autotune=a.autotune)
    print_table(rows, torch.cuda.get_device_name())
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
