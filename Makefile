# `make run` and `make test` set everything up on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: run test test-all lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/jaxepochs run --config experiments/mnist1d_mlp.py --workdir runs/mnist1d_mlp --restart

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not reproduction" --durations=10  # two workers on 2 cores (most tests wait on XLA compiles)

# The suite and the end-to-end reproductions of published figures (double descent, grokking, transfer: --quick).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check jaxepochs experiments tests benchmarks
	$(BIN)/ruff format --check jaxepochs experiments tests benchmarks

# Keras 3 and PyTorch (CPU build) for the side-by-side comparison; `make test` does not need them.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/sweep_speed.py --runs 1,8,32,128
	$(BIN)/python benchmarks/stream_speed.py speed --epochs 15 --rounds 4
	$(BIN)/python benchmarks/optax_hook.py

# The docs site (docs/, mkdocs.yml) into site/, offline; --strict: a warning (a broken link, a docstring that
# does not resolve) fails the build.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site
