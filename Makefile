# The two commands the README promises. Each does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup redis-server bench

demo: setup redis-server
	$(BIN)/tuneops demo

test: setup redis-server
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# torch is pinned first so that nothing later pulls a multi-GB CUDA build; the CPU wheel lies on this machine's disk.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[payload,serve,dev]' torch==2.13.0
	touch $@

redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

bench: setup redis-server
	$(BIN)/python -m payload.bench
