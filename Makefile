# The two commands: `make demo` and `make test`. Each creates .venv when missing and installs into it, and
# compiles the numba kernels whose caches are missing or were built from other sources (2 s when none are).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --prefer-binary -e '.[test]'
	$(BIN)/python -m calc.warm
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m calc.warm
	$(BIN)/marginflow up --demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m calc.warm
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf var/
