"""The backend contract: every registered backend's :class:`~qcompile.backends.base.Capabilities`
equals what it lowers. The format table (:data:`qcompile.formats.FORMATS`) x role (weights per
channel / per group of 32; activations static per tensor / dynamic per token, and int8 per token
and group) on one ``Linear(64, 64)``:

* declared: ``qcompile.lower`` succeeds and the output matches the reference backend (for the
  triton backend, whose undeclared tensors stay PyTorch: the Linear runs a Triton kernel that
  takes that tensor);
* not declared: ``qcompile.lower`` raises the backend's contract error naming the node, its module
  and the format, before any backend code runs (the backend's ``lower`` is replaced by a trap); on
  triton (``fallback="pytorch"``) the Linear stays PyTorch with the format in its skip reason, or
  its activation is read dequantized by the weight-only kernel.

Fast: each backend lowers one model holding a Linear per case it declares (``fc.<i>``), once; an
undeclared case is a one-Linear model, quantized once and shared by every backend that refuses it
(the refusal is cheap: no backend code runs)."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from backend_conformance import assert_matches_reference  # noqa: E402
from qcompile.backends.base import BACKENDS, Capabilities, get_backend, quant_uses, timing_module  # noqa: E402
from qcompile.errors import BackendError  # noqa: E402
from qcompile.formats import FORMATS  # noqa: E402
from qcompile.recipe import CalibrationConfig, LayerConfig, Recipe  # noqa: E402
from qcompile.spec import LAYER, QuantSpec  # noqa: E402

GROUP = 32
_EXTRA = {"onnx": "onnx", "tvm": "tvm", "triton-cuda": "triton", "gguf": "gguf", "compressed-tensors": "compressed_tensors"}
# backends that write one model architecture's file, not any graph: their declared cases are
# lowered and compared with the reference in their own tests (gguf: tests/test_backend_gguf.py, a
# tiny Llama); here only the refusal of undeclared cases, which runs before any backend code
WHOLE_MODEL = {"gguf": "gguf writes Llama causal LMs; its declared grids run in tests/test_backend_gguf.py",
               "compressed-tensors": "compressed-tensors writes transformers causal LMs; its declared grids run in "
                                     "tests/test_backend_compressed_tensors.py"}


def _installed(backend_id: str) -> bool:
    pkg = _EXTRA.get(backend_id)
    return pkg is None or importlib.util.find_spec(pkg) is not None


def _sym(fmt: str) -> bool:
    """Unsigned integer formats asymmetric (their natural use), the rest symmetric (the only choice
    for code books and FP8)."""
    f = FORMATS[fmt]
    return not (f.kind == "int" and not f.signed)


def _weight(fmt, gran):
    return QuantSpec(fmt, gran, symmetric=_sym(fmt), group_size=GROUP if gran == "per_group" else None)


# (role, format, mode) -> LayerConfig. An activation case pairs with a weight every backend that
# lowers the activation also lowers with it: int8 per channel; uint4 per group for the per token
# and group activations (the int4 kernels' only use of them); the same FP8 format for FP8 (the FP8 GEMM).
def _cases():
    cases = {}
    for fmt in FORMATS:
        for gran in ("per_channel", "per_group"):
            cases[("weight", fmt, gran)] = LayerConfig(_weight(fmt, gran))
        partner = _weight(fmt if FORMATS[fmt].kind == "float" else "int8", "per_channel")
        cases[("activation", fmt, "static per_tensor")] = LayerConfig(
            partner, QuantSpec(fmt, "per_tensor", symmetric=_sym(fmt)))
        cases[("activation", fmt, "dynamic per_token")] = LayerConfig(
            partner, QuantSpec(fmt, "per_token", symmetric=_sym(fmt), dynamic=True))
    for fmt in ("int8", "uint8"):
        cases[("activation", fmt, "dynamic per_token_group")] = LayerConfig(
            _weight("uint4", "per_group"),
            QuantSpec(fmt, "per_token_group", symmetric=fmt == "int8", group_size=GROUP, dynamic=True))
    return cases


CASES = _cases()
FLOAT_ZP = ("weight", "uint4", "per_group, float16 zero point")
MODELS = {**CASES, FLOAT_ZP: LayerConfig(QuantSpec("uint4", "per_group", symmetric=False, group_size=GROUP,
                                                   zero_point_dtype="float16"))}


class _Linears(torch.nn.Module):
    """``n`` Linears on the same input, one case each (``fc.<i>``): one lowering covers them all."""

    def __init__(self, n):
        super().__init__()
        self.fc = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(n))

    def forward(self, x):
        return tuple(fc(x) for fc in self.fc)


def _quantize(configs):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 8, 64, generator=g),) for _ in range(3)]
    recipe = Recipe(name="contract", overrides={f"fc.{i}": c for i, c in enumerate(configs)},
                    calibration=CalibrationConfig(progress=False))
    q = qcompile.quantize(_Linears(len(configs)).eval(), recipe, batches[0], calibration=batches[:2], report_samples=1)
    return q, batches[2]


@pytest.fixture(scope="module")
def single():
    """case -> (a one-Linear model quantized so, inputs), built on first use, shared by every backend."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = _quantize([MODELS[case]])
        return cache[case]
    return get


@pytest.fixture(scope="module")
def lowered():
    """backend id -> (cases, quantized model, artifact, its outputs, the reference outputs): one
    model holding every case the backend declares (every case for a fallback backend), lowered and
    run once."""
    cache = {}

    def get(backend_id):
        if backend_id not in cache:
            caps = get_backend(backend_id).capabilities
            cases = [c for c in CASES if caps.fallback is not None or caps.lowers(*c)]
            q, x = _quantize([CASES[c] for c in cases])
            art = qcompile.lower(q, backend=backend_id)
            with torch.no_grad():
                cache[backend_id] = cases, q, art, art(*x), q(*x)
        return cache[backend_id]
    return get


def _backend(backend_id):
    if not _installed(backend_id):
        pytest.skip(f"backend '{backend_id}' is not installed")
    return get_backend(backend_id)


def _linear_nodes(q) -> dict:
    """layer path -> name of its linear node in the converted graph (the key of ``fused``/``skipped``)."""
    return {n.meta[LAYER]: n.name for n in q.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default}


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c).replace(" ", "_") for c in CASES])
@pytest.mark.parametrize("backend_id", list(BACKENDS))
def test_declaration_equals_what_the_backend_lowers(backend_id, case, single, lowered, monkeypatch):
    backend = _backend(backend_id)
    caps = backend.capabilities
    role, fmt, mode = case
    declared = caps.lowers(role, fmt, mode)
    if caps.fallback is None and not declared:
        q, _ = single(case)

        def trap(self, *a, **k):
            raise AssertionError(f"backend '{backend_id}' code ran for undeclared {fmt} {mode} {role}s")
        monkeypatch.setattr(type(backend), "lower", trap)
        with pytest.raises(caps.error) as e:
            qcompile.lower(q, backend=backend_id)
        msg = str(e.value)
        assert "node '" in msg and "module 'fc.0' (Linear)" in msg and f"backend '{backend_id}'" in msg, msg
        # the first tensor it does not lower: this one, or an FP8 activation's FP8 partner weight
        assert f"format '{fmt}' as {mode} {role}s" in msg or f"format '{fmt}' as per_channel weights" in msg, msg
        assert "it lowers" in msg, msg
        return
    if backend_id in WHOLE_MODEL:
        pytest.skip(WHOLE_MODEL[backend_id])
    cases, q, art, out, ref = lowered(backend_id)
    i = cases.index(case)
    if caps.fallback == "pytorch":   # triton: declared <=> a Triton kernel takes that tensor
        node = _linear_nodes(q)[f"fc.{i}"]
        kernel = art.fused.get(node, "")
        if role == "weight":
            assert bool(kernel) == declared, (kernel, art.skipped.get(node))
            if not declared:
                assert f"'{fmt}'" in art.skipped[node]
        else:
            assert kernel.startswith(("w8a8", "fp8 gemm")) == declared, (kernel, art.skipped.get(node))
    assert_matches_reference(out[i], ref[i])


def test_reference_declares_every_format_and_granularity():
    caps = get_backend("reference").capabilities
    assert all(caps.lowers(*case) for case in CASES) and caps.float_zero_points


@pytest.mark.parametrize("backend_id", list(BACKENDS))
def test_float_zero_points_follow_the_declaration(backend_id, single, monkeypatch):
    """``zero_point_dtype`` float: refused by name before backend code where not declared."""
    backend = _backend(backend_id)
    caps = backend.capabilities
    q, x = single(FLOAT_ZP)
    if caps.float_zero_points and backend_id in WHOLE_MODEL:
        pytest.skip(WHOLE_MODEL[backend_id])
    if caps.float_zero_points or caps.fallback is not None:
        art = qcompile.lower(q, backend=backend_id)
        if caps.fallback is not None:
            assert "float zero point" in art.skipped["linear"]
        with torch.no_grad():
            assert_matches_reference(art(*x)[0], q(*x)[0])
        return
    monkeypatch.setattr(type(backend), "lower", lambda *a, **k: pytest.fail("backend code ran"))
    with pytest.raises(caps.error, match=r"node '.*' of module 'fc.0' \(Linear\).*float zero point "
                                         r"\(zero_point_dtype: float16"):
        qcompile.lower(q, backend=backend_id)


def test_a_loaded_model_is_checked_from_its_op_arguments(tmp_path, single):
    """``qcompile.load`` re-exports the graph without qcompile's node meta: the check reads the
    format and granularity from the ops and the scale's shape."""
    q, _ = single(("weight", "uint3", "per_channel"))
    q.save(tmp_path / "m")
    loaded = qcompile.load(tmp_path / "m")
    assert [(u.role, u.format, u.mode) for u in quant_uses(loaded.graph_module)] == \
        [(u.role, u.format, u.mode) for u in quant_uses(q.graph_module)] == [("weight", "uint3", "per_channel")]
    if _installed("onnx"):
        with pytest.raises(BackendError, match="node '.*format 'uint3' as per_channel weights"):
            qcompile.lower(loaded, backend="onnx")


@pytest.mark.parametrize("backend_id", list(BACKENDS))
def test_timing_is_part_of_the_contract(backend_id):
    caps = _backend(backend_id).capabilities
    if caps.timing is None:
        with pytest.raises(NotImplementedError, match="latency budgets on .*use backend='onnx'"):
            timing_module(backend_id)
    else:
        timer = timing_module(backend_id)
        assert timer.__name__ == caps.timing and all(hasattr(timer, f) for f in
                                                     ("ID", "version", "lower", "time_artifact", "time_branches"))


def test_capabilities_reject_unknown_modes():
    with pytest.raises(ValueError, match="per_token"):
        Capabilities(weights={"int8": {"per_token"}})
    assert Capabilities().quantized_outputs == frozenset()
