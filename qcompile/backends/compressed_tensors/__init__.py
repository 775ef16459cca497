"""The compressed-tensors backend (id ``compressed-tensors``, alias ``vllm``): a quantized
transformers causal LM as the directory vLLM and llm-compressor read — ``config.json`` with a
``quantization_config`` built and validated by the ``compressed-tensors`` package's own schema
classes, ``model.safetensors`` with the packed codes (``weight_packed`` / ``weight``),
``weight_scale``, ``weight_zero_point``, ``weight_shape`` and the float tensors untouched — plus
qcompile's manifest (``qcompile.json``: checksums and the contract record) and its smoke inputs.

The mapping (:mod:`.schemes`) is bit for bit: decompressing the directory with compressed-tensors
gives qcompile's reference dequantized weights exactly. Calling the artifact runs the saved
directory in compressed-tensors' own runtime (transformers model, weights decompressed by the
package, activations fake-quantized by its forward).

Example::

    >>> q = qcompile.quantize(model, "w4-g128", ids, example_kwargs={"use_cache": False})
    >>> art = qcompile.lower(q, backend="compressed-tensors", config=model.config)
    >>> art.save("out/llama-w4-ct")             # vllm serve out/llama-w4-ct
    >>> qcompile.check("out/llama-w4-ct")       # reload, smoke inputs, parity against the record
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ...atomic import atomic_directory, read_manifest, write_manifest
from ...contract import SMOKE_FILE, parity_of, record, smoke_bytes, smoke_tensors, split_smoke
from ..base import Capabilities
from .model import CtPlan, load_model, plan_model

FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", SMOKE_FILE)
RUNTIME = "compressed-tensors {version} (transformers model, weights decompressed by the package)"


class CtArtifact:
    """A compressed-tensors directory to be: ``save(path)`` writes it (atomically) and records its
    parity, measured by running the written directory in compressed-tensors' runtime; calling it runs
    that runtime on the saved directory."""

    backend = "compressed-tensors"

    def __init__(self, plan: Optional[CtPlan], qmodel=None):
        self.plan, self.qmodel = plan, qmodel
        self.path: Optional[Path] = None
        self._model = None

    @property
    def quantization_config(self):
        """The package's ``QuantizationConfig`` the directory's config.json holds."""
        return self.plan.quantization_config

    def save(self, path: Union[str, Path]) -> Path:
        """Write the directory: config.json (transformers config + ``quantization_config``),
        model.safetensors, smoke.safetensors, then qcompile.json (checksums and the contract record,
        with the parity of compressed-tensors' runtime against qcompile's reference on the smoke inputs)."""
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from safetensors.torch import save_file

        path = Path(path)
        args, kwargs = self.qmodel.export_example("the compressed-tensors contract's smoke inputs")[:2]
        with torch.no_grad():
            reference = self.qmodel(*args, **kwargs)
        smoke = smoke_tensors(args, {k: v for k, v in kwargs.items() if k in self.qmodel.binder.keywords}, reference)
        with atomic_directory(path) as tmp:
            self.plan.config.to_json_file(str(tmp / "config.json"))
            # the package writes its own quantization_config block (version, quant_method, groups, ignore)
            ModelCompressor(quantization_config=self.plan.quantization_config).update_config(str(tmp))
            save_file(dict(self.plan.tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / SMOKE_FILE).write_bytes(smoke_bytes(smoke))
            model = load_model(tmp, quantized=True)
            smoke_args, smoke_kwargs, smoke_reference = split_smoke(smoke)
            parity = parity_of(run_model(model, *smoke_args, **smoke_kwargs), smoke_reference)
            contract = record(self.qmodel.recipe, self.qmodel.report, self.backend, parity,
                              RUNTIME.format(version=compressed_tensors.__version__))
            write_manifest(tmp, {"format_version": FORMAT_VERSION, "kind": "compressed-tensors",
                                 "contract": contract, "dequantized": self.plan.dequantized}, list(FILES))
        self.path, self._model = path, None
        return path

    def __call__(self, input_ids: torch.Tensor, **kwargs):
        if self.path is None:
            raise RuntimeError("save() the artifact first: it runs the saved directory")
        if self._model is None:
            self._model = load_model(self.path, quantized=True)
        return run_model(self._model, input_ids, **kwargs)


def run_model(model, *args, **kwargs):
    """The logits of a loaded transformers model, as qcompile's reference returns them."""
    kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return model(*args, **kwargs).logits


def read(path: Union[str, Path]) -> dict:
    """The manifest of a saved directory (checksums of every file checked first)."""
    return read_manifest(path, version_key="format_version", version=FORMAT_VERSION,
                         kind="qcompile compressed-tensors directory", required=FILES)


def config_of(path: Union[str, Path]) -> dict:
    """The ``quantization_config`` block of a directory's config.json."""
    return json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})


class CompressedTensorsBackend:
    id = "compressed-tensors"
    # what .schemes maps; the group-divides-K, float-zero-point and double-quantized-scale limits
    # are checked per layer there (named refusals)
    capabilities = Capabilities(
        weights={fmt: {"per_tensor", "per_channel", "per_group"}
                 for fmt in ("int8", "uint8", "int6", "uint6", "uint5", "int4", "uint4", "int3", "uint3",
                             "int2", "uint2")},
        activations={"int8": {"dynamic per_token", "dynamic per_tensor", "static per_tensor"},
                     "uint8": {"dynamic per_token", "dynamic per_tensor", "static per_tensor"}},
        ops={"linear", "embedding"},
        graph_ops=False,   # llama.cpp / vLLM run their own Llama graph: nothing inserted survives
        timing_missing="latency budgets on compressed-tensors: it writes a directory for vLLM, whose speed "
                       "qcompile does not time; use backend='onnx'")

    def lower(self, qmodel, config=None) -> CtArtifact:
        """``config``: the model's transformers config (``model.config``)."""
        return CtArtifact(plan_model(qmodel, config), qmodel)


__all__ = ["CompressedTensorsBackend", "CtArtifact", "config_of", "load_model", "read", "run_model"]
