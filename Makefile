# Two commands for a fresh machine with Python 3.9+:
#   make demo   run the live demo (no database needed)
#   make test   run the whole test suite
# and for maintainers:
#   make lint   mypy --strict and the import-layer contracts (docs/architecture.md)
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/activate: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(BIN)/activate

$(VENV)/.lint: $(BIN)/activate
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	touch $(VENV)/.lint

install: $(BIN)/activate

demo: install
	$(BIN)/pgws-sync demo

test: install
	$(BIN)/python -m pytest

lint: $(VENV)/.lint
	$(BIN)/mypy --strict pgws_sync
	$(BIN)/lint-imports

# make bench ARGS='--clients 1000 --messages 200 --rate 50'   (options: bench/README.md)
bench: install
	$(BIN)/python -m bench.fanout $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
