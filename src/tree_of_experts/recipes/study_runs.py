"""What each step of a study runs: the teacher's answers, an extraction or rebuild, one training (kept with the
study's results), one scoring, an oracle, a learning curve — each a call of the package's own commands with the
study's pair, data and budget. :class:`tree_of_experts.recipes.study.Study` inherits them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable

from ..data import file_hash
from ..errors import ToEError
from ..files import atomic_write_json, atomic_write_text, read_json
from ..folders import SUMMARIES, check_same_build, run_summary
from .study_config import Row

log = logging.getLogger(__name__)
BUDGET_OPTIONS = {"max_disk", "state_tokens", "cache_low_states"}  # extract options that change the disk alone
KEPT = ("metrics.jsonl", "curves.png", *SUMMARIES, "train_args.json",
        "baseline_args.json", "toe_config.json", "toe_model.safetensors", "adapter_config.json",
        "adapter_model.safetensors", "README.md")


class StudyRuns:
    """The steps' work, for a :class:`tree_of_experts.recipes.study.Study` (its paths, config and folders)."""

    # -- what each step runs -------------------------------------------------------------------------------------
    def common(self) -> dict:
        d = self.cfg.data
        fields = {k: v for k, v in (("prompt_field", d.train_prompt_field()),
                                    ("response_field", d.train_response_field())) if v}
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
                     teacher_device_map=self.cfg.pair.teacher_device_map,
                     eval_out=None if tuning else os.path.join(self.out, "acc", "teacher"), resume=True,
                     overwrite=True)
        if got["kept"] < got["generated"]:
            raise ToEError(f"the teacher answered {got['kept']} of {got['generated']} items (the others were "
                           f"empty; {100 * got['truncated_share']:.0f} % cut at scoring.max_new_tokens "
                           f"{self.cfg.scoring.max_new_tokens}): raise it, or give data.answers / data.tuning_answers")
        os.replace(tmp, target)

    def run_train_traces(self) -> None:
        """The training data (data.train_traces): the teacher's greedy traces of the asked rows, graded, the correct
        ones kept (all with keep_incorrect), shortest first; resumed batch by batch after a kill."""
        from ..commands.evaluate import traces

        tr = self.cfg.data.train_traces
        tmp = self.train_data + ".partial"
        got = traces(teacher=self.teacher, data=self.resolve(tr.items, "data.train_traces.items"), out=tmp,
                     task=tr.task, skip=tr.rows[0], limit=tr.rows[1] - tr.rows[0], template=self.cfg.pair.template,
                     max_new_tokens=tr.max_new_tokens or self.cfg.scoring.max_new_tokens,
                     batch_size=self.cfg.scoring.answer_batch_size, dtype=self.cfg.pair.dtype,
                     keep_incorrect=tr.keep_incorrect, teacher_device_map=self.cfg.pair.teacher_device_map,
                     resume=True, overwrite=True)
        if not tr.keep_incorrect:  # a trace cut at the token cap is not a worked solution, whatever number it ends on
            rows = [json.loads(line) for line in open(tmp)]
            whole = [r for r in rows if not r.get("truncated")]
            if len(whole) < len(rows):
                log.info("train-traces: %d correct traces were cut at max_new_tokens: left out", len(rows) - len(whole))
                atomic_write_text(tmp, "".join(json.dumps(r) + "\n" for r in whole))
            got = {**got, "kept": len(whole)}
        if got["kept"] < self.cfg.budget.batch_size:
            why = "empty" if tr.keep_incorrect else "wrong or empty"
            raise ToEError(f"the teacher's traces kept {got['kept']} of {got['generated']} rows (the others were {why}"
                           f"{'' if tr.keep_incorrect else ', or cut at the token cap'}), "
                           f"fewer than budget.batch_size {self.cfg.budget.batch_size}: give more "
                           "data.train_traces.rows or a higher max_new_tokens" +
                           ("" if tr.keep_incorrect else ", or keep_incorrect: true"))
        atomic_write_json(self.train_data + ".json", self.traces_settings())  # what made them (checked on reruns)
        os.replace(tmp, self.train_data)

    def traces_settings(self) -> dict:
        """What the training traces are made of: an edited data.train_traces must not keep the old file."""
        tr = self.cfg.data.train_traces
        # as the config names them (not resolved: a study folder moved to another machine keeps its traces)
        return {"teacher": self.cfg.pair.teacher, "template": self.cfg.pair.template, "items": tr.items,
                "rows": tr.rows, "task": tr.task, "keep_incorrect": tr.keep_incorrect,
                "max_new_tokens": tr.max_new_tokens or self.cfg.scoring.max_new_tokens}

    def run_answer_set(self, name: str) -> None:
        """The teacher's greedy answers (all kept) to the rows of the answer set ``name``: its CE target."""
        from ..commands.evaluate import traces

        aset, target = self.cfg.scoring.answer_sets[name], self.set_answers(name)
        cap = aset.max_new_tokens or self.cfg.scoring.max_new_tokens
        tmp = target + ".partial"
        got = traces(teacher=self.teacher, data=self.resolve(aset.items, f"scoring.answer_sets.{name}.items"),
                     out=tmp, task=aset.task, skip=aset.rows[0], limit=aset.rows[1] - aset.rows[0],
                     template=self.cfg.pair.template, max_new_tokens=cap,
                     batch_size=self.cfg.scoring.answer_batch_size, dtype=self.cfg.pair.dtype, keep_incorrect=True,
                     teacher_device_map=self.cfg.pair.teacher_device_map,
                     eval_out=os.path.join(self.out, f"answers-{name}-graded"), resume=True, overwrite=True)
        if got["kept"] < got["generated"]:
            raise ToEError(f"answers-{name}: the teacher answered {got['kept']} of {got['generated']} items (the "
                           f"others were empty): raise scoring.answer_sets.{name}.max_new_tokens ({cap})")
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
                       if d.startswith("step-") and d.split("-")[1].isdigit())  # (not a snapshot cut short)
        final = self.steps_n()
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

    def run_extract(self, layers: list[int], options: dict | None = None) -> Callable[[], None]:
        def run() -> None:
            from ..commands.extract import extract

            source = self.capture_source(layers, options)
            if source:
                log.info("study: %s samples the capture of %s (its budget alone differs): the teacher does not run "
                         "again", os.path.basename(self.extraction(layers, extract=options)), source)
            extract(teacher=self.teacher, base=self.base, data=self.train_data,
                    out=self.extraction(layers, extract=options), layers=layers, dtype=self.cfg.pair.dtype,
                    teacher_device_map=None if source else self.cfg.pair.teacher_device_map,
                    **self.common(), **{**self.cfg.extract, **(options or {})},
                    **({"reuse_capture": source} if source else {}))
        return run

    def capture_source(self, layers: list[int], options: dict | None) -> str | None:
        """The layer set's shared extraction, where a row's own ``extract`` options only bound the disk and that one
        is finished with every example's states: the budget samples its shards (`toe extract --reuse_capture`: the
        sample and token fields a capture of its own would write, the states up to fp16 rounding) instead of running
        the teacher again. None otherwise (the row captures its own: which way it went, its summary's
        ``capture.reused_from`` says)."""
        from ..extraction.store import Extraction

        if not options or not set(options) <= BUDGET_OPTIONS or "reuse_capture" in self.cfg.extract:
            return None
        shared = Extraction(self.extraction(layers))
        if not (shared.has("build.json") and shared.state_examples() is None):
            return None
        run = shared.run()  # a shared extraction left from another config (its step is done, so never rerun)
        now = {"teacher": self.teacher, "base": self.base, "data_sha256": file_hash(self.train_data),
               "max_length": self.cfg.data.max_length}
        stale = sorted(k for k, v in now.items() if run.get(k) != v)
        if stale:
            log.info("study: %s was captured with another %s: the budgeted extraction captures its own",
                     shared.folder, ", ".join(stale))
            return None
        return shared.folder

    def reuses_capture(self, layers: list[int], options: dict | None) -> bool:
        """Whether an extraction step samples the shared capture: as its finished summary records it, or, pending,
        as :meth:`capture_source` would decide now (the plan's estimate and calibration tell the two apart)."""
        from ..extraction.store import SUMMARY, Extraction

        own = Extraction(self.extraction(layers, extract=options))
        if own.has(SUMMARY):
            return bool(own.summary().get("capture", {}).get("reused_from"))
        return self.capture_source(layers, options) is not None

    def run_rebuild(self, row: Row) -> Callable[[], None]:
        def run() -> None:
            from ..commands.extract import rebuild

            out = self.extraction(row.layers, row.rebuild, row.extract)
            rebuild(source=self.extraction(row.layers, extract=row.extract), out=out, dtype=self.cfg.pair.dtype,
                    overwrite=os.path.isdir(out), **row.rebuild)
        return run

    def run_train(self, row: Row, seed: int, label: str, steps_n: int) -> Callable[[], None]:
        def run() -> None:
            from ..commands.train import train
            from ..recipes.baseline import baseline

            out = self.run_dir(label)
            kept = os.path.join(self.out, "train", label)
            experts = self.extraction(row.layers, row.rebuild, row.extract) if row.layers else None
            if experts and row.kind != "control":  # not a finished run of an earlier build of the extraction
                check_same_build(out, experts, f"delete it (and {kept}) to train it again", finished_ok=True)
            if not run_summary(out):
                marker = any(os.path.isfile(os.path.join(out, f)) for f in ("train_args.json", "baseline_args.json"))
                kw = dict(base=self.base, data=self.train_data, out=out, max_steps=steps_n, seed=seed,
                          snapshot_every=self.cfg.scoring.curve_every if self.cfg.scoring.curves(row, seed) else 0,
                          batch_size=self.cfg.budget.batch_size, dtype=self.cfg.pair.dtype, resume=marker,
                          overwrite=not marker and os.path.isdir(out), **self.common())
                if row.objective == "on_policy":
                    kw.update(objective="on_policy", teacher=self.teacher,
                              teacher_device_map=self.cfg.pair.teacher_device_map)
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
                if os.path.isfile(os.path.join(out, f)) and f not in SUMMARIES:
                    shutil.copy2(os.path.join(out, f), os.path.join(kept, f))
            if row.kind != "lora":  # the bank's geometry before -> after training (did the leaves specialise?)
                from ..commands.hub import inspect

                atomic_write_json(os.path.join(kept, "inspect.json"), inspect(out))
            for f in SUMMARIES:
                if os.path.isfile(os.path.join(out, f)):
                    shutil.copy2(os.path.join(out, f), os.path.join(kept, f))
        return run

    def system_dir(self, label: str) -> str:
        """A trained row's weights: the run folder, else (a fresh machine) the kept copy."""
        run = self.run_dir(label)
        return run if run_summary(run) else os.path.join(self.out, "train", label)

    def run_score(self, target: str, label: str, row: Row | None) -> None:
        from ..commands.evaluate import evaluate

        out = os.path.join(self.out, target, label)
        again = os.path.isfile(os.path.join(out, "generations.partial.jsonl"))
        kw: dict = dict(base=self.base, out=out, batch_size=self.cfg.scoring.batch_size, dtype=self.cfg.pair.dtype,
                        resume=again, overwrite=not again)
        if label == "teacher":
            kw.update(with_base=False, teacher=self.teacher, teacher_device_map=self.cfg.pair.teacher_device_map)
        elif row is None:
            gap = target == "ce" or target in self.cfg.scoring.answer_sets  # the teacher's own answers: its CE too
            kw.update(with_base=True, teacher=self.teacher if gap else None,
                      teacher_device_map=self.cfg.pair.teacher_device_map if gap else None)
        else:
            kw["lora" if row.kind == "lora" else "plugin"] = self.system_dir(label)
            kw["with_base"] = False
        kw["data"] = self.target_data(target)
        if target == "ce":
            kw.update(template=self.cfg.pair.template, ce_target="trace", accuracy=False, task=self.cfg.data.task)
        elif target in self.cfg.scoring.answer_sets:
            kw.update(template=self.cfg.pair.template, ce_target="trace", accuracy=False,
                      task=self.cfg.scoring.answer_sets[target].task)
        elif target == "acc":
            kw.update(skip=self.skip, limit=self.n, template=self.cfg.pair.template, ce=False,
                      max_new_tokens=self.cfg.scoring.max_new_tokens, task=self.cfg.data.task)
        else:
            kw.update(task="code", template="{prompt}", accuracy=False, ce_target="gold")
        evaluate(**kw)

    def run_oracle(self, row: Row, plugin: str) -> Callable[[], None]:
        def run() -> None:
            from ..commands.oracle import oracle

            oracle(teacher=self.teacher, base=self.base,
                   experts=self.extraction(row.layers, extract=self.row_extract(row)),
                   data=self.answers,
                   plugin=self.system_dir(plugin), template=self.cfg.pair.template, ce_target="trace",
                   dtype=self.cfg.pair.dtype, out=os.path.join(self.out, "ce", row.labels()[0]), overwrite=True,
                   **{"batch_size": 1, "lambdas": [0.25], **row.options})
        return run


def _baseline_options(options: dict) -> dict:
    """The options of the study's `train` group that `toe baseline` takes (the group also serves the control, whose
    command lacks some plug-in-only options)."""
    from ..options import option_names
    from .baseline import baseline

    return {k: v for k, v in options.items() if k in option_names(baseline)}
