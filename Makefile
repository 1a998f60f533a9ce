# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing, install torch (pinned CPU build) first, then the package.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.domainsr-installed
TORCH  ?= torch==2.13.0
# spandrel (third-party SR weights) without its declared torchvision: see pyproject's `weights` extra
SPANDREL ?= spandrel==0.4.2

.PHONY: install data services demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(SPANDREL)
	touch $(STAMP)

data: install
	$(PY) -m domainsr.cli data fetch

demo: data
	$(PY) -m domainsr.cli demo

services:
	bash tests/stores/install_services.sh || echo "services not installed: PACS and DICOM validator tests will be skipped"

test: data services
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: data
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/quality.py

lint: install
	$(VENV)/bin/ruff check domainsr flows tests benchmarks

clean:
	rm -rf $(VENV) .cache .pytest_cache demo_out
