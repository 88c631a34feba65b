# `make run` and `make test` set everything up on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/jaxepochs run --config experiments/mnist1d_mlp.py --workdir runs/mnist1d_mlp --restart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check jaxepochs experiments tests benchmarks
	$(BIN)/ruff format --check jaxepochs experiments tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/sweep_speed.py

clean:
	rm -rf $(VENV) runs
