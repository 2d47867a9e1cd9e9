# Two commands for a fresh machine with Python 3.9+:
#   make demo   run the live demo (no database needed)
#   make test   run the whole test suite, after installing the programs it runs (as root, with
#               apt-get: tools/install-test-programs; PGWS_INSTALL_PROGRAMS=no only checks)
# and for maintainers:
#   make lint   mypy --strict, the import-layer contracts (docs/architecture.md) and the
#               docstrings' :param: lists (pydoclint)
#   make docs   the documentation site, into site/
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test programs lint docs install bench clean

$(BIN)/activate: setup.cfg pyproject.toml
	@echo "make: creating $(VENV) and installing pgws_sync with its test and demo extras (first run: about 20 s)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(BIN)/activate

$(VENV)/.lint: $(BIN)/activate setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	touch $(VENV)/.lint

$(VENV)/.docs: $(BIN)/activate
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(VENV)/.docs

install: $(BIN)/activate

demo: install
	$(BIN)/pgws-sync demo

# chromium, redis-server, psql, pgbouncer, prometheus (and python3-venv, before .venv exists)
programs:
	@PYTHON='$(PYTHON)' tools/install-test-programs

test: programs
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m pytest

lint: $(VENV)/.lint
	$(BIN)/mypy --strict pgws_sync
	$(BIN)/lint-imports
	$(BIN)/pydoclint --config=pyproject.toml pgws_sync

# the documentation site, built with warnings as errors into site/
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# make bench ARGS='--clients 1000 --messages 200 --rate 50'   (options: bench/README.md)
bench: install
	$(BIN)/python -m bench.fanout $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
