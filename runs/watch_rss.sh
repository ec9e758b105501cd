#!/usr/bin/env bash
# Samples the resident memory of every running `toe` command every INTERVAL seconds (default 10): one line per
# process, `time pid VmHWM VmRSS (kB) command`. Used to size how many study jobs fit on one machine at once;
# finished runs also record their own peak in train_summary.json / baseline_summary.json (peak_rss_gib).
# Usage: runs/watch_rss.sh [INTERVAL] >> rss.log &
set -uo pipefail
while true; do
  for p in $(pgrep -f "bin/toe "); do
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    echo "$(date +%T) $p $hwm $rss $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | sed 's/.*bin\/toe /toe /' | cut -c1-160)"
  done
  sleep "${1:-10}"
done
