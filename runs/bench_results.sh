#!/usr/bin/env bash
# The README's speed numbers: `toe bench` on the shipped toy pair and on the real pair's base (CPU, one thread).
# Usage: runs/bench_results.sh [PAIR_DIR]   (PAIR_DIR from shared/tools/real-pair.sh; without it, toy only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); toy="$here/src/tree_of_experts/assets/toy"
toe bench --base "$toy/base" --teacher "$toy/teacher" --out "$here/results/bench/toy-cpu" --overwrite true --threads 1 --reps 7 \
  --routing-reps 15
if [ -n "${1:-}" ]; then
  toe bench --base "$1/qwen2.5-coder-0.5b-instruct" --teacher "$1/qwen2.5-coder-1.5b-instruct" \
    --out "$here/results/bench/real-cpu" --overwrite true --threads 1 --reps 3 --routing-reps 9
fi
