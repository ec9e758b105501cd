#!/usr/bin/env bash
# The teacher's greedy traces on the first N GSM8K-train problems, as training data for the real-pair study
# (`--response-field trace`): JOBS parallel `toe traces` runs over consecutive slices (greedy decoding, so the
# rows are the ones one run would write), merged shortest trace first into WORK_DIR/train-traces.jsonl. Only the
# correct traces are kept. A slice whose file exists is not generated again, so the script resumes.
#
# Usage: runs/real_pair_traces.sh PAIR_DIR WORK_DIR [N]   (N: 96)
#   Env: TEMPLATE (e.g. chat), TRACE_TOKENS (400), JOBS (2; one torch thread each), RES (results folder: the
#   per-slice summaries, with the teacher's accuracy and out-of-tokens share, go to RES/train-traces/).
#   CPU cost: ~5.3 min per batch of 8 at 400 tokens in the chat format, one thread, two jobs on 2 cores.
set -euo pipefail
pair=$1; work=$2; n=${3:-96}; jobs=${JOBS:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
res=${RES:-$here/results/real_pair}; per=$(( (n + jobs - 1) / jobs ))
fmt=(); [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
mkdir -p "$work" "$res/train-traces"
for i in $(seq 0 $((jobs - 1))); do
  part="$work/train-traces-$i.jsonl"
  [ -f "$part" ] || OMP_NUM_THREADS=1 toe traces --teacher "$pair/qwen2.5-coder-1.5b-instruct" "${fmt[@]}" \
    --data "$here/../shared/data/gsm8k/train.jsonl" --skip $((i * per)) --limit "$per" \
    --max-new-tokens "${TRACE_TOKENS:-400}" --batch-size 8 --out "$part" > "$res/train-traces/slice-$i.json" &
done
wait
python3 - "$work" "$jobs" <<'PY'
import json, os, sys
from tree_of_experts.io import atomic_write_text
work, jobs = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for i in range(jobs) for l in open(os.path.join(work, f"train-traces-{i}.jsonl"))]
rows.sort(key=lambda r: len(r["trace"]))
atomic_write_text(os.path.join(work, "train-traces.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
print(f"{len(rows)} correct traces -> {work}/train-traces.jsonl")
PY
