# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-12)

.PHONY: setup generate check test test-fast train bench clean

setup: $(STAMP)

# Idempotent: the venv is (re)installed only when requirements.txt changes. The editable install
# adds the `deepseek-moe` command; it fetches nothing (no deps, no build isolation: the setuptools
# torch pulls in builds it).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Writes a generated file only if its bytes change.
generate: setup
	$(PY) -m codegen.generate

# Regenerates in memory and fails with a diff and the fix command if generated/ is stale; lints
# the hand-written code (ruff; black formats generated/), checks the import layers (import-linter,
# contracts in pyproject.toml) and type-checks runtime/ and codegen/ (mypy).
check: setup
	$(PY) -m codegen.generate --check
	$(PY) -m runtime config validate configs/*.yaml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Two pytest workers (pytest-xdist), each test file on one of them so that a module's fixtures run
# once: much of the suite waits on subprocesses (torchrun launches, timeouts), so two workers fit
# on two cores. Under 12 minutes on 2 cores; `PYTEST_WORKERS=0 make test` runs it in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

test: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# The tests that are neither slow nor multiprocess (markers in pyproject.toml): under 3 minutes.
test-fast: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow and not multiprocess"

train: setup
	$(PY) -m runtime train configs/tiny.yaml

bench: setup
	$(PY) -m bench

clean:
	rm -rf out data/*.bin .pytest_cache build *.egg-info
