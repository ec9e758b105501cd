"""What `toe study` checks before anything runs: the files it reads, the answer sets, and kept runs that no
longer match the config (a mixin of :class:`.study.Study`)."""

from __future__ import annotations

import os

from ..errors import ToEError
from ..files import read_json
from ..folders import check_same_build


class StudyChecks:
    """The checks of a :class:`.study.Study` (its paths, config and steps are the study's own)."""

    def check_inputs(self) -> None:
        """Files the study reads exist and hold enough rows, before any model loads."""
        from ..data import read_rows

        pending = {s.id for s in self.steps() if not s.done()}
        tr = self.cfg.data.train_traces
        train = ("data.train_traces.items", self.resolve(tr.items, "data.train_traces.items")) if tr is not None \
            else ("data.train", self.train_data)
        for name, path in (train, ("data.items", self.items),
                           *((f"scoring.ce_files.{k}", self.resolve(v)) for k, v in self.cfg.scoring.ce_files.items()
                             if any(p.startswith(f"score/{k}/") for p in pending))):
            if not path.startswith("hf:") and not os.path.exists(path):
                raise ToEError(f"{name}: {path} not found: fix the path in the study config")
        self.check_kept_runs()
        for name in self.cfg.scoring.answer_sets:
            if any(p.startswith(f"score/{name}/") or p == f"answers-{name}" for p in pending):
                self.check_answer_set(name)
        if tr is not None and "train-traces" in pending:
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
            if not os.path.isfile(self.set_answers(name)):
                raise ToEError(f"{where}.answers: {self.set_answers(name)} not found: fix the path, or leave it "
                               "out to generate them")
            field = TASK_FIELDS[aset.task][0]
            want = sorted(str(r.get(field)) for r in items[aset.rows[0]:aset.rows[1]])
            if sorted(str(r.get(field)) for r in read_rows(self.set_answers(name))) != want:
                raise ToEError(f"{where}.answers {self.set_answers(name)} answers other items than rows {aset.rows} "
                               f"of {path}: give the teacher's answers to exactly those rows")

    def check_kept_runs(self) -> None:
        """A kept run trained with another budget or seed than the config now asks, or (for a row with its own
        ``extract`` options) on another extraction, is refused, not reused: an edited config would otherwise keep
        results it no longer describes."""
        tr = self.cfg.data.train_traces
        # before the study made its traces, an epochs budget's step count is not known: checked once they are made
        estimate = tr is not None and not os.path.isfile(self.train_data) and not self.cfg.budget.steps
        steps_n = None if estimate else self.cfg.budget.steps or self.cfg.budget.steps_for(self.n_train())
        for row in self.cfg.rows:
            for seed, label in enumerate(row.labels()) if row.kind != "oracle" else ():
                for name in ("train_args.json", "baseline_args.json"):
                    path = os.path.join(self.out, "train", label, name)
                    if not os.path.isfile(path):
                        continue
                    args = read_json(path, "delete the kept run to train it again")
                    want = {"max_steps": steps_n, "batch_size": self.cfg.budget.batch_size, "seed": seed}
                    if steps_n is None:
                        del want["max_steps"]
                    differ = [f"{k} {args.get(k)} (the config: {v})" for k, v in want.items()
                              if k in args and args[k] != v]
                    if differ:
                        raise ToEError(f"{os.path.dirname(path)} was trained with {', '.join(differ)}: rename the row "
                                       "(or use another --out) for the new budget, or delete that folder to redo it")
                    if row.layers and row.kind not in ("control", "lora"):  # not trained on an earlier build
                        check_same_build(os.path.dirname(path), self.extraction(row.layers, row.rebuild, row.extract),
                                         "rename the row (or use another --out), or delete that folder to redo it")
                    own = name == ("baseline_args.json" if row.kind in ("control", "lora") else "train_args.json")
                    want_ex = os.path.basename(self.extraction(row.layers, row.rebuild, row.extract)) \
                        if row.extract and row.layers else None
                    if own and want_ex and os.path.basename(str(args.get("experts"))) != want_ex:
                        raise ToEError(f"{os.path.dirname(path)} was trained on {args.get('experts')}, not the row's "
                                       f"extraction {want_ex}: rename the row (or use another --out) for the new "
                                       "extract options, or delete that folder to redo it")
