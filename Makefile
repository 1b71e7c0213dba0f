# Two commands do all set-up on a fresh machine:
#   make demo   - virtualenv, install, local federated run on the embedded S3 server
#   make test   - virtualenv, install, lint and the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
# pytest-xdist workers: the tests wait on S3 servers (moto, SeaweedFS) as much as they
# compute, so two workers overlap one's waits with the other's work on 2 cores.
TEST_WORKERS ?= 2

.PHONY: demo test lint venv sam-tools bench-accuracy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[client,dev]'
	touch $(STAMP)

venv: $(STAMP)

sam-tools:
	bash infra/sam/install-sam.sh
	bash infra/sam/install-checkov.sh

demo: venv
	$(PY) -m infra.demo $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: venv sam-tools lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

bench-accuracy: venv
	$(PY) -m benchmarks.accuracy $(ARGS)

clean:
	rm -rf $(VENV) .venv-sam .venv-checkov .aws-sam runs .pytest_cache .hypothesis .ruff_cache
