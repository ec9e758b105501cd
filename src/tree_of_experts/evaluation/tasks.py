"""Task definitions: which fields hold a task's question and solution, the CE targets, the reference answer, the
stop strings, and the items an evaluation scores. `toe eval`, `toe traces` and `toe oracle` share them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ToEError
from ..data import DataSpec, read_jsonl, scan_rows
from ..grading import gsm8k_gold, last_boxed
from ..options import Scoring

# code: CE-only text (held-out source files: what a plug-in or adapter costs outside its domain)
TASK_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "code": ("prompt", "text")}


@dataclass
class Item:
    prompt: str  # the generation prompt (few-shot prefix included)
    ce_prompt: str  # the prompt the CE target is scored after (no few-shot prefix)
    ce_target: str  # the response whose tokens are scored
    gold: str  # reference answer


GOLD_FORMAT = {"gsm8k": "GSM8K solutions end in '#### <number>'",
               "math": "MATH rows need an 'answer' field or a \\boxed{} answer in the solution", "code": ""}


def gold_answer(task: str, record: dict, response_field: str) -> str:
    if task == "code":
        return ""
    if task == "gsm8k":
        return gsm8k_gold(str(record[response_field])) or ""
    return str(record.get("answer") or last_boxed(str(record[response_field])) or "")


def gradable_rows(task: str, rows: list[dict], response_field: str, where: str, skip_bad: bool = False) -> list[dict]:
    """The rows that carry a gold answer to grade (one without would be graded wrong whatever the system says):
    refuses the first that does not, naming the format, unless ``skip_bad`` (then they are left out); refuses an
    empty result."""
    golds = [gold_answer(task, r, response_field) for r in rows]
    ungraded = [i for i, gold in enumerate(golds) if not gold]
    if ungraded and not skip_bad:
        raise ToEError(f"{where}: {len(ungraded)} of {len(rows)} items have no gold answer to grade (the first is "
                       f"item {ungraded[0] + 1}; {GOLD_FORMAT[task]}): fix them, pass --skip_bad_rows to leave them "
                       "out (`toe eval`), or --accuracy false")
    kept = [r for r, gold in zip(rows, golds) if gold]
    if not kept:
        raise ToEError(f"{where}: no item has a gold answer to grade ({GOLD_FORMAT[task]})")
    return kept


CE_TARGETS = ("gold_clean", "gold", "trace")
STOP = ["\n\nQuestion:", "Question:"]  # generation ends where the model starts a new problem


def ce_target_spec(task: str, template: str, ce_target: str) -> DataSpec:
    """The DataSpec whose response is the CE target: the gold solution without <<...>> notes ("gold_clean"), as
    written ("gold"), or the teacher's completion in the ``trace`` field written by `toe traces` ("trace")."""
    if ce_target not in CE_TARGETS:
        raise ToEError(f"ce_target={ce_target!r}: use gold_clean, gold or trace")
    qf, rf = TASK_FIELDS[task]
    return DataSpec(qf, "trace" if ce_target == "trace" else rf, template, strip_calc=ce_target == "gold_clean")


def check_ce_rows(rows: list[dict], ce_target: str, data: str) -> None:
    """Raises the one-line fix when the trace target is asked of rows that `toe traces` did not write."""
    if ce_target == "trace" and any("trace" not in r for r in rows):
        raise ToEError(f"--ce_target trace needs rows with a 'trace' field: make {data} with `toe traces` first")


def build_items(task: str, rows: list[dict], spec: DataSpec, shots: list[dict], ce_spec: DataSpec) -> list[Item]:
    prefix = "".join(spec.prompt(s) + spec.response(s) + "\n\n" for s in shots)
    return [Item(prefix + spec.prompt(r), ce_spec.prompt(r), ce_spec.response(r),
                 gold_answer(task, r, spec.response_field)) for r in rows]


def eval_rows(data: str, scoring: Scoring, template: str, limit: int | None):
    """What `toe eval` scores in ``data``: the rows (from row ``skip`` on, at most ``limit``; with accuracy only those
    with a gold answer, checked to hold a CE target with ``ce``), the rows left out (``skip_bad_rows``), the prompt
    spec and the CE target's (not yet in a tokenizer's format) and the few-shot examples."""
    task, skip, ce_target, skip_bad_rows = scoring.task, scoring.skip, scoring.ce_target, scoring.skip_bad_rows
    qf, rf = TASK_FIELDS[task]
    spec = DataSpec(qf, rf, template)
    ce_spec = ce_target_spec(task, template, ce_target)
    rows, bad_rows = scan_rows(data, spec, skip_bad=skip_bad_rows)
    rows = rows[skip:]
    rows = rows[:limit] if limit is not None else rows
    if scoring.accuracy:
        graded = gradable_rows(task, rows, rf, f"{data} (after --skip {skip})" if skip else data, skip_bad_rows)
        bad_rows += ["no gold answer"] * (len(rows) - len(graded))  # counted as skipped_rows
        rows = graded
    if not rows:
        raise ToEError(f"{data}: no items left to evaluate (--skip {skip}, --limit {limit})")
    if scoring.ce:
        check_ce_rows(rows, ce_target, data)
    shots = []
    if scoring.few_shot:
        if not scoring.few_shot_data:
            raise ToEError("--few_shot needs --few_shot_data (a JSONL of solved examples, e.g. the train file)")
        shots = read_jsonl(scoring.few_shot_data, spec, limit=scoring.few_shot)
    return rows, bad_rows, spec, ce_spec, shots
