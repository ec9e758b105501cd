#!/usr/bin/env bash
# Real pair, after runs/real_pair_extract.sh: train ToE-B, then evaluate CE on GSM8K dev (gold solutions with the
# <<...>> notes removed) for base, ToE and teacher, and the oracle table on the same items. CPU budget: ~1 h.
# Usage: runs/real_pair_train_eval.sh PAIR_DIR WORK_DIR [DEV_LIMIT] [STEPS]
set -euo pipefail
pair=$1; work=$2; dev_limit=${3:-40}; steps=${4:-30}
here=$(cd "$(dirname "$0")/.." && pwd)
base="$pair/qwen2.5-coder-0.5b-instruct"; teacher="$pair/qwen2.5-coder-1.5b-instruct"
train_data="$here/../shared/data/gsm8k/train.jsonl"; dev="$here/../shared/data/gsm8k/dev.jsonl"
res="$here/results/real_pair"
mkdir -p "$res"
toe train --base "$base" --experts "$work/extract" --data "$train_data" --limit 160 --out "$work/toe-b" \
  --max-steps "$steps" --stage-a-steps 50 --batch-size 4 --max-length 384 --log-every 5 --save-every 10
mkdir -p "$res/train"
cp "$work/toe-b/metrics.jsonl" "$work/toe-b/curves.png" "$work/toe-b/train_summary.json" "$work/toe-b/toe_config.json" \
  "$work/toe-b/README.md" "$res/train/"
toe eval --base "$base" --plugin "$work/toe-b" --teacher "$teacher" --task gsm8k --data "$dev" --limit "$dev_limit" \
  --accuracy false --ce-target gold_clean --batch-size 4 --out "$res/eval-ce"
toe oracle --teacher "$teacher" --base "$base" --experts "$work/extract" --plugin "$work/toe-b" --data "$dev" \
  --limit "$dev_limit" --out "$res/oracle"
