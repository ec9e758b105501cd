#!/usr/bin/env bash
# The real-pair study (Qwen2.5-Coder-1.5B-Instruct teacher -> 0.5B-Instruct base), after runs/real_pair_extract.sh:
# every system trained on the same 160 GSM8K-train problems with the same budget (30 Stage-B steps of 4 sequences,
# 50 route warm-up steps where the system has them), then response CE on the first 40 GSM8K dev items, on two
# targets: gold solutions with the <<...>> notes removed, and the teacher's own greedy completions (`toe traces`).
# One pooled report at the end. Steps whose outputs exist are skipped, so the script resumes after an interruption.
#
# Usage: runs/real_pair_study.sh PAIR_DIR WORK_DIR [SYSTEM ...]
#   SYSTEM: toe-b control lora oracle flat toe-d static random lora-r64 sft toe-b-kd (default: all, in that order),
#   or anchors (the base and teacher rows alone, which every run scores first);
#   toe-b-kd is ToE-B trained on the teacher's top-k distribution alone (--ce-weight 0), not the gold text's CE.
#   Env: DEV_LIMIT (40), STEPS (30), TRACE_TOKENS (256: the teacher's budget for the trace target), TEMPLATE (the
#   prompt template of every step, e.g. TEMPLATE=chat; default `Question: {prompt}\nAnswer: `), RES (results
#   folder, default results/real_pair). Another TEMPLATE needs its own WORK_DIR and RES, and the extraction run with
#   the same TEMPLATE (runs/real_pair_extract.sh reads it too). Training on the teacher's traces instead of gold:
#   TRAIN_DATA=WORK_DIR/train-traces.jsonl FIELD=trace (runs/real_pair_traces.sh), as for the extraction; MAX_LENGTH
#   (384) caps prompt + response tokens in training. DEV_TRACES_FROM: a `toe eval --teacher` folder that already
#   generated the teacher's answers on the dev items (same template and TRACE_TOKENS), used instead of generating.
#   CPU cost, one torch thread per job on 2 cores: ~10 min per trained system (LoRA r=64 ~19 min), ~25 min for the
#   control's extraction, ~4 min per system for the two CE evaluations, ~16 min for the teacher's 40 traces. LoRA
#   and SFT backpropagate through the whole base: they run with gradient checkpointing (same gradients) to fit next
#   to another job in 24 GiB. The oracles cost ~40 min per target (the teacher's capture plus eight base passes):
#   ORACLE_TARGETS (default "gold trace") picks targets, ORACLE_LAMBDAS (e.g. 0.25) the ridge λ values. Memory:
#   the oracle holds teacher and base (fp32, 1.5B + 0.5B) and peaked at 13 GB on the chat traces at batch 4 —
#   twice it was killed for memory next to a training; ORACLE_BATCH=1 lowers the peak (the CE is per item).
set -euo pipefail
pair=$1; work=$2; shift 2
systems=${*:-toe-b control lora oracle flat toe-d static random lora-r64 sft toe-b-kd}
dev_limit=${DEV_LIMIT:-40}; steps=${STEPS:-30}
here=$(cd "$(dirname "$0")/.." && pwd)
base="$pair/qwen2.5-coder-0.5b-instruct"; teacher="$pair/qwen2.5-coder-1.5b-instruct"
train_data=${TRAIN_DATA:-$here/../shared/data/gsm8k/train.jsonl}; dev="$here/../shared/data/gsm8k/dev.jsonl"
res=${RES:-$here/results/real_pair}; traces="$work/dev-traces.jsonl"
fmt=(); [ -n "${TEMPLATE:-}" ] && fmt=(--template "$TEMPLATE")
field=(); [ -n "${FIELD:-}" ] && field=(--response-field "$FIELD")
budget=(--data "$train_data" --limit 160 --max-steps "$steps" --stage-a-steps 50 --batch-size 4
        --max-length "${MAX_LENGTH:-384}" "${fmt[@]}" "${field[@]}")
mkdir -p "$res/ce-gold" "$res/ce-trace" "$res/train"

evals() {  # evals NAME EVAL_ARGS...: CE on both targets, without re-scoring the base (the anchors folder has it)
  local name=$1; shift
  [ -f "$res/ce-gold/$name/metrics.json" ] || toe eval --base "$base" "$@" "${fmt[@]}" --task gsm8k \
    --data "$dev" --limit "$dev_limit" --accuracy false --ce-target gold_clean --batch-size 4 \
    --out "$res/ce-gold/$name"
  [ -f "$res/ce-trace/$name/metrics.json" ] || toe eval --base "$base" "$@" "${fmt[@]}" --task gsm8k \
    --data "$traces" --accuracy false --ce-target trace --batch-size 4 --out "$res/ce-trace/$name"
}

keep() {  # keep NAME FILES...: copy a run's small files into the repo
  local name=$1; shift
  mkdir -p "$res/train/$name"; cp "$@" "$res/train/$name/"
}

# 0. The teacher's own completions on the dev items (second CE target), then base and teacher on both targets.
if [ ! -f "$traces" ]; then
  from=(); [ -n "${DEV_TRACES_FROM:-}" ] && from=(--from-eval "$DEV_TRACES_FROM")
  toe traces --teacher "$teacher" --data "$dev" --limit "$dev_limit" --keep-incorrect true "${fmt[@]}" \
    --max-new-tokens "${TRACE_TOKENS:-256}" --batch-size 8 "${from[@]}" --out "$traces" \
    > "$res/traces_summary.json.tmp"
  mv "$res/traces_summary.json.tmp" "$res/traces_summary.json"  # a failed run leaves the committed file whole
fi
evals anchors --teacher "$teacher"

for sys in $systems; do
  case $sys in
    anchors) ;;  # scored above
    toe-b|toe-d|toe-b-kd)
      experts="$work/extract"; extra=()
      [ "$sys" = toe-b-kd ] && extra=(--ce-weight 0)
      if [ "$sys" = toe-d ]; then
        experts="$work/extract-d"
        [ -f "$experts/summary.json" ] || toe rebuild --source "$work/extract" --out "$experts" --shape deep \
          --selection topp --num-leaves 64
        mkdir -p "$res/extract-d"; cp "$experts/summary.json" "$experts/summary.md" "$res/extract-d/"
      fi
      [ -f "$work/$sys/train_summary.json" ] || toe train --base "$base" --experts "$experts" --out "$work/$sys" \
        "${budget[@]}" "${extra[@]}" --log-every 5 --save-every 10 --resume true
      keep "$sys" "$work/$sys"/{metrics.jsonl,curves.png,train_summary.json,toe_config.json}
      evals "$sys" --plugin "$work/$sys" --with-base false ;;
    control|flat|static|random)
      [ -f "$work/$sys/baseline_summary.json" ] || toe baseline --kind "$sys" --base "$base" \
        --experts "$work/extract" --out "$work/$sys" "${budget[@]}" --save-every 10 --resume true
      keep "$sys" "$work/$sys"/{metrics.jsonl,baseline_summary.json}
      evals "$sys" --plugin "$work/$sys" --with-base false ;;
    lora|lora-r64)
      rank=(--experts "$work/extract"); [ "$sys" = lora-r64 ] && rank=(--lora-rank 64)  # matched rank or r=64
      [ -f "$work/$sys/baseline_summary.json" ] || toe baseline --kind lora "${rank[@]}" --base "$base" \
        --out "$work/$sys" "${budget[@]}" --gradient-checkpointing true
      keep "$sys" "$work/$sys"/{metrics.jsonl,baseline_summary.json}
      evals "$sys" --lora "$work/$sys" --with-base false ;;
    sft)  # full fine-tuning: a reference that breaks the frozen-base rule
      [ -f "$work/sft/baseline_summary.json" ] || toe baseline --kind sft --base "$base" --out "$work/sft" \
        "${budget[@]}" --gradient-checkpointing true
      keep sft "$work/sft"/{metrics.jsonl,baseline_summary.json}
      evals sft --sft "$work/sft" --with-base false ;;
    oracle)  # O1/O2 on both targets, written as eval folders so the report pools them with the systems above
      lam=(--batch-size "${ORACLE_BATCH:-4}"); [ -n "${ORACLE_LAMBDAS:-}" ] && lam+=(--lambdas "[$ORACLE_LAMBDAS]")
      for target in ${ORACLE_TARGETS:-gold trace}; do
        case $target in
          gold) items=(--data "$dev" --limit "$dev_limit" --ce-target gold_clean) ;;
          trace) items=(--data "$traces" --ce-target trace) ;;
          *) echo "unknown oracle target $target (use gold trace)" >&2; exit 2 ;;
        esac
        [ -f "$res/ce-$target/oracle/metrics.json" ] || toe oracle --teacher "$teacher" --base "$base" "${fmt[@]}" \
          "${lam[@]}" --experts "$work/extract" --plugin "$work/toe-b" "${items[@]}" --out "$res/ce-$target/oracle"
      done ;;
    *) echo "unknown system $sys" >&2; exit 2 ;;
  esac
  done_dirs=()  # finished evals only (another run may be writing one), in the study's row order
  for name in anchors anchors-teacher toe-b toe-d toe-b-kd control lora lora-r64 sft flat static random oracle; do
    for target in ce-gold ce-trace; do
      [ -f "$res/$target/$name/metrics.json" ] && done_dirs+=("$res/$target/$name")
    done
  done
  toe report "${done_dirs[@]}" --reference toe-b --out "$res/report"
done
