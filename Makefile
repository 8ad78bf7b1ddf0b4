# fleetgw: `make demo` runs the gateway on its embedded defaults with a central receiver on
# loopback through a link outage, `make test` runs the checks.
# Both set everything up on a fresh machine (a .venv with the project installed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,central]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetgw demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/fleetgw bench journal --seconds 20 --json

clean:
	rm -rf $(VENV) data build *.egg-info
