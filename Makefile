# The two commands a fresh machine needs: `make up` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STACK   ?= local
STAMP   := $(VENV)/.installed

.PHONY: install up test test-mesh lint clean bench

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

up: install
	$(BIN)/infermesh up --stack $(STACK)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m ruff check fleet gateway engines tests

clean:
	rm -rf $(VENV) .infermesh .pytest_cache
