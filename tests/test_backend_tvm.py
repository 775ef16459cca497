"""The tvm backend: the shared conformance suite, the integer-GEMM fusion pass (graph structure,
numerics, negative cases), save/load with TVM's runtime only, and clear errors."""
import shutil

import pytest
import torch

import qcompile
from backend_conformance import BackendConformance, _quantize, assert_matches_reference
from conftest import TinyBlock

pytest.importorskip("tvm", reason="the tvm backend needs the 'tvm' extra: pip install 'qcompile[tvm]'")

from qcompile.backends.tvm import NotBuiltError, load  # noqa: E402
from qcompile.backends.tvm.host import FAMILIES, FAMILY_FLAGS, detect  # noqa: E402
from qcompile.backends.tvm.fuse import INT8_LINEAR, FuseInt8LinearPass  # noqa: E402
from qcompile.ops import DEQUANTIZE  # noqa: E402


class TestTvmBackend(BackendConformance):
    backend = "tvm"


def _block(recipe, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)) for _ in range(3)]
    return _quantize(TinyBlock().eval(), recipe, batches), batches


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_fuse_pass_replaces_every_quantized_linear(recipe):
    import copy

    q, batches = _block(recipe)
    gm = copy.deepcopy(q.graph_module)
    result = FuseInt8LinearPass()(gm)
    assert result.modified and set(result.fused.values()) == {"qcompile_tvm::int8_linear"}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(INT8_LINEAR) == 6 and torch.ops.aten.linear.default not in targets
    # only the embedding's weight dequantize is left (the fused weights are packed integer codes)
    assert targets.count(DEQUANTIZE) == 1
    packed = [getattr(gm, n.args[3].target) for n in gm.graph.nodes if n.target == INT8_LINEAR]
    assert all(w.dtype == torch.int8 and w.dim() == 3 and w.shape[-1] == 64 for w in packed)
    with torch.no_grad():  # the fused op's PyTorch implementation computes the same thing
        for ids, mask in batches:
            _assert_fused_linears_match(gm, q.graph_module, list(result.fused), (ids, mask))


def _assert_fused_linears_match(fused_gm, reference_gm, linear_names, inputs):
    """Each fused node, fed the codes and scales the reference graph computed (teacher forcing),
    gives the reference Linear's output to float rounding. End to end the two graphs may differ by
    a code where float reassociation tips a later quantizer's rounding (it does on AVX2 hosts)."""
    env = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            env[n.name] = super().run_node(n)
            return env[n.name]

    Record(reference_gm).run(*inputs)
    fused = [n for n in fused_gm.graph.nodes if n.target == INT8_LINEAR]
    assert len(fused) == len(linear_names)
    for node, name in zip(fused, linear_names):
        args = [env[a.name] if isinstance(a, torch.fx.Node) and a.op != "get_attr"
                else getattr(fused_gm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args]
        assert_matches_reference(node.target(*args), env[name], rel=1e-5)


def test_fuse_pass_leaves_weight_only_linears_and_says_why():
    import copy

    q, _ = _block("w8")
    gm = copy.deepcopy(q.graph_module)
    result = FuseInt8LinearPass()(gm)
    assert not result.modified and not result.fused
    assert set(result.skipped.values()) == {"the input is not dequantized (weight-only or float layer)"}


def test_artifact_reports_kernels_and_reloads_with_tvm_runtime_only(tmp_path):
    q, batches = _block("w8a8")
    art = qcompile.lower(q, backend="tvm-llvm")
    assert art.compile_seconds > 0 and art.family in FAMILIES and len(art.fused) == 6
    path = art.save(tmp_path / "m")
    assert (path / "model.so").stat().st_size > 0 and (path / "tvm.json").exists()
    again = load(path)
    ids, mask = torch.randint(0, 50, (2, 13)), torch.ones(2, 13, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(again(ids, mask), art(ids, mask))
        assert_matches_reference(again(ids, mask=mask), q(ids, mask))
    # the library's checksum is checked before it is loaded (dlopen of a corrupted library can crash);
    # corrupt a copy: rewriting the file this process has mapped would corrupt the loaded library itself
    corrupt = shutil.copytree(path, tmp_path / "corrupt")
    lib = bytearray((corrupt / "model.so").read_bytes())
    lib[len(lib) // 2] ^= 0x01
    (corrupt / "model.so").write_bytes(bytes(lib))
    with pytest.raises(qcompile.ArtifactError, match=r"model.so' does not match its checksum"):
        load(corrupt)


@pytest.mark.parametrize("family", ["generic", "avx-vnni", "avx2"])
def test_other_family_matches_reference(family):
    """A whole model on a family the host would not pick first (where the host runs it)."""
    missing = [f for f in FAMILY_FLAGS[family] if f not in detect().flags]
    if missing:
        pytest.skip(f"kernel family '{family}' needs {', '.join(missing)}")
    q, batches = _block("w8a8-dynamic")
    art = qcompile.lower(q, backend="tvm", family=family)
    assert art.family == family
    with torch.no_grad():
        assert_matches_reference(art(*batches[0]), q(*batches[0]))


def test_threads_choose_serial_or_parallel_kernels_with_the_same_outputs():
    """Built for one thread the kernels launch no thread-pool tasks; for two they do (GEMM column
    panels, attention heads), and the outputs are the same bit for bit."""
    q, batches = _block("w8a8")
    serial, parallel = (qcompile.lower(q, backend="tvm", threads=t) for t in (1, 2))
    assert serial.meta["parallel"] is False and parallel.meta["parallel"] is True
    with torch.no_grad():
        for b in batches[:2]:
            assert torch.equal(serial(*b), parallel(*b))


def test_unbuilt_format_and_family_raise_not_implemented():
    q, _ = _block("w3-g64")   # 3-bit group-wise weights: no kernel (w4-g64 and w4-g64-a8 lower)
    with pytest.raises(NotBuiltError, match="backend 'tvm' does not lower format 'uint3' as per_group weights"):
        qcompile.lower(q, backend="tvm")
    q, _ = _block("w8")
    with pytest.raises(NotBuiltError, match="kernel family 'sme' is not built"):
        qcompile.lower(q, backend="tvm", family="sme")
    if not detect().has_amx:
        with pytest.raises(NotBuiltError, match="'amx' needs the CPU features amx_tile"):
            qcompile.lower(q, backend="tvm", family="amx")


def test_amx_family_loop_nest_in_a_model_emulated():
    """The whole lowering with the AMX family's GEMMs (32-row blocks, here with the tile
    instructions emulated, so on any host): the same outputs as the generic family, bit for bit,
    including the GEMM whose kernel ends in GELU and a requantize."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 50, (5, 13), generator=g), torch.ones(5, 13, dtype=torch.long)) for _ in range(2)]
    q = _quantize(TinyBlock(d=64, ff=128).eval(), "w8a8", batches)
    emulated = qcompile.lower(q, backend="tvm", family="amx-emulated")
    generic = qcompile.lower(q, backend="tvm", family="generic")
    assert emulated.meta["epilogues"] and emulated.meta["requires_flags"] == []
    with torch.no_grad():
        for ids, mask in batches:   # 65 rows: two AMX blocks and a leftover row
            assert torch.equal(emulated(ids, mask), generic(ids, mask))


class _InputNorm(torch.nn.Module):
    """A LayerNorm straight on a graph input, its output returned in float (no quantize after it,
    so it stays a Relax layer_norm rather than the fused LayerNorm + quantize kernel)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(x)


def test_layer_norm_on_a_graph_input_lowers():
    # torch.export hands the static dim 64 over as a SymInt with a constant expression; TVM named
    # a symbol "64", layer_norm could not match it against its weight, lost its output shape, and
    # the build failed in VM codegen ("cannot emit R.nn.layer_norm")
    torch.manual_seed(0)
    batches = [(torch.randn(4, 64),) for _ in range(3)]
    q = _quantize(_InputNorm().eval(), "w8a8", batches)
    art = qcompile.lower(q, backend="tvm")
    with torch.no_grad():
        assert_matches_reference(art(*batches[1]), q(*batches[1]))
        x7 = torch.randn(7, 64)   # another batch size: the batch dim stays symbolic
        assert_matches_reference(art(x7), q(x7))
