# One-command setup and the two quick-start jobs. Everything runs from a local virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
# torch comes first, pinned to the CPU wheel; the extras' `torch>=2.4` range is then already met.
TORCH  ?= torch==2.13.0

TOOLS  ?= .tools-venv
# perf_analyzer ships inside tritonclient 2.51.0's wheel (newer wheels need a newer glibc); that
# tritonclient pins old numpy/protobuf, so it lives in its own venv and only its binary is used.
PERF_ANALYZER := $(TOOLS)/bin/kiln-perf-analyzer

.PHONY: setup tools demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

tools: $(PERF_ANALYZER)

$(PERF_ANALYZER):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --no-deps "tritonclient==2.51.0" nvidia-cuda-runtime-cu12
	@# perf_analyzer links libb64 (Debian package); best effort so machines without root still test
	-dpkg -s libb64-0d >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libb64-0d) >/dev/null 2>&1
	printf '#!/bin/sh\nLD_LIBRARY_PATH="%s$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "%s" "$$@"\n' \
	  "$$(cd $$(dirname $$(find $(TOOLS) -name 'libcudart.so.12' | head -1)) && pwd)" \
	  "$$(cd $(TOOLS)/bin && pwd)/perf_analyzer" > $@
	chmod +x $@

# The main job on the bundled default, from nothing to a served model: train ResNet-20 on
# scikit-learn's digits, export it through the parity gate, serve it, classify held-out digits
# over gRPC, print a metrics excerpt, stop the server (serving/quickstart.py).
demo: setup
	$(BIN)/python -m serving.quickstart --workdir quickstart

test: setup tools
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
