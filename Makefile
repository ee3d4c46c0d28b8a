# make train  - set up .venv (first time) and run the main job: train the default CNN on the bundled digits
# make test   - set up .venv (first time) and run the test suite (what CI runs)
# make demo   - hand vs autodiff gradients of a small conv net, side by side
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/jaxcnn train

demo: setup
	$(BIN)/jaxcnn demo

test: setup
	$(BIN)/python -m pytest -x -q

lint: setup
	$(BIN)/ruff check jaxcnn tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
