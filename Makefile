# make train  - set up .venv (first time) and run the main job: train the default CNN on the bundled digits
# make test   - set up .venv (first time) and run the test suite (what CI runs)
# make demo   - hand vs autodiff gradients of a small conv net, side by side
# make experiments - rerun experiments/ and rewrite experiments/results/
# make bench  - install the Flax baseline and rewrite BENCHMARKS.md's step benchmark (about 8 minutes on 2 cores)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train demo test lint experiments bench clean

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
	$(BIN)/python -m pytest -x -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check jaxcnn tests experiments

experiments: setup
	for e in gradient_agreement training_curves conv_complexity vanishing_gradients scaling newton_sensitivity \
		gauss_newton_cost; do \
		$(BIN)/python -m experiments.$$e || exit 1; done

bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m experiments.benchmark

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
