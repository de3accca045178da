# The two promised commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch is installed first so pip never swaps in a multi-GB CUDA build on a CPU box.
# On a CPU machine without a local wheel, add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# KEEP=1 leaves the stack running afterwards (stop it with .venv/bin/lmctl stack down).
demo: setup
	$(PY) -m scripts.demo $(if $(KEEP),--keep)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench_lmcore.py
	$(PY) scripts/bench_linear.py
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_serve.py

clean:
	rm -rf .cache runs checkpoints mlruns mlflow.db .stack outputs
