"""The compressed-tensors backend: a tiny Llama (transformers ``LlamaConfig``) quantized with w4-g128,
w4-g64, w8 and w8a8-dynamic, written as a compressed-tensors directory, its config validated by the
package's own schema classes, every quantized weight decompressed by the package's own compressor
and compared bit for bit with qcompile's reference dequantized weight; the import path reads it back
into a float model; the refusals name the layer and leave no directory."""
import json
import os

# compressed-tensors imports triton when it is imported: without this, triton would start in GPU mode
# for the rest of the process and the Triton backend's CPU interpreter tests would fail after this file
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

import qcompile
from qcompile.errors import BackendError
from qcompile.ops import DEQUANTIZE
from qcompile.recipe import LayerConfig, Recipe
from qcompile.spec import LAYER, QuantSpec

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qcompile.backends.compressed_tensors import config_of, load_model  # noqa: E402
from qcompile.passes.infra import get_attr_tensor  # noqa: E402

# preset -> (format, strategy, group_size, symmetric, activations)
EXPECTED = {"w4-g128": ("pack-quantized", "group", 128, False, None),
            "w4-g64": ("pack-quantized", "group", 64, False, None),
            "w8": ("pack-quantized", "channel", None, True, None),
            "w8a8-dynamic": ("int-quantized", "channel", None, True, ("token", False, True))}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(llama, ids, tmp_path_factory):
    cache = {}

    def get(preset):
        if preset not in cache:
            q = qcompile.quantize(llama, preset, ids, calibration=[ids], example_kwargs={"use_cache": False},
                                  report_samples=1)
            art = qcompile.lower(q, backend="compressed-tensors", config=llama.config)
            cache[preset] = q, art, art.save(tmp_path_factory.mktemp("ct") / preset)
        return cache[preset]
    return get


def reference_weights(q) -> dict:
    """layer -> qcompile's reference dequantized weight (the dequantize op on the stored codes)."""
    gm, out = q.graph_module, {}
    for node in gm.graph.nodes:
        if node.target == DEQUANTIZE and node.args[0].op == "get_attr":
            vals = [getattr(gm, a.target) if hasattr(a, "op") else a for a in node.args]
            out[node.meta[LAYER]] = torch.ops.qcompile.dequantize(*vals)
    return out


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_config_is_the_packages_schema(exported, preset):
    _, _, path = exported(preset)
    block = config_of(path)
    assert block["quant_method"] == "compressed-tensors" and block["quantization_status"] == "compressed"
    qc = QuantizationConfig.model_validate({k: v for k, v in block.items() if k in QuantizationConfig.model_fields})
    fmt, strategy, group, symmetric, act = EXPECTED[preset]
    assert len(qc.config_groups) == 1 and qc.format == fmt
    scheme = next(iter(qc.config_groups.values()))
    assert scheme.targets == ["Linear"] and scheme.format == fmt
    w = scheme.weights
    assert (w.type, w.strategy, w.group_size, w.symmetric) == ("int", strategy, group, symmetric)
    assert w.num_bits == (4 if preset.startswith("w4") else 8)
    if act is None:
        assert scheme.input_activations is None
    else:
        a = scheme.input_activations
        assert (a.strategy, a.symmetric, a.dynamic, a.num_bits) == (*act, 8)
    assert "lm_head" not in qc.ignore   # these presets quantize the head; the embedding is written float
    tensors = load_file(str(path / "model.safetensors"))
    key = "weight_packed" if fmt == "pack-quantized" else "weight"
    assert tensors[f"model.layers.0.mlp.down_proj.{key}"].dtype == (torch.int32 if key == "weight_packed" else torch.int8)
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in tensors) == (not symmetric)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32


def assert_bit_exact(q, path) -> list:
    """Every quantized Linear decompressed by the package's own compressor equals qcompile's
    reference dequantized weight bit for bit; returns the layers compared."""
    ref = reference_weights(q)
    tensors = load_file(str(path / "model.safetensors"))
    qc = QuantizationConfig.model_validate({k: v for k, v in config_of(path).items()
                                            if k in QuantizationConfig.model_fields})
    scheme = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    linears = [layer for layer in ref if layer != "model.embed_tokens"]
    for layer in linears:
        local = {k[len(layer) + 1:]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == layer}
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, ref[layer]), layer
    return linears


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_decompressed_by_the_package_bit_exact(exported, preset):
    q, _, path = exported(preset)
    ref = reference_weights(q)
    tensors = load_file(str(path / "model.safetensors"))
    linears = assert_bit_exact(q, path)
    assert len(linears) == 15
    # the embedding: qcompile's dequantized values, float
    assert torch.equal(tensors["model.embed_tokens.weight"], ref["model.embed_tokens"])
    # the import path (transformers + compressed-tensors): the same weights, the float ones untouched
    model = load_model(path)
    state = model.state_dict()
    for layer in linears:
        assert torch.equal(state[f"{layer}.weight"], ref[layer]), layer
    gm = q.graph_module
    norm = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "model.norm.weight")
    assert torch.equal(state["model.norm.weight"], get_attr_tensor(gm, norm))


def test_parity_recorded_by_the_runtime(exported, ids):
    for preset in ("w4-g128", "w8"):   # weights bit-exact, float activations: float32 noise only
        q, art, path = exported(preset)
        parity = json.loads((path / "qcompile.json").read_text())["contract"]["parity"]
        assert parity["max_rel"] < 1e-5, (preset, parity)
        assert torch.allclose(art(ids), q(ids).logits, rtol=0, atol=1e-5)
    # dynamic activations: equal codes but at exact rounding ties (compressed-tensors rounds x/s + z,
    # qcompile round(x/s) + z), which a tiny random Llama amplifies to ~1 % of the logits' range
    parity = json.loads((exported("w8a8-dynamic")[2] / "qcompile.json").read_text())["contract"]["parity"]
    assert 0 < parity["max_rel"] < 0.05


def test_import_then_quantize_again(exported, ids):
    _, _, path = exported("w4-g128")
    model = load_model(path)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "quantization_scheme")
    q = qcompile.quantize(model, "w8", ids, example_kwargs={"use_cache": False}, report_samples=1)
    assert q.report.output_sqnr > 25


@pytest.mark.parametrize("recipe, message", [
    ("nf4", "format 'nf4'"),
    ("w8a8", "SmoothQuant"),
    (Recipe(name="w8a8-sym-dyn", default=LayerConfig(QuantSpec("int8", "per_channel", symmetric=True),
                                                     QuantSpec("int8", "per_token", symmetric=True, dynamic=True))),
     "127.5"),
])
def test_refusal_names_the_layer_and_writes_nothing(llama, ids, tmp_path, recipe, message):
    q = qcompile.quantize(llama, recipe, ids, calibration=[ids], example_kwargs={"use_cache": False},
                          report_samples=1)
    with pytest.raises(BackendError, match=message) as e:
        qcompile.lower(q, backend="compressed-tensors", config=llama.config).save(tmp_path / "out")
    assert "model.layers.0" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_group_not_dividing_k_is_refused(ids):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    small = ids % 128
    q = qcompile.quantize(model, "w4-g64", small, example_kwargs={"use_cache": False}, report_samples=1)
    with pytest.raises(BackendError, match=r"groups of 64 over K=96.*layer|layer '.*': .*groups of 64 over K=96"):
        qcompile.lower(q, backend="compressed-tensors", config=cfg)


def test_wrong_config_is_refused(exported):
    q, _, _ = exported("w8")
    other = transformers.BertConfig(vocab_size=256, hidden_size=128, num_attention_heads=4, num_hidden_layers=1,
                                    intermediate_size=256)
    with pytest.raises(BackendError, match="not a module of"):
        qcompile.lower(q, backend="compressed-tensors", config=other)


def _copy(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "copy")


def _resign(path, edit=None):
    from qcompile.atomic import write_manifest

    body = json.loads((path / "qcompile.json").read_text())
    files = list(body.pop("files"))
    body.pop("manifest_sha256")
    if edit:
        edit(body)
    write_manifest(path, body, files)


def test_check_passes_and_catches_a_flipped_block(exported, tmp_path):
    from safetensors.torch import save_file

    from qcompile.errors import ArtifactError, ParityError

    _, _, saved = exported("w4-g128")
    result = qcompile.check(saved)
    assert result.passed and result.kind == "compressed-tensors" and result.recipe == "w4-g128"
    path = _copy(saved, tmp_path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-7] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        qcompile.check(path)
    tensors = load_file(str(path / "model.safetensors"))   # the flipped byte is in the last tensor's data
    key = "model.layers.1.mlp.down_proj.weight_packed"
    tensors[key] = tensors[key].clone()
    tensors[key][:4] ^= 0x0F0F0F0F   # a flipped block of packed int4 codes
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _resign(path)
    with pytest.raises(ParityError, match="differ from the recorded reference outputs"):
        qcompile.check(path)


def test_check_catches_wrong_metadata(exported, tmp_path):
    _, _, saved = exported("w4-g128")
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True   # zero points dropped
    (path / "config.json").write_text(json.dumps(config))
    _resign(path)
    with pytest.raises(qcompile.ArtifactError, match="does not match its config's compressed model"):
        qcompile.check(path)   # the stored zero points no longer have a place in the schemes


W = QuantSpec
GRIDS = {   # the declared grids beyond the presets: recipe -> (strategy, symmetric, bits)
    "int8-tensor": (LayerConfig(W("int8", "per_tensor", symmetric=True)), ("tensor", True, 8)),
    "uint2-g64": (LayerConfig(W("uint2", "per_group", symmetric=False, group_size=64)), ("group", False, 2)),
    "int3-channel": (LayerConfig(W("int3", "per_channel", symmetric=True)), ("channel", True, 3)),
    "uint8-channel": (LayerConfig(W("uint8", "per_channel", symmetric=False)), ("channel", False, 8)),
    "w8a8-static": (LayerConfig(W("int8", "per_channel", symmetric=True), W("uint8", "per_tensor", symmetric=False)),
                    ("channel", True, 8)),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "w8a8-static" else n for n in GRIDS])
def test_declared_grids_bit_exact(llama, ids, tmp_path, name):
    layer, (strategy, symmetric, bits) = GRIDS[name]
    q = qcompile.quantize(llama, Recipe(name=name, default=layer), ids, calibration=[ids],
                          example_kwargs={"use_cache": False}, report_samples=1)
    path = qcompile.lower(q, backend="compressed-tensors", config=llama.config).save(tmp_path / name)
    scheme = next(iter(QuantizationConfig.model_validate(
        {k: v for k, v in config_of(path).items() if k in QuantizationConfig.model_fields}).config_groups.values()))
    assert (scheme.weights.strategy, scheme.weights.symmetric, scheme.weights.num_bits) == (strategy, symmetric, bits)
    assert len(assert_bit_exact(q, path)) == 15
    parity = json.loads((path / "qcompile.json").read_text())["contract"]["parity"]
    if name == "w8a8-static":   # static activations: the stored input_scale / zero point, int8 (uint8 - 128)
        a = scheme.input_activations
        assert (a.strategy, a.dynamic, a.symmetric) == ("tensor", False, False) and scheme.format == "int-quantized"
        tensors = load_file(str(path / "model.safetensors"))
        assert tensors["model.layers.0.mlp.down_proj.input_zero_point"].dtype == torch.int8
        assert parity["max_rel"] < 0.05
    else:
        assert parity["max_rel"] < 1e-5


def test_tied_head_stays_tied(ids, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    q = qcompile.quantize(model, "w4-g128", ids, example_kwargs={"use_cache": False}, report_samples=1)
    path = qcompile.lower(q, backend="compressed-tensors", config=cfg).save(tmp_path / "tied")
    config = json.loads((path / "config.json").read_text())
    # the head reads the embedding's int8 codes: written once, as qcompile's dequantized float values
    assert config["tie_word_embeddings"] and config["quantization_config"]["ignore"] == ["lm_head"]
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    assert len(assert_bit_exact(q, path)) == 7
    assert qcompile.check(path).passed
