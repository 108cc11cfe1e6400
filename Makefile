# The README's two commands: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/meshward demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The fuzz targets (tests/fuzz/) with many random inputs; `make test` runs them bounded.
fuzz: $(VENV)/.installed-test
	MESHWARD_FUZZ_PROFILE=fuzz $(BIN)/pytest tests/fuzz

bench: $(VENV)/.installed
	$(BIN)/python bench/issuance.py

clean:
	rm -rf $(VENV) .meshward .mypy_cache .ruff_cache .pytest_cache *.egg-info
