# llava-triton. `make demo` exports the embedded default, serves it and streams an answer;
# `make test` runs the test suite. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
ENGINE ?= pytorch
REPO ?= model_repository
GRPC_PORT ?= 8001
OPENAI_PORT ?= 9000
PYTEST_ARGS ?=
# AIPerf in a venv of its own (its pins clash with ours), for tests/test_openai.py.
AIPERF_VENV ?= build/aiperf-venv
# checkov, the chart's policy scanner, in a venv of its own too (make scan-chart).
CHECKOV_VENV ?= build/checkov-venv

.PHONY: setup aiperf export serve demo test bench soak lint scan-chart docs clean

setup: $(VENV)/.setup-done

# The venv: this project (editable) with every optional group of pyproject.toml, and the Triton
# server shipped inside the nvidia-pytriton wheel (installed without its own dependencies: we only
# use its server binary and backend). The serving image installs the base and `export` only.
EXTRAS := export,bench,test,chart,lint
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	@# perf_analyzer needs libb64 from Debian.
	@if ! ldconfig -p | grep -q libb64.so.0d; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y -qq libb64-0d >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null)); \
	  else echo "perf_analyzer needs Debian's libb64-0d: sudo apt-get install libb64-0d"; fi; fi
	$(PY) -m llava_triton.server --check
	touch $@

# Every package pinned in bench/aiperf-requirements.txt, installed without resolving anything else.
aiperf: $(AIPERF_VENV)/.setup-done
$(AIPERF_VENV)/.setup-done: bench/aiperf-requirements.txt
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(AIPERF_VENV)/bin/python -m pip install -q --no-deps -r bench/aiperf-requirements.txt
	$(AIPERF_VENV)/bin/python -m pip check
	touch $@

export: setup
	$(PY) -m export $(if $(MODEL),--model $(MODEL)) --engine $(ENGINE) --output $(REPO)

# Triton's HTTP, gRPC and metrics ports (8000, 8001, 8002) and the OpenAI-compatible API on OPENAI_PORT
# (http://localhost:9000/v1; OPENAI_PORT=0: none).
serve: setup
	$(PY) -m llava_triton.server --model-repository $(REPO) --grpc-port $(GRPC_PORT) --openai-port $(OPENAI_PORT)

demo: export
	$(PY) -m llava_triton.demo --model-repository $(REPO)

test: setup aiperf
	AIPERF=$(abspath $(AIPERF_VENV))/bin/aiperf $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

SOAK_ARGS ?= --duration-s 1800 --concurrency 64
soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)

# ruff as configured in pyproject.toml (it also reports syntax errors), the Dockerfile's linter,
# whether the files generated from llava_triton/spec.py (docs/api.md, the chart's schema) are current,
# and the chart's policy scan.
lint: setup
	$(VENV)/bin/ruff check
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m llava_triton.generated --check
	$(MAKE) --no-print-directory scan-chart

# The chart rendered with several values and scanned by checkov (helm/scan.py says what fails), from a
# venv of its own: checkov's pinned dependencies (helm/checkov-requirements.txt) are not ours.
$(CHECKOV_VENV)/.setup-done: helm/checkov-requirements.txt
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(CHECKOV_VENV)/bin/python -m pip install -q -r helm/checkov-requirements.txt
	touch $@

scan-chart: setup $(CHECKOV_VENV)/.setup-done
	$(PY) helm/scan.py --checkov $(CHECKOV_VENV)/bin/checkov --output build/chart-scan

# Regenerate docs/api.md's tables and the chart's values schema from llava_triton/spec.py.
docs: setup
	$(PY) -m llava_triton.generated

clean:
	rm -rf build $(REPO)/*/config.pbtxt
	find $(REPO) -path '*/1/*' ! -name model.py ! -name .gitkeep -delete
