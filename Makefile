# Every target sets itself up: a virtual environment in .venv with the pinned versions.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=30 tests

demo: $(STAMP)
	$(PY) -m jobs.demo

bench: $(STAMP)
	$(PY) bench/engine.py --config small --workload caption

clean:
	rm -rf $(VENV) build
