"""The toy teacher's margin over several training seeds: the demo's ToE-B and its no-teacher control, each trained
with seeds 0..S-1 (same extraction, same data, same budget), scored on the demo's 128 held-out problems. Another
pair of toy systems compares the same way: `toe-topk` (ToE-B trained with the top-k routing it runs with, instead
of dense), `toe-lr1e-2` (gate and bank at 1e-2 instead of the demo's 3e-3), `lora` (rank-8 LoRA with ToE's
objective: CE + top-k KL to the teacher's cached log-probs), `lora-matched` (the same with the rank that matches
the plug-in's parameter count; `lora-matched-lr3e-3` at ToE's learning rate instead of LoRA's default 2e-4),
`toe-on` and `lora-on` (the same two trained on-policy: the student samples, the teacher scores, generalized JSD
β 0.5), and `toe-mix` and `lora-mix` (half the steps on-policy, half off-policy).

One seed on one machine cannot carry the toy margin (docs/toy.md: float order alone moved it from +2 to +19 points
between machines). Here every seed gives a paired A-minus-B difference on the same items, and two summaries pool
them: the mean over seeds with a t interval over the seeds (how much the training run moves it), and the
seed-averaged per-item difference with a paired bootstrap over items (how much the items move it); a third
interval resamples seeds, then items within them (both at once).

Usage: python runs/toy_seeds.py [WORK_DIR] [SEEDS] [A:B]   (default 5 seeds and toe:control; ~1.5 min per seed and
system off-policy on one CPU core, ~3 min on-policy; results in results/toy_seeds/, another pair in
results/toy_seeds/A-vs-B/). Runs are shared between pairs through WORK_DIR: run pairs one after another, not at once.
LoRA systems train with `toe baseline`'s LoRA defaults (learning rate 2e-4, no route warm-up) unless they say
otherwise; ToE systems with the demo's (3e-3, 100 warm-up steps). seeds.json records each run's own settings.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from toy_ablations import EXTRACT
from toy_ablations import TRAIN as ABLATION_TRAIN

from tree_of_experts.commands.evaluate import evaluate
from tree_of_experts.commands.extract import extract
from tree_of_experts.commands.hub import inspect
from tree_of_experts.evaluation.tables import pool
from tree_of_experts.commands.train import train
from tree_of_experts.files import atomic_write_json, atomic_write_text
from tree_of_experts.recipes.baseline import baseline
from tree_of_experts.recipes.demo import toy_pair_dir, write_toy_data
from tree_of_experts.stats import paired_bootstrap

HERE = os.path.dirname(os.path.abspath(__file__))
# the demo's settings, as the ablations train them (the runs behind results/toy_seeds logged every 100 steps)
TRAIN = {**ABLATION_TRAIN, "log_every": 100}
ON_POLICY = dict(objective="on_policy", sample_max_new_tokens=64)  # the toy's answers fit in 64 tokens
SYSTEMS = {"toe": dict(experts="toe"), "toe-topk": dict(experts="toe", train_selection="topk"),
           "toe-lr1e-2": dict(experts="toe", lr=1e-2, bank_lr=1e-2),  # gate and bank at 1e-2 instead of 3e-3
           "control": dict(experts="control", no_kd=True),  # the control: the base's own states, no distillation
           "lora": dict(experts="toe", kind="lora", lora_rank=8, kd_weight=1.0),
           # rank from the plug-in's parameter count
           "lora-matched": dict(experts="toe", kind="lora", lora_rank=None, kd_weight=1.0),
           "lora-matched-lr3e-3": dict(experts="toe", kind="lora", lora_rank=None, kd_weight=1.0, lr=3e-3),
           "toe-on": dict(experts="toe", **ON_POLICY),
           "lora-on": dict(experts="toe", kind="lora", lora_rank=8, **ON_POLICY),
           # half the steps on-policy, half off-policy on the training text (GKD's λ = 0.5)
           "toe-mix": dict(experts="toe", on_policy_ratio=0.5, **ON_POLICY),
           "lora-mix": dict(experts="toe", kind="lora", lora_rank=8, kd_weight=1.0, on_policy_ratio=0.5, **ON_POLICY)}
LABELS = {"toe": "ToE-B", "toe-topk": "ToE-B trained top-k", "toe-lr1e-2": "ToE-B at lr 1e-2",
          "control": "the no-teacher control", "lora": "LoRA r8",
          "lora-matched": "LoRA with the plug-in's parameter count",
          "lora-matched-lr3e-3": "LoRA with the plug-in's parameter count at lr 3e-3",
          "toe-on": "ToE-B on-policy", "lora-on": "LoRA r8 on-policy", "toe-mix": "ToE-B half on-policy",
          "lora-mix": "LoRA r8 half on-policy"}
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09}  # Student t, 0.975, by df


def settings(run: str, lora: bool) -> dict:
    """What a finished run was trained with (its args and sizes, as it recorded them)."""
    with open(os.path.join(run, "baseline_args.json" if lora else "train_args.json")) as f:
        args = json.load(f)
    with open(os.path.join(run, "baseline_summary.json" if lora else "train_summary.json")) as f:
        summary = json.load(f)
    keys = ("seed", "max_steps", "batch_size", "lr", "bank_lr", "stage_a_steps", "objective", "on_policy_ratio",
            "lora_rank", "kd_weight", "no_kd", "train_selection")
    out = {k: args[k] for k in keys if k in args}
    if lora:
        out.update(rank=summary.get("rank"), trainable_params=summary.get("trainable_params"),
                   plugin_params=summary.get("plugin_params"))
        out["stage_a_steps"] = None  # LoRA has no route warm-up
    return out


def check_reuse(run: str, lora: bool, wanted: dict) -> None:
    """A finished run in WORK_DIR is reused only if it was trained with this script's settings for it."""
    got = settings(run, lora)
    differ = [f"{k}={got.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if k in got and got[k] != v]
    if differ:
        sys.exit(f"{run} was trained with {', '.join(differ)}: delete it or use another WORK_DIR")


def two_way_interval(per_item: list[list[float]], iters: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of the mean difference resampling seeds, then items within them (both sources of variance)."""
    d = torch.tensor(per_item, dtype=torch.float64)  # (seeds, items)
    g = torch.Generator().manual_seed(seed)
    s_idx = torch.randint(d.shape[0], (iters, d.shape[0]), generator=g)
    i_idx = torch.randint(d.shape[1], (iters, d.shape[0], d.shape[1]), generator=g)
    means = d[s_idx.unsqueeze(-1), i_idx].mean(dim=(1, 2))
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def seed_interval(values: list[float]) -> list[float | None]:
    """95 % t interval of the mean over seeds."""
    n = len(values)
    if n < 2:
        return [None, None]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975.get(n - 1, 2.05) * sd / math.sqrt(n)  # df >= 20: 2.09 .. 1.96
    return [mean - half, mean + half]


def main(work: str, seeds: int, pair: tuple[str, str] = ("toe", "control")) -> None:
    torch.set_num_threads(1)
    models = toy_pair_dir()
    teacher, base = os.path.join(models, "teacher"), os.path.join(models, "base")
    data, dev = write_toy_data(os.path.join(work, "data"), 384, 128)
    experts = {"toe": os.path.join(work, "extract"), "control": os.path.join(work, "control-extract")}
    for name, source in (("toe", teacher), ("control", base)):  # the control: the base's own states
        if not os.path.isfile(os.path.join(experts[name], "summary.json")):
            extract(teacher=source, base=base, data=data, out=experts[name], layers=None, **EXTRACT)
    a, b = pair
    res = os.path.join(os.path.dirname(HERE), "results", "toy_seeds")
    if pair != ("toe", "control"):
        res = os.path.join(res, f"{a}-vs-{b}")
    if os.path.isfile(os.path.join(res, "seeds.json")):
        with open(os.path.join(res, "seeds.json")) as f:
            done = len(json.load(f)["seeds"])
        if done > seeds:
            sys.exit(f"{res} holds a {done}-seed report: ask for at least {done} seeds (or delete it)")
    per_seed, diffs = [], {"ce": [], "accuracy": []}
    for seed in range(seeds):
        evals, cos, used = {}, {}, {}
        for name in pair:
            run, ev = os.path.join(work, f"{name}-seed{seed}"), os.path.join(work, f"eval-{name}-seed{seed}")
            kw = {**SYSTEMS[name], "experts": experts[SYSTEMS[name]["experts"]]}
            lora = kw.pop("kind", None) == "lora"
            run_kw = {**({k: TRAIN[k] for k in ("max_steps", "batch_size", "save_every")} if lora else TRAIN), **kw}
            finished = os.path.isfile(os.path.join(run, "baseline_summary.json" if lora else "train_summary.json"))
            if finished:
                check_reuse(run, lora, {"seed": seed, **{k: v for k, v in run_kw.items() if k != "experts"}})
            elif lora:  # an unfinished run (no checkpoint at this budget) starts over
                baseline(kind="lora", base=base, data=data, out=run, seed=seed, gradient_checkpointing=False,
                         overwrite=True, **run_kw)
            else:
                train(base=base, data=data, out=run, seed=seed, overwrite=True, **run_kw)
            if not os.path.isfile(os.path.join(ev, "metrics.json")) or not finished:
                evaluate(base=base, data=dev, out=ev, max_new_tokens=64, batch_size=32, with_base=False,
                         overwrite=True, **({"lora": run} if lora else {"plugin": run}))
            evals[ev] = name
            used[name] = settings(run, lora)
            # a plug-in's trained bank: median leaf cosine to the leaves' mean (LoRA has none)
            cos[name] = None if lora else next(iter(inspect(run)["banks"].values()))["bank"]["cos_to_common_median"]
        (rows,) = pool(list(evals), labels=evals).values()  # per-item rows; refuses systems scored on other items
        ce = [-r["ce"] for r in rows[a]], [-r["ce"] for r in rows[b]]  # higher is better for both keys
        acc = [float(r["correct"]) for r in rows[a]], [float(r["correct"]) for r in rows[b]]
        row = {"seed": seed, f"{a}_accuracy": sum(acc[0]) / len(acc[0]), f"{b}_accuracy": sum(acc[1]) / len(acc[1]),
               f"{a}_ce": -sum(ce[0]) / len(ce[0]), f"{b}_ce": -sum(ce[1]) / len(ce[1]), "runs": used,
               "ce_margin": paired_bootstrap(*ce), "accuracy_margin": paired_bootstrap(*acc),
               "leaf_cos_to_mean": cos}
        per_seed.append(row)
        diffs["ce"].append([x - y for x, y in zip(*ce)])
        diffs["accuracy"].append([x - y for x, y in zip(*acc)])
    pooled = {}
    for key, per_item in diffs.items():
        means = [sum(d) / len(d) for d in per_item]
        averaged = [sum(col) / len(col) for col in zip(*per_item)]  # each item's difference, averaged over seeds
        pooled[key] = {"mean": sum(means) / len(means), "per_seed": means, "ci95_over_seeds": seed_interval(means),
                       "ci95_over_items": paired_bootstrap(averaged, [0.0] * len(averaged))["ci95"],
                       "ci95_seeds_and_items": two_way_interval(per_item)}
    os.makedirs(res, exist_ok=True)
    atomic_write_json(os.path.join(res, "seeds.json"), {"pair": [a, b], "systems": {n: SYSTEMS[n] for n in pair},
                                                        "seeds": per_seed, "pooled": pooled, "plugin_train": TRAIN,
                                                        "extract": EXTRACT, "items": len(diffs["ce"][0])})

    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    def ci(lo_hi: list, scale: float, fmt: str) -> str:
        return "–" if lo_hi[0] is None else f"[{scale * lo_hi[0]:{fmt}}, {scale * lo_hi[1]:{fmt}}]"

    what = " (the teacher's margin)" if pair == ("toe", "control") else ""
    lines = [f"{LABELS[a]} minus {LABELS[b]}{what}, toy pair, 128 held-out problems; CE margin in nats (positive: "
             f"{LABELS[a]}'s CE is lower), accuracy in points.", "",
             f"| seed | {a} accuracy | {b} accuracy | CE margin [95 % CI] | accuracy margin [95 % CI] | bank: leaf cos "
             f"to mean, {a} / {b} |", "|---|---|---|---|---|---|"]
    for r in per_seed:
        c, m = r["ce_margin"], r["accuracy_margin"]
        lines.append(f"| {r['seed']} | {100 * r[f'{a}_accuracy']:.0f} % | {100 * r[f'{b}_accuracy']:.0f} % | "
                     f"{c['mean_diff']:+.4f} {ci(c['ci95'], 1, '+.4f')} | "
                     f"{100 * m['mean_diff']:+.1f} {ci(m['ci95'], 100, '+.1f')} | "
                     f"{num(r['leaf_cos_to_mean'][a])} / {num(r['leaf_cos_to_mean'][b])} |")
    c, m = pooled["ce"], pooled["accuracy"]
    lines += [f"| mean of {seeds} seeds, t interval over seeds | | | {c['mean']:+.4f} "
              f"{ci(c['ci95_over_seeds'], 1, '+.4f')} | "
              f"{100 * m['mean']:+.1f} {ci(m['ci95_over_seeds'], 100, '+.1f')} | |",
              f"| seed-averaged, bootstrap over items | | | {c['mean']:+.4f} {ci(c['ci95_over_items'], 1, '+.4f')} | "
              f"{100 * m['mean']:+.1f} {ci(m['ci95_over_items'], 100, '+.1f')} | |",
              f"| bootstrap over seeds, then items | | | {c['mean']:+.4f} {ci(c['ci95_seeds_and_items'], 1, '+.4f')} | "
              f"{100 * m['mean']:+.1f} {ci(m['ci95_seeds_and_items'], 100, '+.1f')} | |"]
    atomic_write_text(os.path.join(res, "report.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    pair = tuple(sys.argv[3].split(":")) if len(sys.argv) > 3 else ("toe", "control")
    if len(pair) != 2 or not set(pair) <= set(SYSTEMS):
        sys.exit(f"A:B with A and B among {', '.join(SYSTEMS)}, e.g. toe-topk:toe")
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/toe-toy-seeds", int(sys.argv[2]) if len(sys.argv) > 2 else 5,
         pair)
