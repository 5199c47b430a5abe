# Quick start:  make demo   (sets up ./.venv, prepares a dataset, prints its summary)
#               make test   (sets up ./.venv, runs ruff, mypy, the import contracts and the full test suite)
#               make fast   (the fast tests only: what plain `pytest` runs)
# RECSYS_CUDA=1 make ...    installs fbgemm-gpu (CUDA) instead of fbgemm-gpu-cpu (auto-detected).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint fast bench clean
setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Everything, the slow and cluster tests too (plain `pytest` runs only the fast ones: see pyproject.toml).
test: lint
	$(PY) -m pytest -q -m "" --durations=25

fast: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.loader

clean:
	rm -rf data/demo .pytest_cache .mypy_cache .ruff_cache
