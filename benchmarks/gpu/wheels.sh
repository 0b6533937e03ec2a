#!/usr/bin/env bash
# `make gpu-wheels`: the wheels the GPU machine lacks (wheels.txt), for its Python 3.12 on x86-64
# manylinux, plus the project's own wheel, into .whl/ (git-ignored; it travels with `carry`).
# Prints the total and fails over WHEEL_LIMIT_MIB (the run's working tree may carry 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PY="${PYTHON:-python3}"            # any Python with pip; the wheels are chosen for 3.12
LIMIT_MIB="${WHEEL_LIMIT_MIB:-48}"
LIST="$ROOT/benchmarks/gpu/wheels.txt"
CACHE="$ROOT/.cache/gpu-wheels"   # the third-party wheels, fetched once per pinned version
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT

mapfile -t PKGS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
rm -rf "$DEST" && mkdir -p "$DEST"
for spec in "${PKGS[@]}"; do
  name="${spec%%==*}" version="${spec#*==}"
  dir="$CACHE/$name-$version"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$name" = deepspeed ]; then  # source only: a pure-Python wheel without compiled ops
      DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$dir" "$spec" 2> >(quiet)
    else
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$spec" 2> >(quiet)
    fi
  fi
  cp "$dir"/*.whl "$DEST/"
done
# the project itself, installed there like anywhere else (no symlinked package folder), built
# from a copy of the working tree's files (tracked and new, not ignored): no stale build/ parts
mkdir -p "$BUILD/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$BUILD/src" 2>/dev/null) \
  || cp -r "$ROOT"/{pyproject.toml,README.md,bumblefast,prep,shards,kernels} "$BUILD/src/"
"$PY" -m pip wheel -q --no-deps -w "$BUILD/own" "$BUILD/src" 2> >(quiet)
mv "$BUILD"/own/bumblefast-*.whl "$DEST/"

# the data sets bench_train reads on CPU (../shared/data, beside the checkout, does not travel)
BENCHDATA="$ROOT/.benchdata"
SHARED="${SHARED_DATA:-}"
for d in "$ROOT/../shared/data" "$ROOT/../../shared/data"; do  # beside the checkout, or a worktree's
  [ -z "$SHARED" ] && [ -d "$d" ] && SHARED="$d"
done
mkdir -p "$BENCHDATA"
for f in alpaca_zh_demo.json pretrain_zh_demo.json dpo_zh_demo.json; do
  if [ -n "$SHARED" ] && [ -f "$SHARED/$f" ]; then cp "$SHARED/$f" "$BENCHDATA/"; else echo "gpu-wheels: note: no $SHARED/$f (bench_train falls back to the demo data)"; fi
done
echo "gpu-wheels: bench data $(du -sh "$BENCHDATA" | cut -f1) in $BENCHDATA"

n=$(ls "$DEST"/*.whl | wc -l)
want=$(( ${#PKGS[@]} + 1 ))
[ "$n" -eq "$want" ] || { echo "gpu-wheels: expected $want wheels in $DEST, found $n" >&2; exit 1; }
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -1 "$DEST"
awk -v b="$bytes" -v n="$n" -v lim="$LIMIT_MIB" -v d="$DEST" 'BEGIN {
  printf "gpu-wheels: %d wheels, %.1f MiB in %s (limit %d MiB)\n", n, b / 1048576, d, lim
  exit (b > lim * 1048576) }' || { echo "gpu-wheels: over the ${LIMIT_MIB} MiB limit" >&2; exit 1; }
