# make demo   - set up .venv (first time) and run the main job
# make test   - set up .venv (first time) and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/jaxcnn demo

test: setup
	$(BIN)/python -m pytest -x -q

lint: setup
	$(BIN)/ruff check jaxcnn tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
