"""`toe eval` and `toe traces`: accuracy (generation + grading) and response cross-entropy, per system.

Systems: the bare base, base + ToE plug-in, the teacher, base + a LoRA adapter, a fully fine-tuned base (SFT).
Every system sees the same items, prompt and token budget; per-example rows go to ``DIR/<system>.jsonl`` and the
aggregate to ``DIR/metrics.json`` with 95 % intervals, gap closed against the teacher and paired comparisons against
the base.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

from ..config import ToEError
from ..data import DataSpec, read_jsonl
from ..evaluation.results import (
    summary_table,
    teacher_accuracy_args,
    teacher_answers,
    usage_summary,
    write_metrics,
    write_rows,
)
from ..evaluation.scoring import ce_examples, score_system
from ..evaluation.tasks import STOP, TASK_FIELDS, build_items, eval_rows, gradable_rows
from ..files import atomic_write_text
from ..folders import check_file_out, claim_out
from ..grading import grade
from ..hf.layers import input_device
from ..hf.loading import adapter_folder, load_causal_lm, load_config, load_tokenizer, pick_device
from ..inference import GenerationLog, folder_fingerprint
from ..locks import releases_out_locks
from ..options import (
    DEFAULT_TEMPLATE,
    ORACLE_ROWS,
    SAMPLING,
    TRAINING_ONLY,
    Runtime,
    Scoring,
    Systems,
    grouped,
    refuse_unused,
    require,
)
from ..options.base import at_least, optional_at_least

logger = logging.getLogger(__name__)
PARTIAL = "generations.partial.jsonl"  # an interrupted eval's finished generation batches (--resume)


@grouped
@releases_out_locks
def evaluate(
    base: str,
    data: str | None = None,
    out: str = "eval",
    teacher: str | None = None,
    systems: Systems = Systems(),
    scoring: Scoring = Scoring(),
    runtime: Runtime = Runtime(),
    limit: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_length: int = 1024,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Evaluates base, base + plug-in, teacher and LoRA on the same items.

    Every option of a group can also be given flat (``evaluate(base, data=..., plugin=P, task="math")``; on the
    command line ``--plugin P`` or ``--systems.plugin P``).

    Args:
        base: base model id or folder.
        data: the task's items: a .jsonl/.json/.csv/.parquet file or hf:NAME[:CONFIG]:SPLIT (GSM8K:
            question/answer; MATH: problem/solution/answer).
        out: output folder (metrics.json, <system>.jsonl).
        teacher: teacher model id or folder, scored as system "teacher".
        systems: the systems scored beside the base and the teacher (a plug-in and its routing, LoRA, SFT) and
            whether the bare base is scored; the oracle rows are `toe oracle`'s (refused here).
        scoring: the task, which rows and prompts (``skip``, few-shot), what is scored (CE and its target,
            accuracy) and the decoding accuracy grades (greedy by default; sampled with ``temperature`` > 0).
        runtime: dtype and device of the models, resume (continue an interrupted run in ``out`` with the same
            arguments: every generated batch is kept in ``out/generations.partial.jsonl`` as it finishes and is not
            generated again, CE is recomputed; with ``overwrite`` too, the other files go and the finished batches
            stay), overwrite (replace what another run left in ``out``); the training-only fields are refused.
        limit: evaluate at most this many rows, from row ``scoring.skip`` on (default: all).
        template: prompt template with {prompt}, or "chat" for the base tokenizer's chat template (recorded
            rendered).
        max_length: prompt + target tokens kept per item for CE (targets cut by it are counted per system as
            ``ce_cut_by_max_length``).
        batch_size: items per forward or generate call.
        seed: seed of the sampling draws (each system starts from it).

    Returns:
        The metrics dict written to ``out/metrics.json``, and under ``summary`` a one-screen table of it (what `toe
        eval` prints).
    """
    sampling, routing = _checked_options(systems, scoring, runtime, data, teacher, max_length, batch_size, limit, seed)
    task, ce, accuracy, max_new_tokens = scoring.task, scoring.ce, scoring.accuracy, scoring.max_new_tokens
    rows, bad_rows, spec, ce_spec, shots = eval_rows(data, scoring, template, limit)
    # Every input is checked before the first model loads: a wrong path found after the base's pass costs hours.
    lora_dir = _check_models(base, teacher, systems)
    tok = load_tokenizer(base)
    spec, ce_spec = spec.for_tokenizer(tok), ce_spec.for_tokenizer(tok)
    items = build_items(task, rows, spec, shots, ce_spec)
    if ce:
        ce_examples(tok, items, max_length)  # a prompt that fills max_length is refused before any model loads
    claim_out(out, "eval", overwrite=runtime.overwrite, resume=runtime.resume,
              keep=(PARTIAL,) if runtime.resume else (),
              inputs={"base": base, "plugin": systems.plugin, "teacher": teacher, "lora": systems.lora,
                      "sft": systems.sft, "data": data, "few_shot_data": scoring.few_shot_data})
    os.makedirs(out, exist_ok=True)
    args = dict(base=base, task=task, data=data, plugin=systems.plugin, teacher=teacher, lora=systems.lora,
                sft=systems.sft, limit=limit, skip=scoring.skip, few_shot=scoring.few_shot, template=spec.template,
                ce_target=scoring.ce_target, max_new_tokens=max_new_tokens, dtype=runtime.dtype, **sampling.record(),
                stop=STOP, ce=ce, accuracy=accuracy, routing=routing)
    if scoring.skip_bad_rows:
        args["skipped_rows"] = len(bad_rows)

    # Each system scored on the same items, one model in memory at a time; its rows written as it finishes.
    per_system: dict[str, list[dict]] = {}
    weights = {k: folder_fingerprint(v) for k, v in dict(base=base, plugin=systems.plugin, teacher=teacher,
                                                         lora=systems.lora, sft=systems.sft).items()}
    logs, resumed = [], {}

    def run(name: str, model) -> None:
        logs.append(GenerationLog(os.path.join(out, PARTIAL), {
            "system": name, "args": {k: v for k, v in args.items() if k not in ("ce", "accuracy", "ce_target")},
            "weights": weights, "batch_size": batch_size, "device": str(next(model.parameters()).device)}, tag=name))
        per_system[name] = score_system(name, model, tok, items, task, accuracy, ce, max_new_tokens, batch_size,
                                        max_length, STOP, sampling, logs[-1])
        write_rows(out, name, per_system[name])
        if logs[-1].reused:  # generated by the interrupted run: its leaf usage there is not counted again
            resumed[name] = logs[-1].reused

    leaf_usage = _run_systems(run, base, teacher, systems, lora_dir, runtime)
    metrics = write_metrics(out, {**args, "resumed_batches": resumed} if resumed else args, per_system, leaf_usage)
    logs[0].close()  # one file for all systems
    return {**metrics, "summary": summary_table(metrics, out)}


def _checked_options(systems: Systems, scoring: Scoring, runtime: Runtime, data: str | None, teacher: str | None,
                     max_length: int, batch_size: int, limit: int | None, seed: int):
    """Refuses the options `toe eval` does not read, sizes out of range and runs with nothing to evaluate or score;
    returns the decoding (:class:`tree_of_experts.inference.Sampling`) and the plug-in's routing overrides."""
    require("toe eval", systems, {name: "it is a `toe oracle` option" for name in ORACLE_ROWS})
    refuse_unused("toe eval", runtime, ("dtype", "device", "resume", "overwrite", "teacher_device_map"), TRAINING_ONLY)
    if runtime.teacher_device_map and not teacher:
        raise ToEError("--teacher_device_map places the teacher row's model: pass --teacher, or drop it")
    at_least("max_length", max_length, 2, " (tokens per item)")
    at_least("batch_size", batch_size, 1)
    optional_at_least("limit", limit, 1, " (items)")
    plugin, lora, sft, with_base = systems.plugin, systems.lora, systems.sft, systems.with_base
    if data is None:
        raise ToEError("--data is required: the task's items (a .jsonl/.json/.csv/.parquet file or "
                       "hf:NAME[:CONFIG]:SPLIT)")
    if scoring.task == "code" and (scoring.accuracy or scoring.ce_target != "gold"):
        raise ToEError("--task code scores CE on the text alone: pass --accuracy false --ce_target gold")
    if not (with_base or plugin or lora or sft or teacher):
        raise ToEError("nothing to evaluate: --with_base false needs --plugin, --lora, --sft or --teacher")
    if not (scoring.ce or scoring.accuracy):
        raise ToEError("nothing to score: --ce false and --accuracy false; keep one of them")
    sampling = scoring.sampling(seed)
    routing = systems.routing()
    if not plugin and any(v is not None for v in routing.values()):
        raise ToEError("--plugin_selection/--plugin_top_k/--plugin_top_p route a plug-in: pass --plugin, or drop them")
    return sampling, routing


def _check_models(base: str, teacher: str | None, systems: Systems) -> str | None:
    """Refuses a model, plug-in or adapter that does not load or fit, from their configs alone; returns the LoRA
    adapter's folder (None without ``systems.lora``)."""
    from ..plugin_folder import check_plugin_fits

    base_config = load_config(base, "base")
    for option, name in (("teacher", teacher), ("sft", systems.sft)):
        if name:
            load_config(name, option)
    if systems.plugin:
        check_plugin_fits(systems.plugin, base_config, base, systems.plugin_selection, systems.plugin_top_k,
                          systems.plugin_top_p)
    return adapter_folder(systems.lora) if systems.lora else None


def _run_systems(run, base: str, teacher: str | None, systems: Systems, lora_dir: str | None,
                 runtime: Runtime) -> dict[str, dict]:
    """Scores each system with ``run(name, model)``: those on the base's own weights first (the base loaded once),
    then the SFT model and the teacher; returns the plug-in's leaf usage."""
    from ..model import ToEModel

    leaf_usage: dict[str, dict] = {}
    device, dtype = pick_device(runtime.device), runtime.dtype
    if systems.with_base or systems.plugin or systems.lora:  # the systems that run on the base's own weights
        base_model = load_causal_lm(base, dtype=dtype, device=device)
        if systems.with_base:
            run("base", base_model)
        if systems.plugin:
            with ToEModel.from_pretrained(base_model, systems.plugin) as toe, \
                    toe.selection(systems.plugin_selection, systems.plugin_top_k, systems.plugin_top_p), \
                    toe.plugin.counting() as mass:
                run("toe", toe)
            leaf_usage["toe"] = usage_summary(mass, toe.plugin.delta_ratio)
        if systems.lora:
            from peft import PeftModel

            run("lora", PeftModel.from_pretrained(base_model, lora_dir).eval())
        del base_model
    if systems.sft:
        run("sft", load_causal_lm(systems.sft, dtype=dtype, device=device))
    if teacher:
        run("teacher", load_causal_lm(teacher, dtype=dtype, device=device, device_map=runtime.teacher_map()))
    return leaf_usage


@grouped
@releases_out_locks
def traces(
    teacher: str,
    data: str,
    out: str,
    scoring: Scoring = Scoring(),
    runtime: Runtime = Runtime(),
    limit: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    keep_incorrect: bool = False,
    eval_out: str | None = None,
    from_eval: str | None = None,
) -> dict:
    """Samples the teacher greedily and keeps its correct traces as training or CE data.

    Writes JSONL rows with the original fields plus ``trace`` (the teacher's completion) and ``correct``; use
    ``--response_field trace`` downstream. Rows are sorted shortest trace first. Every option of a group can also
    be given flat (``--task math`` or ``--scoring.task math``).

    Args:
        teacher: teacher model id or folder.
        data: the task's items, as for `toe eval` (GSM8K: question/answer; MATH: problem/solution/answer).
        out: the JSONL file to write (a file, not a folder), rows sorted shortest trace first.
        scoring: the task (gsm8k or math: which fields hold question and solution, and how answers are graded), the
            rows (``skip``), few-shot examples (without ``few_shot_data``, none are prepended) and the generation
            budget ``max_new_tokens``; decoding is greedy and nothing but accuracy is scored, so the CE, sampling
            and bad-row options are refused.
        runtime: dtype and device of the teacher, resume (continue an interrupted run with the same arguments:
            each generated batch is kept in ``OUT.partial`` as it finishes and is not generated again), overwrite
            (replace an existing ``out`` file, an interrupted run's ``OUT.partial`` and what another run left in
            ``eval_out``); the training-only fields are refused.
        limit: generate for at most this many rows, from row ``scoring.skip`` on (default: all).
        template: prompt template with {prompt}, or "chat" for the teacher tokenizer's chat template.
        batch_size: prompts per generate call.
        keep_incorrect: also keep the traces whose answer is wrong (``correct`` false).
        eval_out: also write the graded generations as a `toe eval` folder (accuracy only, same prompt, budget and
            stop strings as `toe eval`), so `toe report` pools the teacher's accuracy without generating again.
        from_eval: take the teacher's answers from a `toe eval` folder that generated them on the same rows with the
            same template and budget (its ``teacher.jsonl``) instead of running the teacher again.
    """
    refuse_unused("toe traces", scoring, ("task", "skip", "few_shot", "few_shot_data", "max_new_tokens"), {
        **{name: "the teacher answers greedily" for name in SAMPLING},
        "": "traces are graded answers, nothing else is scored"})
    refuse_unused("toe traces", runtime, ("dtype", "device", "resume", "overwrite", "teacher_device_map"),
                  TRAINING_ONLY)
    at_least("batch_size", batch_size, 1)
    optional_at_least("limit", limit, 1, " (items)")
    task, skip, few_shot, few_shot_data = scoring.task, scoring.skip, scoring.few_shot, scoring.few_shot_data
    max_new_tokens, dtype, resume, overwrite = scoring.max_new_tokens, runtime.dtype, runtime.resume, runtime.overwrite
    if os.path.isdir(out):
        raise ToEError(f"--out {out} is a folder: `toe traces` writes one JSONL file, pass its path")
    check_file_out(out)  # its folders are made as the first batch is kept
    if os.path.exists(out) and _same_file(out, data):
        raise ToEError(f"--out {out} is the --data file: write the traces to a new file")
    if os.path.exists(out) and not overwrite:
        done = "the run finished, nothing to resume: " if resume else ""
        raise ToEError(f"{out} exists: {done}pass --overwrite true to replace it, or a new --out")
    partial = out + ".partial"
    if os.path.exists(partial) and not resume:
        if not overwrite:
            raise ToEError(f"{partial} holds the batches of an interrupted `toe traces` run: pass --resume true to "
                           "continue it (same arguments), or --overwrite true to start over")
        os.remove(partial)
    if eval_out:
        claim_out(eval_out, "eval", overwrite=overwrite, inputs={"from_eval": from_eval, "data": data, "teacher": teacher})
    qf, rf = TASK_FIELDS[task]
    spec = DataSpec(qf, rf, template)
    rows = read_jsonl(data, spec)[skip:]
    rows = gradable_rows(task, rows[:limit] if limit is not None else rows, rf, data)  # traces are kept if correct
    shots = read_jsonl(few_shot_data, spec, limit=few_shot) if few_shot and few_shot_data else []
    tok = load_tokenizer(teacher)
    spec = spec.for_tokenizer(tok)
    items = build_items(task, rows, spec, shots, spec)
    if from_eval:
        scored = teacher_answers(from_eval, items, max_new_tokens)
    else:
        model = load_causal_lm(teacher, dtype=dtype, device=pick_device(runtime.device),
                               device_map=runtime.teacher_map())
        log = GenerationLog(partial, {"teacher": folder_fingerprint(teacher), "task": task, "data": data,
                                      "template": spec.template, "few_shot": few_shot, "max_new_tokens": max_new_tokens,
                                      "batch_size": batch_size, "dtype": dtype,
                                      "device": str(input_device(model))}, tag="teacher")
        scored = score_system("teacher", model, tok, items, task, True, False, max_new_tokens, batch_size, 4096,
                              STOP, log=log)
    kept = [{**r, "trace": s["completion"].strip(), "correct": s["correct"], "truncated": s["truncated"]}
            for r, s in zip(rows, scored)
            if (s["correct"] or keep_incorrect) and s["completion"].strip()]
    kept.sort(key=lambda r: len(r["trace"]))
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in kept))
    if eval_out:
        os.makedirs(eval_out, exist_ok=True)
        write_rows(eval_out, "teacher", scored)
        write_metrics(eval_out, teacher_accuracy_args(task, data, teacher, limit, skip, few_shot, spec.template,
                                                       max_new_tokens), {"teacher": scored})
    if not from_eval:
        log.close()
    return {"generated": len(rows), "kept": len(kept), "accuracy": sum(s["correct"] for s in scored) / len(rows),
            "truncated_share": sum(s["truncated"] for s in scored) / len(rows), "out": out, "settings": asdict(spec)}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@releases_out_locks
def eval_from_traces(traces_file: str, teacher: str, data: str, out: str, task: str = "gsm8k",
                     limit: int | None = None, skip: int = 0, template: str = "Question: {prompt}\nAnswer: ",
                     max_new_tokens: int = 256, overwrite: bool = False) -> dict:
    """The teacher's accuracy from an existing traces file, as an eval folder (no teacher run).

    What `toe traces --eval_out` writes at generation time, from a `toe traces --keep_incorrect true` file. Each of
    the data's rows [skip, skip + limit) is matched to its trace by the question, re-graded, and written in the
    data's order, so `toe report` pools the teacher's accuracy with `toe eval` folders on the same rows.

    Args:
        traces_file: a `toe traces --keep_incorrect true` file covering the rows.
        teacher: the teacher's id or folder (its tokenizer counts the traces' tokens).
        data: the task's items the traces were generated for.
        out: the eval folder to write (metrics.json, teacher.jsonl).
        task: "gsm8k" or "math": fields and grading.
        limit: rows of ``data`` scored, from row ``skip`` on (default: all).
        skip: rows of ``data`` left out first.
        template: the prompt template the traces were generated with (recorded).
        max_new_tokens: the budget the traces were generated with (recorded; older files without the ``truncated``
            flag: a trace within one token of it counts as cut off).
        overwrite: replace what another run left in ``out`` (refused otherwise).
    """
    claim_out(out, "eval", overwrite=overwrite, inputs={"traces_file": traces_file, "data": data})
    if not os.path.isfile(traces_file):
        raise ToEError(f"--traces_file {traces_file} does not exist: write it with `toe traces --keep_incorrect true`")
    qf, rf = TASK_FIELDS[task]
    spec = DataSpec(qf, rf, template)
    rows = read_jsonl(data, spec)[skip:]
    rows = gradable_rows(task, rows[:limit] if limit is not None else rows, rf, data)
    by_question = {str(r[qf]): r for r in read_jsonl(traces_file, spec)}
    missing = [i + skip for i, r in enumerate(rows) if str(r[qf]) not in by_question]
    if missing:
        raise ToEError(f"{traces_file} has no trace for data rows {missing[:5]}: write it with `toe traces "
                       "--keep_incorrect true` on the same rows")
    tok = load_tokenizer(teacher)
    spec = spec.for_tokenizer(tok)
    scored = []
    for r in rows:
        item = build_items(task, [r], spec, [], spec)[0]
        trace = by_question[str(r[qf])]
        text, n = trace["trace"], len(tok(trace["trace"])["input_ids"])
        pred, ok = grade(task, text, item.gold)
        # files from before the flag: a (stripped) trace within one token of the budget ran out of it
        truncated = trace.get("truncated", n >= max_new_tokens - 1)
        scored.append({"system": "teacher", "prompt": item.prompt, "gold": item.gold, "completion": text,
                       "extracted": pred, "correct": ok, "tokens": n, "truncated": truncated})
    longest = max((s["tokens"] for s in scored), default=0)
    if longest > max_new_tokens + 1:  # +1: a stripped trace can tokenize one token longer at its edge
        raise ToEError(f"{traces_file} holds traces of up to {longest} tokens but --max_new_tokens is {max_new_tokens}: "
                       "pass the budget they were generated with")
    os.makedirs(out, exist_ok=True)
    write_rows(out, "teacher", scored)
    args = teacher_accuracy_args(task, data, teacher, limit, skip, 0, spec.template, max_new_tokens)
    return write_metrics(out, {**args, "traces": traces_file}, {"teacher": scored})
