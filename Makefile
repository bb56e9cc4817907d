# The two commands the README promises. Each does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-azure-floors setup redis-server bench bench-gpu

demo: setup redis-server
	$(BIN)/tuneops demo

# Two pytest workers, a test file each at a time (module fixtures built once): most tests wait on processes, Redis and
# HTTP, so two of them share 2 cores well (about 9 minutes instead of 17).
TEST_WORKERS ?= 2

test: setup redis-server
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The Azure tests again, on the oldest versions pyproject.toml allows (ci/azure-floors.txt), in a venv of their own.
FLOORS_VENV ?= .venv-floors
AZURE_TESTS := tests/azure tests/bot/test_slack_azure_*.py tests/bot/test_deploy_aca.py

test-azure-floors: $(FLOORS_VENV)/.installed redis-server
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(AZURE_TESTS)

$(FLOORS_VENV)/.installed: pyproject.toml ci/azure-floors.txt
	test -x $(FLOORS_VENV)/bin/python || $(PY) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(FLOORS_VENV)/bin/pip install -q --disable-pip-version-check -c ci/azure-floors.txt -e '.[payload,serve,dev]' \
		torch==2.13.0
	touch $@

# torch is pinned first so that nothing later pulls a multi-GB CUDA build; the CPU wheel lies on this machine's disk.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[payload,serve,dev,bench]' torch==2.13.0
	touch $@

redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

bench: setup redis-server
	$(BIN)/python -m payload.bench

# The whole GPU check (trainer, inference server, benchmark against TRL) in under 10 minutes on one GPU; without CUDA
# (or with GPUCHECK_ARGS=--dry-run) the same steps run on the CPU at tiny size.
bench-gpu: setup
	$(BIN)/python -m payload.gpucheck $(GPUCHECK_ARGS)
