#!/usr/bin/env bash
# Does a refactor write the same bytes? The same small recipe (tokenizer, prep pretrain / sft /
# dpo shared-prompt / dpo pairs, pretrain 6 steps, LoRA SFT 4 steps, merge-lora, precompute-ref,
# DPO with the precomputed and with a copy reference; 1 thread, seed 0) from BASE_REV's
# packages and from the working tree, then `diff -r` of the two outputs (TensorBoard event
# files are named by time: left out; training_metrics.json timing keys blanked).
# Usage: tools/same_bytes.sh BASE_REV [WORKDIR]      (run from the checkout, .venv installed)
set -euo pipefail
BASE=${1:?usage: tools/same_bytes.sh BASE_REV [WORKDIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${2:-$(mktemp -d /tmp/same_bytes.XXXX)}
PY=$ROOT/.venv/bin/python
D=$ROOT/datasets/demo
C=$ROOT/configs
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=$ROOT/.cache/torch_extensions

# BASE_REV's packages laid out as installed (bumblefast/{prep,shards,kernels}), first on sys.path
rm -rf "$WORK/base_src" && mkdir -p "$WORK/base_src"
git -C "$ROOT" archive "$BASE" bumblefast prep shards kernels | tar -x -C "$WORK/base_src"
for d in prep shards kernels; do mv "$WORK/base_src/$d" "$WORK/base_src/bumblefast/$d"; done

recipe() {  # $1: output folder; PYTHONPATH picks the packages
  local out=$1
  rm -rf "$out" && mkdir -p "$out" && cd "$out"
  $PY -c "import bumblefast.model as m; print('packages:', m.__file__)"
  $PY -m bumblefast tokenizer train --input $D/pretrain.json $D/sft_alpaca.json $D/dpo.json --vocab_size 1024 --output tok >/dev/null
  local P="$PY -m bumblefast prep --tokenizer_name_or_path tok --seq_len 128"
  $P --stage pretrain --input $D/pretrain.json --output_dir pre >/dev/null 2>&1
  $P --stage sft --input $D/sft_alpaca.json --output_dir sft >/dev/null 2>&1
  $P --stage dpo --input $D/dpo.json --output_dir dpo >/dev/null 2>&1
  $P --stage dpo --input $D/dpo.json --output_dir dpo_pairs --share_prompt false >/dev/null 2>&1
  local T="$PY -m bumblefast train --tokenizer_name_or_path tok --cutoff_len 128 --train_micro_batch_size_per_gpu 2
    --gradient_accumulation_steps 2 --logging_steps 100 --save_steps 1000 --kernels reference --seed 0
    --deepspeed_config_path $C/deepspeed/ds_z0.json --gradient_checkpointing false"
  $T --stage pretrain --model_name_or_path $C/models/bumblebee-tiny --dataset_path pre --output_dir m_pre --max_steps 6 --learning_rate 3e-3 >/dev/null 2>&1
  $T --stage sft --model_name_or_path m_pre --dataset_path sft --output_dir m_lora --max_steps 4 --finetuning_type lora --lora_rank 4 --lora_alpha 8 >/dev/null 2>&1
  $PY -m bumblefast merge-lora --base_model_path m_pre --lora_model_path m_lora --save_path m_merged >/dev/null 2>&1
  $PY -m bumblefast precompute-ref --model_name_or_path m_pre --dataset_path dpo --output_dir dpo_ref >/dev/null 2>&1
  $T --stage dpo --model_name_or_path m_pre --dataset_path dpo_ref --output_dir m_dpo --max_steps 4 --learning_rate 1e-3 >/dev/null 2>&1
  $T --stage dpo --model_name_or_path m_pre --dataset_path dpo_pairs --output_dir m_dpo_copy --max_steps 3 --learning_rate 1e-3 >/dev/null 2>&1
  rm -rf m_*/checkpoints m_*/tensorboard
  # peft wrote target_modules in string-hash order before the export sorted it (a revision
  # older than that differs only there): compared sorted
  $PY - <<'PY'
import json, pathlib
for p in pathlib.Path(".").glob("*/adapter_config.json"):
    c = json.loads(p.read_text())
    c["target_modules"] = sorted(c["target_modules"])
    p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
PY
  find . -name training_metrics.json -exec sed -i -E 's/"([a-z_]*(time|elapsed|per_sec|mfu|tflops)[a-z_]*)": [0-9.e+-]+/"\1": 0/g' {} +
}
(PYTHONPATH=$WORK/base_src recipe "$WORK/base")
(PYTHONPATH= recipe "$WORK/tree")
n=$(find "$WORK/tree" -type f | wc -l)
if diff -r "$WORK/base" "$WORK/tree" >"$WORK/diff.txt"; then
  echo "same bytes: $n files identical ($BASE vs the working tree; outputs in $WORK)"
else
  echo "DIFFERENT ($BASE vs the working tree): see $WORK/diff.txt"; head -20 "$WORK/diff.txt"; exit 1
fi
