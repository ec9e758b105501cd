#!/usr/bin/env bash
# The v2 real-pair study (issue "ToE that transfers"): does ToE beat LoRA trained with the same data and the same
# objective? Qwen2.5-Coder-1.5B-Instruct teacher -> 0.5B-Instruct base, chat format, GSM8K.
#
# Data: the teacher's correct traces of GSM8K-train problems (runs/real_pair_traces.sh; the file the study used is
# committed as RES/train-traces.jsonl and read from there). Reported items: GSM8K dev rows [SKIP, SKIP + N) (56-155
# by default); rows 0-55 are the tuning rows (runs/real_pair_v2_sweep.sh) and never reported here.
# Every row trains on the same budget: STEPS Stage-B steps of BATCH sequences (plus 50 route warm-up steps where a
# system has them: they read cached states, not text). Targets: CE on the teacher's greedy chat answers to the
# reported items, graded greedy accuracy (400 new tokens), and CE on held-out code (runs/code_heldout.py: what a row
# costs outside math). Outputs whose metrics exist are skipped, so the script resumes; it runs ROWS in the given
# order (default: the issue's priority order).
#
# Usage: runs/real_pair_v2.sh PAIR_DIR WORK_DIR [ROW ...]   (two invocations may run at once: they share the
#   extractions and the teacher's dev answers, built once under a lock, and each row runs in one invocation only —
#   a row another invocation holds is passed over, so both may be given the same list)
#   ROW: anchors ctl3 toe3-on lora8-on toe3-off lora8-off toe3+lora oracle3 toe1-on ctl1 toe1-off lora1-on
#        lora1-off (default: all, in that order); each trains (if needed) and scores its row.
#   Env: STEPS (40), BATCH (4), SKIP (56), N (100), LAYERS3 (5,11,17), LAYER1 (11), RATIO (on-policy share, 1.0),
#        BETA (0.5), SAMPLE_TOKENS (256), BANK_LR (1e-3), LORA_LR (2e-4: the LoRA rows' learning rate), QUERY_NORM
#        (true), CACHED_STATES (true: off-policy steps of plug-in rows start from the extraction's cached states),
#        TRAIN_SELECTION (the ToE rows' routing in training: unset = `toe train`'s default, dense),
#        SEED (the training seed, default `toe train`'s 0; give repeats a NAME_SUFFIX), HEAVY_THREADS (torch
#        threads of trainings and extractions; default OMP_NUM_THREADS), RES (results/real_pair_v2), SCORE
#        ("ce acc code": which evaluations each row gets), NAME_SUFFIX (appended to each row's name: sweep points),
#        EXTRACT_DIR (where the extractions live, default WORK_DIR: sweeps share them), SIGNAL_FROM (a WORK_DIR
#        whose finished extraction an extraction missing from EXTRACT_DIR is rebuilt from — the same states, its
#        bank from the expert signal SIGNAL, default ridge, step SIGNAL_LAMBDA 0.25: `toe rebuild`), NUM_LEAVES (N of
#        each extraction's bank, built or rebuilt; default 64), EXTRACT_LABEL
#        (the folder under RES the 3-layer extraction's summaries are kept in, default extract-l3), DEV (the
#        evaluation data),
#        TEMPLATE (chat), TRAIN_DATA (default RES/train-traces.jsonl), PAIRS (the reports' A:B comparisons), REPORTS
#        (1; 0: no pooled reports or table after each row, the caller writes its own), DEV_BATCH
#        (25: the teacher's dev answers per generate call; decoding the 1.5B teacher on CPU is cheaper per row in
#        larger batches, and each finished batch is kept for --resume), ACC_BATCH (25: the same for every row's
#        graded answers; one CPU thread decodes a batch of 25 in about the time of a batch of 8 — a decode step
#        reads all the weights whatever the batch — and every row must use the same batches, as a batch's padding
#        can move a near-tie of greedy decoding).
#   CPU, one torch thread per job, two jobs on 2 cores: extraction ~1 min per trace per layer set, an off-policy
#   ToE row ~1 min per step, an on-policy step ~2-3 min (sampling + teacher), CE ~10 min per 100 items, accuracy
#   ~30 min per 100 items.
set -euo pipefail
pair=$1; work=$2; shift 2
rows=${*:-anchors ctl3 toe3-on lora8-on toe3-off lora8-off toe3+lora oracle3 toe1-on ctl1 toe1-off lora1-on lora1-off}
here=$(cd "$(dirname "$0")/.." && pwd)
res=${RES:-$here/results/real_pair_v2}
base="$pair/qwen2.5-coder-0.5b-instruct"; teacher="$pair/qwen2.5-coder-1.5b-instruct"
dev=${DEV:-$here/../shared/data/gsm8k/dev.jsonl}; train_data=${TRAIN_DATA:-$res/train-traces.jsonl}
skip=${SKIP:-56}; n=${N:-100}; score=${SCORE:-ce acc code}; sfx=${NAME_SUFFIX:-}; exdir=${EXTRACT_DIR:-$work}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
chat=(--template "${TEMPLATE:-chat}")
budget=(--data "$train_data" --response-field trace --max-length 512 "${chat[@]}" --max-steps "${STEPS:-40}"
        --batch-size "${BATCH:-4}")
[ -n "${SEED:-}" ] && budget+=(--seed "$SEED")  # a repeat of a row with another training seed (with a NAME_SUFFIX)
objective_on=(--objective on_policy --on-policy-ratio "${RATIO:-1.0}" --beta "${BETA:-0.5}"
              --sample-max-new-tokens "${SAMPLE_TOKENS:-256}" --teacher "$teacher")
# On-policy steps hold the fp32 teacher (6 GB) next to the student's activations over ~4 x 650 tokens: the plug-in
# rows recompute the frozen layers' activations in the backward (as the LoRA rows do), same gradients, ~15 -> ~10 GB.
low_memory=(--gradient-checkpointing true)
toe_knobs=(--bank-lr "${BANK_LR:-1e-3}" --query-norm "${QUERY_NORM:-true}" --stage-a-steps 50)
# Off-policy steps of plug-in rows start from the extraction's cached base states at the lowest injection layer
# (`--cached-states`: the same loss up to the cache's fp16 rounding; not for ToE on LoRA, whose base differs).
cached=(--cached-states "${CACHED_STATES:-true}")
need_traces() {  # the rows that train need the teacher's training traces
  [ -f "$train_data" ] || { echo "$train_data missing: run runs/real_pair_traces.sh and copy its output there" >&2
                            exit 2; }
}
mkdir -p "$res"/{ce,acc,code,train} "$work/locks"

# The reported items: the teacher's greedy chat answers (CE target, all kept) and its graded accuracy.
# The teacher's answers are every CE row's target: they are generated once and committed (RES/dev-traces.jsonl,
# without the data's gold solutions), so a later machine scores against the very same text instead of regenerating
# it (another machine's float order could change a token, and `toe report` refuses targets that differ).
traces="$work/dev-traces.jsonl"
dev_traces() {  # the teacher's dev answers, once (the first caller generates them; a second invocation waits)
  (
    flock 9
    if [ ! -f "$traces" ] && [ -f "$res/dev-traces.jsonl" ]; then cp "$res/dev-traces.jsonl" "$traces"; fi
    if [ ! -f "$traces" ]; then
      toe traces --teacher "$teacher" --data "$dev" --skip "$skip" --limit "$n" --keep-incorrect true "${chat[@]}" \
        --max-new-tokens 400 --batch-size "${DEV_BATCH:-25}" --eval-out "$res/acc/teacher" --overwrite true --resume true \
        --out "$traces.tmp" > "$res/dev_traces.json.tmp"
      mv "$res/dev_traces.json.tmp" "$res/dev_traces.json"
      python3 - "$traces.tmp" "$res/dev-traces.jsonl" <<'PY'
import json, sys
from tree_of_experts.grading import gsm8k_gold
from tree_of_experts.io import atomic_write_text
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:  # the gold solution goes, its final number stays (all that grading reads)
    r["answer"] = "#### " + (gsm8k_gold(str(r.get("answer", ""))) or "")
atomic_write_text(sys.argv[2], "".join(json.dumps(r) + "\n" for r in rows))
PY
      cp "$res/dev-traces.jsonl" "$traces.tmp"  # the CE rows read the committed copy's exact text
      mv "$traces.tmp" "$traces"
    fi
    # the CE target must be the teacher's answers to the very items the accuracy rows grade (DEV rows SKIP..SKIP+N)
    python3 - "$traces" "$dev" "$skip" "$n" <<'PY' || exit 2
import json, sys
traces, dev, skip, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
got = [json.loads(line).get("question") for line in open(traces)]
want = [json.loads(line).get("question") for line in open(dev)][skip:skip + n]
if sorted(map(str, got)) != sorted(map(str, want)):  # the same items (the traces are in the order they were decoded)
    sys.exit(f"{traces} answers other items than {dev} rows {skip}-{skip + n - 1} (SKIP/N/DEV changed?): use another "
             "RES and WORK_DIR for other items")
PY
  ) 9> "$traces.lock"
}
code="$work/code.jsonl"; [ -f "$code" ] || python3 "$here/runs/code_heldout.py" "$code" "$res/code/manifest.json"

heavy() {  # heavy CMD...: one training or extraction at a time across invocations. Trainings peak at 12-14 GB
  # (an on-policy step holds the fp32 teacher, 6 GB): two at once ran out of the machine's 24 GB, while a training
  # next to an evaluation (4-7 GB) fits. The other invocation meanwhile scores its finished rows, or waits here.
  # Off-policy rows too: a LoRA step without the teacher (activations recomputed) still peaks at ~11 GiB, its
  # vocabulary-wide CE tensors over ~4 x 400 positions (results/real_pair_v2/memory).
  # HEAVY_THREADS: torch threads of those jobs alone (e.g. 2 while no other invocation scores beside them); the
  # sweep shares the study's lock
  ( flock 7; OMP_NUM_THREADS=${HEAVY_THREADS:-$OMP_NUM_THREADS} "$@" ) 7> "${HEAVY_LOCK:-$work/locks/heavy.lock}"
}

extraction() {  # extraction NAME LAYERS: one tree + bank per layer, one teacher pass
  local out="$exdir/$1" reuse=(); need_traces; mkdir -p "$exdir"
  # a layer set inside the finished 3-layer extraction's takes its states from those shards (`--reuse-capture`: the
  # same extraction as a new capture, without the teacher's ~50 CPU-minutes); its fusion maps and tree are built anew
  if [ "$1" != extract-l3 ] && [ -f "$exdir/extract-l3/summary.json" ] && python3 -c "import json, sys
sys.exit(not set(map(int, sys.argv[2].split(','))) <= set(json.load(open(sys.argv[1]))['layers']))" \
      "$exdir/extract-l3/summary.json" "$2"; then reuse=(--reuse-capture "$exdir/extract-l3"); fi
  (  # two invocations of this script (two rows at once) build an extraction once: the second waits for the first
    flock 9
    if [ -f "$out/summary.json" ]; then :
    elif [ -n "${SIGNAL_FROM:-}" ]; then  # the states of SIGNAL_FROM/NAME, the bank built from another expert signal
      [ -f "$SIGNAL_FROM/$1/summary.json" ] || { echo "SIGNAL_FROM: $SIGNAL_FROM/$1 is not a finished extraction:" \
        "run a row that builds it first (without SIGNAL_FROM)" >&2; exit 2; }
      heavy toe rebuild --source "$SIGNAL_FROM/$1" --out "$out" --num-leaves "${NUM_LEAVES:-64}" \
        --signal "${SIGNAL:-ridge}" --signal-lambda "${SIGNAL_LAMBDA:-0.25}" --overwrite true
    else
      heavy toe extract --teacher "$teacher" --base "$base" --data "$train_data" \
        --response-field trace --max-length 512 "${chat[@]}" --layers "$2" --num-leaves "${NUM_LEAVES:-64}" --heldout-frac 0.1 \
        --batch-size 4 --shard-size 32 "${reuse[@]}" --out "$out"
    fi
  ) 9> "$out.lock"
  local kept="$res/$1"; [ "$1" = extract-l3 ] && kept="$res/${EXTRACT_LABEL:-$1}"  # its summaries, kept
  mkdir -p "$kept"; cp "$out"/{summary.json,summary.md,manifest.json} "$kept/"
}

again() {  # again DIR: continue an interrupted eval in DIR (its finished generation batches), else start it anew
  if [ -f "$1/generations.partial.jsonl" ]; then echo --resume true; else echo --overwrite true; fi
}

scores() {  # scores NAME SYSTEM_ARGS...: the row's evaluations (each skipped when its metrics exist); CE last, as
  # it reads the teacher's dev answers, which another invocation may still be generating: the core works meanwhile
  local name=$1; shift
  case " $score " in *" acc "*)
    [ -f "$res/acc/$name/metrics.json" ] || toe eval --base "$base" "$@" "${chat[@]}" --data "$dev" --skip "$skip" \
      --limit "$n" --ce false --max-new-tokens 400 --batch-size "${ACC_BATCH:-25}" $(again "$res/acc/$name") \
      --out "$res/acc/$name" ;;
  esac
  case " $score " in *" code "*)
    [ -f "$res/code/$name/metrics.json" ] || toe eval --base "$base" "$@" --task code --data "$code" \
      --template "{prompt}" --accuracy false --ce-target gold --batch-size 4 $(again "$res/code/$name") \
      --out "$res/code/$name" ;; esac
  case " $score " in *" ce "*)
    dev_traces
    [ -f "$res/ce/$name/metrics.json" ] || toe eval --base "$base" "$@" "${chat[@]}" --data "$traces" \
      --ce-target trace --accuracy false --batch-size 4 $(again "$res/ce/$name") --out "$res/ce/$name" ;; esac
}

logged() {  # logged NAME CMD...: runs the training CMD under heavy's lock, its exact command line kept first as
  # RES/train/NAME/command.sh
  mkdir -p "$res/train/$1"; local f="$res/train/$1/command.sh"
  { printf '%q ' "${@:2}"; echo; } > "$f.tmp" && mv "$f.tmp" "$f"
  heavy "${@:2}"
}

keep() {  # keep NAME DIR: the run's small files, and the trained weights of a plug-in or adapter
  [ -f "$2/.restored" ] && return 0  # DIR came from RES/train/NAME (its inspect.json needs the extraction it
  # started from, which a fresh machine may not have yet)
  mkdir -p "$res/train/$1"
  for f in metrics.jsonl curves.png train_summary.json baseline_summary.json train_args.json baseline_args.json \
           toe_config.json \
           toe_model.safetensors adapter_config.json adapter_model.safetensors README.md; do
    [ -f "$2/$f" ] && cp "$2/$f" "$res/train/$1/"
  done
  [ -d "$2/base_adapter" ] && cp -r "$2/base_adapter" "$res/train/$1/"
  # a plug-in's bank geometry after training next to the bank it started from (did the leaves specialise?)
  if [ -f "$2/toe_model.safetensors" ] && [ "$2/toe_model.safetensors" -nt "$res/train/$1/inspect.json" ]; then
    toe inspect --plugin "$2" > "$res/train/$1/inspect.json.tmp" && mv "$res/train/$1/inspect.json.tmp" \
      "$res/train/$1/inspect.json"
  fi
  return 0
}

same_args() {  # same_args DIR FIX KEY=VALUE...: the runs kept in DIR (its *_args.json) were made with these
  # values; else one line naming what differs and FIX, and the study stops
  python3 - "$@" <<'PY' || exit 2
import glob, json, sys
folder, fix, pairs = sys.argv[1], sys.argv[2], [p.split("=", 1) for p in sys.argv[3:]]
for f in glob.glob(f"{folder}/*_args.json"):
    args = json.load(open(f))
    differ = [f"{k}={args.get(k)}" for k, v in pairs if str(args.get(k)) != v]
    if differ:
        sys.exit(f"{folder} was made with {', '.join(differ)}: {fix}")
PY
}

layers_of() {  # layers_of EXTRACTION: the injection layers of extract-l3 / extract-l1
  if [ "$1" = extract-l1 ]; then echo "${LAYER1:-11}"; else echo "${LAYERS3:-5,11,17}"; fi
}

restore() {  # restore NAME SUMMARY: a fresh machine's WORK_DIR lacks the run folders. A finished row comes back
  # from its kept files (RES/train/NAME: weights, config, summary — what the evaluations read), so it is scored,
  # not trained again; an unfinished one from the checkpoint runs/real_pair_v2_stash.sh kept (RES/resume/NAME), so
  # it continues where it stopped.
  local run="$work/$1" kept="$res/train/$1" stash="$res/resume/$1"
  [ -f "$run/$2" ] && return 0
  if [ -f "$kept/$2" ] && { [ -f "$kept/toe_model.safetensors" ] || [ -f "$kept/adapter_model.safetensors" ]; }; then
    # a kept row trained with another budget is not this run's row: variants take a NAME_SUFFIX
    same_args "$kept" "this run asks STEPS=${STEPS:-40} BATCH=${BATCH:-4}: set NAME_SUFFIX for a variant, or another RES" \
      max_steps="${STEPS:-40}" batch_size="${BATCH:-4}"
    mkdir -p "$run"; cp -r "$kept"/. "$run"/; touch "$run/.restored"  # keep leaves its kept files as they are
    echo "row $1: finished earlier; restored from $kept" >&2
  elif [ -d "$stash/checkpoint" ] && [ ! -d "$run/checkpoint" ]; then
    # --resume compares the run's arguments, paths included: the stash continues only with the same folders
    same_args "$stash" "run the study with those folders (PAIR_DIR, WORK_DIR) to continue it, or delete $stash to \
start the row over" out="$run" base="$base"
    mkdir -p "$run"; cp -r "$stash"/. "$run"/; echo "row $1: continuing from the checkpoint kept in $stash" >&2
  fi
}

finished() {  # finished NAME: a finished row's stashed checkpoint (RES/resume/NAME) has served its purpose
  [ -d "$res/resume/$1" ] && rm -rf "$res/resume/$1"
  return 0
}

all_scored() {  # all_scored NAME: the row has metrics on every target asked for (SCORE): nothing left to do
  local t; for t in $score; do [ -f "$res/$t/$1/metrics.json" ] || return 1; done
  echo "row $1: scored on every target ($score); not restored or trained again" >&2
}

toe_row() {  # toe_row NAME EXTRACTION ARGS... (EXTRACTION: extract-l3 or extract-l1, built when the row trains)
  local name=$1$sfx ex=$2; shift 2; all_scored "$name" && return 0; need_traces; restore "$name" train_summary.json
  if [ ! -f "$work/$name/train_summary.json" ]; then
    extraction "$ex" "$(layers_of "$ex")"
  fi
  local sel=()  # the routing the plug-in trains with (default dense: every leaf mixed; it runs top-k at inference)
  [ -n "${TRAIN_SELECTION:-}" ] && sel=(--train-selection "$TRAIN_SELECTION")
  [ -f "$work/$name/train_summary.json" ] || logged "$name" toe train --base "$base" --experts "$exdir/$ex" --out "$work/$name" \
    "${budget[@]}" "${toe_knobs[@]}" "${sel[@]}" "$@" --log-every 1 --save-every 2 --resume true
  keep "$name" "$work/$name"; finished "$name"; scores "$name" --plugin "$work/$name" --with-base false
}

lora_row() {  # lora_row NAME RANK on|off
  local name=$1$sfx rank=$2 args; all_scored "$name" && return 0; need_traces; restore "$name" baseline_summary.json
  # Off-policy steps distil the extraction's cached teacher top-k (as the plug-in rows do), so those rows read the
  # 3-layer extraction; an all-on-policy row (RATIO 1) reads nothing of it and starts without it.
  kd=(--kd-weight 1 --experts "$exdir/extract-l3")
  if [ "$3" = off ]; then args=("${kd[@]}")
  elif awk "BEGIN { exit !(${RATIO:-1.0} < 1) }"; then args=("${objective_on[@]}" "${kd[@]}")
  else args=("${objective_on[@]}"); fi
  if [ ! -f "$work/$name/baseline_summary.json" ]; then
    case " ${args[*]} " in *" --experts "*) extraction extract-l3 "$(layers_of extract-l3)" ;; esac
    logged "$name" toe baseline --kind lora --lora-rank "$rank" --base "$base" --out "$work/$name" "${budget[@]}" \
      --gradient-checkpointing true --lr "${LORA_LR:-2e-4}" --save-every 2 --resume true "${args[@]}"
  fi  # an interrupted row continues from its checkpoint
  keep "$name" "$work/$name"; finished "$name"; scores "$name" --lora "$work/$name" --with-base false
}

# The headline's paired comparisons (A minus B on the same items): the teacher's margin (ToE vs the control at its
# layer set), ToE vs LoRA trained with the same objective, ToE on LoRA vs LoRA alone, each system on-policy vs
# off-policy, three injection layers vs one (same objective), and each row vs the bare base (on held-out code: what
# the row costs outside math).
PAIRS=${PAIRS:-"toe3-on:ctl3 toe3-off:ctl3 toe1-on:ctl1 toe1-off:ctl1 toe3-on:lora8-on toe3-off:lora8-off
  toe1-on:lora1-on toe1-off:lora1-off toe3+lora:lora8-on toe3-on:toe3-off lora8-on:lora8-off toe1-on:toe1-off
  lora1-on:lora1-off toe3-on:toe1-on toe3-off:toe1-off ctl3:ctl1 toe3-on:base toe3-off:base toe1-on:base toe1-off:base
  ctl3:base ctl1:base lora8-on:base lora8-off:base lora1-on:base lora1-off:base toe3+lora:base"}
label() { if [ "$1" = base ]; then echo base; else echo "$1$sfx"; fi; }
scored() {  # scored TARGET LABEL (the base: by the anchors row)
  if [ "$2" = base ]; then [ -f "$res/$1/anchors/metrics.json" ]; else [ -f "$res/$1/$2/metrics.json" ]; fi
}

mkdir -p "$work/locks"
for row in $rows; do
  # One invocation per row at a time: a row another invocation holds is passed over (it does that one), so two
  # invocations may share a row list and split it between them.
  exec 8> "$work/locks/$row$sfx.lock"
  if ! flock -n 8; then echo "row $row$sfx: another invocation is running it; next row" >&2; continue; fi
  case $row in
    anchors)  # base on every target; the teacher's CE (its accuracy came with its dev answers)
      dev_traces
      [ -f "$res/ce/anchors/metrics.json" ] || toe eval --base "$base" --teacher "$teacher" "${chat[@]}" \
        --data "$traces" --ce-target trace --accuracy false --batch-size 4 --overwrite true --out "$res/ce/anchors"
      scores anchors ;;
    ctl3|ctl1)
      ex=extract-l3; [ "$row" = ctl1 ] && ex=extract-l1
      restore "$row$sfx" baseline_summary.json
      [ -f "$work/$row$sfx/baseline_summary.json" ] || extraction "$ex" "$(layers_of "$ex")"
      [ -f "$work/$row$sfx/baseline_summary.json" ] || logged "$row$sfx" toe baseline --kind control --base "$base" \
        --experts "$exdir/$ex" --out "$work/$row$sfx" "${budget[@]}" "${toe_knobs[@]}" "${cached[@]}" --save-every 2 \
        --resume true  # trained like the ToE rows (bank lr, query norm, warm-up), without the teacher
      keep "$row$sfx" "$work/$row$sfx"; finished "$row$sfx"; scores "$row$sfx" --plugin "$work/$row$sfx" --with-base false ;;
    toe3-on) toe_row "$row" extract-l3 "${objective_on[@]}" "${cached[@]}" \
      "${low_memory[@]}" ;;
    toe3-off) toe_row "$row" extract-l3 "${cached[@]}" ;;
    toe1-on) toe_row "$row" extract-l1 "${objective_on[@]}" "${cached[@]}" \
      "${low_memory[@]}" ;;
    toe1-off) toe_row "$row" extract-l1 "${cached[@]}" ;;
    lora8-on) lora_row "$row" 8 on ;;
    lora8-off) lora_row "$row" 8 off ;;
    lora1-on) lora_row "$row" 1 on ;;
    lora1-off) lora_row "$row" 1 off ;;
    toe3+lora)  # LoRA first (the on-policy r8 adapter), then the 3-layer plug-in trained on the adapted base
      restore "lora8-on$sfx" baseline_summary.json
      if [ ! -f "$work/lora8-on$sfx/baseline_summary.json" ]; then
        echo "toe3+lora needs the finished lora8-on row first; passed over" >&2; exec 8>&-; continue
      fi
      toe_row "$row" extract-l3 "${objective_on[@]}" --base-adapter "$work/lora8-on$sfx" "${low_memory[@]}" ;;
    oracle3)  # O1/O2 for the 3-layer set, set-wide and per layer (CE on the reported items' teacher answers), next
      # to the off-policy 3-layer plug-in trained from the same extraction (its "learned" row: the ToE rows' own CE
      # is in their rows; toe3-off is the one finished first, so the oracle need not wait for the on-policy row)
      dev_traces; restore "toe3-off$sfx" train_summary.json
      if [ ! -f "$res/ce/oracle3$sfx/metrics.json" ] && [ ! -f "$work/toe3-off$sfx/train_summary.json" ]; then
        echo "oracle3 needs the finished toe3-off row first; passed over" >&2; exec 8>&-; continue
      fi
      [ -f "$res/ce/oracle3$sfx/metrics.json" ] || extraction extract-l3 "$(layers_of extract-l3)"
      [ -f "$res/ce/oracle3$sfx/metrics.json" ] || heavy toe oracle --teacher "$teacher" --base "$base" "${chat[@]}" \
        --experts "$exdir/extract-l3" --plugin "$work/toe3-off$sfx" --data "$traces" --ce-target trace --batch-size 1 \
        --lambdas "[0.25]" --overwrite true --out "$res/ce/oracle3$sfx" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  if [ "${REPORTS:-1}" = 0 ]; then exec 8>&-; continue; fi  # the caller pools the reports (the sweep)
  for target in ce acc code; do  # one pooled report per target over the finished rows, with the headline pairs
    dirs=(); pairs=()
    for d in "$res/$target"/*/; do [ -f "$d/metrics.json" ] && dirs+=("${d%/}"); done
    for p in $PAIRS; do  # A:B where both rows are scored on this target
      a=$(label "${p%%:*}"); b=$(label "${p#*:}")
      scored "$target" "$a" && scored "$target" "$b" && pairs+=("\"$a:$b\"")
    done
    for d in "$res/$target"/*-seed*/; do  # a repeat with another training seed (SEED) minus the row it repeats
      a=$(basename "$d"); b=${a%-seed*}
      scored "$target" "$a" && scored "$target" "$b" && pairs+=("\"$a:$b\"")
    done
    pair_args=(); [ ${#pairs[@]} -gt 0 ] && pair_args=(--pairs "[$(IFS=,; echo "${pairs[*]}")]")
    ref=${REFERENCE:-toe3-on}; ref_args=(); scored "$target" "$ref" && ref_args=(--reference "$ref")
    if [ ${#dirs[@]} -gt 1 ]; then
      toe report "${dirs[@]}" "${ref_args[@]}" "${pair_args[@]}" --out "$res/report-$target" \
        --overwrite true || echo "the $target report failed (above); the rows' own folders are complete" >&2
    fi
  done
  readme=(); [ "$res" -ef "$here/results/real_pair_v2" ] && readme=(--readme "$here/README.md")  # the study's own
  python3 "$here/runs/real_pair_v2_table.py" "$res" "${readme[@]}" > /dev/null \
    || echo "the table failed (above); the reports are complete" >&2  # the headline table (RES/table.md) so far
  exec 8>&-  # the row is done: its lock goes
done
