# One Makefile: install run test lint bench crds. Everything installs into .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint format bench crds proto check-generated clean images

# Container images: `make images IMAGE_REPO=registry.example.com/team TAG=0.1.0`, then push both
# (README: "Building the images"). Defaults match the chart's and the MoEDeployment's defaults.
IMAGE_REPO ?= ghcr.io/moe-operator
TAG ?= 0.1.0
DOCKER ?= docker
OPERATOR_IMAGE := $(IMAGE_REPO)/moe-operator:$(TAG)
SERVING_IMAGE := $(IMAGE_REPO)/moe-serving:$(TAG)

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
	$(PY) -m bench.run

# Needs only a Docker engine (not .venv): the images install the project themselves.
images:
	@if ! command -v $(DOCKER) >/dev/null 2>&1; then \
		echo "make images: '$(DOCKER)' not found. Install Docker, or run this on a machine that has it" \
			"(DOCKER=podman works too); images/*.Dockerfile build from the project root." >&2; \
		exit 1; \
	fi
	@if ! $(DOCKER) info >/dev/null 2>&1; then \
		echo "make images: '$(DOCKER) info' fails: no Docker engine is reachable here. Start it" \
			"(e.g. 'sudo systemctl start docker') or build on a machine with one." >&2; \
		exit 1; \
	fi
	$(DOCKER) build -f images/operator.Dockerfile -t $(OPERATOR_IMAGE) .
	$(DOCKER) build -f images/serving.Dockerfile -t $(SERVING_IMAGE) .
	@echo "built $(OPERATOR_IMAGE) and $(SERVING_IMAGE)"
	@echo "push: $(DOCKER) push $(OPERATOR_IMAGE) && $(DOCKER) push $(SERVING_IMAGE)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
