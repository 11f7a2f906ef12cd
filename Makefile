# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck demo dev bench reliability docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	@start=$$(date +%s); \
	echo "==> creating the environment in $(VENV) (first run only)"; \
	$(PYTHON) -m venv $(VENV) && \
	$(VENV)/bin/pip install -q --disable-pip-version-check uv && \
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements-dev.txt -e '.[dagster,server]' && \
	touch $@ && \
	echo "==> environment ready in $$(( $$(date +%s) - start ))s"

lint: venv
	$(VENV)/bin/ruff check dagster_octoai tests example_project benchmarks
	$(VENV)/bin/ruff format --check dagster_octoai tests example_project benchmarks

typecheck: venv
	$(VENV)/bin/mypy

test: venv lint typecheck
	$(PY) -m pytest

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .demo
