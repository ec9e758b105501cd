#!/usr/bin/env bash
# Extraction on the real pair (Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct) over a GSM8K-train subset, on CPU.
# Usage: runs/real_pair_extract.sh PAIR_DIR WORK_DIR [LIMIT]
#   PAIR_DIR: folder made by shared/tools/real-pair.sh; WORK_DIR: where shards go (GB-scale, not committed).
#   Env: TEMPLATE (prompt template, e.g. chat; default `Question: {prompt}\nAnswer: `), RES (results folder),
#   TRAIN_DATA (default GSM8K train) and FIELD (its response field, default the gold `answer`): for the teacher's
#   traces, TRAIN_DATA=WORK_DIR/train-traces.jsonl FIELD=trace (runs/real_pair_traces.sh writes it).
#   LAYER: another base injection layer (the teacher's at the same relative depth) instead of the default middle
#   layer 11 <- 13, written to WORK_DIR/extract-lLAYER (runs/real_pair_sweep.sh uses it for the layer sweep).
# Copies the small summary files into RES/extract/ (default results/real_pair/extract/; RES/extract-lLAYER).
set -euo pipefail
pair=$1; work=$2; limit=${3:-160}
here=$(cd "$(dirname "$0")/.." && pwd)
res=${RES:-$here/results/real_pair}
fmt=(); [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
[ -n "${FIELD:-}" ] && fmt+=(--response-field "$FIELD")
name=extract; [ -n "${LAYER:-}" ] && { name=extract-l$LAYER; fmt+=(--layers "[$LAYER]"); }
toe extract "${fmt[@]}" \
  --teacher "$pair/qwen2.5-coder-1.5b-instruct" --base "$pair/qwen2.5-coder-0.5b-instruct" \
  --data "${TRAIN_DATA:-$here/../shared/data/gsm8k/train.jsonl}" --limit "$limit" --heldout-frac 0.125 \
  --num-leaves 64 --shape balanced --batch-size 4 --shard-size 32 --out "$work/$name"
mkdir -p "$res/$name"
cp "$work/$name/summary.json" "$work/$name/summary.md" "$work/$name/manifest.json" "$res/$name/"
