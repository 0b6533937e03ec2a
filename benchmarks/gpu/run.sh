#!/usr/bin/env bash
# The one prepared check for a one-GPU CUDA machine with no internet (docs/performance.md, "How
# to run the GPU check"): give it a 540 s limit; its step timeouts add up to 435 s.
#   1. install .whl/ (the packages the machine lacks + the project's own wheel; `make gpu-wheels`)
#      into $SITE and put it on PYTHONPATH: every step imports that installed bumblefast
#   2. environment check: versions, imports (streaming, deepspeed, liger), attention/kernels
#   3. kernel and attention-dtype tests on CUDA, model parity tests
#   4. benchmarks/bench_kernels.py at 8k tokens
#   5. benchmarks/bench_train.py on the 1.5B preset, seq_len 4096, bf16 (pretrain, SFT, DPO),
#      each stage's results written as soon as the stage ends
#   6. `bumblefast train` end to end: DeepSpeed ZeRO-2, bf16, on the demo data
# Every step runs from a scratch folder, so the checkout's bumblefast/ never shadows the
# installed package, with an empty Triton cache of its own (a fresh machine's cold compiles are
# what the budgets are sized for). Results go to $OUT (default benchmarks/results/gpu), at most
# 8 files: gpu_env.json, gpu_run.log, gpu_steps.json (each step's rc, seconds and, for pytest,
# every test's outcome, rewritten as they end), bench_kernels_*.{json,md} (after every case),
# bench_train_*.{json,md} (after every stage), train_zero2_smoke_metrics.json (as it logs). A
# step that hits its timeout leaves what it had written.
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
TEE_PID=$!
finish() {  # let tee write the log's last lines before the script (and the device call) ends
  local rc=$?
  exec 1>&- 2>&-
  for _ in $(seq 100); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  exit $rc
}
trap finish EXIT
echo "== bumblefast gpu run ($MODE) $(date -u +%FT%TZ) root=$ROOT out=$OUT python=$PY"

# 1. the carried wheels, offline, no dependency resolution (the machine's stack is kept)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  # A $SITE given by the caller may already hold some (the rehearsal keeps one, so DeepSpeed's
  # JIT CPU op, minutes to compile on a loaded CPU, is not rebuilt for new source mtimes):
  # those third-party wheels are kept; bumblefast's own is always reinstalled. On the GPU
  # machine $SITE is fresh, so everything is installed.
  todo=()
  for w in "$WHEELS"/*.whl; do
    b=$(basename "$w"); dist=${b%%-*}; ver=$(cut -d- -f2 <<<"$b")
    [ "$dist" != bumblefast ] && [ -d "$SITE/$dist-$ver.dist-info" ] || todo+=("$w")
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${todo[@]}" || { echo "FATAL: installing $WHEELS/*.whl failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "== installed ${#todo[@]} of $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $((SECONDS - t0))s (the rest were there)"
  EXPECT_SITE="$SITE"
elif [ "$MODE" = rehearsal ]; then
  echo "== no wheels in $WHEELS: using the packages of $PY (rehearsal of the script's logic only)"
  EXPECT_SITE=""
else
  echo "FATAL: no wheels in $WHEELS: run \`make gpu-wheels\` and carry .whl"; exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}" MODE EXPECT_SITE
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"  # empty: every compile is cold
unset TRITON_INTERPRET
STEPS_JSON="$OUT/gpu_steps.json"
mkdir -p "$WORK/plugins" "$WORK/steps"
# pytest plugin: each test's outcome into the step's JSON as it ends (a timeout keeps them)
cat > "$WORK/plugins/bumblefast_steplog.py" <<'PYEOF'
import json, os

_done = {}


def pytest_runtest_logreport(report):
    path = os.environ.get("STEP_TESTS_JSON")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    _done[report.nodeid.split("/")[-1]] = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
    with open(path + ".tmp", "w") as f:
        json.dump(_done, f, indent=0)
    os.replace(path + ".tmp", path)
PYEOF
export PYTHONPATH="$WORK/plugins${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"  # not the checkout: its bumblefast/ lacks the mapped subpackages

# 2. environment: fail fast on anything the later steps import
ROOT="$ROOT" ENV_JSON="$OUT/gpu_env.json" "$PY" - <<'PYEOF'
import json, os, sys
import torch, triton, transformers, numpy
import deepspeed, streaming
import bumblefast, bumblefast.kernels as K
from bumblefast.attention import refused_backends, resolve_backend
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
ops = K.get_ops("auto", dev)
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import bench_train as BT  # the baselines' attention and Liger, as bench_train will pick them
liger_hf, liger_hf_why = BT.hf_liger(dev.type)
hf_attn, hf_attn_why = BT.hf_attention(dev.type)
d = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
         transformers=transformers.__version__, numpy=numpy.__version__, deepspeed=deepspeed.__version__,
         streaming=streaming.__version__, gpu=torch.cuda.get_device_name(0) if cuda else None,
         liger=K.liger_available(),
         # per op: the backend auto chose and why each faster one was refused ("" when none was)
         kernels_auto={op: dict(backend=b, refused=ops.reasons.get(op, "")) for op, b in ops.backends.items()},
         attention_auto_bf16=dict(backend=resolve_backend("auto", dev, torch.bfloat16),
                                  refused=refused_backends(dev, torch.bfloat16)),
         baselines=dict(attn_implementation=hf_attn, attn_refused=hf_attn_why, liger=liger_hf, liger_refused=liger_hf_why),
         bumblefast=bumblefast.__file__)
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
steps_json() {  # steps_json NAME RC SECONDS TIMEOUT: rewrite gpu_steps.json with this step added
  STEPS_JSON="$STEPS_JSON" TESTS="$WORK/steps/$1.json" "$PY" - "$@" <<'PYEOF'
import json, os, sys
name, rc, secs, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = os.environ["STEPS_JSON"]
steps = json.load(open(path)) if os.path.exists(path) else []
step = dict(name=name, rc=rc, seconds=secs, timeout=limit, timed_out=rc in (124, 137))
if os.path.exists(os.environ["TESTS"]):
    step["tests"] = json.load(open(os.environ["TESTS"]))
steps.append(step)
json.dump(steps, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
PYEOF
}
run() {  # run NAME TIMEOUT CMD...: log each step, keep going, remember failures
  local name=$1 t=$(( $2 * SCALE )); shift 2
  echo "== $name (timeout ${t}s)"
  local t0=$SECONDS
  STEP_TESTS_JSON="$WORK/steps/$name.json" timeout -k 10 "$t" "$@"
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  steps_json "$name" "$rc" "$((SECONDS - t0))" "$t"
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
PYTEST=("$PY" -m pytest -p no:cacheprovider -p bumblefast_steplog -q -rs --rootdir "$ROOT" -c "$ROOT/pyproject.toml")
KERNEL_TESTS=("$ROOT/tests/test_kernels_dispatch.py" "$ROOT/tests/test_attention_dtype.py" "$ROOT/tests/test_kernels_autocast.py")
# on CPU the Triton suite runs in the interpreter (minutes on 2 cores): the GPU run compiles it
[ "$MODE" = gpu ] && KERNEL_TESTS+=("$ROOT/tests/test_kernels_triton.py")

# Timeouts (docs/performance.md, "How to run the GPU check", has the reasoning and the
# rehearsal's times): 100 + 25 + 50 + 50 + 165 + 45 = 435 s, plus install and environment
# check (< 30 s), under the device call's 540 s. Every Triton kernel compiles cold (~50 in
# kernel_tests, Liger's and ours at the model's shapes in the later steps).
run kernel_tests 100 "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
# DPO shared prompt: flash / varlen against the sdpa_mask reference in bf16 (CUDA-only tests)
run shared_prompt_cuda 25 "${PYTEST[@]}" "$ROOT/tests/test_shared_prompt.py" -k cuda
run model_tests 50 "${PYTEST[@]}" "$ROOT/tests/test_model.py"
run bench_kernels 50 "$PY" "$ROOT/benchmarks/bench_kernels.py" --out "$OUT" "${KERNEL_ARGS[@]}"
run bench_train 165 "$PY" "$ROOT/benchmarks/bench_train.py" --out "$OUT" "${TRAIN_ARGS[@]}"
run train_zero2_smoke 45 bash -c '
  set -e; PY=$1 ROOT=$2 OUT=$3; shift 3; T=$(mktemp -d)
  save() { cp "$T/run/training_metrics.json" "$OUT/train_zero2_smoke_metrics.json" 2>/dev/null || true; }
  trap save EXIT; trap "exit 143" TERM  # a timeout keeps the steps logged so far
  "$PY" -m bumblefast tokenizer train --input "$ROOT/datasets/demo/pretrain.json" --vocab_size 1024 --output "$T/tok"
  "$PY" -m bumblefast prep --stage pretrain --input "$ROOT/datasets/demo/pretrain.json" \
    --tokenizer_name_or_path "$T/tok" --seq_len 256 --output_dir "$T/shards"
  "$PY" -m bumblefast train --yaml_config "$ROOT/configs/demo/pretrain.yaml" --tokenizer_name_or_path "$T/tok" \
    --model_name_or_path "$ROOT/configs/models/bumblebee-tiny" --dataset_path "$T/shards" --output_dir "$T/run" \
    --deepspeed_config_path "$ROOT/configs/deepspeed/ds_z2.json" \
    --kernels auto "$@"
  test -f "$T/run/training_metrics.json"' _ "$PY" "$ROOT" "$OUT" "${SMOKE[@]}"

cd "$ROOT" && rm -rf "$WORK"
n=$(find "$OUT" -type f | wc -l)
echo "== $n files in $OUT"
[ "$n" -le 8 ] || { echo "ERROR: more than 8 files in $OUT: the device returns 8 at most"; status=1; }
echo "== done status=$status; results in $OUT"
exit $status
