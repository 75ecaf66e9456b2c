# One Makefile: install run test lint bench crds. Everything installs into .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint format bench crds proto check-generated clean

install: $(STAMP)

$(STAMP): pyproject.toml hack/install_helm.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[operator,serving,cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside torch 2.13.0+cpu
	# (see ../shared/STACK.md); text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) hack/install_helm.py --dest $(BIN)
	touch $(STAMP)

run: install
	$(BIN)/moectl up

# Lint first (seconds), then the whole suite; CI runs exactly this.
test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that start Ray / vLLM.
test-fast: install
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy operator/moe_operator serving/moe_serving

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

crds: install
	$(BIN)/moectl generate
	$(PY) hack/render_manifests.py

proto: install
	$(PY) -m moe_serving.grpc_codegen

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
