#!/usr/bin/env bash
# `make gpu-rehearsal`: benchmarks/gpu/run.sh --rehearsal on a CPU copy of the GPU machine's
# stack (stack.txt: Python 3.12, torch 2.11, transformers 5.17, numpy 2.5, no pydantic), with
# .whl/ installed exactly as run.sh installs it there. Run it before every GPU run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${REHEARSAL_VENV:-$ROOT/.cache/gpu-rehearsal-venv}"
STACK="$ROOT/benchmarks/gpu/stack.txt"
PY312="${PYTHON312:-python3.12}"
stamp="$VENV/.stack-$(sha256sum "$STACK" | cut -c1-12)"
if [ ! -f "$stamp" ]; then  # built once per stack.txt (about 5 GB: torch's CUDA wheels)
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r "$STACK"
  # the machine has none of these (typer's newer releases pull pydantic in): deepspeed's come
  # from .whl/, as there
  "$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
  if "$VENV/bin/python" -c "import pydantic" 2>/dev/null; then
    echo "gpu-rehearsal: pydantic got into the copy of the GPU stack; it must come from .whl/" >&2; exit 1
  fi
  touch "$stamp"
fi
# the oldest typing-extensions the machine's torch allows (its own copy is unknown): the carried
# 4.15 must shadow it, or pydantic (deepspeed's config) fails to import
OLD_TE=4.10.0
if [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("typing_extensions"))')" != "$OLD_TE" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps "typing-extensions==$OLD_TE" 2> >(grep -v "is ignored" >&2)
fi
ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || { echo "gpu-rehearsal: no .whl/: run make gpu-wheels first" >&2; exit 1; }
# DeepSpeed's JIT ops are built per torch: the Makefile's shared folder holds the main venv's
# (torch 2.14), whose .so fails to load under 2.11 (undefined symbol), so the copy gets its own
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
# the installed wheels are kept between rehearsals (run.sh reinstalls bumblefast's and any new
# one): DeepSpeed's CPU comm op is JIT-built from the site's sources, and a fresh install (new
# path, new mtimes) rebuilds it, ~1 minute idle and ~10 under load. Wiped when the set changes.
SITE="$VENV/run-site"
wheelset=$(ls "$ROOT"/.whl/*.whl | xargs -n1 basename | grep -v '^bumblefast-' | sha256sum | cut -c1-12)
[ -f "$SITE/.wheelset-$wheelset" ] || { rm -rf "$SITE" && mkdir -p "$SITE" && touch "$SITE/.wheelset-$wheelset"; }
export SITE
OUT="$(mktemp -d /tmp/gpu-rehearsal-out.XXXXXX)"
t0=$SECONDS
rc=0
OUT="$OUT" PYTHON="$VENV/bin/python" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" bash "$ROOT/benchmarks/gpu/run.sh" --rehearsal || rc=$?
echo "gpu-rehearsal: rc=$rc in $((SECONDS - t0))s; files in $OUT:"
ls -la "$OUT"
exit $rc
