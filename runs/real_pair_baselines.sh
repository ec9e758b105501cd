#!/usr/bin/env bash
# Real pair, after runs/real_pair_train_eval.sh: baselines with ToE's data and step budget, their dev CE on the same
# items, and one report over everything. Usage: runs/real_pair_baselines.sh PAIR_DIR WORK_DIR [DEV_LIMIT] [STEPS]
set -euo pipefail
pair=$1; work=$2; dev_limit=${3:-40}; steps=${4:-30}
here=$(cd "$(dirname "$0")/.." && pwd)
base="$pair/qwen2.5-coder-0.5b-instruct"
train_data="$here/../shared/data/gsm8k/train.jsonl"; dev="$here/../shared/data/gsm8k/dev.jsonl"
res="$here/results/real_pair"
for kind in ${KINDS:-lora static flat}; do
  toe baseline --kind "$kind" --base "$base" --experts "$work/extract" --data "$train_data" --limit 160 \
    --out "$work/$kind" --max-steps "$steps" --stage-a-steps 50 --batch-size 4 --max-length 384
  mkdir -p "$res/baseline-$kind"
  cp "$work/$kind/baseline_summary.json" "$work/$kind/metrics.jsonl" "$res/baseline-$kind/"
  if [ "$kind" = lora ]; then
    toe eval --base "$base" --lora "$work/$kind" --task gsm8k --data "$dev" --limit "$dev_limit" --accuracy false \
      --ce-target gold_clean --batch-size 4 --out "$res/eval-ce-$kind"
  else
    toe eval --base "$base" --plugin "$work/$kind" --task gsm8k --data "$dev" --limit "$dev_limit" --accuracy false \
      --ce-target gold_clean --batch-size 4 --out "$res/eval-ce-$kind"
  fi
done
toe report "$res/eval-ce" $(for k in ${KINDS:-lora static flat}; do echo "$res/eval-ce-$k"; done) --out "$res/report"
