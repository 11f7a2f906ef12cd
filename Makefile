# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch goes in first, with pip: `pip install torch==2.13.0` takes the CPU wheel this kind
# of machine keeps on disk (uv does not look there), while an open `torch` pulls a ~3 GB
# CUDA build. uv then finds it installed and installs nothing else in its place.
# On a GPU host without that disk the same line takes PyPI's CUDA build (docs/local-server.md).
# uv compiles the environment's bytecode once, here (about a minute of CPU; pip does it for
# torch): without it every process of the suite compiles Dagster, diffusers, Ray ... from
# source again wherever PYTHONDONTWRITEBYTECODE is set, as on the boxes the suite runs on
# here (10 s of CPU more for each process that imports diffusers, 1-2 s for Dagster or Ray).
TORCH_VERSION ?= 2.13.0
# The suite runs on several workers (pytest-xdist): most tests wait on servers, S3 and
# subprocesses, so more workers than cores pays (README: "The two commands").
TEST_WORKERS ?= 3
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv test pytest lint typecheck demo dev bench bench-quick bench-gpu reliability docs chromium clean

venv: $(STAMP)

# The first run creates the environment and prints how long it took.
$(STAMP): pyproject.toml requirements-dev.txt
	@start=$$(date +%s); \
	echo "==> creating the environment in $(VENV) (first run only)"; \
	$(PYTHON) -m venv $(VENV) && \
	$(VENV)/bin/pip install -q --disable-pip-version-check uv && \
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) && \
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -r requirements-dev.txt -e '.[dagster,server,diffusion]' && \
	touch $@ && \
	echo "==> environment ready in $$(( $$(date +%s) - start ))s"

# The browser test drives Debian's chromium; install it when it is missing.
chromium:
	@bash scripts/ensure_chromium.sh

LINTED := dagster_octoai devtools tests example_project benchmarks scripts

# Style, then the layer rules of pyproject.toml's [tool.importlinter].
lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

# Lint and the type check run beside the tests (their output may interleave); `make test`
# fails if any of the three does.
test: venv chromium
	@$(MAKE) --no-print-directory -j 3 lint typecheck pytest

pytest: venv
	$(PY) -m pytest -n $(TEST_WORKERS)

# The main job end to end on the local server and SeaweedFS.
demo: venv
	$(PY) scripts/demo.py

# The Dagster UI on the same setup (Ctrl-C stops everything it started).
dev: venv
	$(PY) scripts/dev.py

bench: venv
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick --output .bench-quick

# On a CUDA machine: full-size random-weight SDXL / SD 1.5 through the diffusers backend.
bench-gpu: venv
	$(PY) -m benchmarks.gpu

reliability: venv
	$(PY) scripts/reliability_report.py

docs: venv
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .demo .dagster_home test-output .bench-quick
