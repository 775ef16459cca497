"""Run an exported ONNX model in onnxruntime with the PyTorch model's call signature."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ...atomic import atomic_file
from ...capture import flatten_inputs
from ...contract import parity_of, record, smoke_bytes, smoke_tensors
from ...distributed import writes_on_rank_zero
from ...errors import ArtifactError
from .decode import OnnxDecoder

# onnxruntime graph rewrites our sessions turn off, each because it made the model slower here:
# SkipLayerNormFusion replaces residual Add + LayerNormalization with SkipLayerNormalization, whose
# CPU kernel (onnxruntime 1.32) measured 6-8x slower than the two ops it replaces
# (benchmarks/test_onnx_skip_layernorm.py) and less accurate (max error vs float64 2.6e-6 vs 1.0e-6). A session you create yourself for the saved file should pass the same
# ``disabled_optimizers`` (docs/onnx.md). Files qcompile writes now avoid that fusion by themselves
# (rewrites.residual_adds_as_sum writes those residual adds as Sum); the option stays for older files.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_options(threads: int = 0):
    """The onnxruntime session options every qcompile session uses (artifacts and the per-layer
    latency sessions of :mod:`.timing` alike, so both time the same kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime fuses int8 weight-only DQ -> MatMul into MatMulNBits and by default quantizes
    # its activations to int8 there (accuracy level 4): a different model than the recipe's.
    # Level 1 keeps them float, as the recipe says.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


class OnnxArtifact:
    """Callable like the quantized model (torch tensors in, torch tensors out, same structure).

    ``threads``: onnxruntime intra-op threads (1 for benchmarks: see docs/benchmarks.md);
    ``disabled_optimizers``: onnxruntime graph rewrites to skip (default :data:`DISABLED_OPTIMIZERS`)."""

    backend = "onnx"

    def __init__(self, model_bytes: bytes, input_names: list[str], qmodel, threads: int = 0,
                 disabled_optimizers: tuple = DISABLED_OPTIMIZERS):
        import onnxruntime as ort

        self.model_bytes = model_bytes
        self.input_names = input_names
        self._binder = qmodel.binder
        self._gm = qmodel.graph_module
        self._qmodel = qmodel   # the contract record's recipe, report and smoke inputs (save)
        opts = session_options(threads)
        self._options, self._debug = opts, {}
        self.disabled_optimizers = list(disabled_optimizers)
        self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=self.disabled_optimizers)

    def __call__(self, *args, **kwargs):
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, self._feed(args, kwargs))]
        spec = getattr(self._gm, "_out_spec", None)
        return pytree.tree_unflatten(outs, spec) if spec is not None else tuple(outs)

    def decoder(self, layout, batch: int):
        """The fast decode loop for :func:`qcompile.generate`: an :class:`~.decode.OnnxDecoder`
        (onnxruntime IOBinding over a preallocated cache, no per-token allocation) for a file with
        the captured KV-cache signature of ``layout``; None otherwise (generate's plain loop runs it)."""
        if OnnxDecoder.supports(self.session, layout) is not None:
            return None
        return OnnxDecoder(self.session, layout, batch)

    def _feed(self, args, kwargs) -> dict:
        args, kwargs = self._binder.call(args, dict(kwargs))
        flat = [t for t in flatten_inputs(self._gm, args, kwargs) if isinstance(t, torch.Tensor)]
        return {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, flat)}

    @property
    def metadata(self) -> dict:
        """The file's ``metadata_props`` (e.g. ``qcompile.int8_weights``: the int8 weight type
        chosen for the host it was lowered on, and ``qcompile.int8_weights_reason``)."""
        if not hasattr(self, "_metadata"):
            import onnx

            model = onnx.load_from_string(self.model_bytes)
            self._metadata = {p.key: p.value for p in model.metadata_props}
        return self._metadata

    supports_forced_codes = True

    def quantized_activations(self, *args, forced=None, **kwargs) -> list:
        """``[(scale, codes)]`` of every static QuantizeLinear, in graph order (for
        :func:`qcompile.verify`). Runs a second session whose outputs include those codes.

        ``forced``: codes to feed *downstream* of each quantizer instead of the ones this session
        computes (teacher forcing): every layer then starts from the same codes as the reference,
        so a rounding flip in one layer does not propagate into the next one's comparison."""
        key = forced is not None
        if key not in self._debug:
            self._debug[key] = _expose_quantizers(self.model_bytes, self._options, self.disabled_optimizers, forced=key)
        session, points = self._debug[key]
        feed = self._feed(args, kwargs)
        if forced is not None:
            if len(forced) != len(points):
                raise ValueError(f"{len(forced)} forced code tensors for {len(points)} quantizers")
            feed.update({f"{name}__forced": c.detach().cpu().numpy() for (name, _), c in zip(points, forced)})
        outs = session.run([name for name, _ in points], feed)
        return [(scale, torch.from_numpy(np.asarray(o))) for (_, scale), o in zip(points, outs)]

    @writes_on_rank_zero
    def save(self, path) -> Path:
        """Write the ``.onnx`` file (weights inside it) atomically, with qcompile's format version
        and a sha256 of the model in its ``metadata_props``; :func:`read_onnx` checks them. When the
        model has its capture example, the props also hold the contract (:data:`CONTRACT_KEY`: recipe,
        quality, the parity of onnxruntime against the reference on the smoke inputs) and the smoke
        tensors (:data:`SMOKE_KEY`), which ``qcompile.check`` runs again."""
        path = Path(path)
        data = self.model_bytes
        if self._qmodel is not None and getattr(self._qmodel, "_example", None) is not None:
            data = self._with_contract(data)
        with atomic_file(path) as tmp:
            tmp.write_bytes(seal_onnx(data))
        return path

    def _with_contract(self, data: bytes) -> bytes:
        import onnx
        import onnxruntime

        args, kwargs = self._qmodel.export_example("the onnx contract's smoke inputs")[:2]
        kwargs = {k: v for k, v in kwargs.items() if k in self._binder.keywords}
        with torch.no_grad():
            reference = self._qmodel(*args, **kwargs)
        parity = parity_of(self(*args, **kwargs), [t for t in pytree.tree_leaves(reference)
                                                   if isinstance(t, torch.Tensor)])
        smoke = {f"feed.{name}": torch.from_numpy(a) for name, a in self._feed(args, kwargs).items()}
        smoke.update(smoke_tensors((), {}, reference))
        contract = record(self._qmodel.recipe, self._qmodel.report, self.backend, parity,
                          f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)")
        model = onnx.load_from_string(data)
        props = {p.key: p.value for p in model.metadata_props}
        props.update({CONTRACT_KEY: json.dumps(contract), SMOKE_KEY: base64.b64encode(smoke_bytes(smoke)).decode()})
        onnx.helper.set_model_props(model, props)
        return model.SerializeToString()


# metadata_props keys: any ONNX tool reads the file as usual; read_onnx checks them
VERSION_KEY, CHECKSUM_KEY = "qcompile.onnx_format_version", "qcompile.sha256"
# the contract record (JSON) and the smoke tensors (base64 safetensors) qcompile.check reads
CONTRACT_KEY, SMOKE_KEY = "qcompile.contract", "qcompile.smoke"
FORMAT_VERSION = 1


def _unsealed(model):
    """(the model without qcompile's props, those props as a dict)."""
    ours = {p.key: p.value for p in model.metadata_props if p.key in (VERSION_KEY, CHECKSUM_KEY)}
    keep = [p for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model, ours


def seal_onnx(model_bytes: bytes) -> bytes:
    """The model with its format version and the sha256 of its serialized form (without these
    two props) added to ``metadata_props``."""
    import onnx

    model, _ = _unsealed(onnx.load_from_string(model_bytes))
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        VERSION_KEY: str(FORMAT_VERSION), CHECKSUM_KEY: digest})
    return model.SerializeToString()


def read_onnx(path) -> bytes:
    """The bytes of an ``.onnx`` file :meth:`OnnxArtifact.save` wrote, after checking its format
    version and checksum (:class:`~qcompile.errors.ArtifactError` naming the file otherwise).
    Hand them to ``onnxruntime.InferenceSession``.

    Example::

        >>> session = onnxruntime.InferenceSession(read_onnx("out/model.onnx"))
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"'{path}' is missing")
    data = path.read_bytes()
    try:
        model, ours = _unsealed(onnx.load_from_string(data))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"'{path}' is truncated or corrupted (not a readable ONNX model: {e})") from None
    version = ours.get(VERSION_KEY)
    if version is None or not version.isdigit():
        raise ArtifactError(f"'{path}' carries no qcompile onnx format version: it is truncated, corrupted, "
                            f"or was not saved by qcompile")
    if int(version) != FORMAT_VERSION:
        newer = "newer than" if int(version) > FORMAT_VERSION else "not"
        raise ArtifactError(f"'{path}' has onnx format version {version}, {newer} the version this qcompile reads "
                            f"({FORMAT_VERSION})")
    if hashlib.sha256(model.SerializeToString()).hexdigest() != ours.get(CHECKSUM_KEY):
        raise ArtifactError(f"'{path}' does not match its checksum (sha256 mismatch): the file is truncated or corrupted")
    return data


def read_contract(path) -> tuple[dict, dict]:
    """(contract record, smoke tensors) of an ``.onnx`` file :meth:`OnnxArtifact.save` wrote, after
    :func:`read_onnx`'s checks; ``({}, {})`` when the file carries none."""
    import onnx
    from safetensors.torch import load

    model = onnx.load_from_string(read_onnx(path))
    props = {p.key: p.value for p in model.metadata_props}
    if CONTRACT_KEY not in props or SMOKE_KEY not in props:
        return {}, {}
    try:
        return json.loads(props[CONTRACT_KEY]), load(base64.b64decode(props[SMOKE_KEY]))
    except (ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{path}': its contract metadata is unreadable ({e})") from None


def run_smoke(path, feed: dict) -> list:
    """The outputs of the saved file in an onnxruntime session (qcompile's session options) on ``feed``."""
    import onnxruntime as ort

    session = ort.InferenceSession(read_onnx(path), session_options(), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(DISABLED_OPTIMIZERS))
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {k: v.numpy() for k, v in feed.items()})]


def _expose_quantizers(model_bytes: bytes, options, disabled_optimizers=(), forced: bool = False):
    """(a session that also returns every static QuantizeLinear's codes, [(output name, scale)]).
    ``forced``: the quantizers' consumers read a new graph input ``<codes>__forced`` instead."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    points = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in consts:
            continue
        scale = numpy_helper.to_array(consts[node.input[1]])
        if scale.size != 1:
            continue
        zp_type = consts[node.input[2]].data_type if len(node.input) > 2 and node.input[2] in consts \
            else onnx.TensorProto.UINT8
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], zp_type, None))
        points.append((node.output[0], float(scale.reshape(()))))
        if forced:
            name = f"{node.output[0]}__forced"
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, zp_type, None))
            for other in model.graph.node:
                for i, inp in enumerate(other.input):
                    if inp == node.output[0]:
                        other.input[i] = name
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled_optimizers))
    return session, points
