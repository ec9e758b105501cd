#!/usr/bin/env bash
# The knobs of the real-pair study (K, N, route warm-up) chosen on GSM8K dev rows 40-55, which the study's
# reported numbers (rows 0-39) exclude, after runs/real_pair_study.sh trained ToE-B: response CE on the teacher's
# own answers to those rows (the prompt sweep's, rebuilt with `toe traces --from-eval`), every point against the same
# base and teacher. One pooled report (RES/sweep-report, with sweep.png) at the end of each point.
#   k          K = 1, 2, 4, 8, 16 leaves of the trained ToE-B (N = 64, trained at K = 4), at inference only.
#   n16 n256   N = 16 and 256: a new tree and bank from the same extraction (`toe rebuild`), trained with ToE-B's
#              budget (N = 64 is ToE-B itself).
#   no-warmup  ToE-B trained without the route warm-up (Stage A), same Stage-B budget.
#   l5 l17     injection at base layer 5 or 17 (teacher layer at the same relative depth, 6 or 20) instead of
#              11 <- 13: a new extraction on the same text (runs/real_pair_extract.sh with LAYER), then ToE-B's
#              training.
# Steps whose outputs exist are skipped; two runs may take different points at once.
#
# Usage: runs/real_pair_sweep.sh PAIR_DIR WORK_DIR [POINT ...]   (default: k n16 n256 no-warmup)
#   Env: as for the study (TEMPLATE, RES, TRAIN_DATA, FIELD, MAX_LENGTH, STEPS, TRACE_TOKENS, and EXTRACT_LIMIT:
#   the extraction's problem count, default 160, for the layer points); SWEEP_FROM: the
#   `toe eval --teacher` folder holding the teacher's answers to rows 40-55 (default RES/prompt-sweep/chat, written
#   by runs/real_pair_prompt_sweep.sh with the same template and 400 tokens).
#   CPU cost, one torch thread: ~3 min for base and teacher, ~1.5 min per K, ~25 min per trained point (a layer
#   point adds ~20 min of extraction on the 53 chat traces; with
#   gradient checkpointing: the same gradients, in less memory than ToE-B's run, to fit next to the oracle).
set -euo pipefail
pair=$1; work=$2; shift 2
points=${*:-k n16 n256 no-warmup}
here=$(cd "$(dirname "$0")/.." && pwd)
base="$pair/qwen2.5-coder-0.5b-instruct"; teacher="$pair/qwen2.5-coder-1.5b-instruct"
train_data=${TRAIN_DATA:-$here/../shared/data/gsm8k/train.jsonl}; dev="$here/../shared/data/gsm8k/dev.jsonl"
res=${RES:-$here/results/real_pair}; sweep="$res/sweep"; traces="$work/sweep-traces.jsonl"
fmt=(); [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
field=(); [ -n "${FIELD:-}" ] && field=(--response-field "$FIELD")
budget=(--data "$train_data" --limit 160 --max-steps "${STEPS:-30}" --batch-size 4 --max-length "${MAX_LENGTH:-384}"
        "${fmt[@]}" "${field[@]}" --log-every 5 --save-every 10 --resume true --gradient-checkpointing true)
ce=(--base "$base" "${fmt[@]}" --task gsm8k --data "$traces" --accuracy false --ce-target trace --batch-size 4)
[ -f "$work/toe-b/train_summary.json" ] || { echo "train ToE-B first: runs/real_pair_study.sh $pair $work toe-b" >&2; exit 2; }
mkdir -p "$sweep"

[ -f "$traces" ] || toe traces --teacher "$teacher" --data "$dev" --skip 40 --limit 16 --keep-incorrect true \
  "${fmt[@]}" --max-new-tokens "${TRACE_TOKENS:-400}" --from-eval "${SWEEP_FROM:-$res/prompt-sweep/chat}" \
  --out "$traces" > "$sweep/traces_summary.json"
[ -f "$sweep/anchors/metrics.json" ] || toe eval "${ce[@]}" --teacher "$teacher" --out "$sweep/anchors"

train_point() {  # train_point NAME EXPERTS TRAIN_ARGS...: a ToE-B variant, then its CE on the sweep rows
  local name=$1 experts=$2; shift 2
  [ -f "$work/sweep-$name/train_summary.json" ] || toe train --base "$base" --experts "$experts" \
    --out "$work/sweep-$name" "${budget[@]}" "$@"
  mkdir -p "$sweep/train-$name"
  cp "$work/sweep-$name"/{metrics.jsonl,curves.png,train_summary.json,toe_config.json} "$sweep/train-$name/"
  [ -f "$sweep/$name/metrics.json" ] || toe eval "${ce[@]}" --plugin "$work/sweep-$name" --with-base false \
    --out "$sweep/$name"
}

for point in $points; do
  case $point in
    k)
      for k in 1 2 4 8 16; do
        [ -f "$sweep/k$k/metrics.json" ] || toe eval "${ce[@]}" --plugin "$work/toe-b" --with-base false \
          --plugin-top-k "$k" --out "$sweep/k$k"
      done ;;
    n16|n256)
      n=${point#n}
      [ -f "$work/extract-n$n/summary.json" ] || toe rebuild --source "$work/extract" --out "$work/extract-n$n" \
        --num-leaves "$n"
      train_point "$point" "$work/extract-n$n" --stage-a-steps 50 ;;
    no-warmup) train_point no-warmup "$work/extract" --stage-a-steps 0 ;;
    l[0-9]*)
      [ -f "$work/extract-$point/summary.json" ] || LAYER=${point#l} "$here/runs/real_pair_extract.sh" "$pair" "$work" \
        "${EXTRACT_LIMIT:-160}"
      train_point "$point" "$work/extract-$point" --stage-a-steps 50 ;;
    *) echo "unknown point $point (use k n16 n256 no-warmup lL)" >&2; exit 2 ;;
  esac
  dirs=(); labels=()  # finished points only (another run may be writing one)
  for name in anchors k1 k2 k4 k8 k16 n16 n256 no-warmup l5 l17; do
    [ -f "$sweep/$name/metrics.json" ] || continue
    dirs+=("$sweep/$name")
    case $name in
      k4) labels+=("\"k4\": \"ToE-B (N=64, K=4)\"") ;;
      k*) labels+=("\"$name\": \"K=${name#k}\"") ;;
      no-warmup) labels+=("\"$name\": \"no route warm-up\"") ;;
      n*) labels+=("\"$name\": \"N=${name#n}\"") ;;
      l*) labels+=("\"$name\": \"layer ${name#l}\"") ;;
    esac
  done
  toe report "${dirs[@]}" --reference "ToE-B (N=64, K=4)" --labels "{$(IFS=,; echo "${labels[*]}")}" \
    --out "$res/sweep-report"
done
