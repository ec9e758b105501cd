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

import functools
import logging
import os
from collections.abc import Callable

from ..errors import ToEError
from ..files import atomic_write_json
from ..folders import run_summary
from .steps import TIMES, TRAIN_TRACES, Step, run_steps
from .study_config import TOY, Row, StudyConfig, load_study
from .study_checks import StudyChecks
from .study_runs import StudyRuns

log = logging.getLogger(__name__)
TARGET_DIRS = {"ce": "ce", "accuracy": "acc"}


class Study(StudyRuns, StudyChecks):
    """A study config and its output folder: where every path resolves, the checks before anything runs, and the
    graph of steps (:mod:`.study_runs` says what each step does)."""

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
        """The training data: data.train, or the teacher's traces the study makes (data.train_traces)."""
        if self.cfg.data.train_traces is not None:
            return os.path.join(self.out, "train-traces.jsonl")
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
            raise ToEError(f"{key} {path}: use toy:base, toy:teacher, toy:train or toy:dev")
        data = os.path.join(self.out, "data")
        if not os.path.isfile(os.path.join(data, f"{what}.jsonl")):
            write_toy_data(data, 384, 128)
        return os.path.join(data, f"{what}.jsonl")

    def target_dirs(self) -> list[str]:
        """Every target's folder name: ``ce``/``acc`` as asked, then the ce_files and the answer sets."""
        return [TARGET_DIRS[t] for t in self.cfg.scoring.targets] + list(self.cfg.scoring.ce_files) + \
            list(self.cfg.scoring.answer_sets)

    def target_data(self, target: str) -> str:
        """The file a target's scores read: the teacher's answers (``ce``, an answer set), the items (``acc``), or
        a ``scoring.ce_files`` file."""
        if target == "ce":
            return self.answers
        if target in self.cfg.scoring.answer_sets:
            return self.set_answers(target)
        if target == "acc":
            return self.items
        return self.resolve(self.cfg.scoring.ce_files[target])

    def set_answers(self, name: str) -> str:
        """The teacher's answers of the answer set ``name``: its given file, or the one the study generates."""
        a = self.cfg.scoring.answer_sets[name].answers
        return self.resolve(a, f"scoring.answer_sets.{name}.answers") if a else \
            os.path.join(self.out, f"answers-{name}.jsonl")

    def n_train(self) -> int:
        """Training rows: the file's, or before the study made its traces, the rows it will generate for (the
        correct ones are kept: an upper bound)."""
        from ..data import read_rows

        tr = self.cfg.data.train_traces
        if tr is not None and not os.path.isfile(self.train_data):
            return tr.rows[1] - tr.rows[0]
        return len(read_rows(self.train_data))

    def steps_n(self) -> int:
        """Every trained row's optimiser steps (an epochs budget: over the training rows, read only then)."""
        return self.cfg.budget.steps or self.cfg.budget.steps_for(self.n_train())

    # -- the plan ----------------------------------------------------------------------------------------------
    def extraction(self, layers: list[int], rebuild: dict | None = None, extract: dict | None = None) -> str:
        """The extraction folder of a layer set (with a row's own ``extract`` options, its own one; with ``rebuild``
        options, the bank rebuilt from it)."""
        def suffix(options: dict) -> str:  # a path-valued option's separators would make sub-folders
            return "".join(f"-{k}{str(v).replace(os.sep, '_').replace(' ', '')}" for k, v in sorted(options.items()))

        return os.path.join(self.work, "extract-l" + "-".join(map(str, layers)) + suffix(extract or {}) +
                            suffix(rebuild or {}))

    def row_extract(self, row: Row) -> dict:
        """A row's own extraction options: an oracle's are its plug-in row's (it reads that row's extraction)."""
        return self.cfg.row(row.plugin_of).extract if row.kind == "oracle" else row.extract

    def steps(self) -> list[Step]:
        """Every step of the study, in the priority order: the teacher's answers (and the training traces, when the
        study makes them), the anchors' scorings, then each row's extraction, training per seed, scorings and curve."""
        steps = self.data_steps()
        needs_data = [TRAIN_TRACES] if self.cfg.data.train_traces is not None else []
        extractions: dict[str, str] = {}  # step id -> "extract" or "rebuild", for the check that they differ
        steps_n = self.steps_n()
        for row in self.cfg.rows:
            for k, label in enumerate(row.labels()):
                steps += self.row_steps(row, k, label, needs_data, extractions, steps_n)
        return steps

    def data_steps(self) -> list[Step]:
        """The steps every row needs: the teacher's answers to the reported rows, to each answer set, to the
        training items (data.train_traces) and the tuning rows (learning curves), and the anchors' scorings."""
        cfg, steps = self.cfg, []
        steps.append(Step("answers", [], lambda: os.path.isfile(self.answers), self.run_answers,
                          {"kind": "answers"}, stage="answers"))
        for name, aset in cfg.scoring.answer_sets.items():
            steps.append(Step(f"answers-{name}", [], lambda name=name: os.path.isfile(self.set_answers(name)),
                              lambda name=name: self.run_answer_set(name),
                              {"kind": "answers", "n": aset.rows[1] - aset.rows[0],
                               "new": aset.max_new_tokens or cfg.scoring.max_new_tokens}, stage="answers", target=name))
        if cfg.data.train_traces is not None:
            tr = cfg.data.train_traces
            trained = [lab for r in cfg.rows if r.kind != "oracle" for lab in r.labels()]
            # made, or needed by nothing left (every row's kept results exist: a fresh clone skips it)
            steps.append(Step(TRAIN_TRACES, [], lambda: os.path.isfile(self.train_data) or all(
                self.trained(lab) for lab in trained), self.run_train_traces,
                              {"kind": "answers", "n": tr.rows[1] - tr.rows[0],
                               "new": tr.max_new_tokens or cfg.scoring.max_new_tokens}, stage="answers"))
        if cfg.scoring.curve_every:
            steps.append(Step("tuning-answers", [], lambda: os.path.isfile(self.tuning_answers),
                              lambda: self.run_answers(tuning=True), {"kind": "answers"}, stage="answers"))
        targets = self.target_dirs()
        steps += [self.score_step(t, "anchors", None) for t in targets]
        if "acc" in targets:  # the teacher's graded answers (made with its answers when the study generates them)
            steps.append(Step("score/acc/teacher", ["answers"], lambda: self.scored("acc", "teacher"),
                              lambda: self.run_score("acc", "teacher", None),
                              {"kind": "score", "target": "acc", "row": None}, stage="score", label="teacher",
                              target="acc"))
        return steps

    def row_steps(self, row: Row, k: int, label: str, needs_data: list[str], extractions: dict[str, str],
                  steps_n: int) -> list[Step]:
        """Seed ``k`` (``label``) of ``row``: its extraction when no row before made it (and a rebuilt bank), its
        training, its scorings and its learning curve; an oracle row's scoring alone."""
        steps, deps = [], list(needs_data)
        own = f"extract/{os.path.basename(self.extraction(row.layers, extract=self.row_extract(row)))}" \
            if row.layers else None
        if row.layers and row.kind != "oracle":
            _refuse_shared(own, extractions, "extract", row.name)
            if own not in extractions:
                extractions[own] = "extract"
                steps.append(Step(own, list(needs_data), self.extraction_done(row.layers, extract=row.extract),
                                  self.run_extract(row.layers, row.extract),
                                  {"kind": "extract", "layers": row.layers, "options": row.extract}, stage="extract"))
            deps.append(own)
        if row.rebuild:
            rebuilt = f"extract/{os.path.basename(self.extraction(row.layers, row.rebuild, row.extract))}"
            _refuse_shared(rebuilt, extractions, "rebuild", row.name)
            if rebuilt not in extractions:
                extractions[rebuilt] = "rebuild"
                steps.append(Step(rebuilt, list(deps), self.extraction_done(row.layers, row.rebuild, row.extract),
                                  self.run_rebuild(row), {"kind": "rebuild"}, stage="extract"))
            deps = [rebuilt]
        if row.kind == "oracle":  # it reads the extraction of its layer set (which its plug-in row built)
            plugin = self.cfg.row(row.plugin_of).labels()[0]
            return [Step(f"score/ce/{label}", ["answers", own, f"train/{plugin}"],
                         lambda: self.scored("ce", label), self.recorded("ce", label, self.run_oracle(row, plugin)),
                         {"kind": "oracle", "layers": row.layers}, stage="score", label=label, target="ce")]
        if row.kind == "toe_on_lora":
            deps.append(f"train/{self.cfg.row(row.adapter_of).labels()[k]}")
        steps.append(Step(f"train/{label}", deps, lambda: self.trained(label), self.run_train(row, k, label, steps_n),
                          {"kind": "train", "row": row, "steps": steps_n}, stage="train", label=label))
        steps += [self.score_step(t, label, row) for t in self.target_dirs()]
        if self.cfg.scoring.curves(row, k):
            steps.append(Step(f"curve/{label}", ["tuning-answers", f"train/{label}"],
                              lambda: os.path.isfile(os.path.join(self.out, "curve", label, "curve.json")),
                              self.recorded("curve", label, lambda: self.run_curve(label, row)), {"kind": "curve"},
                              stage="curve", label=label))
        return steps

    def score_step(self, target: str, label: str, row: Row | None) -> Step:
        deps = (["answers"] if target in ("ce", "acc") else [f"answers-{target}"]
                if target in self.cfg.scoring.answer_sets else []) + ([f"train/{label}"] if row else [])
        return Step(f"score/{target}/{label}", deps, lambda: self.scored(target, label),
                    self.recorded(target, label, lambda: self.run_score(target, label, row)),
                    {"kind": "score", "target": target, "row": row}, stage="score", label=label, target=target)

    def recorded(self, target: str, label: str, run: Callable[[], None]) -> Callable[[], None]:
        """``run`` (a scoring of ``label`` on ``target``), then the record of what it scored (:meth:`record_inputs`)."""
        def run_and_record() -> None:
            run()
            self.record_inputs(target, label)
        return run_and_record

    # -- done markers ------------------------------------------------------------------------------------------
    def scored(self, target: str, label: str) -> bool:
        return os.path.isfile(os.path.join(self.out, target, label, "metrics.json"))

    def run_dir(self, label: str) -> str:
        """A training's own folder: under the study's name, so studies sharing a work folder (and its extractions)
        never adopt each other's runs."""
        return os.path.join(self.work, "train", self.cfg.name, label)

    def trained(self, label: str) -> bool:
        kept = os.path.join(self.out, "train", label)
        return run_summary(kept) is not None

    def extraction_done(self, layers: list[int], rebuild: dict | None = None,
                        extract: dict | None = None) -> Callable[[], bool]:
        path = self.extraction(layers, rebuild, extract)
        extract = extract or {}

        def done() -> bool:
            # trained rows whose kept results exist need no extraction: a fresh machine skips it
            users = [lab for r in self.cfg.rows if r.layers == layers and r.kind != "oracle" and r.extract == extract
                     and (not rebuild or r.rebuild == rebuild) for lab in r.labels()]
            oracles = [r for r in self.cfg.rows if r.kind == "oracle" and r.layers == layers and not rebuild
                       and self.row_extract(r) == extract]
            return os.path.isfile(os.path.join(path, "summary.json")) or (
                all(self.trained(u) for u in users) and all(self.scored("ce", r.labels()[0]) for r in oracles))

        return done

    def selected_steps(self, rows: list[str] | None = None, targets: list[str] | None = None,
                       seeds: list[int] | None = None) -> list[Step]:
        """The steps of ``rows`` (and what they need; default every row, in the config's order) scoring ``targets``
        (default all), for the seeds ``seeds`` of each row (default all). Given rows run in the order given, each
        with its seeds in turn."""
        steps = self.steps()
        if targets is not None:  # the other targets' scorings (and an answer set's generation) wait for a later run
            steps = [s for s in steps if s.target is None or s.target in targets]
        if seeds is not None:  # the other seeds' training and scoring wait for a later run
            other = {label for r in self.cfg.rows for k, label in enumerate(r.labels()) if k not in seeds}
            steps = [s for s in steps if s.label not in other]
        if rows is not None:  # those rows' steps and what they need
            labels = {label for r in rows for label in self.cfg.row(r).labels()}
            keep = {s.id for s in steps if s.label in ("anchors", "teacher") or s.label in labels}  # tables' ends
            while True:
                more = {d for s in steps if s.id in keep for d in s.deps} - keep
                if not more:
                    break
                keep |= more
            steps = [s for s in steps if s.id in keep]
            # the rows' order as given is the priority (what the study shares runs first)
            rank = {label: i for i, r in enumerate(rows) for label in self.cfg.row(r).labels()}
            order = {s.id: i for i, s in enumerate(steps)}
            steps.sort(key=lambda s: (rank.get(s.label, -1), order[s.id]))
        return steps

    def lock_folder(self, step: Step) -> str:
        """Where ``step``'s lock lives: an extraction may be shared by studies with one work folder, so its lock
        lives there; every other step's in the study folder."""
        return self.work if step.stage == "extract" else self.out

    def run(self, render: Callable[[], None], poll_s: float = 10.0, rows: list[str] | None = None,
            targets: list[str] | None = None, seeds: list[int] | None = None) -> dict:
        """Runs the steps of ``rows`` scoring ``targets`` for ``seeds`` (default all), rendering after every
        scoring."""
        times = os.path.join(self.out, TIMES)
        made = {"ran": [], "waited": False}
        selected = self.selected_steps(rows, targets, seeds)
        needed = any(TRAIN_TRACES in s.deps and not s.done() for s in selected)  # by a pending step, or not made
        if needed and any(s.id == TRAIN_TRACES and not s.done() for s in selected):
            # the training data first: the rows' step counts (an epochs budget) are the traces kept
            made = run_steps([s for s in selected if s.id == TRAIN_TRACES], self.lock_folder, render, poll_s,
                             times=times)
            selected = self.selected_steps(rows, targets, seeds)  # planned again from the traces kept
        steps = [s for s in selected if s.id != TRAIN_TRACES or needed]
        result = run_steps(steps, self.lock_folder, render, poll_s, times=times)
        return {"ran": made["ran"] + result["ran"], "waited": made["waited"] or result["waited"]}


def _refuse_shared(step_id: str, made: dict[str, str], kind: str, row: str) -> None:
    """A row's extraction and another row's rebuilt bank must not be one folder (their options name it alike)."""
    if made.get(step_id, kind) != kind:
        raise ToEError(f"rows.{row}: its extraction {step_id.split('/', 1)[1]} is also another row's rebuilt bank "
                       "(extract and rebuild options name folders alike): give one of the rows other options")


def study(file: str, out: str, dry_run: bool = False, rows: list[str] | None = None,
          targets: list[str] | None = None, seeds: list[int] | None = None, render_only: bool = False,
          poll_s: float = 10.0) -> dict:
    """Plans, runs (resuming) and renders a study: toe study CONFIG.yaml --out DIR.

    Args:
        file: the study's YAML config, the first argument (or ``--file``; see ``studies/toy.yaml``;
            :mod:`tree_of_experts.recipes.study_config` documents every key).
        out: the study folder (results, small files; committed) — rerunning into it continues the study.
        dry_run: print the plan (every step with its status, estimated time and disk) and stop; nothing loads.
        rows: run only these rows (and the steps they need), in the order given (the first row's steps first);
            default: every row, in the config's order.
        targets: score only these targets now (``ce``, ``acc``, a ``scoring.ce_files`` or a
            ``scoring.answer_sets`` name: an answer set's answers are made only when it is a target); the others
            stay pending for a later run. Default: every target.
        seeds: train and score only these seeds (0 is a row's first) of every row now, e.g. ``--seeds 0`` for a
            first pass over all rows before any repeat; the others stay pending. Default: every seed.
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
    known = s.target_dirs()
    targets = [TARGET_DIRS.get(t, t) for t in targets] if targets is not None else None  # `accuracy` is `acc`
    if any(t not in known for t in targets or []):
        raise ToEError(f"--targets {targets}: this study scores {', '.join(known)}")
    most = max(r.seeds for r in cfg.rows)
    if seeds is not None and (not seeds or any(isinstance(k, bool) or not 0 <= k < most for k in seeds)):
        raise ToEError(f"--seeds {seeds}: give seed numbers from 0 to {most - 1} (the rows' seeds: "
                       f"{', '.join(f'{r.name} {r.seeds}' for r in cfg.rows)})")
    os.makedirs(s.out, exist_ok=True)
    if render_only:
        return {**render(s), "ran": [], "waited": False}
    s.check_inputs()
    if dry_run:  # the steps this call would run (with --rows/--targets: those only)
        return plan(s, s.selected_steps(rows, targets, seeds))
    atomic_write_json(os.path.join(s.out, "study.json"), {"config": os.path.abspath(file), "name": cfg.name})
    result = s.run(lambda: render(s), poll_s, rows, targets, seeds)
    summary = render(s)
    return {**summary, **result}


def load(file: str, out: str) -> Study:
    """The study of ``file`` in the folder ``out`` (for rendering or inspection without running)."""
    return Study(load_study(file), out)
