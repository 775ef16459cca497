"""The Relax pipeline the tvm backend builds with: TVM's CPU phases (dispatch, legalize + fuse,
lower, finalize) with one phase of ours after fusion, :func:`schedule_float_matmuls`.

TVM's default CPU pipeline leaves every legalized loop nest unscheduled; for a float matmul (the
attention products ``Q K^T`` and ``P V``, which stay float in w8a8) the reduction is the innermost
loop and each step reads ``B`` with a stride: a few GFLOP/s. Moving the reduction outside the
last spatial loop makes the inner loop contiguous in ``B`` and ``C``, which LLVM vectorizes, with
or without static shapes. The integer GEMM kernels (``qgemm_*``) are hand-written and left alone.
"""
from __future__ import annotations


def _blocks(sch):
    root = sch.get_sblock("root")
    out = []
    stack = list(sch.get_child_blocks(root))
    while stack:
        b = stack.pop()
        out.append(b)
        stack.extend(sch.get_child_blocks(b))
    return out


def schedule_primfunc(func):
    """``func`` with each ``matmul`` block's reduction loop moved outside its last spatial loop
    (the init split off first); ``func`` itself when it has none or scheduling fails."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    changed = False
    for blk in _blocks(sch):
        if not sch.get(blk).name_hint.startswith("matmul"):
            continue
        loops = sch.get_loops(blk)
        if len(loops) < 2:
            continue
        try:
            sch.reorder(loops[-1], loops[-2])
            sch.decompose_reduction(blk, loops[-1])
            changed = True
        except Exception:  # noqa: BLE001 - a shape this rewrite does not fit keeps TVM's loop order
            return func
    return sch.mod["main"] if changed else func


def schedule_float_matmuls():
    """A module pass applying :func:`schedule_primfunc` to every PrimFunc but ours."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="QcompileScheduleFloatMatmuls")
    def run(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and not gv.name_hint.startswith("qgemm"):
                new = schedule_primfunc(func)
                if new is not func:
                    mod[gv] = new
        return mod

    return run


def get_pipeline(target):
    """TVM's CPU phases with :func:`schedule_float_matmuls` after fusion."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="QcompileCPUPipeline")
    def run(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                                           + [schedule_float_matmuls()] + cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))
            return seq(mod)

    return run
