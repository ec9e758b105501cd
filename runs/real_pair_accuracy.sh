#!/usr/bin/env bash
# GSM8K answer accuracy on the real pair, after runs/real_pair_study.sh trained the systems: greedy generation
# (256 new tokens, the prompt and stop strings of `toe eval`) on the same first 40 dev items, graded, one pooled
# report. The teacher's answers are the greedy completions `toe traces` already wrote for the study (re-graded by
# `toe eval-traces`), so the 1.5B model does not generate again. Steps whose outputs exist are skipped.
#
# Usage: runs/real_pair_accuracy.sh PAIR_DIR WORK_DIR [SYSTEM ...]
#   SYSTEM: any system the study trained (default: toe-b control lora toe-b-kd), or anchors (teacher and base
#   only). Env: DEV_LIMIT (40), TEMPLATE and RES as for the study (use the study's), GEN_TOKENS (256; the teacher's
#   comes from its traces, TRACE_TOKENS).
#   CPU cost: ~5-10 min per system on one core. Each row says which share of answers ran out of tokens.
set -euo pipefail
pair=$1; work=$2; shift 2
systems=${*:-toe-b control lora toe-b-kd}
dev_limit=${DEV_LIMIT:-40}
here=$(cd "$(dirname "$0")/.." && pwd)
base="$pair/qwen2.5-coder-0.5b-instruct"; teacher="$pair/qwen2.5-coder-1.5b-instruct"
dev="$here/../shared/data/gsm8k/dev.jsonl"; res=${RES:-$here/results/real_pair}; acc="$res/acc"
fmt=(); [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
gen=(--task gsm8k --data "$dev" --limit "$dev_limit" --ce false --max-new-tokens "${GEN_TOKENS:-256}"
     --batch-size 8 "${fmt[@]}")
mkdir -p "$acc"

[ -f "$acc/teacher/metrics.json" ] || toe eval-traces --traces-file "$work/dev-traces.jsonl" --teacher "$teacher" \
  --data "$dev" --limit "$dev_limit" --max-new-tokens "${TRACE_TOKENS:-256}" "${fmt[@]}" --overwrite true \
  --out "$acc/teacher"
[ -f "$acc/base/metrics.json" ] || toe eval --base "$base" "${gen[@]}" --out "$acc/base"

for sys in $systems; do
  case $sys in
    anchors) continue ;;  # teacher and base only: scored above
    lora|lora-r64) model=(--lora "$work/$sys") ;;
    sft) model=(--sft "$work/sft") ;;
    *) model=(--plugin "$work/$sys") ;;
  esac
  [ -f "$acc/$sys/metrics.json" ] || toe eval --base "$base" "${model[@]}" --with-base false "${gen[@]}" \
    --out "$acc/$sys"
  done_dirs=$(dirname $(ls "$acc"/*/metrics.json))  # finished evals only
  toe report $done_dirs --reference toe-b --out "$res/acc-report"
done
