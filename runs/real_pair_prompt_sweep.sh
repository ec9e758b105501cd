#!/usr/bin/env bash
# Prompt-format choice for the real pair on a dev slice the study does not report (rows 40-55 of the GSM8K dev
# file; the study reports rows 0-39): greedy accuracy of the base and the teacher with the raw
# `Question: {prompt}\nAnswer: ` prompt and with each tokenizer's chat template, 400 new tokens.
#
# Usage: runs/real_pair_prompt_sweep.sh PAIR_DIR   Env: RES (results folder, default results/real_pair_chat).
#   CPU cost: ~25 min on one core (the teacher's 16 answers take ~9 min per format).
set -euo pipefail
pair=$1
here=$(cd "$(dirname "$0")/.." && pwd)
res=${RES:-$here/results/real_pair_chat}/prompt-sweep
for fmt in raw chat; do
  tpl=(); [ "$fmt" = chat ] && tpl=(--template chat)
  [ -f "$res/$fmt/metrics.json" ] || toe eval --base "$pair/qwen2.5-coder-0.5b-instruct" \
    --teacher "$pair/qwen2.5-coder-1.5b-instruct" "${tpl[@]}" --task gsm8k \
    --data "$here/../shared/data/gsm8k/dev.jsonl" --skip 40 --limit 16 --ce false --max-new-tokens 400 \
    --batch-size 8 --out "$res/$fmt"
done
python3 - "$res" <<'PY'
import json, sys
for fmt in ("raw", "chat"):
    m = json.load(open(f"{sys.argv[1]}/{fmt}/metrics.json"))["systems"]
    print(fmt, {s: (round(v["accuracy"], 3), [round(x, 3) for x in v["accuracy_ci95"]], v["truncated_share"])
                for s, v in m.items()})
PY
