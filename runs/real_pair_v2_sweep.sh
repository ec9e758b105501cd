#!/usr/bin/env bash
# The choices of the v2 study, made on GSM8K dev rows 0-55 (never reported by runs/real_pair_v2.sh, which scores rows
# 56-155): each ToE point trains the 3-layer on-policy ToE row (toe3-on) with one knob changed from the study's
# defaults, each LoRA point the on-policy r8 row (lora8-on), and every point scores CE on the teacher's chat answers
# to rows 0-55. Points whose metrics exist are skipped (resumable).
#
# Usage: runs/real_pair_v2_sweep.sh PAIR_DIR WORK_DIR [POINT ...]
#   POINT: default (RATIO 1, BETA 0.5, BANK_LR 1e-3, QUERY_NORM true), ratio0.5, beta1 (reverse KL), beta0 (forward
#          KL), banklr1e-4 (the v1 bank learning rate), noqnorm, topk (trained with the top-k routing it samples
#          and runs with, instead of dense: on-policy, the network scored is then the one that sampled), l1 (one
#          layer, 11), l3-4-12-20 (another set), ridge (the bank built from the untrained ridge step λ 0.25 (P(u) - h),
#          the O1 ridge oracle's edit, instead of the trained fusion map: `toe rebuild --signal ridge` of the 3-layer
#          extraction), n16 and n256 (N leaves per layer instead of 64: the 3-layer extraction's bank rebuilt with
#          `toe rebuild --num_leaves`, the same states and fusion maps), and
#          for LoRA, whose learning rate is the one knob it brings: lora (LORA_LR 2e-4) and lora-lr1e-3 — default:
#          all fourteen, in that order. Env as for runs/real_pair_v2.sh (BATCH, ...); SWEEP_STEPS (10): each point trains
#          for a quarter of the study's 40 steps (an on-policy step is ~2-3 CPU-minutes here, so ten points at the
#          full budget would be ~17 CPU-hours): it ranks the choices, the study trains the chosen ones in full.
#   Results: results/real_pair_v2/sweep/: after each point one pooled CE report with every point minus its reference
#   (the ToE points minus `default`, the LoRA point minus `lora`), and the sweep's table (table.md).
set -euo pipefail
pair=$1; work=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
points=${*:-default ratio0.5 beta1 beta0 banklr1e-4 noqnorm topk l1 l3-4-12-20 ridge n16 n256 lora lora-lr1e-3}
export RES=${SWEEP_RES:-$here/results/real_pair_v2/sweep} SKIP=0 N=56 SCORE=ce EXTRACT_DIR=$work REPORTS=0
export STEPS=${SWEEP_STEPS:-10}
# one training at a time with a study running on the same machine (two trainings at once run out of 24 GB)
export HEAVY_LOCK=${HEAVY_LOCK:-$work/locks/heavy.lock}; mkdir -p "$work/locks"
export TRAIN_DATA=${TRAIN_DATA:-$here/results/real_pair_v2/train-traces.jsonl}
for p in $points; do
  env=(NAME_SUFFIX="-$p"); row=toe3-on
  case $p in
    default) ;;
    ratio0.5) env+=(RATIO=0.5) ;;
    beta1) env+=(BETA=1.0) ;;
    beta0) env+=(BETA=0.0) ;;
    banklr1e-4) env+=(BANK_LR=1e-4) ;;
    noqnorm) env+=(QUERY_NORM=false) ;;
    topk) env+=(TRAIN_SELECTION=topk) ;;
    l1) row=toe1-on ;;
    l3-4-12-20) env+=(LAYERS3=4,12,20 EXTRACT_DIR="$work/sweep-l4-12-20" EXTRACT_LABEL=extract-l4-12-20) ;;
    ridge) env+=(EXTRACT_DIR="$work/sweep-ridge" EXTRACT_LABEL=extract-l3-ridge SIGNAL_FROM="$work" SIGNAL=ridge
                 SIGNAL_LAMBDA=0.25) ;;  # the 3-layer extraction's states, its bank rebuilt from the ridge step
    n16|n256) env+=(EXTRACT_DIR="$work/sweep-$p" EXTRACT_LABEL="extract-l3-$p" SIGNAL_FROM="$work" SIGNAL=fusion_map
                    NUM_LEAVES="${p#n}") ;;
    lora) row=lora8-on ;;
    lora-lr1e-3) row=lora8-on; env+=(LORA_LR=1e-3) ;;
    *) echo "unknown point $p" >&2; exit 2 ;;
  esac
  env "${env[@]}" "$here/runs/real_pair_v2.sh" "$pair" "$work/sweep" anchors "$row"
  dirs=(); pairs=()  # the pooled report: each scored point minus its reference point, paired on the tuning rows
  for d in "$RES"/ce/*/; do [ -f "$d/metrics.json" ] && dirs+=("${d%/}"); done
  # the reference rule lives in the table script, next to the table that reads these pairs
  listed=$(python3 "$here/runs/real_pair_v2_table.py" "$RES" --sweep-pairs) \
    || { echo "the sweep's pairs could not be listed (above): fix that, then run the sweep again" >&2; exit 2; }
  for pr in $listed; do pairs+=("\"$pr\""); done
  pair_args=(); [ ${#pairs[@]} -gt 0 ] && pair_args=(--pairs "[$(IFS=,; echo "${pairs[*]}")]")
  [ ${#dirs[@]} -gt 1 ] && { toe report "${dirs[@]}" "${pair_args[@]}" --out "$RES/report-ce" --overwrite true \
    || echo "the sweep report failed (above); the points' own folders are complete" >&2; }
  python3 "$here/runs/real_pair_v2_table.py" "$RES" --sweep > /dev/null \
    || echo "the sweep table failed (above); the report is complete" >&2
done
