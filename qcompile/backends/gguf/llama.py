"""A quantized Llama-architecture causal LM as the tensors and metadata of a GGUF file, the way
llama.cpp's ``convert_hf_to_gguf.py`` writes one: tensor names from the ``gguf`` package's name
map, q/k rows permuted for llama.cpp's rotary layout, norms as F32, a tied ``lm_head`` left to
``token_embd``, the tokenizer as ``tokenizer.ggml.*`` metadata, and each quantized weight's codes
packed into the block type that holds its grid bit for bit (:mod:`.blocks`)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import gguf
import numpy as np
import torch

from ...errors import BackendError
from ...ops import DEQUANTIZE
from ...passes.infra import get_attr_tensor, layer_of
from ...presets import gguf_activation
from ...spec import LAYER, QPARAMS, ROLE
from .blocks import BLOCK_TYPES, K_QUANTS, QuantizedWeight, match, refusal
from .kquants import K_TYPES, match_k
from .requantize import requantize as requantize_weight

ARCH = "llama"
REQUANTIZED_KEY = "qcompile.requantized"   # GGUF metadata: the requantize option's per-layer report (JSON)
# the type a file "mostly" is (general.file_type), as llama.cpp's quantizer names it
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17,
               "Q6_K": 18}


@dataclass
class GgufTensor:
    name: str
    data: np.ndarray          # F32 values, or uint8 blocks [rows, bytes per row]
    type: str                 # "F32" or a BLOCK_TYPES / K_TYPES name
    layer: str                # the qcompile layer it came from


@dataclass
class GgufPlan:
    """What a GGUF file will hold: metadata calls on a ``gguf.GGUFWriter`` and the tensors."""

    metadata: list = field(default_factory=list)   # (GGUFWriter method name, args)
    tensors: list = field(default_factory=list)
    # layer -> report entry of a weight requantized to the nearest type (requantize.requantize)
    requantized: dict = field(default_factory=dict)

    def types(self) -> dict:
        """GGUF tensor name → its type (``Q4_0``, ``F32``, ...)."""
        return {t.name: t.type for t in self.tensors}


def _require_llama(config) -> None:
    if config is None:
        raise BackendError("the gguf backend needs the model's transformers config: "
                           "qcompile.lower(q, backend='gguf', config=model.config, tokenizer=tokenizer)")
    model_type = getattr(config, "model_type", None)
    if model_type != ARCH:
        raise BackendError(f"the gguf backend writes Llama-architecture causal LMs (config.model_type 'llama'); "
                           f"got model_type {model_type!r} ({type(config).__name__})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise BackendError(f"the gguf backend writes default rotary embeddings; this config has rope scaling {rope}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise BackendError(f"the gguf backend writes Llama without biases; config.{flag} is true")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


# bitsandbytes-style double-quantized scales: no GGUF type stores them (a refusal, or requantized)
_DOUBLE_QUANTIZED = ("double-quantized (int8) scales or zero points ({fmt}, groups of {group}) are bitsandbytes' "
                     "form, which no GGUF type stores; llama.cpp's k-quants ({kq}) are scale_dtype kquant6/kquant8 "
                     "(the gguf-q4_k_m/-q6_k presets)")


def _weights(gm, requantize: bool = False) -> dict:
    """layer path → its weight as the graph holds it (a float tensor or a :class:`QuantizedWeight`),
    plus ``"lm_head"`` → ``"tied"`` when the head reads the embedding's own tensor. ``requantize``:
    a double-quantized weight is returned with its scales' values (``.refused`` says why) instead
    of raising."""
    out: dict = {}
    seen: dict = {}   # weight node -> the first layer reading it
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default,
                                                              torch.ops.aten.embedding.default):
            continue
        layer = layer_of(node)
        w = node.args[1] if node.target == torch.ops.aten.linear.default else node.args[0]
        if w in seen:
            out[layer] = ("tied", seen[w])
            continue
        seen[w] = layer
        if node.target == torch.ops.aten.linear.default and len(node.args) > 2 and node.args[2] is not None:
            raise BackendError(f"layer '{layer}' has a bias; the gguf backend writes Llama without biases")
        if w.op == "get_attr":
            out[layer] = get_attr_tensor(gm, w).detach().float()
        elif w.target == DEQUANTIZE:
            codes, scale, zp, fmt, group = w.args[:5]
            two = _two_level(gm, scale, zp)
            if two is None and (getattr(scale, "op", None) != "get_attr" or getattr(zp, "op", "get_attr") != "get_attr"):
                why = _DOUBLE_QUANTIZED.format(fmt=fmt, group=group, kq=", ".join(K_QUANTS))
                if not requantize:
                    raise NotImplementedError(f"layer '{layer}': {why}")
                out[layer] = QuantizedWeight(layer, fmt, group, get_attr_tensor(gm, codes), _evaluate(gm, scale),
                                             None if zp is None else _evaluate(gm, zp), refused=why)
                continue
            if two is not None:
                deq = _evaluate(gm, scale), None if zp is None else _evaluate(gm, zp)
                out[layer] = QuantizedWeight(layer, fmt, group, get_attr_tensor(gm, codes), deq[0], deq[1], two)
                continue
            out[layer] = QuantizedWeight(layer, fmt, group, get_attr_tensor(gm, codes), get_attr_tensor(gm, scale),
                                         None if zp is None else get_attr_tensor(gm, zp))
        else:
            raise BackendError(f"layer '{layer}': its weight comes from '{w.target}', not a stored tensor or a "
                               "dequantize of stored codes")
    return out


def _activations(gm) -> dict:
    """layer path → the activation spec its Linear quantizes its input with (None: float input)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            x = node.args[0]
            quantized = getattr(x, "target", None) == DEQUANTIZE and x.meta.get(ROLE) == "activation"
            out[layer_of(node)] = x.meta.get(QPARAMS) if quantized else None
    return out


def check_activations(gm, tensors: list) -> None:
    """A Linear whose input the recipe quantizes must quantize it the way llama.cpp's CPU dot product
    does for the type its weight is written as (:func:`qcompile.presets.gguf_activation`), else the
    reference would compute another model than the file: a :class:`BackendError` naming the layer."""
    types = {t.layer: t.type for t in tensors}
    for layer, spec in _activations(gm).items():
        if spec is None:
            continue
        gtype = types.get(layer, types.get("model.embed_tokens") if layer == "lm_head" else None)
        if gtype is None or gtype == "F32":
            raise BackendError(f"layer '{layer}': its input is quantized ({spec.format} {spec.granularity}) but its "
                               "weight is written F32; llama.cpp quantizes no input of a float matmul")
        want = gguf_activation(gtype)
        if spec != want:
            raise BackendError(f"layer '{layer}': its input is quantized as {spec.format} {spec.granularity} "
                               f"(group {spec.group_size}, symmetric {spec.symmetric}); llama.cpp computes a {gtype} "
                               f"matmul with int8 inputs in blocks of {want.group_size} (symmetric, amax / 127): "
                               "qcompile.presets.gguf_activation(type) is that spec")


def _two_level_parts(gm, node):
    """(codes, super-scales, code format) of a k-quant two-level value node (a dequantize of stored
    codes against stored float16 super-scales, :meth:`ConvertPass._two_level`), else None."""
    if getattr(node, "target", None) != DEQUANTIZE or node.args[2] is not None \
            or any(getattr(a, "op", None) != "get_attr" for a in node.args[:2]):
        return None
    return get_attr_tensor(gm, node.args[0]), get_attr_tensor(gm, node.args[1]), node.args[3]


def _two_level(gm, scale, zp) -> Optional[dict]:
    """The k-quant parts of a weight's scale (and minimum) nodes, as ``QuantizedWeight.two_level``."""
    s = _two_level_parts(gm, scale)
    if s is None or s[1].dtype != torch.float16:
        return None
    kind = {"uint6": "kquant6", "int8": "kquant8", "uint4": "kquant4", "int6": "kquant6s"}.get(s[2])
    two = {"scale_dtype": kind, "scale_codes": s[0], "scale_super": s[1]}
    if zp is not None:
        m = _two_level_parts(gm, zp)
        if m is None or m[2] not in ("uint6", "uint4"):
            return None
        two.update(zero_point_dtype="kquant6" if m[2] == "uint6" else "kquant4", min_codes=m[0], min_super=m[1])
    return two if kind else None


def _evaluate(gm, node):
    """The value of a node computed from stored tensors alone, as the graph computes it: a weight's
    scale or minimum subgraph (two-level: the dequantize of its parts; double-quantized: dequantize,
    add, reshape, clamp)."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return get_attr_tensor(gm, node)
    return node.target(*[_evaluate(gm, a) for a in node.args], **{k: _evaluate(gm, v) for k, v in node.kwargs.items()})


def _norms(gm) -> dict:
    """norm path → its weight: a stored ``*norm.weight``, or a tensor a pass put in its place (AWQ
    folds ``1/s`` into a norm as a new tensor) named by the norm ``mul`` that reads it."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        if n.target.endswith("norm.weight"):
            out[n.target.removesuffix(".weight")] = get_attr_tensor(gm, n).detach().float()
            continue
        for user in n.users:
            norm = str(user.meta.get(LAYER) or "")
            if user.target == torch.ops.aten.mul.Tensor and norm.endswith("norm") and ".mlp." not in norm \
                    and get_attr_tensor(gm, n).dim() == 1 and user.meta.get(ROLE) is None:
                out[norm] = get_attr_tensor(gm, n).detach().float()
    return out


def check_input_scales(gm) -> None:
    """A per-channel ``mul`` on a Linear's input (AWQ's or SmoothQuant's ``1/s`` where no norm or
    previous layer could absorb it) has no tensor in llama.cpp's Llama graph: a
    :class:`BackendError` naming the layer, not a file that drops it."""
    for node in gm.graph.nodes:
        if node.meta.get(ROLE) == "smoothing":
            raise BackendError(f"layer '{node.meta.get(LAYER)}': its input is multiplied by a per-channel scale "
                               f"('{node.name}', AWQ/SmoothQuant's 1/s that no norm or previous layer absorbed); "
                               "llama.cpp's Llama graph has no tensor for it. Fold it (a float32-scale grid lets AWQ "
                               "fold it into the previous layer's rows) or solve without it")


def rotary_permutation(rows: int, n_head: int) -> torch.Tensor:
    """The row order ``convert_hf_to_gguf.py`` gives q_proj / k_proj (``LlamaModel.permute``): per head,
    the two rotary halves interleaved, as llama.cpp's rotary embedding reads them."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _tensor(name: str, layer: str, w, perm: Optional[torch.Tensor], as_float: bool) -> GgufTensor:
    if isinstance(w, torch.Tensor):
        w = w if perm is None else w[perm]
        return GgufTensor(name, w.numpy().astype(np.float32), "F32", layer)
    if perm is not None:
        w = w.permute_rows(perm)
    if as_float:   # a per-channel embedding: its exact dequantized values
        deq = DEQUANTIZE(w.codes, w.scale, w.zero_point, w.format, w.group_size, torch.float32)
        return GgufTensor(name, deq.numpy(), "F32", layer)
    if w.two_level:
        ktype, packed = match_k(w, refusal)
        return GgufTensor(name, packed, ktype.name, layer)
    btype, u, d, m = match(w)
    return GgufTensor(name, btype.pack(u, d, m), btype.name, layer)


def llama_tensors(qmodel, config, requantize: bool = False, requantized: Optional[dict] = None) -> list:
    """The GGUF tensors of a quantized Llama causal LM (each quantized weight packed bit for bit into
    its block type), without the metadata: what :func:`plan_llama` writes and
    :func:`~.verify.verify_gguf` compares a file against. ``requantize``: a weight whose grid no type
    holds is requantized to the nearest type (:mod:`.requantize`) instead of refused; each such layer's
    report entry goes into ``requantized``."""
    _require_llama(config)
    gm = qmodel.graph_module
    check_input_scales(gm)
    weights, norms = _weights(gm, requantize), _norms(gm)
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tensors = []
    for layer, w in list(weights.items()) + list(norms.items()):
        if isinstance(w, tuple):   # ("tied", first reader): llama.cpp reads token_embd as the output
            if not (layer == "lm_head" and w[1] == "model.embed_tokens"):
                raise BackendError(f"layer '{layer}' shares its weight with '{w[1]}'; GGUF ties only lm_head "
                                   "to the token embedding")
            continue
        gname = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise BackendError(f"layer '{layer}' has no GGUF name in llama's tensor map: not a Llama causal LM")
        perm = None
        if layer.endswith("self_attn.q_proj"):
            perm = rotary_permutation(n_head * head_dim, n_head)
        elif layer.endswith("self_attn.k_proj"):
            perm = rotary_permutation(n_kv * head_dim, n_kv)
        per_channel = isinstance(w, QuantizedWeight) and not w.group_size
        embedding = layer in ("model.embed_tokens", "lm_head")
        try:
            if isinstance(w, QuantizedWeight) and w.refused:
                raise NotImplementedError(f"layer '{layer}': {w.refused}")
            if per_channel and not embedding:
                raise BackendError(f"layer '{layer}': no GGUF block type holds its grid ({w.grid()}): llama.cpp's "
                                   "blocks are groups of 32; the nearest type is Q8_0 (a gguf-* preset targets it)")
            tensors.append(_tensor(gname, layer, w, perm, per_channel and embedding))
        except (BackendError, NotImplementedError) as e:
            if not (requantize and isinstance(w, QuantizedWeight)):
                raise
            w, entry = requantize_weight(w, str(e))
            if requantized is not None:
                requantized[layer] = entry
            tensors.append(_tensor(gname, layer, w, perm, False))
    if "model.embed_tokens" not in weights:
        raise BackendError("no model.embed_tokens in the graph: not a Llama causal LM")
    check_activations(gm, tensors)
    return tensors


def plan_llama(qmodel, config, tokenizer, tokenizer_pre: str = "default", name: Optional[str] = None,
               requantize: bool = False) -> GgufPlan:
    """The GGUF tensors and metadata of a quantized Llama causal LM (``config``: its transformers
    config; ``tokenizer``: its transformers tokenizer, byte-level BPE; ``requantize``: see
    :func:`llama_tensors`). See the module docstring."""
    _require_llama(config)
    requantized: dict = {}
    plan = GgufPlan(tensors=llama_tensors(qmodel, config, requantize, requantized), requantized=requantized)
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    counts = Counter(t.type for t in plan.tensors if t.type in BLOCK_TYPES or t.type in K_TYPES)
    main = counts.most_common(1)[0][0] if counts else "F32"

    meta = plan.metadata
    meta += [("add_name", (name or getattr(qmodel.recipe, "name", None) or "qcompile",)),
             ("add_context_length", (config.max_position_embeddings,)),
             ("add_embedding_length", (config.hidden_size,)),
             ("add_block_count", (n_layer,)),
             ("add_feed_forward_length", (config.intermediate_size,)),
             ("add_head_count", (n_head,)),
             ("add_head_count_kv", (n_kv,)),
             ("add_rope_freq_base", (_rope_theta(config),)),
             ("add_layer_norm_rms_eps", (float(config.rms_norm_eps),)),
             ("add_rope_dimension_count", (head_dim,)),
             ("add_vocab_size", (config.vocab_size,)),
             ("add_file_type", (_FILE_TYPES[main],)),
             ("add_quantization_version", (gguf.GGML_QUANT_VERSION,))]
    if head_dim * n_head != config.hidden_size:
        meta += [("add_key_length", (head_dim,)), ("add_value_length", (head_dim,))]
    meta += tokenizer_metadata(tokenizer, config.vocab_size, tokenizer_pre)
    if requantized:   # the file says which layers are not the reference's weights, and by how much
        meta.append(("add_string", (REQUANTIZED_KEY, json.dumps(requantized))))
    return plan


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str = "default") -> list:
    """``tokenizer.ggml.*`` metadata of a transformers byte-level BPE tokenizer (GPT-2 style: the
    kind SmolLM2 and Llama-3 use), padded to ``vocab_size`` as ``convert_hf_to_gguf.py`` does."""
    if tokenizer is None:
        raise BackendError("the gguf backend needs the model's tokenizer (tokenizer=...): llama.cpp loads none "
                           "without one")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise BackendError(f"the gguf backend writes byte-level BPE tokenizers; this one is "
                           f"{model.get('type', type(tokenizer).__name__)!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    n = len(tokenizer)
    if n > vocab_size:
        raise BackendError(f"the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    types = [3 if i in special else 1 for i in range(n)]   # CONTROL, NORMAL
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [5] * (vocab_size - n)                         # UNUSED
    meta: list[tuple[str, Any]] = [("add_tokenizer_model", ("gpt2",)), ("add_tokenizer_pre", (pre,)),
                                   ("add_token_list", (tokens,)), ("add_token_types", (types,)),
                                   ("add_token_merges", (merges,))]
    for what, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            meta.append((f"add_{what}_token_id", (int(value),)))
    meta.append(("add_add_bos_token", (bool(getattr(tokenizer, "add_bos_token", False)),)))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        meta.append(("add_chat_template", (tokenizer.chat_template,)))
    return meta
