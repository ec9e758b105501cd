"""`toe study CONFIG --out DIR`: a declarative study, planned, run, resumed and rendered.

The config (:mod:`.study_config`) names the pair, the data, the budget, the rows and the comparisons. This module
turns it into steps — the teacher's answers to the reported items, one extraction per layer set, one training per
row and seed, one scoring per row, seed and target — each with the file that says it is done. Running a study runs
the steps not done yet, in the rows' order, so a killed study continues where it stopped when rerun (each library
command resumes its own work: extraction shards, training checkpoints, generation batches). Two processes may share
one study folder: each step is taken under a file lock, a step another process holds is passed over, and a step
whose inputs another process is still making waits for them. After every finished scoring the table, the paired
comparisons, the plots and the verdict are rendered anew from the per-item scores
(:mod:`..evaluation.study_table`).

Folder layout (OUT): ``dev-traces.jsonl`` (the teacher's answers, the CE target), ``TARGET/ROW[-seedK]/`` (each
scoring's per-item JSONL and metrics.json: ``ce``, ``acc`` and one folder per ``scoring.ce_files`` name),
``train/ROW[-seedK]/`` (the trained plug-in or adapter with its metrics; the small files only), ``table.md``,
``table.json``, ``study.png``, ``curves.png``; WORK (default OUT/work): extractions and checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ToEError
from ..io import atomic_write_json, read_json
from .study_config import TOY, Row, StudyConfig, load_study

log = logging.getLogger(__name__)
TARGET_DIRS = {"ce": "ce", "accuracy": "acc"}
DONE = ("train_summary.json", "baseline_summary.json")  # a kept run is done when its summary is there
KEPT = ("metrics.jsonl", "curves.png", "train_summary.json", "baseline_summary.json", "train_args.json",
        "baseline_args.json", "toe_config.json", "toe_model.safetensors", "adapter_config.json",
        "adapter_model.safetensors", "README.md")


@dataclass
class Step:
    """One unit of work: ``done`` says whether its output exists, ``run`` makes it (resuming what it finds)."""

    id: str
    deps: list[str]
    done: Callable[[], bool]
    run: Callable[[], None]
    work: dict = field(default_factory=dict)  # what the estimate needs: tokens, model, kind


class Study:
    def __init__(self, cfg: StudyConfig, out: str):
        self.cfg, self.out = cfg, os.path.abspath(out)
        self.skip, self.n = cfg.data.reported[0], cfg.data.reported[1] - cfg.data.reported[0]

    # Paths resolve when first used (``${VAR}`` from the environment, ``toy:`` to the shipped pair), so rendering
    # the committed results needs none of the machine's folders.
    @functools.cached_property
    def work(self) -> str:
        return os.path.abspath(self.resolve(self.cfg.work, "work") if self.cfg.work else os.path.join(self.out, "work"))

    @functools.cached_property
    def base(self) -> str:
        return self.resolve(self.cfg.pair.base, "pair.base")

    @functools.cached_property
    def teacher(self) -> str:
        return self.resolve(self.cfg.pair.teacher, "pair.teacher")

    @functools.cached_property
    def train_data(self) -> str:
        return self.resolve(self.cfg.data.train, "data.train")

    @functools.cached_property
    def items(self) -> str:
        return self.resolve(self.cfg.data.items, "data.items")

    @functools.cached_property
    def answers(self) -> str:
        a = self.cfg.data.answers
        return self.resolve(a, "data.answers") if a else os.path.join(self.out, "dev-traces.jsonl")

    @functools.cached_property
    def tuning_answers(self) -> str:
        a = self.cfg.data.tuning_answers
        return self.resolve(a, "data.tuning_answers") if a else os.path.join(self.out, "tuning-traces.jsonl")

    # -- inputs ------------------------------------------------------------------------------------------------
    def resolve(self, path: str, key: str = "a path") -> str:
        """A config path: ``toy:base``/``toy:teacher`` (the shipped toy pair), ``toy:train``/``toy:dev`` (the toy
        data, written into OUT/data once), a hub id, or a file/folder."""
        if "$" in path:  # ${PAIR}/model: the config names the machine's folders through the environment
            expanded = os.path.expandvars(path)
            if "$" in expanded:
                raise ToEError(f"{key} {path}: set the environment variable it names (e.g. PAIR=/path/to/models)")
            path = expanded
        if not path.startswith(TOY):
            return path
        from .demo import toy_pair_dir, write_toy_data

        what = path[len(TOY):]
        if what in ("base", "teacher"):
            return os.path.join(toy_pair_dir(), what)
        if what not in ("train", "dev"):
            raise ToEError(f"{path}: use toy:base, toy:teacher, toy:train or toy:dev")
        data = os.path.join(self.out, "data")
        if not os.path.isfile(os.path.join(data, f"{what}.jsonl")):
            write_toy_data(data, 384, 128)
        return os.path.join(data, f"{what}.jsonl")

    def check_inputs(self) -> None:
        """Files the study reads exist and hold enough rows, before any model loads."""
        from ..data import read_rows

        pending = {s.id for s in self.steps() if not s.done()}
        for name, path in (("data.train", self.train_data), ("data.items", self.items),
                           *((f"scoring.ce_files.{k}", self.resolve(v)) for k, v in self.cfg.scoring.ce_files.items()
                             if any(p.startswith(f"score/{k}/") for p in pending))):
            if not path.startswith("hf:") and not os.path.exists(path):
                raise ToEError(f"{name}: {path} not found: fix the path in the study config")
        self.check_kept_runs()
        items = read_rows(self.items)
        if self.cfg.data.reported[1] > len(items):
            raise ToEError(f"data.reported {self.cfg.data.reported}: data.items {self.items} has {len(items)} rows")
        if self.cfg.data.answers:
            if not os.path.isfile(self.answers):
                raise ToEError(f"data.answers: {self.answers} not found: fix the path, or leave it out to generate them")
            field = self.cfg.data.prompt_field or "question"
            want = sorted(str(r.get(field)) for r in items[self.skip:self.skip + self.n])
            got = sorted(str(r.get(field)) for r in read_rows(self.answers))
            if got != want:
                raise ToEError(f"data.answers {self.answers} answers other items than data.items rows "
                               f"{self.cfg.data.reported}: give the teacher's answers to exactly those rows")
        for who, path in (("pair.base", self.base), ("pair.teacher", self.teacher)):
            from ..hf import load_config

            cfg = load_config(path, who)
            for r in self.cfg.rows:
                bad = [x for x in r.layers or [] if who == "pair.base" and not 0 <= x < cfg.num_hidden_layers]
                if bad:
                    raise ToEError(f"rows.{r.name}.layers {bad}: the base has {cfg.num_hidden_layers} layers "
                                   f"(0-{cfg.num_hidden_layers - 1})")

    def check_kept_runs(self) -> None:
        """A kept run trained with another budget or seed than the config now asks is refused, not reused: an edited
        config would otherwise keep results it no longer describes."""
        steps_n = self.cfg.budget.steps or self.cfg.budget.steps_for(self.n_train())
        for row in self.cfg.rows:
            for seed, label in enumerate(row.labels()) if row.kind != "oracle" else ():
                for name in ("train_args.json", "baseline_args.json"):
                    path = os.path.join(self.out, "train", label, name)
                    if not os.path.isfile(path):
                        continue
                    args = read_json(path, "delete the kept run to train it again")
                    want = {"max_steps": steps_n, "batch_size": self.cfg.budget.batch_size, "seed": seed}
                    differ = [f"{k} {args.get(k)} (the config: {v})" for k, v in want.items()
                              if k in args and args[k] != v]
                    if differ:
                        raise ToEError(f"{os.path.dirname(path)} was trained with {', '.join(differ)}: rename the row "
                                       "(or use another --out) for the new budget, or delete that folder to redo it")

    def n_train(self) -> int:
        from ..data import read_rows

        return len(read_rows(self.train_data))

    # -- the plan ----------------------------------------------------------------------------------------------
    def extraction(self, layers: list[int], rebuild: dict | None = None) -> str:
        """The extraction folder of a layer set (and, with ``rebuild`` options, the bank rebuilt from it)."""
        name = "extract-l" + "-".join(map(str, layers))
        if rebuild:
            name += "-" + "-".join(f"{k}{v}" for k, v in sorted(rebuild.items()))
        return os.path.join(self.work, name)

    def steps(self) -> list[Step]:
        cfg, steps = self.cfg, []
        targets = [TARGET_DIRS[t] for t in cfg.scoring.targets] + list(cfg.scoring.ce_files)
        steps.append(Step("answers", [], lambda: os.path.isfile(self.answers), self.run_answers,
                          {"kind": "answers"}))
        if cfg.scoring.curve_every:
            steps.append(Step("tuning-answers", [], lambda: os.path.isfile(self.tuning_answers),
                              lambda: self.run_answers(tuning=True), {"kind": "answers"}))
        for t in targets:
            steps.append(self.score_step(t, "anchors", None))
        if "acc" in targets:  # the teacher's graded answers (made with its answers when the study generates them)
            steps.append(Step("score/acc/teacher", ["answers"], lambda: self.scored("acc", "teacher"),
                              lambda: self.run_score("acc", "teacher", None), {"kind": "score", "target": "acc",
                                                                               "row": None}))
        extractions = set()
        steps_n = cfg.budget.steps or cfg.budget.steps_for(self.n_train())
        for row in cfg.rows:
            for k, label in enumerate(row.labels()):
                deps = []
                if row.layers and row.kind != "oracle" and tuple(row.layers) not in extractions:
                    extractions.add(tuple(row.layers))
                    steps.append(Step(f"extract/{os.path.basename(self.extraction(row.layers))}", [],
                                      self.extraction_done(row.layers), self.run_extract(row.layers),
                                      {"kind": "extract", "layers": row.layers}))
                if row.layers and row.kind != "oracle":
                    deps.append(f"extract/{os.path.basename(self.extraction(row.layers))}")
                if row.rebuild:
                    rebuilt = f"extract/{os.path.basename(self.extraction(row.layers, row.rebuild))}"
                    if rebuilt not in {s.id for s in steps}:
                        steps.append(Step(rebuilt, list(deps), self.extraction_done(row.layers, row.rebuild),
                                          self.run_rebuild(row), {"kind": "rebuild"}))
                    deps = [rebuilt]
                if row.kind == "oracle":  # it reads the extraction of its layer set (which its plug-in row built)
                    plugin = cfg.row(row.plugin_of).labels()[0]
                    ex = f"extract/{os.path.basename(self.extraction(row.layers))}"
                    steps.append(Step(f"score/ce/{label}", ["answers", ex, f"train/{plugin}"],
                                      lambda label=label: self.scored("ce", label),
                                      self.run_oracle(row, plugin), {"kind": "oracle", "layers": row.layers}))
                    continue
                if row.kind == "toe_on_lora":
                    deps.append(f"train/{cfg.row(row.adapter_of).labels()[k]}")
                steps.append(Step(f"train/{label}", deps, lambda label=label: self.trained(label),
                                  self.run_train(row, k, label, steps_n),
                                  {"kind": "train", "row": row, "steps": steps_n}))
                for t in targets:
                    steps.append(self.score_step(t, label, row))
                if cfg.scoring.curve_every:
                    steps.append(Step(f"curve/{label}", ["tuning-answers", f"train/{label}"],
                                      lambda label=label: os.path.isfile(os.path.join(self.out, "curve", label,
                                                                                      "curve.json")),
                                      lambda label=label, row=row: self.run_curve(label, row), {"kind": "curve"}))
        return steps

    def score_step(self, target: str, label: str, row: Row | None) -> Step:
        deps = (["answers"] if target in ("ce", "acc") else []) + ([f"train/{label}"] if row else [])
        return Step(f"score/{target}/{label}", deps, lambda: self.scored(target, label),
                    lambda: self.run_score(target, label, row), {"kind": "score", "target": target, "row": row})

    # -- done markers ------------------------------------------------------------------------------------------
    def scored(self, target: str, label: str) -> bool:
        return os.path.isfile(os.path.join(self.out, target, label, "metrics.json"))

    def run_dir(self, label: str) -> str:
        """A training's own folder: under the study's name, so studies sharing a work folder (and its extractions)
        never adopt each other's runs."""
        return os.path.join(self.work, "train", self.cfg.name, label)

    def trained(self, label: str) -> bool:
        kept = os.path.join(self.out, "train", label)
        return any(os.path.isfile(os.path.join(kept, f)) for f in ("train_summary.json", "baseline_summary.json"))

    def extraction_done(self, layers: list[int], rebuild: dict | None = None) -> Callable[[], bool]:
        path = self.extraction(layers, rebuild)

        def done() -> bool:
            # trained rows whose kept results exist need no extraction: a fresh machine skips it
            users = [lab for r in self.cfg.rows if r.layers == layers and r.kind != "oracle"
                     and (not rebuild or r.rebuild == rebuild) for lab in r.labels()]
            oracles = [r for r in self.cfg.rows if r.kind == "oracle" and r.layers == layers and not rebuild]
            return os.path.isfile(os.path.join(path, "summary.json")) or (
                all(self.trained(u) for u in users) and all(self.scored("ce", r.labels()[0]) for r in oracles))

        return done

    # -- running the steps -------------------------------------------------------------------------------------
    def common(self) -> dict:
        d = self.cfg.data
        fields = {k: v for k, v in (("prompt_field", d.prompt_field), ("response_field", d.response_field)) if v}
        return dict(template=self.cfg.pair.template, max_length=d.max_length, **fields)

    def run_answers(self, tuning: bool = False) -> None:
        """The teacher's greedy answers (all kept) to the reported rows (the CE target; its graded accuracy too), or
        with ``tuning`` to the tuning rows (the learning curves' target)."""
        from ..commands.evaluate import traces

        target = self.tuning_answers if tuning else self.answers
        skip, n = (self.cfg.data.tuning[0], self.cfg.data.tuning[1] - self.cfg.data.tuning[0]) if tuning else \
            (self.skip, self.n)
        tmp = target + ".partial"
        got = traces(teacher=self.teacher, data=self.items, out=tmp, task=self.cfg.data.task, skip=skip, limit=n,
                     template=self.cfg.pair.template, max_new_tokens=self.cfg.scoring.max_new_tokens,
                     batch_size=self.cfg.scoring.answer_batch_size, dtype=self.cfg.pair.dtype, keep_incorrect=True,
                     eval_out=None if tuning else os.path.join(self.out, "acc", "teacher"), resume=True,
                     overwrite=True)
        if got["kept"] < got["generated"]:
            raise ToEError(f"the teacher answered {got['kept']} of {got['generated']} items (the others were "
                           f"empty; {100 * got['truncated_share']:.0f} % cut at scoring.max_new_tokens "
                           f"{self.cfg.scoring.max_new_tokens}): raise it, or give data.answers / data.tuning_answers")
        os.replace(tmp, target)

    def run_curve(self, label: str, row: Row) -> None:
        """CE on the tuning rows' teacher answers of every kept snapshot and the final weights: the learning curve."""
        from ..commands.evaluate import evaluate

        run, points = self.run_dir(label), []
        snaps = os.path.join(run, "snapshots")
        if not os.path.isdir(snaps):
            raise ToEError(f"curve/{label}: {snaps} is gone (its work folder did not survive): delete "
                           f"{os.path.join(self.out, 'train', label)} to train the row again, or set "
                           "scoring.curve_every 0")
        found = sorted((int(d.split("-")[1]), os.path.join(snaps, d)) for d in os.listdir(snaps)
                       if d.startswith("step-"))
        final = self.cfg.budget.steps or self.cfg.budget.steps_for(self.n_train())
        for step, folder in [*found, (final, run)]:
            out = os.path.join(self.out, "curve", label, f"step-{step}")
            if not os.path.isfile(os.path.join(out, "metrics.json")):
                evaluate(base=self.base, **{"lora" if row.kind == "lora" else "plugin": folder}, with_base=False,
                         data=self.tuning_answers, template=self.cfg.pair.template, ce_target="trace",
                         accuracy=False, task=self.cfg.data.task, batch_size=self.cfg.scoring.batch_size,
                         dtype=self.cfg.pair.dtype, out=out, overwrite=True)
            system = next(iter(read_json(os.path.join(out, "metrics.json"), "rerun the study")["systems"].values()))
            points.append({"step": step, "ce": system["ce"], "ce_ci95": system.get("ce_ci95")})
        atomic_write_json(os.path.join(self.out, "curve", label, "curve.json"), {"row": row.name, "points": points})

    def run_extract(self, layers: list[int]) -> Callable[[], None]:
        def run() -> None:
            from ..commands.extract import extract

            extract(teacher=self.teacher, base=self.base, data=self.train_data, out=self.extraction(layers),
                    layers=layers, dtype=self.cfg.pair.dtype, **self.common(), **self.cfg.extract)
        return run

    def run_rebuild(self, row: Row) -> Callable[[], None]:
        def run() -> None:
            from ..commands.extract import rebuild

            out = self.extraction(row.layers, row.rebuild)
            rebuild(source=self.extraction(row.layers), out=out, dtype=self.cfg.pair.dtype,
                    overwrite=os.path.isdir(out), **row.rebuild)
        return run

    def run_train(self, row: Row, seed: int, label: str, steps_n: int) -> Callable[[], None]:
        def run() -> None:
            from ..commands.train import train
            from ..recipes.baseline import baseline

            out = self.run_dir(label)
            kept = os.path.join(self.out, "train", label)
            if not any(os.path.isfile(os.path.join(out, f)) for f in ("train_summary.json", "baseline_summary.json")):
                marker = any(os.path.isfile(os.path.join(out, f)) for f in ("train_args.json", "baseline_args.json"))
                kw = dict(base=self.base, data=self.train_data, out=out, max_steps=steps_n, seed=seed,
                          snapshot_every=self.cfg.scoring.curve_every,
                          batch_size=self.cfg.budget.batch_size, dtype=self.cfg.pair.dtype, resume=marker,
                          overwrite=not marker and os.path.isdir(out), **self.common())
                if row.objective == "on_policy":
                    kw.update(objective="on_policy", teacher=self.teacher)
                experts = self.extraction(row.layers, row.rebuild) if row.layers else None
                if row.kind == "lora":
                    baseline(kind="lora", lora_rank=row.rank, experts=experts, **kw, **{**self.cfg.lora, **row.options})
                elif row.kind == "control":
                    baseline(kind="control", experts=experts, **kw, **{**_baseline_options(self.cfg.train),
                                                                        **row.options})
                else:
                    adapter = self.run_dir(self.cfg.row(row.adapter_of).labels()[seed]) if row.adapter_of else None
                    if adapter and not os.path.isdir(adapter):  # a fresh machine: the adapter from its kept copy
                        adapter = os.path.join(self.out, "train", self.cfg.row(row.adapter_of).labels()[seed])
                    train(experts=experts, base_adapter=adapter, **kw, **{**self.cfg.train, **row.options})
            os.makedirs(kept, exist_ok=True)
            for f in KEPT:  # the small files and the trained weights, kept with the study's results; the summary
                # (what marks the step done) last, so a kill mid-copy leaves the step to redo
                if os.path.isfile(os.path.join(out, f)) and f not in DONE:
                    shutil.copy2(os.path.join(out, f), os.path.join(kept, f))
            if row.kind != "lora":  # the bank's geometry before -> after training (did the leaves specialise?)
                from ..commands.hub import inspect

                atomic_write_json(os.path.join(kept, "inspect.json"), inspect(out))
            for f in DONE:
                if os.path.isfile(os.path.join(out, f)):
                    shutil.copy2(os.path.join(out, f), os.path.join(kept, f))
        return run

    def system_dir(self, label: str) -> str:
        """A trained row's weights: the run folder, else (a fresh machine) the kept copy."""
        run = self.run_dir(label)
        return run if os.path.isdir(run) and any(
            os.path.isfile(os.path.join(run, f)) for f in ("train_summary.json", "baseline_summary.json")) else \
            os.path.join(self.out, "train", label)

    def run_score(self, target: str, label: str, row: Row | None) -> None:
        from ..commands.evaluate import evaluate

        out = os.path.join(self.out, target, label)
        again = os.path.isfile(os.path.join(out, "generations.partial.jsonl"))
        kw: dict = dict(base=self.base, out=out, batch_size=self.cfg.scoring.batch_size, dtype=self.cfg.pair.dtype,
                        resume=again, overwrite=not again)
        if label == "teacher":
            kw.update(with_base=False, teacher=self.teacher)
        elif row is None:
            kw.update(with_base=True, teacher=self.teacher if target == "ce" else None)
        else:
            kw["lora" if row.kind == "lora" else "plugin"] = self.system_dir(label)
            kw["with_base"] = False
        if target == "ce":
            kw.update(data=self.answers, template=self.cfg.pair.template, ce_target="trace", accuracy=False,
                      task=self.cfg.data.task)
        elif target == "acc":
            kw.update(data=self.items, skip=self.skip, limit=self.n, template=self.cfg.pair.template, ce=False,
                      max_new_tokens=self.cfg.scoring.max_new_tokens, task=self.cfg.data.task)
        else:
            kw.update(data=self.resolve(self.cfg.scoring.ce_files[target]), task="code", template="{prompt}",
                      accuracy=False, ce_target="gold")
        evaluate(**kw)

    def run_oracle(self, row: Row, plugin: str) -> Callable[[], None]:
        def run() -> None:
            from ..commands.oracle import oracle

            oracle(teacher=self.teacher, base=self.base, experts=self.extraction(row.layers), data=self.answers,
                   plugin=self.system_dir(plugin), template=self.cfg.pair.template, ce_target="trace",
                   dtype=self.cfg.pair.dtype, out=os.path.join(self.out, "ce", row.labels()[0]), overwrite=True,
                   **{"batch_size": 1, "lambdas": [0.25], **row.options})
        return run

    # -- the loop ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, step: Step):
        """The step's advisory lock (released by the kernel if the process dies): yields False when another
        process holds it."""
        # an extraction may be shared by studies with one work folder: its lock lives there
        where = self.work if step.id.startswith("extract/") else self.out
        os.makedirs(os.path.join(where, "locks"), exist_ok=True)
        path = os.path.join(where, "locks", step.id.replace("/", "__") + ".lock")
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                f.seek(0), f.truncate(), f.write(f"pid {os.getpid()}\n"), f.flush()
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run(self, render: Callable[[], None], poll_s: float = 10.0, rows: list[str] | None = None,
            targets: list[str] | None = None) -> dict:
        steps = self.steps()
        if targets is not None:  # the other targets' scorings wait for a later run
            steps = [s for s in steps if not s.id.startswith("score/") or s.id.split("/")[1] in targets]
        if rows is not None:  # those rows' steps and what they need
            keep = {s.id for s in steps if s.id.split("/")[-1] in ("anchors", "teacher")  # every table's ends
                    or any(s.id.split("/")[-1] in self.cfg.row(r).labels() for r in rows)}
            while True:
                more = {d for s in steps if s.id in keep for d in s.deps} - keep
                if not more:
                    break
                keep |= more
            steps = [s for s in steps if s.id in keep]
        by_id = {s.id: s for s in steps}
        ran, waited, failed = [], False, {}

        def blocked(s: Step) -> bool:  # a step whose input failed waits for a later run, not forever
            return any(d in failed or blocked(by_id[d]) for d in s.deps if d in by_id)

        while True:
            pending = [s for s in steps if not s.done() and s.id not in failed and not blocked(s)]
            if not pending:
                break
            progressed = held = False
            for s in pending:
                if s.done() or not all(by_id[d].done() for d in s.deps if d in by_id):
                    held = held or any(not by_id[d].done() for d in s.deps if d in by_id)
                    continue
                with self.lock(s) as mine:
                    if not mine:
                        held = True
                        log.info("study: %s is running in another process; next step", s.id)
                        continue
                    if s.done():
                        continue
                    log.info("study: %s", s.id)
                    try:
                        s.run()
                    except ToEError as e:  # one row's trouble does not stop the others: said at the end
                        failed[s.id] = str(e)
                        log.error("study: %s failed: %s (the steps that need it wait; the others go on)", s.id, e)
                    else:
                        ran.append(s.id)
                        if s.id.startswith("score/"):
                            render()
                    progressed = True
                    break  # back to the first pending step: the rows' order is the priority order
            if not progressed:
                if not held:
                    raise ToEError("study: steps left that cannot start: " + ", ".join(s.id for s in pending[:5]))
                waited = True
                time.sleep(poll_s)  # another process holds a step this one needs
        render()
        if failed:
            first, why = next(iter(failed.items()))
            raise ToEError(f"study: {len(failed)} step(s) failed, the rest ran and the table is rendered: {first}: "
                           f"{why}" + (f" (and {', '.join(list(failed)[1:4])})" if len(failed) > 1 else ""))
        return {"ran": ran, "waited": waited}


def _baseline_options(options: dict) -> dict:
    """The options of the study's `train` group that `toe baseline` takes (the group also serves the control, whose
    command lacks some plug-in-only options)."""
    from ..options import option_names
    from .baseline import baseline

    return {k: v for k, v in options.items() if k in option_names(baseline)}


def study(file: str, out: str, dry_run: bool = False, rows: list[str] | None = None,
          targets: list[str] | None = None, render_only: bool = False, poll_s: float = 10.0) -> dict:
    """Plans, runs (resuming) and renders a study.

    Args:
        file: the study's YAML config (see ``studies/toy.yaml``; :mod:`tree_of_experts.recipes.study_config` documents
            every key).
        out: the study folder (results, small files; committed) — rerunning into it continues the study.
        dry_run: print the plan (every step with its status, estimated time and disk) and stop; nothing loads.
        rows: run only these rows (and the steps they need), in the config's order; default: every row.
        targets: score only these targets now (``ce``, ``acc`` or a ``scoring.ce_files`` name); the others stay
            pending for a later run. Default: every target.
        render_only: run nothing; render the table, plots and verdict from what is scored.
        poll_s: seconds between looks while another process holds a step this one needs.

    Returns:
        The plan (``dry_run``) or the rendered table's summary.
    """
    from ..evaluation.study_table import render
    from .study_plan import plan

    cfg = load_study(file)
    s = Study(cfg, out)
    unknown = [r for r in rows or [] if r not in {x.name for x in cfg.rows}]
    if unknown:
        raise ToEError(f"--rows {unknown}: not rows of {file} ({', '.join(x.name for x in cfg.rows)})")
    known = [TARGET_DIRS[t] for t in cfg.scoring.targets] + list(cfg.scoring.ce_files)
    targets = [TARGET_DIRS.get(t, t) for t in targets] if targets is not None else None  # `accuracy` is `acc`
    if any(t not in known for t in targets or []):
        raise ToEError(f"--targets {targets}: this study scores {', '.join(known)}")
    os.makedirs(s.out, exist_ok=True)
    if render_only:
        return {**render(s), "ran": [], "waited": False}
    s.check_inputs()
    if dry_run:
        return plan(s)
    atomic_write_json(os.path.join(s.out, "study.json"), {"config": os.path.abspath(file), "name": cfg.name})
    result = s.run(lambda: render(s), poll_s, rows, targets)
    summary = render(s)
    return {**summary, **result}


def load(file: str, out: str) -> Study:
    """The study of ``file`` in the folder ``out`` (for rendering or inspection without running)."""
    return Study(load_study(file), out)
