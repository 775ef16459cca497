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
