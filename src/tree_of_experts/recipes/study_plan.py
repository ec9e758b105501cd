"""`toe study --dry_run`: every step with its status, estimated time and disk, before anything loads.

How the estimate is made (printed with the plan): the models' sizes come from their configs (no weights load); the
training data's token counts from the base's tokenizer over the first 200 rows; this machine's speed from a short
probe (an fp32 matrix product for FLOP/s, a tensor copy for memory bandwidth; a probe beside other jobs reads low,
and the plan says so when the load average was at least half the CPUs). A forward costs 2·P FLOPs per token
(P: the weights' multiply-adds, embeddings' output projection included), a training step that backpropagates
through the frozen base ~3× a forward (4× with activation checkpointing), and a decode step the larger of reading
every weight once and 2·P·batch FLOPs; every forward call adds a fixed overhead (10 ms + 2 ms per layer: Python and
kernel launches, what dominates tiny models). An extraction is its capture (a base and a teacher forward per token)
and its fusion maps' training (``projector_epochs`` passes of training steps over the base); a control row adds its
own extraction with the base as the teacher. Real runs add what the probe cannot see (Python overhead, attention over long
contexts, other jobs on the machine): on the CPU they have run 1-3× these estimates, so once steps of a kind have
finished on this machine (``step-times.jsonl`` in the study folder records every run's wall time) the plan also
scales the pending steps of that kind by their measured / estimated ratio. Disk: an extraction's bytes
per token by the formula of :func:`tree_of_experts.shapes.capture_bytes_per_token`; checkpoints by the trained
parameters × 3 (weights and Adam's two moments).
"""

from __future__ import annotations

import os
import platform
import re
import time

import torch

from ..files import read_json_object
from ..shapes import capture_bytes_per_token
from ..training.checkpoint import RESUMED
from .steps import TIMES, recorded_times

CHECKPOINTS = [name for name in RESUMED if name.startswith("checkpoint")]  # in the order a resume takes them
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def probe(seconds: float = 0.3) -> dict:
    """This machine's fp32 matmul FLOP/s and memory bandwidth (bytes/s), measured now, and the load average (1 min)
    and CPU count it was measured under (other jobs make it read low)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows, nor where the system does not say
        load = None
    a = torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    flops = n * 2 * 512**3 / (time.perf_counter() - t0)
    x = torch.empty(16 * 2**20)  # 64 MB
    y = torch.empty_like(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        y.copy_(x)
        n += 1
    bandwidth = n * 2 * x.numel() * 4 / (time.perf_counter() - t0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # this process's
    return {"flops": flops, "bandwidth": bandwidth, "threads": torch.get_num_threads(), "load": load, "cpus": cpus}


def busy_note(speed: dict) -> str:
    """A note for the plan when the probe ran beside other work (a 1-min load average of at least half the CPUs):
    its speed reads low and its estimates long."""
    load, cpus = speed.get("load"), speed.get("cpus") or 1
    if load is None or load < cpus / 2:
        return ""
    return (f" (the machine was busy: load average {load:.1f} on {cpus} CPU(s), so the probe reads low and its "
            "estimates long; finished steps calibrate their kind)")


def flops_per_token(cfg) -> float:
    d, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) // cfg.num_attention_heads
    return 2.0 * (L * (2 * d * d + 2 * d * kv + 3 * d * i) + v * d)


def _tokens(study, tok) -> tuple[int, float]:
    """(rows, mean tokens per row) of the training data (first 200 rows, capped at max_length); before the study
    made its traces (data.train_traces), the rows it generates for, their gold solutions standing in for the traces."""
    from ..data import DataSpec, read_rows

    d = study.cfg.data
    tr = d.train_traces
    fields = {"prompt_field": d.train_prompt_field(), "response_field": d.train_response_field(),
              "template": study.cfg.pair.template}
    spec = DataSpec(**{k: v for k, v in fields.items() if v is not None}).for_tokenizer(tok)
    if tr is not None and not os.path.isfile(study.train_data):
        # before the traces exist: their prompts, each with a trace as long as its cap (an upper bound)
        rows = read_rows(study.resolve(tr.items, "data.train_traces.items"))[tr.rows[0]:tr.rows[1]]
        cap = tr.max_new_tokens or study.cfg.scoring.max_new_tokens
        lengths = [min(d.max_length, len(tok(spec.prompt(r))["input_ids"]) + cap) for r in rows[:200]]
    else:
        rows = read_rows(study.train_data)
        lengths = [min(d.max_length, len(tok(spec.prompt(r) + spec.response(r))["input_ids"])) for r in rows[:200]]
    return len(rows), sum(lengths) / max(1, len(lengths))


class Estimates:
    """Each kind of step's estimated seconds and disk bytes on this machine (the module's docstring says how)."""

    def __init__(self, study):
        from ..hf.loading import load_config, load_tokenizer

        self.study, self.cfg = study, study.cfg
        self.speed = probe()
        self.base, self.teacher = load_config(study.base, "pair.base"), load_config(study.teacher, "pair.teacher")
        self.fb, self.ft = flops_per_token(self.base), flops_per_token(self.teacher)
        self.wbytes = DTYPE_BYTES[self.cfg.pair.dtype]
        self.n_rows, self.mean_len = _tokens(study, load_tokenizer(study.base))
        self.F, self.BW = self.speed["flops"], self.speed["bandwidth"]
        self.new, self.n = self.cfg.scoring.max_new_tokens, study.n

    def of(self, step, **extra) -> tuple[float, int]:
        """(seconds, disk bytes) of ``step``, by its ``work["kind"]`` (a kind without an estimate: 0, 0); ``extra``
        adds to its work (``left``: the steps a resumed training has left)."""
        kind = step.work.get("kind")
        return getattr(self, kind)({**step.work, **extra}) if kind in ESTIMATED else (0.0, 0)

    # -- the costs every estimate is made of ----------------------------------------------------------------------
    @staticmethod
    def call_s(c) -> float:  # the fixed cost of one forward call
        return 0.010 + 0.002 * c.num_hidden_layers

    def decode_s(self, fpt: float, steps: int, batch: int, c=None) -> float:
        return steps * (max(fpt / 2 * self.wbytes / self.BW, batch * fpt / self.F) + self.call_s(c or self.base))

    def extraction_s(self, teacher_fpt: float, teacher_c, capture: bool = True) -> float:  # capture, maps' training
        batches = -(-self.n_rows // self.cfg.extract.get("batch_size", 4))
        tokens = self.n_rows * self.mean_len
        capture = capture * (tokens * (self.fb + teacher_fpt) / self.F
                             + batches * (self.call_s(self.base) + self.call_s(teacher_c)))
        epochs = self.cfg.extract.get("projector_epochs", 1)
        return capture + epochs * (tokens * 3 * self.fb / self.F + batches * 3 * self.call_s(self.base))

    def ce_s(self, n: int, new: int) -> float:  # a CE scoring: one forward over n items of ~new/2 answer tokens
        return n * new / 2 * self.fb / self.F + -(-n // self.cfg.scoring.batch_size) * self.call_s(self.base)

    # -- one method per kind of step ----------------------------------------------------------------------------
    def answers(self, w: dict) -> tuple[float, int]:
        """The teacher's answers to the reported rows, or an answer set's (its own count and cap)."""
        n, new, batch = w.get("n", self.n), w.get("new", self.new), self.cfg.scoring.answer_batch_size
        return self.decode_s(self.ft, -(-n // batch) * new, batch, self.teacher), 0

    def extract(self, w: dict) -> tuple[float, int]:
        # a budget sampling the shared extraction's finished capture builds alone (StudyRuns.capture_source)
        w["reused"] = self.study.reuses_capture(w["layers"], w.get("options"))
        k = len(w["layers"])
        disk = int(self.n_rows * self.mean_len * capture_bytes_per_token([self.base.hidden_size] * k,
                                                                        [self.teacher.hidden_size] * k, 32))
        budget = {**self.cfg.extract, **w.get("options", {})}.get("max_disk")
        if budget:  # the extraction keeps states for a sample that fits (its own --dry_run says which)
            from ..extraction.budget import parse_size

            disk = min(disk, parse_size(str(budget)))
        return self.extraction_s(self.ft, self.teacher, not w["reused"]), disk

    def rebuild(self, w: dict) -> tuple[float, int]:  # clustering the cached signal anew: ~20 passes to the leaves
        return self.n_rows * self.mean_len * self.base.hidden_size * 64 * 2 * 20 / self.F, 0

    def train(self, w: dict) -> tuple[float, int]:
        cfg, row, steps = self.cfg, w["row"], w.get("left", w["steps"])
        tokens = steps * cfg.budget.batch_size * self.mean_len
        options = {**(cfg.lora if row.kind == "lora" else cfg.train), **row.options}  # the row's own win
        factor = 4 if options.get("gradient_checkpointing") else 3
        sec = tokens * self.fb * factor / self.F + steps * factor * self.call_s(self.base)
        if row.kind == "control" and "left" not in w:  # its own extraction (the base standing in for the teacher),
            # made before its training's first checkpoint
            sec += self.extraction_s(self.fb, self.base)
        if row.objective == "on_policy":
            sample = cfg.train.get("sample_max_new_tokens", 256)
            sec += steps * self.decode_s(self.fb, sample, cfg.budget.batch_size) + tokens * self.ft / self.F
        d = self.base.hidden_size
        params = (len(row.layers or []) * 64 * d * 3) if row.kind != "lora" else \
            row.rank * 2 * d * 7 * self.base.num_hidden_layers
        return sec, params * 4 * 3

    def score(self, w: dict) -> tuple[float, int]:
        t, scoring = w["target"], self.cfg.scoring
        aset = scoring.answer_sets.get(t)
        n, new = (aset.rows[1] - aset.rows[0], aset.max_new_tokens or self.new) if aset else (self.n, self.new)
        if t == "acc":
            return self.decode_s(self.fb, -(-self.n // scoring.batch_size) * self.new, scoring.batch_size), 4096 * n
        return self.ce_s(n, new) * (2 if w["row"] is None else 1), 4096 * n  # the anchors: base and teacher

    def curve(self, w: dict) -> tuple[float, int]:  # CE on the tuning rows of every snapshot and the final weights
        points = self.cfg.budget.steps_for(self.n_rows) // self.cfg.scoring.curve_every + 1
        n_tuning = self.cfg.data.tuning[1] - self.cfg.data.tuning[0]
        return points * self.ce_s(n_tuning, self.new), points * 4096 * n_tuning

    def oracle(self, w: dict) -> tuple[float, int]:
        return self.n * self.new / 2 * (self.ft + 8 * self.fb) / self.F, 0


ESTIMATED = ("answers", "extract", "rebuild", "train", "score", "curve", "oracle")


def plan(study, steps: list | None = None) -> dict:
    """The plan of ``study``: one line per step (done / resumes / to run; ``steps``, default every step of the
    study), its estimate (of what is left of a training that resumes from its checkpoint), and the totals."""
    est = Estimates(study)
    everything = study.steps()  # every step's estimate: the finished ones calibrate whichever are planned
    chosen = [x.id for x in (everything if steps is None else steps)]
    lines = []
    for s in everything:
        done = s.done()
        at = resumes_at(study.run_dir(s.label)) if s.stage == "train" and not done else None
        # a killed training resumes from its checkpoint: the Stage-B steps it has left (its Stage A counts as none)
        left = {"left": max(0, min(s.work["steps"], at[1] - at[0]))} if at else {}
        sec, disk = est.of(s, **left)
        line = {"step": s.id, "status": "done" if done else "resumes" if at else "to run", "seconds": sec,
                "disk_bytes": disk, "kind": _kind(s), **({"at": at} if at else {})}
        lines.append(line)
    factors = calibrate(lines, recorded_times(os.path.join(study.out, TIMES)))
    by_id = {x["step"]: x for x in lines}
    lines = [by_id[i] for i in chosen]
    return {"summary": summary(study, est, lines, factors), "steps": lines, "probe": est.speed,
            "total_seconds": _total(lines, "seconds"), "calibrated_seconds": _total(lines, "calibrated_seconds"),
            "calibration": factors, "total_disk_bytes": _total(lines, "disk_bytes"),
            "out": os.path.abspath(study.out)}


def resumes_at(run_dir: str) -> tuple[int, int] | None:
    """(step, total steps) of the checkpoint a training in ``run_dir`` resumes from, or None where it has none. A
    checkpoint from before ``total_steps`` was kept takes it from the run's recorded arguments (a LoRA run has no
    Stage A)."""
    # a kill between a save's two renames leaves the newest whole one in checkpoint.tmp, the one before in .old
    found = (read_json_object(os.path.join(run_dir, name, "state.json")) for name in CHECKPOINTS)
    state = next((x for x in found if x and isinstance(x.get("step"), int)), None)
    if state is None:
        return None
    total = state.get("total_steps")
    for name in ("train_args.json", "baseline_args.json"):
        args = read_json_object(os.path.join(run_dir, name)) if total is None else None
        if args and isinstance(args.get("max_steps"), int):
            no_stage_a = args.get("kind") in ("lora", "sft", "static", "random") or args.get("skip_stage_a")
            total = args["max_steps"] + (0 if no_stage_a else args.get("stage_a_steps", 0))
    return (state["step"], total) if total else None


def _total(lines: list[dict], key: str) -> float:
    """The sum of ``key`` over the steps still to run (calibrated seconds: the probe's where a kind has none)."""
    return sum(x.get(key, x["seconds"]) for x in lines if x["status"] != "done")


def summary(study, est: Estimates, lines: list[dict], factors: dict) -> str:
    """The plan as text: the totals, the probe, the calibration, one line per step and how the estimate is made."""
    total_s, calibrated, total_b = (_total(lines, k) for k in ("seconds", "calibrated_seconds", "disk_bytes"))
    by = "; ".join(f"{k} ×{f['factor']:.2g} ({f['steps']} step{'s' * (f['steps'] > 1)})" for k, f in factors.items())
    text = [f"plan of study {study.cfg.name} ({study.out}): {sum(x['status'] == 'done' for x in lines)} of "
            f"{len(lines)} steps done; to run: ~{_dur(total_s)} by the probe"
            + (f", ~{_dur(calibrated)} by this study's finished steps on this machine" if factors else "")
            + f"; ~{_size(total_b)} of disk",
            f"machine probe: {est.F / 1e9:.0f} GFLOP/s fp32 matmul on {est.speed['threads']} thread(s), "
            f"{est.BW / 1e9:.1f} GB/s copy; training data: {est.n_rows} rows, ~{est.mean_len:.0f} tokens each; "
            f"reported items: {est.n}" + busy_note(est.speed),
            *([f"measured / probe estimate, by kind of step: {by}"] if factors else []),
            "", f"{'step':<40} {'status':<8} {'estimate':>9} {'measured':>13} {'disk':>10}"]
    text += [f"{_shown(x):<40} {x['status']:<8} {_dur(x['seconds']):>9} {_measured(x):>13} "
             f"{_size(x['disk_bytes']):>10}" for x in lines]
    if any("at" in x for x in lines):
        text += ["", "(at STEP/TOTAL): the step a killed training resumes from; a plug-in row's total counts its route "
                 "warm-up (train.stage_a_steps) before the budget's steps, as its log does"]
    how = " ".join((__doc__ or "").split("How the estimate is made (printed with the plan): ")[1].split())
    text += ["", "estimates: " + plain(how)]
    return "\n".join(text)


def plain(text: str) -> str:
    """``text`` with its reST markup as a terminal shows it: ``x`` and :func:`a.b.f` become `x` and `a.b.f`."""
    return re.sub(r":\w+:`([^`]+)`", r"`\1`", text).replace("``", "`")


def _kind(step) -> str:
    """The kind of step whose measured times calibrate each other's estimates: a training row by its kind and
    objective, a scoring by generation (accuracy) or a forward (CE), the anchors' and the teacher's scorings
    (other models than a row's) on their own."""
    work = step.work
    kind = work.get("kind", "other")
    if kind == "train":
        return f"train:{work['row'].kind}" + (":on_policy" if work["row"].objective == "on_policy" else "")
    if kind == "score":
        return ("score:acc" if work["target"] == "acc" else "score:ce") + \
            (f":{step.label}" if work.get("row") is None else "")
    if kind == "extract" and work.get("reused"):  # a build from another extraction's capture: no capture to time
        return "extract:reused"
    return kind


def calibrate(lines: list[dict], times: dict[str, dict]) -> dict[str, dict]:
    """Per kind of step, the measured over the estimated time of this study's finished steps run on this machine
    with this thread count (a step's runs summed: a resumed step counts whole); sets each pending step's
    ``calibrated_seconds`` and each finished one's ``measured_seconds``. Kinds with no finished step keep the
    probe's estimate."""
    here, threads, sums = platform.node(), torch.get_num_threads(), {}  # (a host or thread count of None: mixed)
    for x in lines:
        t = times.get(x["step"])
        if x["status"] == "done" and t and t.get("finished"):
            x["measured_seconds"] = t["seconds"]
            if t.get("host") == here and t.get("threads") == threads and x["seconds"] > 0:
                m, e, k = sums.get(x["kind"], (0.0, 0.0, 0))
                sums[x["kind"]] = (m + t["seconds"], e + x["seconds"], k + 1)
    factors = {k: {"factor": m / e, "steps": c} for k, (m, e, c) in sums.items()}
    for x in lines:
        if x["status"] != "done" and x["kind"] in factors:
            x["calibrated_seconds"] = x["seconds"] * factors[x["kind"]]["factor"]
    return factors


def _shown(x: dict) -> str:
    return x["step"] + (f" (at {x['at'][0]}/{x['at'][1]})" if "at" in x else "")


def _measured(x: dict) -> str:
    if "measured_seconds" in x:
        return _dur(x["measured_seconds"])
    return f"~{_dur(x['calibrated_seconds'])}" if "calibrated_seconds" in x else ""


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _size(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"
