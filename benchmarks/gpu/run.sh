#!/usr/bin/env bash
# The one prepared check for a one-GPU CUDA machine with no internet (docs/performance.md, "How
# to run the GPU check"): give it a 540 s limit; its step timeouts add up to 450 s.
#   1. install .whl/ (the packages the machine lacks + the project's own wheel; `make gpu-wheels`)
#      into $SITE and put it on PYTHONPATH: every step imports that installed bumblefast
#   2. environment check: versions, imports (streaming, deepspeed, liger), attention/kernels
#   3. kernel and attention-dtype tests on CUDA, model parity tests
#   4. benchmarks/bench_kernels.py at 8k tokens
#   5. benchmarks/bench_train.py on the 1.5B preset, seq_len 4096, bf16 (pretrain, SFT, DPO),
#      each stage's results written as soon as the stage ends
#   6. `bumblefast train` end to end: DeepSpeed ZeRO-2, bf16, on the demo data
# Every step runs from a scratch folder, so the checkout's bumblefast/ never shadows the
# installed package. Results go to $OUT (default benchmarks/results/gpu), at most 8 files:
# gpu_env.json, gpu_run.log, bench_kernels_*.{json,md}, bench_train_*.{json,md},
# train_zero2_smoke_metrics.json.
#
#   bash benchmarks/gpu/run.sh               # on the GPU machine
#   bash benchmarks/gpu/run.sh --rehearsal   # the same steps on CPU at the smallest sizes
#                                            # (`make gpu-rehearsal`: on a copy of its stack)
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --rehearsal) MODE=rehearsal ;;
  "") ;;
  *) echo "usage: $0 [--rehearsal]" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_run.log"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
WORK="$(mktemp -d /tmp/bumblefast_gpu.XXXXXX)"
SITE="${SITE:-$WORK/site}"
status=0
exec > >(tee -a "$LOG") 2>&1
echo "== bumblefast gpu run ($MODE) $(date -u +%FT%TZ) root=$ROOT out=$OUT python=$PY"

# 1. the carried wheels, offline, no dependency resolution (the machine's stack is kept)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "FATAL: installing $WHEELS/*.whl failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "== installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $((SECONDS - t0))s"
  EXPECT_SITE="$SITE"
elif [ "$MODE" = rehearsal ]; then
  echo "== no wheels in $WHEELS: using the packages of $PY (rehearsal of the script's logic only)"
  EXPECT_SITE=""
else
  echo "FATAL: no wheels in $WHEELS: run \`make gpu-wheels\` and carry .whl"; exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}" MODE EXPECT_SITE
unset TRITON_INTERPRET
cd "$WORK"  # not the checkout: its bumblefast/ lacks the mapped subpackages

# 2. environment: fail fast on anything the later steps import
ENV_JSON="$OUT/gpu_env.json" "$PY" - <<'PYEOF'
import json, os, sys
import torch, triton, transformers, numpy
import deepspeed, streaming
import bumblefast, bumblefast.kernels as K
from bumblefast.attention import resolve_backend
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
d = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
         transformers=transformers.__version__, numpy=numpy.__version__, deepspeed=deepspeed.__version__,
         streaming=streaming.__version__, gpu=torch.cuda.get_device_name(0) if cuda else None,
         liger=K.liger_available(), kernels_auto=K.get_ops("auto", dev).backends,
         attn_auto_bf16=resolve_backend("auto", dev, torch.bfloat16), bumblefast=bumblefast.__file__)
# written by Python, not stdout: deepspeed prints its accelerator warning there
open(os.environ["ENV_JSON"], "w").write(json.dumps(d, indent=1) + "\n")
site = os.environ["EXPECT_SITE"]
assert not site or bumblefast.__file__.startswith(site), f"bumblefast imported from {bumblefast.__file__}, not {site}"
assert cuda or os.environ["MODE"] == "rehearsal", "no CUDA device visible"
PYEOF
rc=$?
cat "$OUT/gpu_env.json"
[ $rc -eq 0 ] || { echo "FATAL: environment check failed"; exit 1; }

# The timeouts are the GPU run's; a CPU rehearsal stretches them (2 shared cores are slower).
SCALE="${TIMEOUT_SCALE:-$([ "$MODE" = gpu ] && echo 1 || echo 20)}"
run() {  # run NAME TIMEOUT CMD...: log each step, keep going, remember failures
  local name=$1 t=$(( $2 * SCALE )); shift 2
  echo "== $name (timeout ${t}s)"
  local t0=$SECONDS
  timeout "$t" "$@"
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

# Sizes: the GPU run, or the smallest that exercise the same code on CPU.
if [ "$MODE" = gpu ]; then
  KERNEL_ARGS=(--tokens 8192 --dtype bfloat16)
  TRAIN_ARGS=(--stage all --seq_len 4096 --preset bumblebee-1.5b --steps 4 --rounds 3 --min_pairs 8 --profile)
  SMOKE=(--max_steps 20 --bf16 true)
else
  KERNEL_ARGS=(--quick --dtype float32 --ops rms_norm)
  TRAIN_ARGS=(--stage all --quick --preset bumblebee-tiny --steps 2 --rounds 2 --min_pairs 2 --profile)
  SMOKE=(--max_steps 2 --bf16 false)
fi
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --rootdir "$ROOT" -c "$ROOT/pyproject.toml")
KERNEL_TESTS=("$ROOT/tests/test_kernels_dispatch.py" "$ROOT/tests/test_attention_dtype.py")
# on CPU the Triton suite runs in the interpreter (minutes on 2 cores): the GPU run compiles it
[ "$MODE" = gpu ] && KERNEL_TESTS+=("$ROOT/tests/test_kernels_triton.py")

# Timeouts: 75 + 30 + 45 + 60 + 195 + 45 = 450 s, plus install and environment check (< 60 s).
run kernel_tests 75 "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
# DPO shared prompt: flash / varlen against the sdpa_mask reference in bf16 (CUDA-only tests)
run shared_prompt_cuda 30 "${PYTEST[@]}" "$ROOT/tests/test_shared_prompt.py" -k cuda
run model_tests 45 "${PYTEST[@]}" "$ROOT/tests/test_model.py"
run bench_kernels 60 "$PY" "$ROOT/benchmarks/bench_kernels.py" --out "$OUT" "${KERNEL_ARGS[@]}"
run bench_train 195 "$PY" "$ROOT/benchmarks/bench_train.py" --out "$OUT" "${TRAIN_ARGS[@]}"
run train_zero2_smoke 45 bash -c '
  set -e; PY=$1 ROOT=$2 OUT=$3; shift 3; T=$(mktemp -d)
  "$PY" -m bumblefast tokenizer train --input "$ROOT/datasets/demo/pretrain.json" --vocab_size 1024 --output "$T/tok"
  "$PY" -m bumblefast prep --stage pretrain --input "$ROOT/datasets/demo/pretrain.json" \
    --tokenizer_name_or_path "$T/tok" --seq_len 256 --output_dir "$T/shards"
  "$PY" -m bumblefast train --yaml_config "$ROOT/configs/demo/pretrain.yaml" --tokenizer_name_or_path "$T/tok" \
    --model_name_or_path "$ROOT/configs/models/bumblebee-tiny" --dataset_path "$T/shards" --output_dir "$T/run" \
    --deepspeed_config_path "$ROOT/configs/deepspeed/ds_z2.json" \
    --kernels auto "$@"
  cp "$T/run/training_metrics.json" "$OUT/train_zero2_smoke_metrics.json"' _ "$PY" "$ROOT" "$OUT" "${SMOKE[@]}"

cd "$ROOT" && rm -rf "$WORK"
n=$(find "$OUT" -type f | wc -l)
echo "== $n files in $OUT"
[ "$n" -le 8 ] || { echo "ERROR: more than 8 files in $OUT: the device returns 8 at most"; status=1; }
echo "== done status=$status; results in $OUT"
exit $status
