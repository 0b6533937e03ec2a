# The two commands a newcomer needs (README): `make demo` and `make test`.
# Each creates the virtual environment on first use (about 3-4 minutes), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles its CPU ops once into this folder; keep it per checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast test-old-pins lint format clean browser gpu-wheels gpu-rehearsal

# mosaicml-streaming 0.13.0 (its last release) declares transformers<5 and numpy<2.2; its code runs
# under transformers 5 and numpy 2.4, so it is installed without its metadata (--no-deps) and
# pyproject lists the packages it imports (docs/dependencies.md). The README gives users the same line.
STREAMING := mosaicml-streaming==0.13.0
# `pip check` lines that are expected after a --no-deps streaming and nothing else: its stale pins
# and the cloud SDKs of remotes this project does not use (S3's boto3 is a dependency). Any other
# line fails the install.
STREAMING_CHECK_OK := ^mosaicml-streaming 0\.13\.0 (has requirement (transformers<5|numpy<2\.2\.0)|requires (oci|azure-storage-blob|azure-storage-file-datalake|azure-identity|google-cloud-storage|paramiko), which is not installed)|^No broken requirements found\.$$
define pip_check
	@$(1) -m pip check > $(2).pipcheck 2>&1; \
	  if grep -vE '$(STREAMING_CHECK_OK)' $(2).pipcheck | grep -q .; then \
	    echo "pip check failed:"; cat $(2).pipcheck; rm -f $(2).pipcheck; exit 1; fi; \
	  if [ -s $(2).pipcheck ]; then echo "pip check: only streaming's known pins/SDKs:"; sed 's/^/  /' $(2).pipcheck; fi; \
	  rm -f $(2).pipcheck
endef

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps '$(STREAMING)'
	$(call pip_check,$(PY),$(VENV)/)
	$(PY) -c 'import streaming, transformers, numpy; print("stack: transformers", transformers.__version__, "numpy", numpy.__version__, "streaming", streaming.__version__)'
	touch $@

# The old pins (transformers 4.57, numpy<2.2: streaming's declared ranges, resolved by pip through the
# [old-pins] extra) in their own venv, and the model/prep/shards/train tests on them. CI runs it.
OLD_VENV ?= .venv-old-pins
OLD_PY := $(OLD_VENV)/bin/python
OLD_PINS_TESTS ?= tests/test_model.py tests/test_prep.py tests/test_shards.py tests/test_train.py tests/test_families.py
# extra pytest arguments: CI passes -m 'not slow' (the slow ones are DeepSpeed multi-process runs that
# the main suite already runs; what differs between the stacks is transformers/numpy, which the fast
# model, prep and shards tests cover) to keep its run well inside its time
OLD_PINS_ARGS ?=

# Layered on the main venv: a .pth puts its site-packages after the old venv's own, so pip
# installs here only what the old pins change (transformers, numpy, tokenizers, huggingface_hub,
# streaming's cloud SDKs) and reuses the rest (torch alone is ~4 GB): ~1 min less per CI run.
# pip leaves the main venv's copies alone (outside this environment); this venv's win on import.
$(OLD_VENV)/.installed: pyproject.toml $(VENV)/.installed
	rm -rf $(OLD_VENV)
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/_main_venv.pth", "w").write(sys.argv[1] + "\n")' \
	  "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(OLD_PY) -m pip install -e '.[dev,old-pins]'
	$(OLD_PY) -m pip check
	$(OLD_PY) -c 'import transformers, numpy; v = transformers.__version__; assert v.startswith("4."), v; print("old pins: transformers", v, "numpy", numpy.__version__)'
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
	$(PY) -m pytest -q --durations=40

# Its own DeepSpeed op cache: ops JIT-built from the other venv's sources would be rebuilt in place.
test-old-pins: $(OLD_VENV)/.installed
	TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR)-old-pins $(OLD_PY) -m pytest -q $(OLD_PINS_ARGS) $(OLD_PINS_TESTS)

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
