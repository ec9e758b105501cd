"""What `toe study` checks before anything runs: the files it reads, the answer sets, and kept runs that no
longer match the config (a mixin of :class:`.study.Study`)."""

from __future__ import annotations

import os

from ..data import file_hash
from ..errors import ToEError
from ..files import atomic_write_json, read_json
from ..folders import check_same_build, run_summary
from .steps import TRAIN_TRACES


INPUTS = "inputs.json"  # beside a score's metrics.json (a curve's curve.json): what it was made from
_SHA: dict[tuple, str] = {}


def _sha(path: str | None) -> str | None:
    """sha256 of a file (None when there is none), cached per (path, size, mtime): the runner asks often."""
    if not path or path.startswith("hf:") or not os.path.isfile(path):
        return None
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = file_hash(path)
    return _SHA[key]


def check_answers(where: str, path: str, items: list[dict], rows: list[int], field: str, of: str) -> None:
    """Given answers (a JSONL of the teacher's answers) exist and answer exactly ``rows`` [start, stop) of ``items``
    (compared by their question ``field``, which the answers keep)."""
    from ..data import read_rows

    if not os.path.isfile(path):
        raise ToEError(f"{where}: {path} not found: fix the path, or leave it out to generate them")
    want = sorted(str(r.get(field)) for r in items[rows[0]:rows[1]])
    if sorted(str(r.get(field)) for r in read_rows(path)) != want:
        raise ToEError(f"{where} {path} answers other items than rows {rows} of {of}: give the teacher's answers to "
                       "exactly those rows")


class StudyChecks:
    """The checks of a :class:`.study.Study` (its paths, config and steps are the study's own)."""

    def check_inputs(self) -> None:
        """Files the study reads exist and hold enough rows, before any model loads."""
        from ..data import read_rows
        from ..evaluation.tasks import TASK_FIELDS

        pending = [s for s in self.steps() if not s.done()]
        pending_targets = {s.target for s in pending}
        tr = self.cfg.data.train_traces
        train = ("data.train_traces.items", self.resolve(tr.items, "data.train_traces.items")) if tr is not None \
            else ("data.train", self.train_data)
        for name, path in (train, ("data.items", self.items),
                           *((f"scoring.ce_files.{k}", self.resolve(v)) for k, v in self.cfg.scoring.ce_files.items()
                             if k in pending_targets)):
            if not path.startswith("hf:") and not os.path.exists(path):
                raise ToEError(f"{name}: {path} not found: fix the path in the study config")
        self.check_kept_runs()
        self.check_scores_current()
        for name in self.cfg.scoring.answer_sets:
            if name in pending_targets:
                self.check_answer_set(name)
        if tr is not None and any(s.id == TRAIN_TRACES for s in pending):
            n = len(read_rows(train[1]))
            if tr.rows[1] > n:
                raise ToEError(f"data.train_traces.rows {tr.rows}: {train[1]} has {n} rows")
        made = self.train_data + ".json"
        if tr is not None and os.path.isfile(self.train_data) and os.path.isfile(made):
            was = read_json(made, "delete it and the traces beside it to make them again")
            changed = sorted(k for k, v in self.traces_settings().items() if was.get(k) != v)
            if changed:
                raise ToEError(f"{self.train_data} was made with another {', '.join(changed)} than data.train_traces "
                               "now asks: delete it (and its .json) to make the traces again, or use another --out")
        items = read_rows(self.items)
        if self.cfg.data.reported[1] > len(items):
            raise ToEError(f"data.reported {self.cfg.data.reported}: data.items {self.cfg.data.items} has {len(items)} "
                           f"rows: give a range within [0, {len(items)}]")
        field = TASK_FIELDS[self.cfg.data.task][0]  # the answers keep their items' fields
        if self.cfg.data.answers:
            check_answers("data.answers", self.answers, items, self.cfg.data.reported, field, "data.items")
        if self.cfg.data.tuning_answers and self.cfg.scoring.curve_every:  # (never generated into a given path)
            check_answers("data.tuning_answers", self.tuning_answers, items, self.cfg.data.tuning, field,
                          "data.items")
        for who, path in (("pair.base", self.base), ("pair.teacher", self.teacher)):
            from ..hf.loading import load_config

            cfg = load_config(path, who)
            for r in self.cfg.rows:
                bad = [x for x in r.layers or [] if who == "pair.base" and not 0 <= x < cfg.num_hidden_layers]
                if bad:
                    raise ToEError(f"rows.{r.name}.layers {bad}: the base has {cfg.num_hidden_layers} layers "
                                   f"(0-{cfg.num_hidden_layers - 1})")

    def check_answer_set(self, name: str) -> None:
        """An answer set's items exist and hold its rows; given answers answer exactly those rows."""
        from ..data import read_rows
        from ..evaluation.tasks import TASK_FIELDS

        aset, where = self.cfg.scoring.answer_sets[name], f"scoring.answer_sets.{name}"
        path = self.resolve(aset.items, f"{where}.items")
        if not path.startswith("hf:") and not os.path.exists(path):
            raise ToEError(f"{where}.items: {path} not found: fix the path in the study config")
        items = read_rows(path)
        if aset.rows[1] > len(items):
            raise ToEError(f"{where}.rows {aset.rows}: {path} has {len(items)} rows")
        if aset.answers:
            check_answers(f"{where}.answers", self.set_answers(name), items, aset.rows, TASK_FIELDS[aset.task][0],
                          path)

    def check_kept_runs(self) -> None:
        """A run trained with another budget or seed than the config now asks, or (for a row with its own
        ``extract`` options) on another extraction, is refused, not reused: its kept copy (OUT/train/ROW) and its
        training's own folder (WORK/train/STUDY/ROW, which a rerun would copy back) alike. An edited config would
        otherwise keep results it no longer describes."""
        tr = self.cfg.data.train_traces
        # before the study made its traces, an epochs budget's step count is not known: checked once they are made
        estimate = tr is not None and not os.path.isfile(self.train_data) and not self.cfg.budget.steps
        steps_n = None if estimate else self.steps_n()
        refused = []  # (its error, what is wrong, its folders): every one named at once, not one per rerun
        for row in self.cfg.rows:
            for seed, label in enumerate(row.labels()) if row.kind != "oracle" else ():
                folders = (os.path.join(self.out, "train", label), self.run_dir(label))
                redo = (f"rename the row for the new settings, or delete {' and '.join(folders)} (what exists of "
                        "them) to train it again")
                try:
                    for folder in folders:
                        self._check_kept_run(row, seed, folder, steps_n, redo)
                except ToEError as e:
                    if not str(e).endswith(redo):  # another kind of fault (a damaged file): its own message and fix
                        raise
                    refused.append((e, str(e).removesuffix(": " + redo), folders))
        if len(refused) == 1:
            raise refused[0][0]
        if refused:
            every = " ".join(f for _, _, folders in refused for f in folders)
            raise ToEError(f"{len(refused)} kept runs no longer fit the config ({'; '.join(x[1] for x in refused)}): "
                           f"rename their rows for the new settings, or delete what exists of {every} to train them "
                           "again")

    def _check_kept_run(self, row, seed: int, folder: str, steps_n: int | None, redo: str) -> None:
        own = "baseline_args.json" if row.kind in ("control", "lora") else "train_args.json"
        experts = self.extraction(row.layers, row.rebuild, row.extract) if row.layers else None
        for name in ("train_args.json", "baseline_args.json"):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            args = read_json(path, "delete the kept run to train it again")
            want = {"max_steps": steps_n, "batch_size": self.cfg.budget.batch_size, "seed": seed}
            differ = [f"{k} {args.get(k)} (the config: {v})" for k, v in want.items()
                      if k in args and v is not None and args[k] != v]
            if differ:
                raise ToEError(f"{folder} was trained with {', '.join(differ)}: {redo}")
            if experts and row.kind not in ("control", "lora"):
                check_same_build(folder, experts, redo, finished_ok=True)
            want_ex = os.path.basename(experts) if experts and row.extract else None
            if name == own and want_ex and os.path.basename(str(args.get("experts"))) != want_ex:
                raise ToEError(f"{folder} was trained on {args.get('experts')}, not the row's extraction "
                               f"{want_ex}: {redo}")

    # -- what a score was made from ----------------------------------------------------------------------------
    def score_inputs(self, target: str, label: str) -> dict:
        """What the score of ``label`` on ``target`` (``curve``: its learning curve) is made from: the kept training
        it scores (its summary, rewritten by every training) and the answers or items file it reads."""
        data = self.tuning_answers if target == "curve" else self.target_data(target)
        return {"training": _sha(run_summary(os.path.join(self.out, "train", label))), "data": _sha(data)}

    def record_inputs(self, target: str, label: str) -> None:
        """Keeps beside a finished score what it was made from (:meth:`check_scores_current` compares)."""
        atomic_write_json(os.path.join(self.out, target, label, INPUTS), self.score_inputs(target, label))

    def check_scores_current(self) -> None:
        """A finished score (or learning curve) made from another training or answers file than the study now holds
        is refused, not shown: a row trained again, or answers made again, would otherwise sit beside the old
        numbers. Scores from before the study recorded their inputs pass; a file that is gone is not compared."""
        def changed(key: str, was: str | None, now: str | None) -> bool:
            if not was:
                return False
            return key == "training" if now is None else now != was  # a training gone scores nothing any more

        stale = []
        for target in (*self.target_dirs(), "curve"):
            folder = os.path.join(self.out, target)
            for label in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                path = os.path.join(folder, label, INPUTS)
                if not os.path.isfile(path):
                    continue
                was = read_json(path, "delete its folder to score it again")
                if any(changed(k, was.get(k), v) for k, v in self.score_inputs(target, label).items()):
                    stale.append(os.path.join(folder, label))
        if stale:
            raise ToEError(f"{len(stale)} score(s) were made from another training or answers than the study now "
                           f"holds (e.g. {stale[0]}): delete {' '.join(stale[:6])}{' …' if len(stale) > 6 else ''} "
                           "to score them again")
