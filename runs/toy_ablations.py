"""Ablations on the shipped toy pair: N, K, tree shape, flat router, route warm-up, KD, injection layer, routing
in training (dense, the default, vs the top-k it runs with), and the no-teacher control, each against the demo's
default ToE-B on the same 128 held-out problems (one pooled table), with each trained bank's geometry before and after
training (banks.md: does the bank stay one vector?).

Usage: python runs/toy_ablations.py [WORK_DIR]   (~5 min on one CPU core; results in results/toy_ablations/)
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from tree_of_experts.commands.evaluate import evaluate
from tree_of_experts.commands.extract import extract, rebuild
from tree_of_experts.commands.hub import inspect
from tree_of_experts.commands.report import report
from tree_of_experts.commands.train import train
from tree_of_experts.recipes.baseline import baseline
from tree_of_experts.recipes.demo import toy_pair_dir, write_toy_data

HERE = os.path.dirname(os.path.abspath(__file__))
# The demo's settings: N = 32, layer 1, 384 training problems, 1000 steps of 16, lr 3e-3 for gate and bank.
EXTRACT = dict(num_leaves=32, shard_size=64, heldout_frac=0.1, gate_rank=32)
TRAIN = dict(max_steps=1000, stage_a_steps=100, batch_size=16, lr=3e-3, bank_lr=3e-3, log_every=50, save_every=1000)


def main(work: str) -> None:
    torch.set_num_threads(1)
    pair = toy_pair_dir()
    teacher, base = os.path.join(pair, "teacher"), os.path.join(pair, "base")
    data, dev = write_toy_data(os.path.join(work, "data"), 384, 128)
    res = os.path.join(os.path.dirname(HERE), "results", "toy_ablations")
    ev = os.path.join(work, "eval")

    def ex(name: str, **kw) -> str:
        out = os.path.join(work, name)
        if not os.path.isfile(os.path.join(out, "summary.json")):
            extract(teacher=teacher, base=base, data=data, out=out, **{**EXTRACT, **kw})
        return out

    def rb(name: str, **kw) -> str:
        out = os.path.join(work, name)
        if not os.path.isfile(os.path.join(out, "summary.json")):
            rebuild(source=os.path.join(work, "extract-l1"), out=out,
                    **{"num_leaves": EXTRACT["num_leaves"], "gate_rank": EXTRACT["gate_rank"], **kw})
        return out

    def tr(name: str, experts: str, **kw) -> None:
        out = os.path.join(work, name)
        if not os.path.isfile(os.path.join(out, "train_summary.json")):
            train(base=base, experts=experts, data=data, out=out, **{**TRAIN, **kw})
        score(name, plugin=out)

    def score(name: str, **kw) -> None:
        if not os.path.isfile(os.path.join(ev, name, "metrics.json")):
            evaluate(base=base, data=dev, out=os.path.join(ev, name), max_new_tokens=64, batch_size=32,
                     with_base=False, **kw)

    evaluate(base=base, teacher=teacher, data=dev, out=os.path.join(ev, "anchors"), max_new_tokens=64, batch_size=32)
    main_x = ex("extract-l1", layers=[1])
    tr("ToE-B (N=32, K=4, layer 1)", main_x)
    tr("N=8", rb("extract-n8", num_leaves=8))
    tr("N=128", rb("extract-n128", num_leaves=128))
    tr("K=1", rb("extract-k1", top_k=1))
    tr("K=8", rb("extract-k8", top_k=8))
    tr("ToE-D (deep, top-p)", rb("extract-deep", shape="deep", selection="topp"))
    tr("no route warm-up", main_x, skip_stage_a=True)
    tr("no KD", main_x, no_kd=True)
    tr("trained top-k", main_x, train_selection="topk")
    tr("layer 0", ex("extract-l0", layers=[0]))
    tr("layer 2", ex("extract-l2", layers=[2]))
    flat = os.path.join(work, "flat")
    if not os.path.isfile(os.path.join(flat, "baseline_summary.json")):
        baseline(kind="flat", base=base, experts=main_x, out=flat, **{k: TRAIN[k] for k in (
            "max_steps", "stage_a_steps", "batch_size", "lr", "bank_lr")}, data=data)
    score("flat router (MoE)", plugin=flat)
    control_x = os.path.join(work, "control-extract")
    if not os.path.isfile(os.path.join(control_x, "summary.json")):
        extract(teacher=base, base=base, data=data, out=control_x, layers=[1], **EXTRACT)
    tr("no-teacher control", control_x, no_kd=True)
    names = ["anchors", "ToE-B (N=32, K=4, layer 1)", "N=8", "N=128", "K=1", "K=8", "ToE-D (deep, top-p)",
             "no route warm-up", "no KD", "trained top-k", "layer 0", "layer 2", "flat router (MoE)",
             "no-teacher control"]
    tmp = res + ".tmp"  # the committed results are replaced only by a finished report
    shutil.rmtree(tmp, ignore_errors=True)
    report([os.path.join(ev, n) for n in names], out=tmp, reference="ToE-B (N=32, K=4, layer 1)")
    banks(work, names[1:], tmp)
    shutil.rmtree(res, ignore_errors=True)
    os.replace(tmp, res)
    print(open(os.path.join(res, "report.md")).read())


def banks(work: str, names: list[str], out: str) -> None:
    """Each trained plug-in's bank before and after training (`toe inspect`): the median leaf cosine to the leaves'
    mean (near 1: one shared vector, routing cannot matter) and how far training moved the leaves."""
    rows = {}
    for name in names:
        folder = os.path.join(work, "flat" if name == "flat router (MoE)" else name)
        (layer, geo), = inspect(folder)["banks"].items()
        before = geo.get("bank_before_training", {})  # a baseline folder does not name the bank it started from
        rows[name] = {"layer": layer, "cos_to_common_before": before.get("cos_to_common_median"),
                      "cos_to_common_after": geo["bank"]["cos_to_common_median"],
                      "common_share_before": before.get("common_share"),
                      "common_share_after": geo["bank"]["common_share"], "leaf_movement": geo.get("leaf_movement")}
    with open(os.path.join(out, "banks.json"), "w") as f:
        json.dump(rows, f, indent=2)

    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    lines = ["| system | median leaf cos to the mean, before → after | common share, before → after | "
             "leaf movement |", "|---|---|---|---|"]
    lines += [f"| {n} | {num(r['cos_to_common_before'])} → {num(r['cos_to_common_after'])} | "
              f"{num(r['common_share_before'])} → {num(r['common_share_after'])} | {num(r['leaf_movement'])} |"
              for n, r in rows.items()]
    with open(os.path.join(out, "banks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/toe-toy-ablations")
