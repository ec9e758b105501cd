#!/usr/bin/env bash
# Runs `toe demo` and copies its small result files into results/demo/ (what the README's demo table shows).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); d=${1:-/tmp/toe-demo}
rm -rf "$d"; toe demo --out "$d"
r="$here/results/demo"; mkdir -p "$r"/{eval,eval-control,extract,train,control}
cp "$d"/report.{md,json,png} "$d"/usage.png "$r/"
cp "$d"/eval/*.json* "$r/eval/"; cp "$d"/eval-control/*.json* "$r/eval-control/"
cp "$d"/extract/summary.{json,md} "$r/extract/"
cp "$d"/plugin/{metrics.jsonl,curves.png,train_summary.json} "$r/train/"
cp "$d"/control/{metrics.jsonl,train_summary.json} "$r/control/"
