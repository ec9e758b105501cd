#!/usr/bin/env bash
# The teacher's greedy traces on N consecutive problems of a data file, as training data for the real-pair study
# (`--response-field trace`). The rows [SKIP, SKIP + N) are cut into chunks of CHUNK rows; JOBS chunks run at once.
# Each chunk writes its file (every generated row, graded) only when it is done (greedy decoding, so the rows are
# the ones one run would write) into WORK_DIR, then a copy without the data's gold solution (its final number kept
# as `gold`: the data files stay out of the repo) into RES/OUT_NAME.chunks/ — small, committed, so a later session
# or machine resumes from them: a chunk whose file exists there is not generated again. The chunks are merged shortest trace first into
# WORK_DIR/OUT_NAME and RES/OUT_NAME (correct traces only: the training text) and RES/OUT_NAME.summary.json (how many
# generated, kept, the teacher's accuracy).
#
# Usage: runs/real_pair_traces.sh PAIR_DIR WORK_DIR [N] [SKIP]   (N: 96, SKIP: 0)
#   Env: TEMPLATE (e.g. chat), TRACE_TOKENS (400), JOBS (2), THREADS (torch threads per job, 1), BATCH (8), CHUNK
#   (32), DATA (GSM8K train), OUT_NAME (train-traces.jsonl), RES (results folder; per-chunk summaries go to
#   RES/OUT_NAME.chunks/).
#   CPU cost: ~5.3 min per batch of 8 at 400 tokens in the chat format, one thread, two jobs on 2 idle cores; decoding
#   the 1.5B teacher in fp32 is memory-bound, so next to other jobs it slowed to ~45 min per batch (2026-11-30).
#   One job with 2 threads and a larger batch reads the weights once per step for more sequences:
#   JOBS=1 THREADS=2 BATCH=64 CHUNK=64 (used for results/real_pair_v2: ~2.5x the throughput of two 1-thread jobs).
#   Chunks are named by their first row: keep CHUNK the same when resuming (another CHUNK would leave gaps or overlaps;
#   the merge refuses duplicated rows).
set -euo pipefail
pair=$1; work=$2; n=${3:-96}; skip=${4:-0}
here=$(cd "$(dirname "$0")/.." && pwd)
data=${DATA:-$here/../shared/data/gsm8k/train.jsonl}; chunk=${CHUNK:-32}; name=${OUT_NAME:-train-traces.jsonl}
res=${RES:-$here/results/real_pair}; parts="$res/${name%.jsonl}.chunks"
raw="$work/${name%.jsonl}.chunks"
mkdir -p "$work" "$parts" "$raw"
export pair data parts raw res name here TEMPLATE TRACE_TOKENS THREADS BATCH
one() {  # one chunk: rows [$1, $1 + $2)
  local id; id=$(printf '%06d' "$1"); local fmt=()
  [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
  [ -f "$parts/$id.jsonl" ] && return 0
  [ -f "$raw/$id.jsonl" ] || OMP_NUM_THREADS=${THREADS:-1} toe traces --teacher "$pair/qwen2.5-coder-1.5b-instruct" \
    "${fmt[@]}" --data "$data" --skip "$1" --limit "$2" --keep_incorrect true --resume true \
    --max-new-tokens "${TRACE_TOKENS:-400}" --batch-size "${BATCH:-8}" --out "$raw/$id.jsonl" > "$parts/$id.json.part" \
    || { rm -f "$parts/$id.json.part"; echo "chunk $id failed: stopping (rerun resumes from the finished chunks)" >&2
         exit 255; }  # 255 makes xargs stop starting chunks
  [ -f "$parts/$id.json.part" ] && mv "$parts/$id.json.part" "$parts/$id.json"
  python3 - "$raw/$id.jsonl" "$parts/$id.jsonl" <<'PY'
import json, sys
from tree_of_experts.grading import gsm8k_gold
from tree_of_experts.io import atomic_write_text
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    r["gold"] = gsm8k_gold(str(r.pop("answer", ""))) or ""
atomic_write_text(sys.argv[2], "".join(json.dumps(r) + "\n" for r in rows))
PY
}
export -f one
for s in $(seq "$skip" "$chunk" $((skip + n - 1))); do
  echo "$s $(( skip + n - s < chunk ? skip + n - s : chunk ))"
done | xargs -P "${JOBS:-2}" -L 1 bash -c 'one "$0" "$1"'
python3 - "$parts" "$work/$name" "$res/$name.summary.json" "$res/$name" <<'PY'
import glob, json, sys
from tree_of_experts.io import atomic_write_text
parts, out, summary, committed = sys.argv[1:]
rows = [json.loads(l) for p in sorted(glob.glob(f"{parts}/*.jsonl")) for l in open(p)]
questions = [r["question"] for r in rows]
if len(set(questions)) != len(questions):
    sys.exit(f"{parts} holds overlapping chunks (a rerun with another CHUNK?): keep one CHUNK per output")
kept = sorted((r for r in rows if r["correct"]), key=lambda r: len(r["trace"]))
text = "".join(json.dumps(r) + "\n" for r in kept)
atomic_write_text(out, text)
atomic_write_text(committed, text)
atomic_write_text(summary, json.dumps({"generated": len(rows), "kept": len(kept),
                                       "accuracy": len(kept) / max(len(rows), 1),
                                       "truncated_share": sum(r["truncated"] for r in rows) / max(len(rows), 1),
                                       "chunks": len(glob.glob(f"{parts}/*.jsonl"))}, indent=1) + "\n")
print(f"{len(kept)} correct traces of {len(rows)} -> {out}")
PY
