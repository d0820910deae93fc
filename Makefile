# qwenlite developer targets. The llama.cpp peer (oracle + benchmark baseline) lives in the
# gitignored .peer/ folder, in its own virtual environment, so it never touches the main install.

PYTHON   ?= python3
PEER     := .peer
PEER_PY  := $(PEER)/venv/bin/python
BENCH_VENV := $(PEER)/qwenlite-venv
# Pinned llama-cpp-python sdist (it vendors llama.cpp), fetched from PyPI into .peer/ when missing;
# override SDIST to build from a local copy.
PEER_VERSION := 0.3.36
SDIST    ?= $(PEER)/llama_cpp_python-$(PEER_VERSION).tar.gz
JOBS     ?= 2
# Native CPU code; only the libraries the bindings need (no tools, server, tests, mtmd).
PEER_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
BENCH_ARGS   ?=
BATCH_ARGS   ?=
KV_ARGS      ?=
CONVERT_ARGS ?=
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

FUZZ_ARGS ?=
.PHONY: fuzz install test test-peer lint peer peer-build peer-src peer-server peer-tools bench bench-batch bench-kv bench-serve bench-json bench-venv bench-convert clean

# Editable install of qwenlite with the test extras.
install:
	$(PYTHON) -m pip install -e '.[test]'

# The whole test suite (peer tests skip when .peer/ is absent).
test:
	$(PYTHON) -m pytest -q

# The long fuzz campaign: 10,000 mutated GGUF files, 2,000 mutated checkpoints, 1,000 hostile command
# lines (~15 min on 2 cores); counts by family and outcome, bad cases kept in fuzz-failures/. CI runs
# a sample (tests/test_fuzz.py).
fuzz:
	$(PYTHON) tests/fuzz/run.py --gguf 10000 --hf 2000 --cli 1000 $(FUZZ_ARGS)

# Only the tests that use the llama.cpp oracles.
test-peer: peer
	$(PYTHON) -m pytest -q -m peer

# Lint every Python tree.
lint:
	ruff check qwenlite converters tests benchmarks

# llama-cpp-python 0.3.36 in .peer/venv (~20-60 min on 2 cores; log in .peer/build.log); a no-op
# when it already imports. A lock file keeps concurrent `make` runs from building it twice.
peer: peer-src
	@mkdir -p $(PEER) && flock $(PEER)/build.lock $(MAKE) --no-print-directory peer-build

peer-build:
	@if $(PEER_PY) -c "import llama_cpp" 2>/dev/null; then echo "peer ready: $(PEER_PY)"; else \
	set -e; $(PYTHON) -m venv $(PEER)/venv; $(PEER_PY) -m pip install -q numpy; \
	echo "building llama-cpp-python (tail -f $(PEER)/build.log)"; \
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) nice -n 10 $(PEER_PY) -m pip install \
		-v --config-settings=build-dir=$(CURDIR)/$(PEER)/build $(SDIST) > $(PEER)/build.log 2>&1; \
	$(PEER_PY) -c "import llama_cpp; print('peer ready:', llama_cpp.__version__)"; fi

$(PEER)/llama_cpp_python-$(PEER_VERSION).tar.gz:
	mkdir -p $(PEER) && $(PYTHON) -m pip download -q --no-deps --no-binary :all: -d $(PEER) \
		llama-cpp-python==$(PEER_VERSION)

# llama.cpp's sources from the sdist: convert_hf_to_gguf.py, gguf-py, tokenizer test vectors.
peer-src: $(SDIST)
	@test -d $(PEER)/llama.cpp-src || { mkdir -p $(PEER)/unpack && tar xzf $(SDIST) -C $(PEER)/unpack \
		&& mv $(PEER)/unpack/llama_cpp_python-*/vendor/llama.cpp $(PEER)/llama.cpp-src && rm -rf $(PEER)/unpack; }

# qwenlite vs llama.cpp throughput, TTFT, RSS, bandwidth -> BENCHMARKS.md (extra GGUFs: BENCH_ARGS=...).
bench: peer bench-venv
	QWENLITE_BENCH_EXE=$(CURDIR)/$(BENCH_VENV)/bin/qwenlite $(PYTHON) -m benchmarks.bench_side_by_side $(BENCH_ARGS)

# Batched decode (B sequences per step), qwenlite vs llama.cpp's batch API -> BENCHMARKS.md
# (e.g. BATCH_ARGS="-n 64 -r 3 -b 1,2,4,8").
bench-batch: peer bench-venv
	QWENLITE_BENCH_EXE=$(CURDIR)/$(BENCH_VENV)/bin/qwenlite $(PYTHON) -m benchmarks.bench_batch $(BATCH_ARGS)

# Peak RSS per KV cache type (f32, f16, q8_0) at a 32k context, qwenlite vs llama.cpp -> BENCHMARKS.md.
bench-kv: peer bench-venv
	QWENLITE_BENCH_EXE=$(CURDIR)/$(BENCH_VENV)/bin/qwenlite $(PYTHON) -m benchmarks.kv_memory $(KV_ARGS)

# qwenlite installed the README's way (`pip install -e .`, no test extras) in its own environment, so
# the benchmarks run with exactly the package's dependencies.
bench-venv:
	@test -x $(BENCH_VENV)/bin/qwenlite || { $(PYTHON) -m venv $(BENCH_VENV) && $(BENCH_VENV)/bin/pip install -q -e '.[server]'; }

# llama.cpp's llama-server from the same pinned sources (the `make bench-serve` baseline), built in
# .peer/server-build (~15-30 min on 2 cores; log in .peer/server-build.log). No web UI assets (they would
# be downloaded), no TLS.
PEER_SERVER := $(PEER)/server-build/bin/llama-server
peer-server: peer-src
	@test -x $(PEER_SERVER) || { set -e; echo "building llama-server (tail -f $(PEER)/server-build.log)"; \
	cmake -S $(PEER)/llama.cpp-src -B $(PEER)/server-build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF > $(PEER)/server-build.log 2>&1; \
	nice -n 10 cmake --build $(PEER)/server-build --target llama-server -j $(JOBS) >> $(PEER)/server-build.log 2>&1; }
	@echo "llama-server ready: $(PEER_SERVER)"

# llama.cpp's quality tools from the same sources and build folder as llama-server: llama-perplexity
# (perplexity and KL divergence), llama-imatrix, llama-quantize (the oracles of `qwenlite perplexity`;
# ~15 min on 2 cores, log in .peer/tools-build.log).
PEER_TOOLS := llama-perplexity llama-imatrix llama-quantize
peer-tools: peer-src
	@test -x $(PEER)/server-build/bin/llama-perplexity || { set -e; echo "building $(PEER_TOOLS) (tail -f $(PEER)/tools-build.log)"; \
	cmake -S $(PEER)/llama.cpp-src -B $(PEER)/server-build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF > $(PEER)/tools-build.log 2>&1; \
	nice -n 10 cmake --build $(PEER)/server-build --target $(PEER_TOOLS) -j $(JOBS) >> $(PEER)/tools-build.log 2>&1; }
	@echo "llama.cpp tools ready: $(PEER)/server-build/bin/"

# Served throughput and TTFT, `qwenlite serve --parallel 4` vs `llama-server --parallel 4`, streaming
# clients at concurrency 1/4/8 -> BENCHMARKS.md (e.g. SERVE_ARGS="--models 0.5b").
SERVE_ARGS ?=
bench-serve: peer-server bench-venv
	@$(BENCH_VENV)/bin/python -c "import uvicorn, starlette" 2>/dev/null || $(BENCH_VENV)/bin/pip install -q -e '.[server]'
	QWENLITE_BENCH_EXE=$(CURDIR)/$(BENCH_VENV)/bin/qwenlite LLAMA_SERVER=$(CURDIR)/$(PEER_SERVER) \
		$(PYTHON) -m benchmarks.bench_serve $(SERVE_ARGS)

# Converter speed, qwenlite vs llama.cpp, HF -> Q4_K_M -> BENCHMARKS.md.
# Decode under a JSON-schema constraint vs unconstrained (issue: tool calls and constrained output).
bench-json:
	$(PYTHON) -m benchmarks.bench_constrained $(JSON_ARGS)

bench-convert: peer
	$(PYTHON) -m benchmarks.bench_convert $(CONVERT_ARGS)

# Caches and build outputs (keeps .peer/: rebuilding it is slow; `rm -rf .peer` for that).
clean:
	find . -path ./$(PEER) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
