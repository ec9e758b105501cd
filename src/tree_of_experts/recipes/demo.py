"""`toe demo`: extract -> train -> eval -> report end to end, on the shipped toy pair or on any pair.

Default world (no network, ≤ 10 min on 2 CPU cores): see :mod:`tree_of_experts.toy`. Sixteen keys hold secret
digits; the teacher was trained with the true values, the base with random ones. Besides the base, ToE and the
teacher, the demo trains the **no-teacher control**: the identical pipeline with the base's own states in place
of the teacher's and no distillation, so the margin of ToE over it is what the teacher contributed.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources

from ..commands.evaluate import evaluate
from ..commands.extract import extract
from ..evaluation.tables import leaf_usage, markdown, plot, pool, table_rows, usage_plot
from ..commands.train import train
from ..errors import ToEError
from ..data import DataSpec, read_jsonl
from ..evaluation.tasks import TASK_FIELDS, gradable_rows
from ..files import atomic_write_json, atomic_write_text
from ..options import (
    ACCELERATE_PLACES,
    TRAINING_ONLY,
    Fit,
    Pipeline,
    Runtime,
    Scoring,
    Tree,
    grouped,
    refuse_unused,
)

log = logging.getLogger(__name__)


def toy_pair_dir() -> str:
    path = str(resources.files("tree_of_experts") / "assets" / "toy")
    if not os.path.isdir(os.path.join(path, "teacher")):
        raise ToEError(f"the toy pair is missing from {path}: reinstall tree-of-experts or run runs/make_toy_world.py")
    return path


def write_toy_data(out: str, n_train: int, n_dev: int) -> tuple[str, str]:
    from ..toy import toy_rows, toy_values

    with open(os.path.join(toy_pair_dir(), "world.json")) as f:
        world = json.load(f)
    values = toy_values(world["values_seed"])
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, n, seed in (("train", n_train, 7), ("dev", n_dev, 8)):
        path = os.path.join(out, f"{name}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in toy_rows(n, seed, values)))
        paths.append(path)
    return paths[0], paths[1]


@grouped
def demo(
    teacher: str | None = None,
    base: str | None = None,
    data: str | None = None,
    dev_data: str | None = None,
    out: str = "toe-demo",
    layers: list[int] | None = None,
    batch_size: int = 16,
    pipeline: Pipeline = Pipeline(),
    tree: Tree = Tree(num_leaves=32, gate_rank=32),
    fit: Fit = Fit(lr=3e-3, bank_lr=3e-3),
    scoring: Scoring = Scoring(max_new_tokens=64),
    runtime: Runtime = Runtime(),
) -> dict:
    """Runs the whole pipeline and returns the gap-closed table.

    Every option of a group can also be given flat (``--num_leaves 16`` or ``--tree.num_leaves 16``).

    Args:
        teacher: teacher model id or folder (default: the shipped toy pair's; give ``base`` with it).
        base: base model id or folder (default: the shipped toy pair's; give ``teacher`` with it).
        data: training JSONL (default: generated toy problems; required with your own pair).
        dev_data: evaluation JSONL (default: generated toy problems; required with your own pair).
        out: output folder (extract/, plugin/, control/, eval/, report.md, report.png).
        layers: base injection layers of both extractions (default: the middle layer).
        batch_size: `toe train` sequences per step.
        pipeline: the generated toy data's size, the training length (Stage B steps) and the no-teacher control.
        tree: the tree and bank of both extractions, as `toe extract` builds them (here N = 32 leaves and gate rank
            32 by default).
        fit: how both plug-ins train, as in `toe train` (here learning rates 3e-3 for the gate and the bank by
            default; ``stage_a_steps`` is the route warm-up).
        scoring: the evaluation's grading (``task``: "gsm8k" grades the last number) and generation budget
            (``max_new_tokens``, 64 here), as in `toe eval`.
        runtime: dtype of every model, overwrite (rerun into an ``out`` that holds an earlier demo, replacing it),
            and for training mixed precision, gradient checkpointing and trackers; ``device`` (training runs where
            accelerate places it) and ``resume`` are refused.
    """
    refuse_unused("toe demo", runtime, ("dtype", "overwrite") + tuple(TRAINING_ONLY),
                  {"device": ACCELERATE_PLACES, "resume": "a demo starts again: pass --overwrite true"})
    task, control, overwrite = scoring.task, pipeline.control, runtime.overwrite
    earlier = [d for d in ("extract", "plugin", "eval", "report.md") if os.path.exists(os.path.join(out, d))]
    if earlier and not overwrite:
        raise ToEError(f"{out} holds an earlier demo ({', '.join(earlier)}): pass --overwrite true to replace it, "
                       "or another --out")
    if (teacher is None) != (base is None):
        raise ToEError("give both --teacher and --base, or neither for the toy pair")
    toy = teacher is None
    if toy:
        import torch

        torch.set_num_threads(1)  # the toy models are tiny: one thread beats two that contend
        pair = toy_pair_dir()
        teacher, base = os.path.join(pair, "teacher"), os.path.join(pair, "base")
        data, dev_data = write_toy_data(os.path.join(out, "data"), pipeline.n_train, pipeline.n_dev)
    elif data is None or dev_data is None:
        raise ToEError("with your own pair, pass --data (training JSONL) and --dev_data (evaluation JSONL)")
    else:  # the evaluation would refuse ungradable items only after both extractions and trainings
        qf, rf = TASK_FIELDS[task]
        gradable_rows(task, read_jsonl(dev_data, DataSpec(qf, rf)), rf, dev_data)
    steps = pipeline.train_steps
    inference = Runtime(dtype=runtime.dtype, overwrite=overwrite)  # what extraction and evaluation read
    common = dict(tree=tree, layers=layers, shard_size=64, heldout_frac=0.1, runtime=inference)
    train_kw = dict(data=data, fit=fit, runtime=runtime, max_steps=steps, batch_size=batch_size, log_every=20,
                    save_every=max(steps, 1))
    log.info("[1/4] extract: teacher states -> projector -> tree + bank")
    extract(teacher=teacher, base=base, data=data, out=os.path.join(out, "extract"), **common)
    log.info("[2/4] train the plug-in (route warm-up, then distillation)")
    train(base=base, experts=os.path.join(out, "extract"), out=os.path.join(out, "plugin"), **train_kw)
    if control:
        log.info("[2b] no-teacher control: same pipeline, the base's own states, no distillation")
        extract(teacher=base, base=base, data=data, out=os.path.join(out, "control-extract"), **common)
        train(base=base, experts=os.path.join(out, "control-extract"), out=os.path.join(out, "control"), no_kd=True,
              **train_kw)
    log.info("[3/4] evaluate base, ToE and teacher on held-out problems")
    evaluate(base=base, plugin=os.path.join(out, "plugin"), teacher=teacher, data=dev_data, scoring=scoring,
             out=os.path.join(out, "eval"), batch_size=32, runtime=inference)
    runs = [os.path.join(out, "eval")]
    if control:
        evaluate(base=base, plugin=os.path.join(out, "control"), data=dev_data, scoring=scoring,
                 out=os.path.join(out, "eval-control"), batch_size=32, runtime=inference)
        runs.append(os.path.join(out, "eval-control"))
    log.info("[4/4] report")
    labels = {runs[0]: "ToE", **({runs[1]: "no-teacher control"} if control else {})}
    rows = table_rows(pool(runs, labels), "ToE")
    table = markdown(rows)
    margin = control_margin(rows) if control else None
    if margin:
        table += ("\nToE minus no-teacher control on the same items (what the teacher contributed), paired bootstrap: "
                  f"CE {margin['ce']['mean_diff']:+.4f} nats [{margin['ce']['ci95'][0]:+.4f}, "
                  f"{margin['ce']['ci95'][1]:+.4f}]; accuracy {100 * margin['accuracy']['mean_diff']:+.1f} pts "
                  f"[{100 * margin['accuracy']['ci95'][0]:+.1f}, {100 * margin['accuracy']['ci95'][1]:+.1f}].\n")
    if margin and toy:
        table += ("One training run: over ten training seeds the teacher's margin on the toy pair is not significant "
                  "(docs/toy.md, runs/toy_seeds.py) — this run checks the pipeline, it does not measure the teacher.\n")
    atomic_write_text(os.path.join(out, "report.md"), table)
    atomic_write_json(os.path.join(out, "report.json"), rows)
    plot(rows, os.path.join(out, "report.png"))
    usage_plot(leaf_usage(runs, labels), os.path.join(out, "usage.png"))
    where = f"\nFiles in {out}/: report.md/.json/.png, usage.png, the plug-in (plugin/) and its extraction (extract/)" \
            + (", the control (control/, control-extract/)" if control else "") + ", the evaluations (eval*/)" \
            + (", the generated toy data (data/)" if toy else "") + "."
    return {"out": out, "rows": rows, "control_margin": margin, "summary": table + where}


def control_margin(rows: list[dict]) -> dict:
    """ToE minus the no-teacher control, per-item CE and correctness (paired bootstrap), from the report rows."""
    ctl = next(r for r in rows if r["system"] == "no-teacher control")
    flip = {}
    for key in ("ce", "accuracy"):
        d = ctl[f"{key}_vs_reference"]  # control - ToE
        flip[key] = {**d, "mean_diff": -d["mean_diff"], "ci95": [-d["ci95"][1], -d["ci95"][0]],
                     "p_positive": 1 - d["p_positive"]}
    return flip
