"""pytest entry of :mod:`bench_linear` (``python -m pytest benchmarks/gpu -s``): skipped without a
CUDA GPU; on one it prints the table and checks every kernel's result against the dequantized
product (correctness on the GPU). Speed targets are reported, not asserted (see docs/triton.md)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_linear  # noqa: E402

reason = bench_linear.no_gpu_reason()
if reason:
    pytest.skip(reason, allow_module_level=True)


def test_llama3_8b_linear_table():
    rows = bench_linear.run()
    bench_linear.print_table(rows, torch.cuda.get_device_name())
    failed = [r for r in rows if "error" in r and not r["kernel"].startswith("torch-")]
    assert not failed, failed
    for r in rows:
        if r.get("max_rel_err") is not None:
            assert r["max_rel_err"] < 2e-2, r
