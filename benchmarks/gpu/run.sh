#!/usr/bin/env bash
# One prepared check for a one-GPU CUDA machine with no internet (< 8 minutes):
#   1. install the carried wheels (.whl/: deepspeed, mosaicml-streaming, liger-kernel) into /tmp/site
#   2. make `bumblefast`, `bumblefast.kernels`, ... importable without pip (symlinked package dir)
#   3. kernel tests on CUDA (fp32 + bf16, ours and Liger), model parity tests on CUDA
#   4. benchmarks/bench_kernels.py at 8k tokens
#   5. benchmarks/bench_train.py on the 1.5B preset, seq_len 4096, bf16: pretrain and SFT (ours vs
#      transformers + Liger) and DPO (LoRA: adapter vs precomputed reference vs TRL-style padding),
#      with MFU and a torch.profiler summary of where the step time goes; a ZeRO-2 smoke run of `bumblefast train` on one GPU
# Results and logs go to $OUT (default benchmarks/results/). Usage: bash benchmarks/gpu/run.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_run.log"
PY="${PYTHON:-python3}"
SITE=/tmp/site
PKG="$(mktemp -d /tmp/bumblefast_pkg.XXXXXX)"
status=0
exec > >(tee -a "$LOG") 2>&1
echo "== bumblefast gpu run $(date -u +%FT%TZ) root=$ROOT out=$OUT"

# 1. wheels carried beside the checkout (offline, no deps, no compile)
WHL_DIR=""
for d in "$ROOT/.whl" "$ROOT/../.whl"; do [ -d "$d" ] && WHL_DIR="$d" && break; done
if [ -n "$WHL_DIR" ] && ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHL_DIR"/*.whl \
    || echo "WARN: wheel install failed"
else
  echo "WARN: no .whl/ folder found; using preinstalled packages only"
fi

# 2. importable package without installing: $PKG/bumblefast/{*.py from bumblefast/, kernels, prep, shards}
mkdir -p "$PKG/bumblefast"
for f in "$ROOT"/bumblefast/*; do ln -s "$f" "$PKG/bumblefast/$(basename "$f")"; done
for sub in kernels prep shards; do
  [ -d "$ROOT/$sub" ] && [ ! -e "$PKG/bumblefast/$sub" ] && ln -s "$ROOT/$sub" "$PKG/bumblefast/$sub"
done
# $PKG must win over $ROOT/bumblefast (which lacks the mapped subpackages): python -P keeps the
# cwd/script dir off sys.path and pytest's importlib mode does not insert rootdirs.
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

cd "$ROOT"
"$PY" -P - <<'PYEOF' | tee "$OUT/gpu_env.json"
import json, torch, triton, transformers
import bumblefast.kernels as K
from bumblefast.attention import resolve_backend
d = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
         transformers=transformers.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         liger=K.liger_available(), kernels_auto=K.get_ops("auto", "cuda").backends if torch.cuda.is_available() else None,
         attn_auto=resolve_backend("auto", torch.device("cuda")) if torch.cuda.is_available() else None,
         bumblefast_kernels=K.__file__)
print(json.dumps(d, indent=1))
assert torch.cuda.is_available(), "no CUDA device visible"
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FATAL: environment check failed"; exit 1; }

run() {  # run NAME TIMEOUT CMD...: log each step, keep going, remember failures
  local name=$1 t=$2; shift 2
  echo "== $name (timeout ${t}s)"
  local t0=$SECONDS
  timeout "$t" "$@"
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

PYTEST=("$PY" -P -m pytest --import-mode=importlib -p no:cacheprovider -q -rs)
# Budget (one call under 8 minutes at most): 100 + 60 + 60 + 80 + 210 + 120 + 60 s of timeouts, plus installs.
# Files back from $OUT: env, log, 2 x bench_kernels, 2 x bench_train, 2 x bench_shared_prompt, smoke metrics.
run kernel_tests 100 "${PYTEST[@]}" tests/test_kernels_triton.py tests/test_kernels_dispatch.py
run model_tests 60 "${PYTEST[@]}" tests/test_model.py
run shared_prompt_tests 60 "${PYTEST[@]}" tests/test_shared_prompt.py -k cuda
run bench_kernels 80 "$PY" -P benchmarks/bench_kernels.py --out "$OUT" --tokens 8192 --dtype bfloat16
run bench_train 210 "$PY" -P benchmarks/bench_train.py --stage all --seq_len 4096 --preset bumblebee-1.5b \
  --steps 8 --warmup 2 --profile --out "$OUT"
# DPO with a shared prompt vs unshared, 1.5B preset, seq 4096 (pairs/s, same pairs, interleaved epochs)
run bench_shared_prompt 120 "$PY" -P benchmarks/bench_shared_prompt.py --seq_len 4096 --preset bumblebee-1.5b \
  --pairs 64 --rounds 3 --out "$OUT"
# the real trainer end to end: DeepSpeed ZeRO-2, bf16, fused AdamW, tiny preset on the demo data
run train_zero2_smoke 60 bash -c '
  set -e; T=$(mktemp -d)
  "$0" -P -m bumblefast tokenizer train --input datasets/demo/pretrain.json --vocab_size 1024 --output "$T/tok"
  "$0" -P -m bumblefast prep --stage pretrain --input datasets/demo/pretrain.json --tokenizer_name_or_path "$T/tok" \
    --seq_len 256 --output_dir "$T/shards"
  "$0" -P -m bumblefast train --yaml_config configs/demo/pretrain.yaml --tokenizer_name_or_path "$T/tok" \
    --dataset_path "$T/shards" --output_dir "$T/run" --max_steps 20 --bf16 true \
    --deepspeed_config_path configs/deepspeed/ds_z2.json --kernels auto
  cp "$T/run/training_metrics.json" "'"$OUT"'/train_zero2_smoke_metrics.json"' "$PY"

rm -rf "$PKG"
echo "== done status=$status; results in $OUT"
exit $status
