"""int8 weights on x86 hosts without VNNI: onnxruntime's u8 x s8 kernels saturate 16-bit sums there
(vpmaddubsw), so the onnx backend writes them as uint8 with zero point + 128 (qcompile/backends/onnx/
weights.py). The choice is a function of the CPU's flags (checked on any host); the saturation case
runs through the real lowering and onnxruntime."""
import copy
import dataclasses

import pytest
import torch

import qcompile
from backend_conformance import assert_matches_reference
from qcompile.cpu import CpuInfo, cpu_info, parse_cpuinfo
from qcompile.errors import BackendError

ort = pytest.importorskip("onnxruntime", reason="the onnx backend needs the 'onnx' extra")
onnx = pytest.importorskip("onnx")

from qcompile.backends.onnx.lower import INT8_WEIGHTS_KEY, INT8_WEIGHTS_REASON_KEY  # noqa: E402
from qcompile.backends.onnx.runtime import read_onnx  # noqa: E402
from qcompile.backends.onnx.weights import Int8WeightsAsUint8Pass, choose_int8_weights  # noqa: E402

ZEN3 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2".split())


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", ZEN3, "uint8"),                                            # AVX2 only (Zen 3): vpmaddubsw
    ("x86_64", ZEN3 | {"avx512f", "avx512bw"}, "uint8"),                  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", frozenset(), "uint8"),                                     # no /proc/cpuinfo: the exact choice
    ("x86_64", ZEN3 | {"avx512f", "avx512bw", "avx512_vnni"}, "int8"),    # Zen 4, Cascade Lake+
    ("x86_64", ZEN3 | {"avx_vnni"}, "int8"),                              # Alder Lake: VEX VNNI
    ("x86_64", ZEN3 | {"avx512_vnni", "amx_tile", "amx_int8"}, "int8"),   # Sapphire Rapids
    ("aarch64", frozenset({"asimd", "asimddp"}), "int8"),                 # not x86
])
def test_weight_type_follows_the_host_flags(machine, flags, expected):
    choice, why = choose_int8_weights(CpuInfo(machine, "", "", flags))
    assert choice == expected
    assert ("saturate" in why) == (expected == "uint8")


def test_cpuinfo_is_parsed_from_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n"
            "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx512_vnni\n")
    info = parse_cpuinfo(text, "x86_64")
    assert (info.vendor, info.model, info.flags, info.x86) == ("AuthenticAMD", "AMD EPYC 7B13",
                                                               frozenset({"fpu", "avx2", "fma"}), True)
    assert not parse_cpuinfo("", "aarch64").x86


def _saturating_linear():
    """A Linear whose int8 codes are +-127 in pairs of the same sign, on activations whose uint8 codes
    span 0..255: two adjacent u8 x s8 products reach 2 x 255 x 127 = 64,770, past int16's 32,767."""
    torch.manual_seed(0)
    k, n = 64, 8
    model = torch.nn.Linear(k, n).eval()
    sign = torch.tensor([[1.0 if (j // 2 + i) % 3 else -1.0 for j in range(k)] for i in range(n)])
    model.weight.data = sign * torch.linspace(0.5, 1.0, n)[:, None]
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8a8"), smoothing=None,
                                 calibration=qcompile.CalibrationConfig(progress=False))
    batches = [(torch.rand(16, k),) for _ in range(2)]
    return qcompile.quantize(model, recipe, batches[0], calibration=batches, report_samples=1), torch.rand(32, k)


@pytest.mark.parametrize("target", ["onnxruntime", "qdq"])
def test_full_range_u8_times_extreme_s8_weights_match_the_reference(target):
    q, x = _saturating_linear()
    art = qcompile.lower(q, backend="onnx", target=target)
    with torch.no_grad():
        ref = q(x)
        assert_matches_reference(art(x), ref)
    # the saved file itself is right in a plain session (no qcompile session options)
    plain = ort.InferenceSession(art.model_bytes, providers=["CPUExecutionProvider"])
    assert_matches_reference(torch.from_numpy(plain.run(None, {art.input_names[0]: x.numpy()})[0]), ref)
    assert art.metadata[INT8_WEIGHTS_KEY] == choose_int8_weights(cpu_info())[0]
    # the test can fail: on a host where u8 x s8 saturates, the int8 file is far off (MatMulIntegerToFloat;
    # onnxruntime leaves this qdq Linear a float MatMul: the qdq conformance CNN's QLinearConv is that case)
    if target == "onnxruntime" and choose_int8_weights(cpu_info())[0] == "uint8":
        wrong = qcompile.lower(q, backend="onnx", target=target, int8_weights="int8")
        with torch.no_grad():
            err = (wrong(x) - ref).abs().max().item()
        assert err > 0.05 * ref.abs().max().item(), err


def _initializers(art):
    model = onnx.load_from_string(art.model_bytes)
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}, model


def test_uint8_weights_hold_the_same_values_in_the_fused_kernel():
    q, _ = _saturating_linear()
    codes = {}
    for choice in ("int8", "uint8"):
        art = qcompile.lower(q, backend="onnx", int8_weights=choice)
        inits, model = _initializers(art)
        (mm,) = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
        b = inits[mm.input[1]]
        assert str(b.dtype) == choice
        zero = inits[mm.input[5]].astype("int32") if len(mm.input) > 5 and mm.input[5] else 0
        codes[choice] = b.astype("int32") - zero
        meta = art.metadata
        assert meta[INT8_WEIGHTS_KEY] == choice and meta[INT8_WEIGHTS_REASON_KEY].startswith("requested")
    assert (codes["uint8"] == codes["int8"]).all() and abs(codes["int8"]).max() == 127


def test_the_choice_survives_save(tmp_path):
    q, _ = _saturating_linear()
    path = qcompile.lower(q, backend="onnx", int8_weights="uint8").save(tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load_from_string(read_onnx(path)).metadata_props}
    assert props[INT8_WEIGHTS_KEY] == "uint8" and "1 weights converted" in props[INT8_WEIGHTS_REASON_KEY]


def test_weights_on_float_activations_stay_int8_with_the_reason():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    recipe = dataclasses.replace(qcompile.Recipe.preset("w8"), calibration=qcompile.CalibrationConfig(progress=False))
    q = qcompile.quantize(model, recipe, (torch.randn(4, 16),), calibration=[(torch.randn(4, 16),)], report_samples=1)
    gm = copy.deepcopy(q.graph_module)
    result = Int8WeightsAsUint8Pass()(gm)
    assert not result.modified
    assert not result.changed and "not uint8 codes" in next(iter(result.skipped.values()))


def test_unknown_weight_type_is_an_error():
    q, _ = _saturating_linear()
    with pytest.raises(BackendError, match="int8_weights 'int4'.*auto, int8, uint8"):
        qcompile.lower(q, backend="onnx", int8_weights="int4")
