"""`toe study`: the plan, the run, kill and resume, two processes, the statistics, and bad configs."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml

from tree_of_experts.cli import main
from tree_of_experts.config import ToEError
from tree_of_experts.evaluation.study_stats import Draws, coverage, interval, level_from, reading
from tree_of_experts.recipes.study import Study, study
from tree_of_experts.recipes.study_config import load_study

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def answers(tmp_path) -> str:
    """The CE target: "the teacher's answers" to the reported rows 8-19 (the fixture's own: the tiny random teacher
    would ramble to the token cap)."""
    rows = [json.loads(x) for x in open(FIXTURE)][8:20]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({**r, "trace": r["answer"].split("####")[0].strip()}) + "\n" for r in rows))
    return str(path)


def config(pair, tmp_path, **changes) -> str:
    """A small study of the tiny pair: ToE at layer 1 (2 seeds), its control, LoRA r2 (KD from the extraction)."""
    cfg = {
        "name": "tiny",
        "pair": {"base": str(pair / "base"), "teacher": str(pair / "teacher")},
        "data": {"train": FIXTURE, "items": FIXTURE, "tuning": [0, 8], "reported": [8, 20], "max_length": 64,
                 "answers": answers(tmp_path)},
        "budget": {"steps": 4, "batch_size": 4},
        "rows": [{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2},
                 {"name": "ctl", "kind": "control", "layers": [1]},
                 {"name": "lora", "kind": "lora", "rank": 2, "layers": [1]}],
        "compare": ["toe - ctl", "toe - lora"],
        "scoring": {"targets": ["ce"], "max_new_tokens": 8, "batch_size": 4, "answer_batch_size": 6},
        "extract": {"num_leaves": 4, "heldout_frac": 0.25, "batch_size": 4, "shard_size": 8, "gate_rank": 4},
        "train": {"stage_a_steps": 2, "save_every": 1, "log_every": 1},
        "lora": {"save_every": 1, "kd_weight": 1.0},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp_path / f"study-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def table(out) -> dict:
    t = json.load(open(os.path.join(out, "table.json")))
    return {"rows": t["rows"], "comparisons": t["comparisons"], "verdict": t["verdict"]}


def test_a_study_runs_end_to_end_and_its_table_carries_seeds_and_a_computed_verdict(pair, tmp_path):
    cfg = config(pair, tmp_path, scoring__targets=["ce", "accuracy"])
    result = study(cfg, str(tmp_path / "s"))
    t = table(tmp_path / "s")
    rows = {r["name"]: r for r in t["rows"]}
    assert set(rows) == {"base", "teacher", "toe", "ctl", "lora"}
    toe = rows["toe"]["ce"]
    assert toe["seeds"] == 2 and len(toe["per_seed"]) == 2 and len(toe["gap_closed"]["per_seed"]) == 2
    assert toe["gap_closed"]["ci95"][0] <= toe["gap_closed"]["point"] <= toe["gap_closed"]["ci95"][1]
    assert rows["ctl"]["ce"]["seeds"] == 1 and "acc" in rows["toe"]
    assert {(c["a"], c["b"], c["target"]) for c in t["comparisons"]} == {
        ("toe", "ctl", "ce"), ("toe", "lora", "ce"), ("toe", "ctl", "acc"), ("toe", "lora", "acc")}
    for c in t["comparisons"]:  # every reading in the verdict comes from its interval by the fixed rule
        assert c["reading"] == reading(c, c["target"], c["a"], c["b"]) + coverage(c["seeds"], ":" in c["a"] + c["b"])
        lo, hi = c["ci95"]
        f = (lambda v: f"{100 * v:+.1f} pts") if c["target"] == "acc" else (lambda v: f"{v:+.4f}")
        assert f"{c['a']} − {c['b']} {f(c['point'])} [{f(lo)}, {f(hi)}]" in t["verdict"]  # its number, from the file
        # the equivalence margin: 2 % of the base-teacher gap on the comparison's own target
        gap_ = rows["teacher"][c["target"]]["mean"]["point"] - rows["base"][c["target"]]["mean"]["point"]
        assert c["margin"] == (pytest.approx(0.02 * abs(gap_)) if gap_ else None)  # no gap: no margin
    assert all((tmp_path / "s" / f).exists() for f in ("table.md", "study.png", "curves.png"))
    assert (tmp_path / "s" / "train" / "toe-seed1" / "toe_model.safetensors").exists()
    assert "score/ce/lora" in result["ran"]
    again = study(cfg, str(tmp_path / "s"))  # everything is done: nothing runs again, the same table
    assert again["ran"] == [] and table(tmp_path / "s") == t


def test_a_killed_study_resumes_to_the_same_table(pair, tmp_path):
    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2}],
                 compare=[], train={"stage_a_steps": 2, "save_every": 1, "log_every": 1}, budget={"steps": 6,
                                                                                                  "batch_size": 4})
    study(cfg, str(tmp_path / "whole"))
    code = "import sys; from tree_of_experts.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "study", cfg, "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "work" / "train" / "tiny" / "toe-seed1" / "checkpoint"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second seed's training
    proc.wait()
    assert checkpoint.exists(), "the study finished before it could be killed mid-training"
    assert not (tmp_path / "killed" / "ce" / "toe-seed1" / "metrics.json").exists()
    result = study(cfg, str(tmp_path / "killed"))
    assert "train/toe" not in result["ran"] and "train/toe-seed1" in result["ran"]
    assert table(tmp_path / "killed") == table(tmp_path / "whole")


def test_a_step_another_process_holds_is_waited_for(pair, tmp_path, monkeypatch):
    """Another process holds the anchors' scoring: the study runs every other step meanwhile, then waits for it and
    runs it itself once the holder lets go (the holder lets go only once the study waits, after its other steps)."""
    import tree_of_experts.recipes.steps as steps_mod

    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1]}], compare=[])
    out = tmp_path / "s"
    (out / "locks").mkdir(parents=True)
    lock, waiting = out / "locks" / "score__ce__anchors.lock", tmp_path / "waiting"
    class Clock(types.ModuleType):  # the time module, but for the study's own waits, which let the holder go
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(s):
            waiting.touch()
            time.sleep(s)

    monkeypatch.setattr(steps_mod, "time", Clock("time"))
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time; f = open({str(lock)!r}, 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
                               f"while not os.path.exists({str(waiting)!r}): time.sleep(0.1)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    result = study(cfg, str(out), poll_s=0.2)
    holder.wait()
    assert result["waited"] and result["ran"][-1] == "score/ce/anchors"
    with open(lock) as f:  # and it let go of its own locks
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_dry_run_prints_a_plan_with_estimates_and_loads_no_model(pair, tmp_path, monkeypatch, capsys):
    import tree_of_experts.hf.loading as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded in a dry run"))
    assert main(["study", config(pair, tmp_path), "--out", str(tmp_path / "s"), "--dry_run", "true"]) == 0
    text = capsys.readouterr().out
    assert "plan of study tiny" in text and "GFLOP/s" in text and "train/toe-seed1" in text
    assert "extract/extract-l1" in text and "estimates:" in text and ":func:" not in text and "``" not in text
    assert not (tmp_path / "s" / "work").exists()
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))  # a probe beside other jobs says so
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["study", config(pair, tmp_path), "--out", str(tmp_path / "s"), "--dry_run", "true"]) == 0
    assert "the machine was busy: load average 3.0 on 2 CPU(s)" in capsys.readouterr().out
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert main(["study", config(pair, tmp_path), "--out", str(tmp_path / "s"), "--dry_run", "true"]) == 0
    assert "busy" not in capsys.readouterr().out
    # --rows and --targets plan what that call would run: the row's steps and what they need, nothing else
    assert main(["study", config(pair, tmp_path), "--out", str(tmp_path / "s"), "--dry_run", "true",
                 "--rows", "lora", "--targets", "ce"]) == 0
    text = capsys.readouterr().out
    assert "train/lora" in text and "score/ce/lora" in text
    assert "train/toe-seed1" not in text and "train/ctl" not in text and "score/acc" not in text
    # rows named in another order run in that order: the plan lists lora's steps before toe's
    assert main(["study", config(pair, tmp_path), "--out", str(tmp_path / "s"), "--dry_run", "true",
                 "--rows", "lora,toe", "--targets", "ce"]) == 0
    text = capsys.readouterr().out
    assert text.index("train/lora") < text.index("train/toe") < text.index("train/toe-seed1")


@pytest.mark.parametrize("changes, message", [
    (dict(rows=[{"name": "x", "kind": "tree"}]), "rows.x.kind: 'tree': use one of toe, control"),
    (dict(data__tuning=[10, 20]), "overlaps data.reported"),
    (dict(data__train="missing.jsonl"), "data.train: missing.jsonl not found"),
    (dict(data__items="toy:dve"), "data.items toy:dve: use toy:base, toy:teacher, toy:train or toy:dev"),
    (dict(compare=["toe - nope"]), "'nope' is not a row"),
    (dict(compare=["toe-ctl"]), "write `A - B`"),
    (dict(train={"bank_lrr": 1.0}), "train.bank_lrr: not an option of `toe train` (did you mean bank_lr"),
    (dict(lora={"learning_rate": 1e-3}), "lora.learning_rate: not an option of `toe baseline` (did you mean lr?)"),
    (dict(train={"max_steps": 3}), "the study sets max_steps itself"),
    (dict(budget={"steps": 2, "epochs": 1}), "exactly one of steps and epochs"),
    (dict(budget={"steps": "two"}), "budget.steps: 'two': expected int"),
    (dict(train={"gradient_accumulation_steps": 3}), "train.gradient_accumulation_steps 3: give a divisor of"),
    (dict(rows=[{"name": "a", "kind": "toe"}]), "needs layers"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [7]}], compare=[]), "the base has 2 layers"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1]}, {"name": "a", "kind": "lora"}]), "named twice"),
    (dict(data__reported=[8, 200]), "has 24 rows"),
    (dict(colour="blue"), "unknown key 'colour'"),
    (dict(rows=[{"name": "a", "kind": "lora", "extract": {"max_disk": "1MB"}}], compare=[]),
     "rows.a.extract: only a row with layers reads an extraction"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "extract": {"num_leafs": 4}}], compare=[]),
     "rows.a.extract.num_leafs: not an option of `toe extract`"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1]},
                {"name": "o", "kind": "oracle", "layers": [1], "plugin_of": "a", "extract": {"num_leaves": 4}}],
          compare=[]), "rows.o.extract: an oracle reads its plug-in row's extraction"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "rebuild": {"num_leaves": 8}},
                {"name": "b", "kind": "toe", "layers": [1], "extract": {"num_leaves": 8}}], compare=[]),
     "rows.b: its extraction extract-l1-num_leaves8 is also another row's rebuilt bank"),
    (dict(data__train_traces={"items": FIXTURE, "rows": [20, 24]}), "data.train (a JSONL file) or data.train_traces"),
    (dict(data__train=None, data__train_traces={"items": FIXTURE, "rows": [12, 24]}),
     "data.train_traces.rows [12, 24] overlap data.reported [8, 20]"),
    (dict(data__train=None, data__train_traces={"items": FIXTURE, "rows": [20, 30]}), "has 24 rows"),
    (dict(data__train=None, data__train_traces={"items": FIXTURE, "rows": [20, 24]},
          scoring__answer_sets={"more": {"items": FIXTURE, "rows": [22, 24], "task": "gsm8k"}}),
     "overlap scoring.answer_sets.more.rows [22, 24]"),
    (dict(scoring__curve_every=2, scoring__curve_seeds=[2]), "scoring.curve_seeds [2]: give seeds from 0 to 1"),
    (dict(scoring__curve_seeds=[0]), "with scoring.curve_every set"),
    (dict(scoring__curve_every=2, data__tuning_answers="ANSWERS"), "data.tuning_answers "),
    (dict(scoring__curve_every=2, data__tuning_answers="nowhere.jsonl"), "data.tuning_answers: nowhere.jsonl not found"),
    (dict(rows=[{"name": "a", "kind": "lora"}], compare=[]), "rows.a: kd_weight 1.0 reads what an extraction cached"),
    (dict(rows=[], compare=[]), "rows: empty: give the study at least one row"),
    (dict(rows=[{"name": "answers", "kind": "lora", "layers": [1]}], compare=[]), "rows: name 'answers'"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1]},
                {"name": "o", "kind": "oracle", "layers": [1], "plugin_of": "a", "seeds": 2}], compare=[]),
     "rows.o.seeds 2: an oracle row is scored once"),
    (dict(rows=[{"name": "a", "kind": "lora", "layers": [1], "rank": 0}], compare=[]), "rows.a.rank 0: give a whole"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "seeds": 0}], compare=[]), "rows.a.seeds 0: give a whole"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "options": {"lr": "fast"}}], compare=[]),
     "rows.a.options: lr='fast': must be a finite number"),  # a value is checked before any step, as a name is
    (dict(lora={"lr": -1, "kd_weight": 1.0}), "lora (row lora): lr=-1: must be a finite number"),
    (dict(lora={"lr": "1e-3", "kd_weight": 1.0}), "(YAML reads 1e-3 as text: write it with a decimal point"),
    (dict(extract={"num_leaves": 0}), "extract: num_leaves"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "options": {"on_policy_ratio": 0.5}}], compare=[]),
     "rows.a.options: --on_policy_ratio sets on-policy training"),  # checked with the row's objective
    (dict(scoring__batch_size=0), "scoring.batch_size 0: give a whole number >= 1"),
    (dict(scoring__margin=5), "scoring.margin 5.0: give a share of the gap in [0, 1)"),
    (dict(scoring__margins={"cod": 0.01}), "scoring.margins: ['cod'] is not a target of this study"),
    (dict(scoring__margins={"ce": -1}), "scoring.margins {'ce': -1.0}: give margins >= 0"),
    (dict(scoring__margins={"acc": 0.05}), "scoring.margins: ['acc'] is not a target of this study"),
    (dict(rows=[{"name": "a", "kind": "toe", "layers": [1], "options": {"gradient_accumulation_steps": 3}}],
          compare=[]), "rows.a.options.gradient_accumulation_steps 3: give a divisor of budget.batch_size (4)"),
    (dict(data__max_length=0), "data.max_length 0"),
    (dict(data__reported=[5], data__train=None, data__train_traces={"items": FIXTURE, "rows": [20, 24]}),
     "data.reported: [5]: give [start, stop)"),
    (dict(compare=["toe - nobody"], scoring__answer_sets={"math": {"items": FIXTURE, "rows": [20, 24]}}),
     "(rows: toe, ctl, lora;"),
    (dict(rows=[{"name": "a", "kind": "lora", "options": {"kd_weight": 0, "state_loss_weight": 1.0}}], compare=[]),
     "rows.a: state_loss_weight 1.0 reads what an extraction cached"),
])
def test_bad_configs_fail_in_one_line_before_any_model_loads(pair, tmp_path, monkeypatch, capsys, changes, message):
    import tree_of_experts.hf.loading as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    if "colour" in changes:
        path = config(pair, tmp_path)
        raw = yaml.safe_load(open(path))
        raw["colour"] = "blue"
        open(path, "w").write(yaml.safe_dump(raw))
    else:
        if changes.get("data__tuning_answers") == "ANSWERS":  # the teacher's answers to rows 8-19, not 0-7
            changes = {**changes, "data__tuning_answers": answers(tmp_path)}
        path = config(pair, tmp_path, **changes)
    assert main(["study", path, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("toe: error:") and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s" / "work").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["study", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_two_level_bootstrap_counts_seed_variation_and_pairs_seeds():
    torch.manual_seed(0)
    items = torch.randn(1, 200)
    offsets = torch.tensor([[-1.0], [0.0], [1.0]])  # three seeds that differ by a whole unit
    a = items + offsets  # (3, 200)
    b = items + offsets + 0.1  # the same seeds' shifts, 0.1 higher everywhere
    d = Draws(200)
    width = lambda x: float(x.quantile(0.975) - x.quantile(0.025))  # noqa: E731
    seeds_and_items, items_only = d.means(a), Draws(200).means(a.mean(0, keepdim=True))
    assert width(seeds_and_items) > 3 * width(items_only)  # the seeds' spread widens the interval
    diff = d.means(b) - d.means(a)  # paired on seeds and items: the shared variation cancels
    assert torch.allclose(diff, torch.full_like(diff, 0.1))
    # a row's draws do not depend on which rows were drawn before it (rows scored later move nothing)
    fresh = Draws(200)
    fresh.means(torch.randn(2, 200), (0, 1)), fresh.means(torch.randn(1, 200), (0,))
    assert torch.equal(fresh.means(a, (0, 1, 2)), Draws(200).means(a, (0, 1, 2)))
    assert torch.isnan(Draws(0).means(torch.zeros(2, 0))).all()  # no common items: no interval, no crash


def test_the_reading_rule():
    assert reading({"point": -0.2, "ci95": [-0.3, -0.1]}, "ce", "a", "b") == \
        "a is better than b (the interval excludes zero)"
    assert reading({"point": -0.2, "ci95": [-0.3, -0.1]}, "acc", "a", "b").startswith("a is worse")
    # an interval that includes zero: level only within the margin, else not resolved (and without a margin)
    assert "are level" in reading({"point": 0.1, "ci95": [-0.1, 0.3], "margin": 0.3}, "ce", "a", "b")
    assert "not resolved" in reading({"point": 0.1, "ci95": [-0.1, 0.3], "margin": 0.2}, "ce", "a", "b")
    assert "this target has no margin" in reading({"point": 0.1, "ci95": [-0.1, 0.3]}, "ce", "a", "b")
    assert reading({"point": -0.2, "ci95": [-0.3, -0.1], "margin": 0.5}, "ce", "a", "b").endswith(
        "excludes zero, but lies within the margin)")  # a difference, and one too small to matter
    assert level_from({"ci95": [-0.1, 0.3]}) == 0.3 and level_from({"ci95": [0.1, 0.3]}) is None
    assert "undefined" in reading({"point": 0.1, "ci95": [None, None]}, "ce", "a", "b")
    # the direction is the interval's, not the point's (a percentile interval need not hold its point)
    assert reading({"point": 0.01, "ci95": [-0.3, -0.1]}, "ce", "a", "b").startswith("a is better")
    assert coverage([1, 1]) == "; items only: one training seed" and "one side has one" in coverage([1, 2])
    assert interval(torch.full((100,), float("nan")), float("nan"), 50) == {"point": None, "ci95": [None, None]}


@pytest.mark.parametrize("name", ["real_pair_v2", "real_pair_v2_sweep", "real_pair_v3", "seed_scale"])
def test_every_shipped_study_config_reads(name):
    """Each config under studies/ is a valid study (read and checked; nothing resolved or loaded)."""
    cfg = load_study(os.path.join(os.path.dirname(__file__), "..", "studies", f"{name}.yaml"))
    assert cfg.rows and cfg.name == name


def test_the_shipped_toy_study_config_is_valid(tmp_path):
    from tree_of_experts.recipes.study_config import load_study

    cfg = load_study(os.path.join(os.path.dirname(__file__), "..", "studies", "toy.yaml"))
    assert cfg.pair.base == "toy:base" and all(r.seeds == 2 for r in cfg.rows)
    with pytest.raises(ToEError, match="toy:"):
        from tree_of_experts.recipes.study import Study

        Study(cfg, str(tmp_path)).resolve("toy:nope")


def test_step_selection_by_rows_seeds_and_targets_over_every_kind_of_row(pair, tmp_path):
    """What --rows, --seeds and --targets select (read from each step's stage, row seed and target): an oracle row
    pulls in its plug-in row's training and extraction, a ToE-on-LoRA row its adapter seed for seed, a rebuilt bank
    its source extraction; the given rows' order is the priority; other seeds and targets wait."""
    rows = [{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2},
            {"name": "ctl", "kind": "control", "layers": [1]},
            {"name": "lora", "kind": "lora", "rank": 2, "layers": [1], "seeds": 2},
            {"name": "tol", "kind": "toe_on_lora", "layers": [1], "adapter_of": "lora", "seeds": 2},
            {"name": "reb", "kind": "toe", "layers": [1], "rebuild": {"num_leaves": 2, "top_k": 2}},
            {"name": "o", "kind": "oracle", "layers": [1], "plugin_of": "toe"}]
    path = config(pair, tmp_path, rows=rows, compare=["toe - ctl"], scoring__ce_files={"code": FIXTURE},
                  scoring__answer_sets={"more": {"items": FIXTURE, "rows": [20, 24], "task": "gsm8k"}},
                  scoring__curve_every=2, scoring__curve_seeds=[0])
    st = Study(load_study(path), str(tmp_path / "s"))
    deps = {s.id: s.deps for s in st.steps()}
    ends = ["answers", "answers-more", "score/ce/anchors", "score/code/anchors", "score/more/anchors"]
    assert [s.id for s in st.selected_steps(rows=["o"])] == ends + ["extract/extract-l1", "train/toe", "score/ce/o"]
    assert deps["train/tol-seed1"] == ["extract/extract-l1", "train/lora-seed1"]  # seed for seed
    assert deps["train/reb"] == ["extract/extract-l1-num_leaves2-top_k2"] == [
        s for s in deps if s.startswith("extract/") and "extract/extract-l1" in deps[s]]
    picked = [s.id for s in st.selected_steps(rows=["tol", "toe"])]
    assert picked.index("score/ce/tol-seed1") < picked.index("train/toe") and "train/lora-seed1" in picked
    assert "train/ctl" not in picked and "curve/tol" in picked and "curve/toe" in picked
    seed1 = [s.id for s in st.selected_steps(seeds=[1])]
    assert {x.split("/")[-1] for x in seed1 if x.startswith(("train/", "score/", "curve/"))} == \
        {"anchors", "toe-seed1", "lora-seed1", "tol-seed1"}
    more = [s.id for s in st.selected_steps(targets=["more"])]
    assert "answers-more" in more and not any(x.startswith(("score/ce/", "score/code/")) for x in more)
    assert "score/more/reb" in more and "curve/reb" in more  # curves are no target's: they run with their row


def test_rows_and_targets_run_only_what_they_name(pair, tmp_path, capsys):
    cfg = config(pair, tmp_path, scoring__targets=["ce", "accuracy"])
    r = study(cfg, str(tmp_path / "s"), rows=["ctl"], targets=["ce"])
    assert set(r["ran"]) == {"score/ce/anchors", "extract/extract-l1", "train/ctl", "score/ce/ctl"}
    rows = {x["name"]: x for x in table(tmp_path / "s")["rows"]}
    verdict = table(tmp_path / "s")["verdict"]
    assert "toe" not in rows and "Not scored yet: toe, lora" in verdict
    assert "Not compared yet: toe − ctl; toe − lora." in verdict  # written as the table writes comparisons
    assert "The trained row ctl closes" in verdict and "close between" not in verdict  # one row: no range
    assert main(["study", cfg, "--out", str(tmp_path / "s"), "--rows", "nope"]) == 2
    assert main(["study", cfg, "--out", str(tmp_path / "s"), "--targets", "code"]) == 2
    assert "this study scores ce, acc" in capsys.readouterr().err


def test_seeds_plan_and_run_only_the_seeds_named(pair, tmp_path, monkeypatch, capsys):
    """``--seeds 0``: a first pass over every row before any repeat; a later call runs the rest."""
    import tree_of_experts.hf.loading as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded in a dry run"))
    cfg = config(pair, tmp_path)
    assert main(["study", cfg, "--out", str(tmp_path / "s"), "--dry_run", "true", "--seeds", "0"]) == 0
    text = capsys.readouterr().out
    assert "train/toe " in text and "train/ctl " in text and "train/lora " in text and "toe-seed1" not in text
    assert main(["study", cfg, "--out", str(tmp_path / "s"), "--dry_run", "true", "--seeds", "1"]) == 0
    text = capsys.readouterr().out
    assert "train/toe-seed1" in text and "train/toe " not in text and "train/ctl " not in text
    assert main(["study", cfg, "--out", str(tmp_path / "s"), "--dry_run", "true", "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert "--seeds [2]: give seed numbers from 0 to 1" in err and len(err.strip().splitlines()) == 1


def test_learning_curves_score_the_snapshots_on_the_tuning_rows(pair, tmp_path):
    rows = [json.loads(x) for x in open(FIXTURE)][0:8]
    tuning = tmp_path / "tuning.jsonl"
    tuning.write_text("".join(json.dumps({**r, "trace": r["answer"].split("####")[0].strip()}) + "\n" for r in rows))
    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2},
                                       {"name": "lora", "kind": "lora", "rank": 2, "layers": [1]},
                                       {"name": "quiet", "kind": "lora", "rank": 2, "layers": [1], "curve": False}], compare=[],
                 data__tuning_answers=str(tuning), scoring__curve_every=2, scoring__curve_seeds=[0])
    r = study(cfg, str(tmp_path / "s"))
    assert {"curve/toe", "curve/lora"} <= set(r["ran"]) and "train/toe-seed1" in r["ran"]
    assert "train/quiet" in r["ran"] and "curve/quiet" not in r["ran"]  # a row may opt out of its curve
    curves = json.load(open(tmp_path / "s" / "table.json"))["curves"]
    assert [p["step"] for p in curves["toe"]] == [2, 4] and [p["step"] for p in curves["lora"]] == [2, 4]
    runs = {p.name: p for p in (tmp_path / "s" / "work" / "train").glob("*/*")}
    assert "toe-seed1" not in curves and (runs["toe"] / "snapshots").is_dir()  # seed 1 kept no snapshots
    assert not (runs["toe-seed1"] / "snapshots").exists() and not (runs["quiet"] / "snapshots").exists()
    assert all(0 < p["ce"] < 100 for c in curves.values() for p in c) and (tmp_path / "s" / "curves-dev.png").exists()
    with pytest.raises(ToEError, match="data.tuning"):
        study(config(pair, tmp_path, data__tuning=None, scoring__curve_every=2), str(tmp_path / "t"))


def test_a_failing_step_leaves_the_other_rows_running(pair, tmp_path, monkeypatch):
    import tree_of_experts.recipes.study as study_mod

    real = study_mod.Study.run_score

    def broken(self, target, label, row):
        if label == "ctl":
            raise ToEError("planted failure")
        return real(self, target, label, row)

    monkeypatch.setattr(study_mod.Study, "run_score", broken)
    cfg = config(pair, tmp_path, rows=[{"name": "ctl", "kind": "control", "layers": [1]},
                                       {"name": "toe", "kind": "toe", "layers": [1]}], compare=[])
    with pytest.raises(ToEError, match="1 step\\(s\\) failed.*score/ce/ctl: planted failure"):
        study(cfg, str(tmp_path / "s"))
    rows = {r["name"] for r in table(tmp_path / "s")["rows"]}
    assert "toe" in rows and "ctl" not in rows  # the row after the failed one was trained and scored


def test_seeds_pair_by_which_seeds_a_row_has():
    g = torch.Generator().manual_seed(0)
    items = torch.randn(1, 50, generator=g)
    a = items + torch.tensor([[0.0], [5.0]])  # seeds 0 and 1
    d = Draws(50)
    same = d.means(a, (0, 1)) - d.means(a + 0.1, (0, 1))  # the same seeds: paired, the shift is exact
    assert torch.allclose(same, torch.full_like(same, -0.1), atol=1e-5)
    other = d.means(a, (0, 1)) - d.means(a + 0.1, (0, 2))  # other seeds: drawn independently
    assert float(other.std()) > 0.5
    assert coverage([1, 3]).startswith("; one side has one") and "under-estimated" in coverage([2, 2]) and not coverage([3, 3])


@pytest.mark.parametrize("changes, message", [
    (dict(rows=[{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2},
                {"name": "toe-seed1", "kind": "toe", "layers": [1]}], compare=[]), "another row's seed"),
    (dict(scoring__ce_files={"train": "x.jsonl"}), "a folder the study writes itself"),
    (dict(rows=[{"name": "t", "kind": "toe", "layers": [1]},
                {"name": "o", "kind": "oracle", "layers": [0], "plugin_of": "t"}], compare=[]), "give t's layers"),
])
def test_config_clashes_are_refused(pair, tmp_path, changes, message):
    with pytest.raises(ToEError, match=message):
        study(config(pair, tmp_path, **changes), str(tmp_path / "s"), dry_run=True)


def test_a_kept_run_of_another_budget_is_refused_not_reused(pair, tmp_path):
    rows = [{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2}]
    study(config(pair, tmp_path, rows=rows, compare=[]), str(tmp_path / "s"))
    edited = config(pair, tmp_path, rows=rows, compare=[], budget={"steps": 8, "batch_size": 4})
    # every refused run named at once (both seeds), not one per rerun
    with pytest.raises(ToEError, match="2 kept runs no longer fit the config \\(.*/toe was trained with max_steps 4 "
                                       "\\(the config: 8\\); .*toe-seed1 was trained .* delete what exists of .*toe-seed1"):
        study(edited, str(tmp_path / "s"), dry_run=True)
    shutil.rmtree(tmp_path / "s" / "train" / "toe-seed1")
    shutil.rmtree(tmp_path / "s" / "work" / "train" / "tiny" / "toe-seed1")
    shutil.rmtree(tmp_path / "s" / "train" / "toe")  # the kept copy alone deleted: the finished run is not taken back
    with pytest.raises(ToEError, match="train/tiny/toe was trained with max_steps 4 \\(the config: 8\\): rename"):
        study(edited, str(tmp_path / "s"), dry_run=True)


def test_a_score_of_a_training_or_answers_since_replaced_is_refused_not_shown(pair, tmp_path):
    """Every score keeps what it was made from; a row trained again (its folders deleted, as the budget message
    says) or answers made again leave the old scores refused, named, before anything runs."""
    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1]}], compare=[])
    out = tmp_path / "s"
    study(cfg, str(out))
    assert set(json.load(open(out / "ce" / "toe" / "inputs.json"))) == {"training", "data"}
    study(cfg, str(out), dry_run=True)  # nothing changed: nothing refused
    with open(tmp_path / "answers.jsonl", "a") as f:  # the same items, answered again (other bytes)
        f.write("\n")
    with pytest.raises(ToEError, match=r"2 score\(s\) were made from another training or answers .*ce/anchors"):
        study(cfg, str(out), dry_run=True)
    shutil.rmtree(out / "ce" / "anchors")
    os.remove(out / "ce" / "toe" / "inputs.json")  # a score from before the record: taken as it is
    study(cfg, str(out), dry_run=True)
    shutil.rmtree(out / "ce" / "toe")
    study(cfg, str(out))  # scored again, with its record
    shutil.rmtree(out / "train" / "toe")
    shutil.rmtree(out / "work" / "train" / "tiny" / "toe")
    with pytest.raises(ToEError, match=r"1 score\(s\) .*ce/toe"):  # its training gone: the score is of nothing
        study(cfg, str(out), dry_run=True)


def test_a_run_trained_from_an_earlier_build_of_its_extraction_is_refused(pair, tmp_path):
    """An extraction rebuilt in place with another bank (a new rule, changed options) makes the plug-ins trained
    from it stale: neither their kept copies nor their finished runs are reused, and a rebuild that makes the same
    bank changes nothing."""
    from safetensors.torch import load_file, save_file

    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1]}], compare=[])
    out = tmp_path / "s"
    study(cfg, str(out))
    bank = next(out.glob("work/**/extract-l1/toe_model.safetensors"))
    tensors = load_file(str(bank))
    save_file(dict(tensors), str(bank))  # the same bank written again: still the same build
    study(cfg, str(out), dry_run=True)
    # captured again on another machine: another bank (another sha256), the same settings: the same build
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, str(bank))
    study(cfg, str(out), dry_run=True)
    kept = out / "train" / "toe" / "train_args.json"
    args = json.loads(kept.read_text())
    assert args["experts_build"]["build"]["num_leaves"] == 4
    kept.write_text(json.dumps({k: v for k, v in args.items() if k != "experts_build"}))
    study(cfg, str(out), dry_run=True)  # a finished kept run from before the settings were recorded: kept, warned
    args["experts_build"]["build"]["seed"] = 7  # trained from a build with another seed (a rebuild in place since)
    kept.write_text(json.dumps(args))
    with pytest.raises(ToEError, match="s/train/toe was trained from an earlier build of .*extract-l1 .*other "
                                       r"settings: build.seed\): .*delete "):
        study(cfg, str(out), dry_run=True)
    run_args = out / "work" / "train" / "tiny" / "toe" / "train_args.json"
    run_args.write_text(json.dumps(args))
    shutil.rmtree(out / "train" / "toe")  # the kept copy gone, the finished run in the work folder is refused too
    with pytest.raises(ToEError, match="train/tiny/toe was trained from an earlier build .*delete .*s/train/toe and "
                                       ".*train/tiny/toe"):
        study(cfg, str(out))


def test_a_row_with_its_own_extraction_options_trains_on_its_own_extraction(pair, tmp_path):
    """``extract:`` on a row (here a bounded state sample, as `--max_disk` plans one) gives the row an extraction of
    its own next to the layer set's shared one, named by its options; the plan lists both."""
    rows = [{"name": "toe", "kind": "toe", "layers": [1]},
            {"name": "toe-sampled", "kind": "toe", "layers": [1], "extract": {"state_tokens": 500}}]
    cfg = config(pair, tmp_path, rows=rows, compare=["toe-sampled - toe"], budget={"steps": 2, "batch_size": 4})
    plan = study(cfg, str(tmp_path / "s"), dry_run=True)["summary"]
    assert "extract/extract-l1-state_tokens500" in plan and "extract/extract-l1 " in plan
    study(cfg, str(tmp_path / "s"))
    work = tmp_path / "s" / "work"
    sampled = json.load(open(work / "extract-l1-state_tokens500" / "run.json"))
    assert sampled["state_budget"]["state_tokens"] == 500
    assert json.load(open(work / "extract-l1" / "run.json")).get("state_budget") is None
    # the shared extraction finished first: the sampled one took its shards from that capture (the teacher not run)
    summary = json.load(open(work / "extract-l1-state_tokens500" / "summary.json"))
    assert summary["capture"]["reused_from"] == os.path.abspath(work / "extract-l1")
    args = json.load(open(work / "train" / "tiny" / "toe-sampled" / "train_args.json"))
    assert args["experts"].endswith("extract-l1-state_tokens500")
    # an oracle of the row reads the row's own extraction
    oracle = {"name": "o", "kind": "oracle", "layers": [1], "plugin_of": "toe-sampled"}
    s = Study(load_study(config(pair, tmp_path, rows=[*rows, oracle], compare=[])), str(tmp_path / "s"))
    assert "extract/extract-l1-state_tokens500" in next(x for x in s.steps() if x.id == "score/ce/o").deps
    # the row's extract options edited after it trained: its kept run is refused, not reused
    edited = [rows[0], {**rows[1], "extract": {"state_tokens": 600}}]
    with pytest.raises(ToEError, match="not the row's extraction extract-l1-state_tokens600"):
        study(config(pair, tmp_path, rows=edited, compare=[], budget={"steps": 2, "batch_size": 4}),
              str(tmp_path / "s"), dry_run=True)
    assert [r["name"] for r in table(tmp_path / "s")["rows"]][-1] == "toe-sampled"


def test_answer_sets_add_ce_targets_on_other_items_with_the_gap_closed(pair, tmp_path, monkeypatch):
    """``scoring.answer_sets``: the teacher's answers to other items (given, or generated by the study) become CE
    targets every row and the base/teacher anchors are scored on, with the gap closed in the table."""
    import tree_of_experts.commands.evaluate as ev

    asked = {}

    def traces(**kw):  # the tiny random teacher answers nothing readable: the fixture's answers stand in for it
        asked.update(kw)
        got = [json.loads(x) for x in open(kw["data"])][kw["skip"]:kw["skip"] + kw["limit"]]
        with open(kw["out"], "w") as f:
            f.writelines(json.dumps({**r, "trace": r["answer"].split("####")[0]}) + "\n" for r in got)
        os.makedirs(kw["eval_out"])
        open(os.path.join(kw["eval_out"], "metrics.json"), "w").write("{}")
        return {"kept": len(got), "generated": len(got)}

    monkeypatch.setattr(ev, "traces", traces)
    rows = [json.loads(x) for x in open(FIXTURE)][20:24]
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps({**r, "trace": r["answer"].split("####")[0].strip()}) + "\n" for r in rows))
    sets = {"given": {"items": FIXTURE, "rows": [20, 24], "task": "gsm8k", "answers": str(given)},
            "made": {"items": FIXTURE, "rows": [0, 3], "task": "gsm8k", "max_new_tokens": 4}}
    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1]}], compare=[],
                 budget={"steps": 2, "batch_size": 4}, scoring__answer_sets=sets)
    plan = study(cfg, str(tmp_path / "s"), dry_run=True)["summary"]
    assert re.search(r"answers-given +done", plan) and re.search(r"answers-made +to run", plan)
    assert "score/given/toe" in plan and "score/made/anchors" in plan
    plan = study(cfg, str(tmp_path / "s"), dry_run=True, targets=["ce"])["summary"]  # no answers for a later target
    assert "answers-made" not in plan and "score/made" not in plan and "score/ce/toe" in plan
    study(cfg, str(tmp_path / "s"))
    made = [json.loads(x) for x in open(tmp_path / "s" / "answers-made.jsonl")]
    assert len(made) == 3 and all(r["trace"] for r in made)
    assert (asked["skip"], asked["limit"], asked["max_new_tokens"], asked["task"]) == (0, 3, 4, "gsm8k")
    assert (tmp_path / "s" / "answers-made-graded" / "metrics.json").exists()  # the teacher's answers, graded
    t = json.load(open(tmp_path / "s" / "table.json"))
    toe = next(r for r in t["rows"] if r["name"] == "toe")
    assert {"given", "made", "ce"} <= set(toe) and "gap_closed" in toe["given"] and "gap_closed" in toe["made"]
    assert toe["given"]["mean"]["point"] is not None and toe["given"]["items"] == 4
    assert "given CE gap closed" in open(tmp_path / "s" / "table.md").read()


@pytest.mark.parametrize("sets, message", [
    ({"ce": {"items": FIXTURE}}, "scoring.answer_sets: ['ce'] is a folder the study writes itself"),
    ({"m": {"items": FIXTURE, "rows": [5, 2]}}, "scoring.answer_sets.m.rows [5, 2]: give [start, stop)"),
    ({"accuracy": {"items": FIXTURE}}, "['accuracy'] is a folder the study writes itself"),
    ({"answers-x": {"items": FIXTURE}}, "not starting with answers-"),
    ({"m": {"items": FIXTURE, "rows": [0, 2], "answers": "ANSWERS"}}, "answers other items than rows [0, 2]"),
    ({"m": {"items": FIXTURE, "rows": [0, 200]}}, "scoring.answer_sets.m.rows [0, 200]"),
    ({"m": {"items": "nowhere.jsonl"}}, "scoring.answer_sets.m.items: nowhere.jsonl not found"),
])
def test_bad_answer_sets_are_refused_before_any_model_loads(pair, tmp_path, sets, message):
    for s in sets.values():
        if s.get("answers") == "ANSWERS":  # the teacher's answers to rows 8-19, not 0-1
            s["answers"] = answers(tmp_path)
    with pytest.raises(ToEError, match=re.escape(message)):
        study(config(pair, tmp_path, scoring__answer_sets=sets), str(tmp_path / "s"), dry_run=True)


def test_the_pair_s_teacher_device_map_reaches_every_teacher_load(pair, tmp_path, monkeypatch):
    """``pair.teacher_device_map``: the extraction, the teacher's answers and the anchors' teacher CE load the
    teacher spread by it (here half offloaded to the disk); a bad value is one line before anything runs."""
    import tree_of_experts.commands.evaluate as ev
    import tree_of_experts.commands.extract as ex

    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    loads = []
    for module in (ex, ev):
        real = module.load_causal_lm
        monkeypatch.setattr(module, "load_causal_lm", lambda name, *a, real=real, **k: loads.append(
            (os.path.basename(str(name)), k.get("device_map"))) or real(name, *a, **k))
    rows = [{"name": "toe", "kind": "toe", "layers": [1]}]
    cfg = config(pair, tmp_path, rows=rows, compare=[], budget={"steps": 2, "batch_size": 4},
                 pair__teacher_device_map=str(tmp_path / "map.json"))
    study(cfg, str(tmp_path / "s"))
    teacher = [m for name, m in loads if name == "teacher"]
    assert len(teacher) >= 2 and all(m == mapping for m in teacher)  # the extraction and the anchors' CE
    assert all(m is None for name, m in loads if name == "base")
    with pytest.raises(ToEError, match="pair.teacher_device_map 'gpus': give one of auto"):
        study(config(pair, tmp_path, pair__teacher_device_map="gpus"), str(tmp_path / "s2"), dry_run=True)


def test_the_plan_calibrates_its_estimates_by_the_study_s_measured_steps(pair, tmp_path):
    """Every step run's wall time goes to step-times.jsonl; the next plan shows them and scales the pending steps of
    a kind by that kind's measured / estimated ratio on this machine."""
    from tree_of_experts.recipes.study_plan import calibrate

    cfg = config(pair, tmp_path, rows=[{"name": "toe", "kind": "toe", "layers": [1], "seeds": 2}], compare=[],
                 budget={"steps": 2, "batch_size": 4})
    ran = study(cfg, str(tmp_path / "s"), seeds=[0])["ran"]
    times = [json.loads(x) for x in open(tmp_path / "s" / "step-times.jsonl")]
    assert [t["step"] for t in times] == ran and all(t["finished"] and t["seconds"] >= 0 for t in times)
    p = study(cfg, str(tmp_path / "s"), dry_run=True)
    steps = {x["step"]: x for x in p["steps"]}
    assert "measured_seconds" in steps["train/toe"] and "train:toe" in p["calibration"]
    f = p["calibration"]["train:toe"]["factor"]
    assert steps["train/toe-seed1"]["calibrated_seconds"] == pytest.approx(steps["train/toe-seed1"]["seconds"] * f)
    assert "by this study's finished steps on this machine" in p["summary"] and "train:toe ×" in p["summary"]
    # a killed training resumes from its checkpoint: the plan estimates what is left of it
    run = tmp_path / "s" / "work" / "train" / "tiny" / "toe-seed1"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 3, "total_steps": 4}))
    now = {x["step"]: x for x in study(cfg, str(tmp_path / "s"), dry_run=True)["steps"]}  # the same probe: seed 0's
    left = now["train/toe-seed1"]                                                         # estimate is seed 1's whole
    assert left["status"] == "resumes" and left["seconds"] == pytest.approx(now["train/toe"]["seconds"] / 2)
    os.replace(run / "checkpoint", run / "checkpoint.tmp")  # killed between a save's renames: resumes from it
    (run / "checkpoint.tmp" / "state.json").write_text(json.dumps({"step": 1}))  # before total_steps was kept
    (run / "train_args.json").write_text(json.dumps({"max_steps": 2, "stage_a_steps": 2}))
    p = study(cfg, str(tmp_path / "s"), dry_run=True)
    assert "train/toe-seed1 (at 1/4)" in p["summary"] and "resumes" in p["summary"] and "route warm-up" in p["summary"]
    left = {x["step"]: x for x in p["steps"]}["train/toe-seed1"]  # still in Stage A: all its 2 training steps left
    assert left["seconds"] == pytest.approx({x["step"]: x for x in p["steps"]}["train/toe"]["seconds"])
    # another machine's (or thread count's) times are shown but do not calibrate
    lines = [{"step": "a", "status": "done", "seconds": 10.0, "kind": "k"}, {"step": "b", "status": "to run",
                                                                            "seconds": 5.0, "kind": "k"}]
    assert calibrate(lines, {"a": {"seconds": 30.0, "finished": True, "host": "elsewhere", "threads": 1}}) == {}
    assert lines[0]["measured_seconds"] == 30.0 and "calibrated_seconds" not in lines[1]


def test_the_time_record_adds_a_resumed_step_s_runs_and_restarts_a_redone_one(tmp_path):
    from tree_of_experts.recipes.steps import recorded_times

    path = tmp_path / "step-times.jsonl"
    rows = [("train/a", 10, False, "h"), ("train/a", 5, True, "h"),     # killed, then resumed to the end
            ("train/b", 7, False, "h"), ("train/b", 3, True, "other"),  # resumed on another machine
            ("train/c", 9, True, "h"), ("train/c", 4, True, "h")]       # finished, then redone
    path.write_text("".join(json.dumps({"step": s, "seconds": t, "finished": f, "host": h, "threads": 1}) + "\n"
                            for s, t, f, h in rows) + "not json\n")
    t = recorded_times(str(path))
    assert t["train/a"] == {"seconds": 15.0, "finished": True, "host": "h", "threads": 1}
    assert t["train/b"]["seconds"] == 10.0 and t["train/b"]["host"] is None  # mixed: shown, never calibrates
    assert t["train/c"]["seconds"] == 4.0


def test_a_step_that_ends_without_its_output_fails_once_and_a_render_error_costs_no_step(tmp_path):
    from tree_of_experts.recipes.steps import Step, run_steps

    runs, renders = [], []

    def render():
        renders.append(1)
        if len(renders) == 1:
            raise ValueError("a table that cannot be drawn yet")

    made = []
    steps = [Step("score/ce/a", [], lambda: bool(made), lambda: made.append(1), stage="score"),
             Step("score/ce/b", [], lambda: False, lambda: runs.append(1), stage="score")]  # never writes its output
    with pytest.raises(ToEError, match="score/ce/b finished without writing its output"):
        run_steps(steps, lambda s: str(tmp_path), render)
    assert runs == [1] and made and len(renders) == 2  # run once; the failed render after a did not stop b


def test_a_running_step_records_its_time_as_it_goes_so_a_killed_run_still_counts(tmp_path):
    """A machine that stops kills the study without a ``finally``: the beats written while the step ran are its
    time so far, and the run that resumes it adds its own."""
    from tree_of_experts.recipes.steps import Step, recorded_times, timed

    path, done = str(tmp_path / "step-times.jsonl"), []
    step = Step("train/a", [], lambda: bool(done), lambda: None)
    with timed(path, step, beat_s=0.1):  # (each record's seconds are rounded to 0.1)
        time.sleep(0.35)
        so_far = recorded_times(path)["train/a"]  # what a kill right now would leave
    assert not so_far["finished"] and 0.2 <= so_far["seconds"] <= 0.4
    assert so_far["threads"] == torch.get_num_threads()  # the run's count, not the timer thread's
    done.append(True)
    with timed(path, step, beat_s=10.0):  # the resumed run, finishing before its first beat
        time.sleep(0.1)
    total = recorded_times(path)["train/a"]
    assert total["finished"] and 0.4 <= total["seconds"] < 1.0 and len(open(path).readlines()) >= 4
    with timed(None, step):  # no record asked for: nothing written
        pass


def test_a_budgeted_row_samples_the_shared_capture_only_when_it_is_this_study_s(pair, tmp_path):
    """A row whose `extract` options only bound the disk takes the shared extraction's capture when that one is
    finished with every state and was captured from this study's pair, data and length; otherwise it captures its
    own (a shared folder left from an edited config is done, so never rerun, and would be refused as a source)."""
    from tree_of_experts.data import file_hash

    rows = [{"name": "toe", "kind": "toe", "layers": [1]},
            {"name": "toe-sampled", "kind": "toe", "layers": [1], "extract": {"state_tokens": 500}}]
    s = Study(load_study(config(pair, tmp_path, rows=rows, compare=[])), str(tmp_path / "s"))
    shared = s.extraction([1])
    assert s.capture_source([1], {"state_tokens": 500}) is None  # nothing finished yet
    os.makedirs(shared)
    run = {"teacher": s.teacher, "base": s.base, "data_sha256": file_hash(s.train_data),
           "max_length": s.cfg.data.max_length, "state_examples": None}
    for name, record in (("run.json", run), ("build.json", {})):
        with open(os.path.join(shared, name), "w") as f:
            json.dump(record, f)
    assert s.capture_source([1], {"state_tokens": 500}) == shared
    assert s.capture_source([1], {"state_tokens": 500, "num_leaves": 4}) is None  # not a budget alone
    for stale in ({"data_sha256": "0" * 64}, {"max_length": 7}, {"state_examples": [0, 1]}):
        with open(os.path.join(shared, "run.json"), "w") as f:
            json.dump({**run, **stale}, f)
        assert s.capture_source([1], {"state_tokens": 500}) is None, stale


def test_a_study_makes_its_training_traces_first_and_trains_on_them(pair, tmp_path, monkeypatch):
    """data.train_traces: the teacher's traces of other items' rows, made once into OUT/train-traces.jsonl before
    any extraction or training reads them; the budget's epochs count the traces kept; a rerun makes nothing again.
    (`toe traces` itself is tested in test_eval; the tiny random teacher's answers are empty, so its gold solutions
    stand in for them here, every other row "wrong" and left out.)"""
    import tree_of_experts.commands.evaluate as evaluate

    asked = []

    def fake_traces(teacher, data, out, skip, limit, keep_incorrect, max_new_tokens, **kw):
        rows = [json.loads(x) for x in open(data)][skip:skip + limit]
        asked.append((skip, limit, keep_incorrect, max_new_tokens))
        kept = [{**r, "trace": r["answer"].split("####")[0].strip(), "correct": True, "truncated": False}
                for r in rows[::2]]
        kept[-1]["truncated"] = True  # correct by its last number, but cut at the cap: left out
        open(out, "w").write("".join(json.dumps(r) + "\n" for r in kept))
        return {"kept": len(kept), "generated": len(rows)}

    monkeypatch.setattr(evaluate, "traces", fake_traces)
    train_items = tmp_path / "train-items.jsonl"
    shutil.copy(FIXTURE, train_items)
    cfg = config(pair, tmp_path, data__train=None, budget={"epochs": 1, "batch_size": 4},
                 data__train_traces={"items": str(train_items), "rows": [0, 24], "max_new_tokens": 8},
                 rows=[{"name": "toe", "kind": "toe", "layers": [1]}], compare=[])
    planned = study(cfg, str(tmp_path / "s"), dry_run=True)  # before the traces exist: the rows asked, at most
    assert "train-traces" in json.dumps(planned) and not asked
    r = study(cfg, str(tmp_path / "s"))
    made = [json.loads(x) for x in open(tmp_path / "s" / "train-traces.jsonl")]
    assert r["ran"][0] == "train-traces" and {"train/toe", "score/ce/toe"} <= set(r["ran"])
    assert asked == [(0, 24, False, 8)] and len(made) == 11 and not any(m["truncated"] for m in made)
    from tree_of_experts.data import file_hash

    ex = json.load(open(next((tmp_path / "s" / "work").glob("extract-l1/run.json"))))
    assert ex["data_sha256"] == file_hash(str(tmp_path / "s" / "train-traces.jsonl"))  # extracted from the traces
    summary = json.load(open(tmp_path / "s" / "train" / "toe" / "train_summary.json"))
    assert summary["examples"] == 11 and summary["steps"] - summary["stage_a_steps"] == 3  # an epoch of 11, 4 a step
    assert study(cfg, str(tmp_path / "s"))["ran"] == []
    edited = yaml.safe_load(open(cfg))
    edited["data"]["train_traces"]["max_new_tokens"] = 16  # other traces than the ones kept: refused, not reused
    open(cfg, "w").write(yaml.safe_dump(edited))
    with pytest.raises(ToEError, match="was made with another max_new_tokens"):
        study(cfg, str(tmp_path / "s"))
    from tree_of_experts.recipes.study_config import Data, TrainTraces

    math = Data(items=FIXTURE, train_traces=TrainTraces(items="math.jsonl", rows=[0, 8], task="math"))
    assert (math.train_prompt_field(), math.train_response_field()) == ("problem", "trace")  # MATH rows' fields
