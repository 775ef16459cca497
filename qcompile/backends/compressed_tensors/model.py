"""A quantized transformers model as a compressed-tensors directory (``config.json`` with its
``quantization_config``, ``model.safetensors``), planned from the converted graph, and the way
back: :func:`load_model` reads any compressed-tensors directory (qcompile's or another tool's)
into a float transformers model, decompressed by the package itself."""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from compressed_tensors.quantization import QuantizationConfig

from ...errors import ArtifactError, BackendError
from ...ops import DEQUANTIZE
from ...passes.infra import get_attr_tensor, layer_of
from .schemes import EMBEDDING, LINEAR, LayerPlan, activation_args, compressed_tensors, \
    storage_format, weight_plan


@dataclass
class CtPlan:
    """What the directory will hold: the transformers config (``tie_word_embeddings`` set to what
    the graph does), the package's ``QuantizationConfig``, and every tensor by its transformers name."""

    config: object
    quantization_config: QuantizationConfig
    tensors: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    layers: dict = field(default_factory=dict)        # layer -> LayerPlan (quantized Linears)
    dequantized: list = field(default_factory=list)   # layers written as qcompile's dequantized float weight


def _skeleton(config):
    """The transformers model of ``config`` on the meta device: the names and shapes to write."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _weight_sources(gm) -> dict:
    """layer -> (op node, weight node) for every Linear and embedding of the graph."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (LINEAR, EMBEDDING):
            w = node.args[1] if node.target == LINEAR else node.args[0]
            out.setdefault(layer_of(node), (node, w))
    return out


def plan_model(qmodel, config) -> CtPlan:
    """Map ``qmodel``'s converted graph onto ``config``'s transformers model: quantized Linears as
    compressed-tensors schemes (:mod:`.schemes`), quantized embeddings as qcompile's exact
    dequantized float values (vLLM loads no quantized embedding), every other tensor as it is."""
    if config is None:
        raise BackendError("the compressed-tensors backend needs the model's transformers config: "
                           "qcompile.lower(q, backend='compressed-tensors', config=model.config)")
    gm = qmodel.graph_module
    skeleton = _skeleton(config)
    expected = skeleton.state_dict()
    linears = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    sources = _weight_sources(gm)
    tensors: dict = {}
    layers: dict = {}
    dequantized = []
    by_node: dict = {}
    for layer, (op, w) in sources.items():
        if f"{layer}.weight" not in expected:
            raise BackendError(f"layer '{layer}' of the quantized graph is not a module of {type(skeleton).__name__} "
                               f"(config.model_type {getattr(config, 'model_type', None)!r}): pass the config of the "
                               "model that was quantized")
        if op.target == LINEAR and op.args[2:] and op.args[2] is not None:
            bias = get_attr_tensor(gm, op.args[2])
            if bias is None:
                raise BackendError(f"layer '{layer}': its bias is computed in the graph, not a stored tensor")
            tensors[f"{layer}.bias"] = bias.detach()
        if w in by_node:   # a tied head reads the embedding's own tensor
            by_node[w].append(layer)
            continue
        by_node[w] = [layer]
        if getattr(w, "target", None) == DEQUANTIZE and op.target == LINEAR and get_attr_tensor(gm, w.args[0]) is not None:
            plan = weight_plan(gm, layer, w)
            activation_args(gm, plan, op.args[0])
            layers[layer] = plan
        elif getattr(w, "target", None) == DEQUANTIZE:
            if op.target == LINEAR:
                raise BackendError(f"layer '{layer}': its weight codes are not a stored tensor")
            with torch.no_grad():   # qcompile's reference dequantized values, float
                tensors[f"{layer}.weight"] = torch.ops.qcompile.dequantize(*[get_attr_tensor(gm, a) if hasattr(a, "op") else a
                                                                             for a in w.args])
            dequantized.append(layer)
        elif get_attr_tensor(gm, w) is not None:
            tensors[f"{layer}.weight"] = get_attr_tensor(gm, w).detach()
        else:
            raise BackendError(f"layer '{layer}': its weight comes from '{w.target}', not a stored tensor or a "
                               "dequantize of stored codes")
    for node in gm.graph.nodes:   # norms, biases and other float parameters under their own names
        if node.op == "get_attr" and node.target in expected and node.target not in tensors:
            tensors[node.target] = get_attr_tensor(gm, node).detach()
    config = copy.deepcopy(config)
    tied = any(len(ls) > 1 for ls in by_node.values())
    config.tie_word_embeddings = tied
    for ls in by_node.values():   # a tied head: transformers ties it again on load
        for layer in ls[1:]:
            tensors.pop(f"{layer}.weight", None)
    for layer, plan in layers.items():
        tensors.pop(f"{layer}.weight", None)
        for name, t in compressed_tensors(plan, storage_format(plan.scheme)).items():
            tensors[f"{layer}.{name}"] = t
    tied_keys = {f"{ls[i]}.weight" for ls in by_node.values() for i in range(1, len(ls))}
    missing = [k for k in expected if k not in tensors and k not in tied_keys and
               not any(k == f"{layer}.weight" for layer in layers) and not k.endswith("inv_freq")]
    if missing:
        raise BackendError(f"the quantized graph holds no tensor for {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} of {type(skeleton).__name__}: was it captured from "
                           "this config's model?")
    qconfig = quantization_config(layers, sorted(linears - set(layers)))
    # cloned: layers that share one activation quantizer (q/k/v) would otherwise share its scale's storage
    ordered = OrderedDict((k, tensors[k].detach().cpu().contiguous().clone()) for k in sorted(tensors))
    return CtPlan(config, qconfig, ordered, layers, dequantized)


def quantization_config(layers: dict, ignore: list) -> QuantizationConfig:
    """The package's ``QuantizationConfig``: one config group per distinct scheme (targets: the
    layer names, or ``Linear`` when one scheme covers every quantized Linear and ``ignore`` the rest),
    ``quantization_status`` compressed. The package validates every field as it builds it."""
    groups: dict = {}
    for layer, plan in layers.items():
        key = (plan.scheme.weights.model_dump_json(), plan.scheme.input_activations.model_dump_json()
               if plan.scheme.input_activations else "", storage_format(plan.scheme))
        groups.setdefault(key, []).append(plan)
    config_groups = {}
    for i, plans in enumerate(groups.values()):
        s = plans[0].scheme
        targets = ["Linear"] if len(groups) == 1 else [p.layer for p in plans]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": s.weights.model_dump(),
                                       "input_activations": s.input_activations.model_dump()
                                       if s.input_activations else None, "format": storage_format(s)}
    formats = {storage_format(p[0].scheme) for p in groups.values()}
    return QuantizationConfig(config_groups=config_groups, quantization_status="compressed", ignore=ignore,
                              format=formats.pop() if len(formats) == 1 else "mixed-precision")


def load_model(path: Union[str, Path], quantized: bool = False, dtype: torch.dtype = torch.float32):
    """Read a compressed-tensors directory (vLLM / llm-compressor layout; qcompile's or another
    tool's) through transformers, every quantized Linear decompressed by compressed-tensors' own
    compressors.

    ``quantized=False`` (import): a plain float transformers model, to verify or quantize again.
    ``quantized=True`` (runtime): the modules keep the package's quantization schemes, so a call
    runs compressed-tensors' reference forward (weights decompressed on the first call, activations
    fake-quantized dynamically or with the stored ``input_scale``): what the artifact's parity measures.

    Example::

        >>> from qcompile.backends.compressed_tensors import load_model
        >>> model = load_model("out/llama-w4-ct")           # a transformers model, float weights
        >>> q = qcompile.quantize(model, "w8", ids, example_kwargs={"use_cache": False})
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"'{path}' is not a compressed-tensors directory: config.json is missing")
    try:
        if quantized:
            return _quantized_runtime(path, dtype).eval()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"'{path}': compressed-tensors could not load it: {e}") from e
    return model.eval()


def _quantized_runtime(path: Path, dtype: torch.dtype):
    """compressed-tensors' own decompression lifecycle (its ``ModelCompressor`` docstring): apply the
    config's schemes to a fresh model, compress it (the packed parameter layout), load the
    checkpoint's tensors into it, decompress. transformers 5.25's ``dequantize=False`` path cannot
    load an asymmetric pack-quantized checkpoint: it builds the unpacked zero-point shape on the
    meta device ([N, G]) where the package writes it packed ([N / (32 / bits), G])."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    block = getattr(config, "quantization_config", None) or {}
    block = block if isinstance(block, dict) else block.to_dict()
    qconfig = QuantizationConfig.model_validate({k: v for k, v in block.items() if k in QuantizationConfig.model_fields})
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_quantization_config(model, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "smoke.safetensors":
            state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ArtifactError(f"'{path}': the checkpoint does not match its config's compressed model: missing "
                            f"{missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    compressor.decompress_model(model)
    return model


__all__ = ["CtPlan", "LayerPlan", "load_model", "plan_model", "quantization_config"]
