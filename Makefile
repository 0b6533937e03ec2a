# The two commands a newcomer needs (README): `make demo` and `make test`.
# Each creates the virtual environment on first use (about 3-4 minutes), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles its CPU ops once into this folder; keep it per checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint format clean browser gpu-wheels gpu-rehearsal

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip check
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/bumblefast demo --out demo_out

# The web-page test drives Debian's Chromium (no browser download): installed here when missing.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	      && echo "installed /usr/bin/chromium"; \
	  else echo "note: /usr/bin/chromium is missing; tests/test_serve.py's page test needs it (apt-get install chromium)"; fi; \
	fi

test: $(VENV)/.installed browser
	$(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf demo_out .pytest_cache .cache

# The GPU check (docs/performance.md, "How to run the GPU check"). gpu-wheels: the wheels the GPU
# machine lacks + the project's own wheel into .whl/, and the bench data into .benchdata/ (both
# travel with the run); gpu-rehearsal: benchmarks/gpu/run.sh --rehearsal on a CPU copy of the
# GPU machine's stack (its venv built once into .cache/gpu-rehearsal-venv).
# A Python 3.12 that runs (a pyenv shim may exist and refuse to): the GPU machine's version.
PYTHON312 ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12.1/bin/python; do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)

gpu-wheels:  # any Python with pip: the wheels are chosen for 3.12 by pip's --python-version
	PYTHON=$(PYTHON) bash benchmarks/gpu/wheels.sh

gpu-rehearsal:
	@test -n "$(PYTHON312)" || { echo "gpu-rehearsal: needs Python 3.12 (set PYTHON312=...)"; exit 1; }
	PYTHON312=$(PYTHON312) bash benchmarks/gpu/rehearsal.sh
