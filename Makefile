# The two commands a fresh machine needs: `make up` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STACK   ?= local
STAMP   := $(VENV)/.installed

.PHONY: install up test test-mesh test-quarantine system-deps lint typecheck clean bench

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

up: install
	$(BIN)/infermesh up --stack $(STACK)

test: install system-deps typecheck
	$(BIN)/python -m pytest -q

# The mesh tests alone: hosts as network namespaces, sshd, WireGuard (wireguard-go), real playbooks.
test-mesh: install system-deps
	INFERMESH_MESH_TESTS=1 $(BIN)/python -m pytest -q -m mesh

# Drills that fail intermittently for a reason not yet found (each names its open issue): run them by hand.
test-quarantine: install system-deps
	$(BIN)/python -m pytest -q -m quarantine || test $$? -eq 5   # 5: none quarantined now

# System packages the mesh tests and bootstrap need (sshd, wireguard-go, wg, iptables); a no-op when present.
system-deps:
	bash scripts/install-system-deps.sh

lint: install typecheck
	$(BIN)/python -m ruff check fleet infermesh_cli gateway engines tests bench policies __main__.py

# mypy (config in pyproject.toml) on the packages that are clean; `make test` and `make lint` run it first.
typecheck: install
	$(BIN)/python -m mypy gateway fleet infermesh_cli

clean:
	rm -rf $(VENV) .infermesh .pytest_cache .mypy_cache
