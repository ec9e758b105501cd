#!/usr/bin/env bash
# Times the README's two set-up commands on this machine, each from a fresh clone in a fresh virtual environment with
# pip's cache off (every package from the registry), and writes results/setup/setup-time.txt.
#   bash runs/setup_time.sh            (run it on an idle machine: other jobs slow both commands)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export PIP_NO_CACHE_DIR=1
out="$repo/results/setup/setup-time.txt"
mkdir -p "$(dirname "$out")"
git clone -q "$repo" "$tmp/repo"
cd "$tmp/repo"
python3 -m venv "$tmp/v1" && python3 -m venv "$tmp/v2"
{
  echo "machine: $(nproc) CPU cores ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/Mem:/{print $2}') GiB RAM;" \
       "load before: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F); commit $(git rev-parse --short HEAD)"
  ( source "$tmp/v1/bin/activate"
    /usr/bin/time -f "command 1 (install + toe demo): %e s" bash -c \
      "pip install -q torch==2.13.0 && pip install -q -c constraints.txt -e . && toe demo" > "$tmp/cmd1.log" 2>&1 )
  tail -1 "$tmp/cmd1.log"
  ( source "$tmp/v2/bin/activate"
    /usr/bin/time -f "command 2 (install + python -m pytest): %e s" bash -c \
      "pip install -q torch==2.13.0 && pip install -q -c constraints.txt -e '.[test]' && python -m pytest -p no:cacheprovider" \
      > "$tmp/cmd2.log" 2>&1 )
  echo "tests: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$tmp/cmd2.log" | tail -1 | tr -d '=')"
  tail -1 "$tmp/cmd2.log"
} | tee "$out"
