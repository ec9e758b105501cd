#!/usr/bin/env bash
# Keeps the v2 study's unfinished trainings in the repo, so a later session on a fresh machine continues them
# (runs/real_pair_v2.sh restores RES/resume/NAME into WORK_DIR/NAME and resumes from its checkpoint; a row that
# finishes deletes its stash). A run folder's small files and its last checkpoint are copied, not the caches a
# control builds (extract/). Run it before a session stops, then commit RES/resume.
#
# A training writes a new checkpoint every 2 steps (a swap of folders): the copy is checked to hold one step
# throughout, and taken again if a save came in between.
#
# Usage: runs/real_pair_v2_stash.sh WORK_DIR [ROW ...]   (default: every unfinished run in WORK_DIR)
#   Env: RES (results/real_pair_v2)
set -euo pipefail
work=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
res=${RES:-$here/results/real_pair_v2}
step_of() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$1" 2>/dev/null || echo none; }
rows=${*:-$(for d in "$work"/*/; do if [ -d "$d/checkpoint" ]; then basename "$d"; fi; done)}
for row in $rows; do
  run="$work/$row"
  if [ -f "$run/train_summary.json" ] || [ -f "$run/baseline_summary.json" ]; then
    echo "$row: finished (its kept files are in $res/train/$row); nothing to stash"; continue
  fi
  [ -d "$run/checkpoint" ] || { echo "$row: no checkpoint in $run yet; nothing to stash"; continue; }
  tmp="$res/resume/.$row.tmp"
  for _ in 1 2 3 4 5; do
    rm -rf "$tmp"; mkdir -p "$tmp"; before=$(step_of "$run/checkpoint/state.json")
    # the checkpoint and what --resume checks next to it (the run's arguments, its logged rows)
    ok=true
    for f in "$run"/*; do case $(basename "$f") in extract|checkpoint.tmp|checkpoint.old) ;;
      *) cp -r "$f" "$tmp"/ 2>/dev/null || ok=false ;; esac; done
    [ $ok = true ] && [ "$before" != none ] && [ "$(step_of "$tmp/checkpoint/state.json")" = "$before" ] &&
      [ "$(step_of "$run/checkpoint/state.json")" = "$before" ] && break
    ok=false; sleep 5  # a checkpoint was being written: copy again
  done
  [ $ok = true ] || { echo "$row: its checkpoint kept changing while copied; nothing stashed (stop the row first)" >&2
                      rm -rf "$tmp"; continue; }
  rm -rf "$res/resume/$row"; mv "$tmp" "$res/resume/$row"
  echo "$row: step $before kept in $res/resume/$row ($(du -sh "$res/resume/$row" | cut -f1))"
done
