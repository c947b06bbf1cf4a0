# Each target does its own set-up: a fresh clone with only Python installed is enough.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-floor test-local docs lint typecheck check bench bench-core bench-nemo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e ".[all]" --group dev
	touch $@

## The main job: an end-to-end demonstration against the bundled (emulated) guard server.
demo: setup
	$(BIN)/python -m flexguard_integrations.demo

## The whole test suite.
test: setup
	$(BIN)/python -m pytest -q

## The suite against the oldest framework versions pyproject.toml allows, in a venv of its own: keeps the lower
## bounds honest (the main venv gets the newest).
FLOOR_VENV ?= .venv-floor
FLOOR_PINS  = "langchain-core==1.7.0" "langchain==1.4.2" "llama-index-core==0.14.25"
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e ".[all]" --group dev $(FLOOR_PINS)
	$(FLOOR_VENV)/bin/python -m pip check
	$(FLOOR_VENV)/bin/python -c "import langchain, langchain_core, llama_index.core as li; print('floor:', langchain.__version__, langchain_core.__version__, li.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider

## The local (transformers) guard's tests, on a tiny random model: installs the CPU build of torch (a local
## wheel here; never the CUDA build) and FAILS, rather than skips, when torch or transformers is missing.
test-local: setup
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet "transformers>=4.51"
	HF_HUB_OFFLINE=1 FLEXGUARD_REQUIRE_LOCAL=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/local

## The documentation site (mkdocs-material + mkdocstrings), built strictly.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

lint: setup
	$(BIN)/ruff check flexguard_integrations tests benchmarks examples
	$(BIN)/ruff format --check flexguard_integrations tests benchmarks examples

typecheck: setup
	$(BIN)/mypy

check: lint typecheck test

## Benchmarks run on demand, never in the test suite: everything, NeMo Guardrails peer included (~30 min).
bench: setup bench-core bench-nemo

bench-core: setup
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.agent_step
	$(BIN)/python -m benchmarks.streaming

## The peer comparison with NeMo Guardrails 0.24.1, installed in a separate venv (never the project's).
NEMO_VENV ?= /tmp/nemo-venv
bench-nemo: setup
	test -x $(NEMO_VENV)/bin/python || $(PYTHON) -m venv $(NEMO_VENV)
	$(NEMO_VENV)/bin/python -m pip install --quiet "nemoguardrails==0.24.1" httpx aiohttp
	$(BIN)/python -m benchmarks.nemo_peer --nemo-python $(NEMO_VENV)/bin/python

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .mypy_cache .ruff_cache build dist
