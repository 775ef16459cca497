"""Shared set-up for the benchmark suites (run with ``python -m pytest benchmarks --benchmark-only``).

Every benchmark runs on one intra-op thread: numbers are comparable between machines with a
different core count, and float and quantized runs compete for nothing. The bundled MiniLM and
the docstring text are loaded once per session."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 (``qcompile.models.MiniLM``), float, eval mode."""
    from qcompile.models import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def session_cache():
    """A dict shared by the tests of one run (the quantized model, float medians for ratios)."""
    return {}


@pytest.fixture(scope="session")
def compiled_peers(minilm):
    """``get(impl, batch) -> (callable, build seconds)`` for MiniLM's compiled peers
    (``benchmarks/peers.py``): ``"float-compiled"`` (inductor) and ``"torchao-pt2e"`` (torchao's
    PT2E x86 int8 path), each built once per session on first use (about a minute each: inductor
    specializes on the batch size)."""
    import peers
    from test_minilm import _calibration_batches, _fixed_inputs

    built = {}

    def get(impl: str, batch: int):
        if (impl, batch) not in built:
            example = _fixed_inputs(minilm, batch)
            if impl == "float-compiled":
                built[impl, batch] = peers.torch_compiled(minilm.model, example)
            elif impl == "torchao-pt2e":
                pytest.importorskip("torchao")
                built[impl, batch] = peers.torchao_pt2e_x86(minilm.model, example, _calibration_batches(minilm))
            else:
                raise KeyError(impl)
        return built[impl, batch]

    return get
