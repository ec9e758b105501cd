"""`toe study --dry_run`: every step with its status, estimated time and disk, before anything loads.

How the estimate is made (printed with the plan): the models' sizes come from their configs (no weights load); the
training data's token counts from the base's tokenizer over the first 200 rows; this machine's speed from a short
probe (an fp32 matrix product for FLOP/s, a tensor copy for memory bandwidth). A forward costs 2·P FLOPs per token
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
import time

import torch

from ..shapes import capture_bytes_per_token
from .steps import TIMES, recorded_times

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def probe(seconds: float = 0.3) -> dict:
    """This machine's fp32 matmul FLOP/s and memory bandwidth (bytes/s), measured now."""
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
    return {"flops": flops, "bandwidth": bandwidth, "threads": torch.get_num_threads()}


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


def plan(study, steps: list | None = None) -> dict:
    """The plan of ``study``: one line per step (done / to run; ``steps``, default every step of the study), its
    estimate, and the totals."""
    from ..hf.loading import load_config, load_tokenizer

    cfg = study.cfg
    speed = probe()
    base_cfg, teacher_cfg = load_config(study.base, "pair.base"), load_config(study.teacher, "pair.teacher")
    fb, ft = flops_per_token(base_cfg), flops_per_token(teacher_cfg)
    wbytes = DTYPE_BYTES[cfg.pair.dtype]
    n_rows, mean_len = _tokens(study, load_tokenizer(study.base))
    F, BW = speed["flops"], speed["bandwidth"]
    new, n = cfg.scoring.max_new_tokens, study.n

    def call_s(c) -> float:  # the fixed cost of one forward call
        return 0.010 + 0.002 * c.num_hidden_layers

    def decode_s(fpt: float, steps: int, batch: int, c=base_cfg) -> float:
        return steps * (max(fpt / 2 * wbytes / BW, batch * fpt / F) + call_s(c))

    def extraction_s(teacher_fpt: float, teacher_c, capture: bool = True) -> float:  # capture, the maps' training
        batches = -(-n_rows // cfg.extract.get("batch_size", 4))
        capture = capture * (n_rows * mean_len * (fb + teacher_fpt) / F + batches * (call_s(base_cfg)
                                                                                   + call_s(teacher_c)))
        epochs = cfg.extract.get("projector_epochs", 1)
        return capture + epochs * (n_rows * mean_len * 3 * fb / F + batches * 3 * call_s(base_cfg))

    lines = []
    everything = study.steps()  # every step's estimate: the finished ones calibrate whichever are planned
    chosen = [x.id for x in (everything if steps is None else steps)]
    for s in everything:
        w, sec, disk = s.work, 0.0, 0
        kind = w.get("kind")
        if kind == "answers":  # the reported rows' answers, or an answer set's (its own count and cap)
            n_a, new_a = w.get("n", n), w.get("new", new)
            sec = decode_s(ft, -(-n_a // cfg.scoring.answer_batch_size) * new_a, cfg.scoring.answer_batch_size,
                           teacher_cfg)
        elif kind == "extract":
            # a budget sampling the shared extraction's finished capture builds alone (StudyRuns.capture_source)
            w["reused"] = study.reuses_capture(w["layers"], w.get("options"))
            sec = extraction_s(ft, teacher_cfg, not w["reused"])
            k = len(w["layers"])
            disk = int(n_rows * mean_len * capture_bytes_per_token([base_cfg.hidden_size] * k,
                                                                   [teacher_cfg.hidden_size] * k, 32))
            budget = {**cfg.extract, **w.get("options", {})}.get("max_disk")
            if budget:  # the extraction keeps states for a sample that fits (its own --dry_run says which)
                from ..extraction.budget import parse_size

                disk = min(disk, parse_size(str(budget)))
        elif kind == "rebuild":  # clustering the cached signal anew: ~20 passes of token-to-leaf distances
            sec = n_rows * mean_len * base_cfg.hidden_size * 64 * 2 * 20 / F
        elif kind == "train":
            row, tokens = w["row"], w["steps"] * cfg.budget.batch_size * mean_len
            factor = 4 if (cfg.lora if row.kind == "lora" else cfg.train).get("gradient_checkpointing") else 3
            sec = tokens * fb * factor / F + w["steps"] * factor * call_s(base_cfg)
            if row.kind == "control":  # its own extraction, the base standing in for the teacher
                sec += extraction_s(fb, base_cfg)
            if row.objective == "on_policy":
                sample = cfg.train.get("sample_max_new_tokens", 256)
                sec += w["steps"] * (decode_s(fb, sample, cfg.budget.batch_size) / max(1, sample) * sample) \
                    + tokens * ft / F
            d = base_cfg.hidden_size
            params = (len(row.layers or []) * 64 * d * 3) if row.kind != "lora" else \
                row.rank * 2 * d * 7 * base_cfg.num_hidden_layers
            disk = params * 4 * 3
        elif kind == "score":
            t = w["target"]
            aset = cfg.scoring.answer_sets.get(t)
            n_s, new_s = (aset.rows[1] - aset.rows[0], aset.max_new_tokens or new) if aset else (n, new)
            sec = decode_s(fb, -(-n // cfg.scoring.batch_size) * new, cfg.scoring.batch_size) if t == "acc" else \
                (n_s * new_s / 2 * fb / F + -(-n_s // cfg.scoring.batch_size) * call_s(base_cfg)) * (
                    2 if w["row"] is None else 1)
            disk = 4096 * n_s
        elif kind == "curve":  # CE on the tuning rows of every snapshot and the final weights
            every = cfg.scoring.curve_every
            points = cfg.budget.steps_for(n_rows) // every + 1
            n_tuning = cfg.data.tuning[1] - cfg.data.tuning[0]
            sec = points * (n_tuning * new / 2 * fb / F + -(-n_tuning // cfg.scoring.batch_size) * call_s(base_cfg))
            disk = points * 4096 * n_tuning
        elif kind == "oracle":
            sec = n * new / 2 * (ft + 8 * fb) / F
        status = "done" if s.done() else "to run"
        lines.append({"step": s.id, "status": status, "seconds": sec, "disk_bytes": disk, "kind": _kind(s)})
    factors = calibrate(lines, recorded_times(os.path.join(study.out, TIMES)))
    by_id = {x["step"]: x for x in lines}
    lines = [by_id[i] for i in chosen]
    total_b = sum(x["disk_bytes"] for x in lines if x["status"] != "done")
    total_s = sum(x["seconds"] for x in lines if x["status"] != "done")
    calibrated = sum(x.get("calibrated_seconds", x["seconds"]) for x in lines if x["status"] != "done")
    by = "; ".join(f"{k} ×{f['factor']:.2g} ({f['steps']} step{'s' * (f['steps'] > 1)})" for k, f in factors.items())
    text = [f"plan of study {cfg.name} ({study.out}): {sum(x['status'] == 'done' for x in lines)} of {len(lines)} "
            f"steps done; to run: ~{_dur(total_s)} by the probe"
            + (f", ~{_dur(calibrated)} by this study's finished steps on this machine" if factors else "")
            + f"; ~{_size(total_b)} of disk",
            f"machine probe: {F / 1e9:.0f} GFLOP/s fp32 matmul on {speed['threads']} thread(s), {BW / 1e9:.1f} GB/s "
            f"copy; training data: {n_rows} rows, ~{mean_len:.0f} tokens each; reported items: {n}",
            *([f"measured / probe estimate, by kind of step: {by}"] if factors else []),
            "", f"{'step':<40} {'status':<8} {'estimate':>9} {'measured':>13} {'disk':>10}"]
    text += [f"{x['step']:<40} {x['status']:<8} {_dur(x['seconds']):>9} {_measured(x):>13} "
             f"{_size(x['disk_bytes']):>10}" for x in lines]
    text += ["", "estimates: " + " ".join((__doc__ or "").split("How the estimate is made (printed with the plan): ")[1]
                                         .split())]
    return {"summary": "\n".join(text), "steps": lines, "probe": speed, "total_seconds": total_s,
            "calibrated_seconds": calibrated, "calibration": factors, "total_disk_bytes": total_b,
            "out": os.path.abspath(study.out)}


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
            (f":{step.id.split('/')[-1]}" if work.get("row") is None else "")
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
