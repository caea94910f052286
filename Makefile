# The two commands (each sets itself up on a fresh machine: virtualenv, pip, data fetch):
#   make run    the main job: data -> tokenizer -> shards -> pretraining -> samples (tiny preset, 2 CPU cores)
#   make test   lint, type check and the whole test suite (what .ci/run calls)

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test setup bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/llmstack data fetch
	$(BIN)/llmstack run --preset tiny

test: $(STAMP)
	$(BIN)/llmstack data fetch --assets-only
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmstack
	LLMSTACK_REQUIRE_ASSETS=1 $(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/tokenizer_throughput.py
