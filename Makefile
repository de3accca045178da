# The two promised commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch is installed first, and on a machine without an NVIDIA GPU never as a multi-GB
# CUDA build (scripts/install_torch.py asks pip first and falls back to PyTorch's CPU index).
# TORCH_PIP_ARGS (e.g. "--index-url URL") names your own source and skips that decision.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit bench clean FORCE

setup: $(VENV)/.installed

# Setup runs again when the torch settings change, not only pyproject.toml: the file is
# rewritten (so newer than .installed) only when its text differs.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@printf '%s\n' '$(TORCH_VERSION) $(TORCH_PIP_ARGS)' | cmp -s - $@ || \
		printf '%s\n' '$(TORCH_VERSION) $(TORCH_PIP_ARGS)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-spec
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" $(PY) scripts/install_torch.py $(TORCH_VERSION)
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
	$(PY) scripts/bench_quantized.py
	$(PY) scripts/bench_load.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_serve.py
	$(PY) scripts/bench_events.py

clean:
	rm -rf .cache runs checkpoints mlruns mlflow.db .stack outputs
