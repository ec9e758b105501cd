"""One training loop for every trained system: a ToE plug-in, the no-teacher control and the other plug-in
baselines (`toe train`), and LoRA and SFT adapters (`toe baseline`).

The loop owns what must be identical for a comparison to be fair: the data order and the on-policy draws (functions
of (seed, step)), the batches (:func:`tree_of_experts.training.distill.step_batch`), the objective
(:func:`~tree_of_experts.training.distill.objective_loss`) and the state loss, the finite-loss guard, checkpoints and
``resume`` (bit-identical to an uninterrupted run), snapshots, metrics rows, progress and trackers. A
:class:`Student` says only what differs: which weights train, what runs around the forward (the plug-in's routing
mode, cached starting states) and its extra terms (the plug-in's route and usage losses, and its Stage-A warm-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import batch_indices
from ..errors import ToEError
from ..hf.layers import capture_layers, padded_inputs
from ..files import append_jsonl
from ..losses import state_loss
from ..options import Schedule
from .checkpoint import (has_checkpoint, keep_logged_rows, load_checkpoint, log_progress, logged_step, plot_curves,
                         save_checkpoint)
from .distill import OnPolicy, eos_ids, is_on_policy, objective_loss, scored_tail, step_batch, teacher_logits
from .steps import finite_loss, global_mean


def accelerator(mixed_precision: str = "no", report_to: str | None = None, out: str | None = None):
    """The run's accelerate ``Accelerator`` (CPU where no CUDA device is seen; trackers write to ``out/trackers``)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=report_to,
                       project_dir=os.path.join(out, "trackers") if report_to and out else None)


def check_batch(batch_size: int, accumulation: int, processes: int | None = None) -> None:
    """Refuses, in one line before any model loads, a batch that does not split evenly over the processes (default:
    accelerate's count for this launch) and then into ``accumulation`` micro-batches."""
    if processes is None:
        from accelerate import PartialState

        processes = PartialState().num_processes
    if batch_size % processes:
        raise ToEError(f"batch_size={batch_size} must divide evenly over {processes} processes")
    if accumulation < 1 or (batch_size // processes) % accumulation:
        raise ToEError(f"gradient_accumulation_steps={accumulation} must divide each process's "
                       f"{batch_size // processes} sequences per step into equal micro-batches: use a divisor of it")


def micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` split into ``n`` micro-batches of consecutive rows (the last may be smaller), each without the
    columns that are padding in all of its rows (positions come from the attention mask, so none moves)."""
    if n == 1:
        return [batch]
    rows = batch["input_ids"].shape[0]
    size = -(-rows // n)
    out = []
    for lo in range(0, rows, size):
        mb = {k: v[lo:lo + size] for k, v in batch.items()}
        first = int(mb["attention_mask"].any(0).nonzero()[0]) if mb["attention_mask"].any() else 0
        # time is axis 1, but axis 2 for the state targets (B, L, T, ...)
        out.append({k: v[:, :, first:] if k in ("state_target", "state_norm2") else v[:, first:]
                    for k, v in mb.items()})
    return out


def summed(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Loss parts of the micro-batches added up (each is normalised by the whole batch's tokens); None stays."""
    return {k: None if rows[0][k] is None else sum(r[k] for r in rows) for k in rows[0]}


def averaged(rows: list[dict]) -> dict:
    """The system's own metrics over the micro-batches: numbers and lists of numbers averaged."""
    if len(rows) == 1:
        return rows[0]
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, list):
            out[k] = [sum(r[k][i] for r in rows) / len(rows) for i in range(len(v))]
        elif isinstance(v, (int, float)):
            out[k] = sum(r[k] for r in rows) / len(rows)
        else:
            out[k] = v
    return out


class Student:
    """What one trained system adds to the shared loop. The defaults are an adapter's: the model's own trainable
    weights, nothing around the forward, no extra terms, no warm-up."""

    command = "toe baseline"  # names the progress bar and log lines
    what = "adapter"  # names the checkpoint's weights (and picks their file)
    warmup_steps = 0  # steps of :meth:`warmup_step` before the loop's own (a plug-in's Stage A)
    final_checkpoint = False  # also checkpoint the last step (a plug-in does; an adapter saves its weights instead)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model  # what the forward runs (and samples on-policy)
        self.optimizer = optimizer

    def trained(self) -> Mapping[str, torch.Tensor]:
        """The trained tensors by name (what a checkpoint holds)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Puts a checkpoint's ``weights`` back; another shape is a one-line error."""
        trained = self.trained()
        if {n: t.shape for n, t in weights.items()} != {n: p.shape for n, p in trained.items()}:
            raise ToEError("holds other trainable tensors than this run's (another --kind, rank or base?)")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(weights[name])

    def optimizer_at(self, step: int) -> torch.optim.Optimizer:
        """The optimizer that makes step ``step`` (0-based, warm-up included)."""
        return self.optimizer

    def stage(self, step: int) -> str:
        """The stage a checkpoint after ``step`` steps resumes into."""
        return "A" if step <= self.warmup_steps and self.warmup_steps else "B"

    def warmup_step(self, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of warm-up step ``step`` (0-based)."""
        raise NotImplementedError

    def recording(self) -> contextlib.AbstractContextManager:
        """What the forward and the loss run in, inside autocast (a plug-in records its routes for
        :meth:`regularise`)."""
        return contextlib.nullcontext()

    def sampling(self) -> contextlib.AbstractContextManager:
        """What on-policy sampling runs in (a plug-in samples with its inference routing)."""
        return contextlib.nullcontext()

    def forward_context(self, batch: dict, b_step: int, stack: contextlib.ExitStack) -> str:
        """Enters what the forward and the backward run in (routing mode, cached states) on ``stack``; returns
        the step's stage label."""
        return "B"

    def regularise(self, loss: torch.Tensor, b_step: int, g: torch.Generator, part: tuple[int, int] = (0, 1)
                   ) -> tuple[torch.Tensor, dict]:
        """``loss`` with the system's own terms added (called inside :meth:`recording`) and their metrics, for
        micro-batch ``part`` = (i, n) of the step (gradient accumulation): a term that does not depend on the batch
        is added once (in micro-batch 0), one that does 1/n in each."""
        return loss, {}

    def combine(self, extras: list[dict]) -> dict:
        """The step's metrics row entries from its micro-batches' :meth:`regularise` metrics (default: averaged)."""
        return averaged(extras)

    def state_model(self) -> torch.nn.Module:
        """The model whose decoder layers the state loss reads."""
        return self.model

    def snapshot(self, path: str) -> None:
        """Saves the trained weights as a loadable folder (a learning curve's point)."""
        from ..files import follow_umask

        self.model.save_pretrained(path)
        follow_umask(path)  # safetensors writes 0600 files


@dataclass
class StepObjective:
    """The step's loss settings, as the trained system resolved them."""

    on_policy: OnPolicy
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    state_loss_weight: float = 0.0
    state_layers: list[int] = field(default_factory=list)


class TrainLoop:
    """Runs ``student`` for ``schedule.max_steps`` steps (after its warm-up) on ``examples`` and writes
    ``out/metrics.jsonl``, ``out/checkpoint`` (and ``out/snapshots``, ``out/curves.png``)."""

    def __init__(self, student: Student, examples: list, tok, out: str, schedule: Schedule, objective: StepObjective,
                 accel, teacher: torch.nn.Module | None = None, report_to: str | None = None, accumulation: int = 1):
        self.student, self.examples, self.tok, self.out = student, examples, tok, out
        self.schedule, self.objective, self.accel, self.teacher = schedule, objective, accel, teacher
        self.report_to, self.accumulation = report_to, accumulation
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.total = student.warmup_steps + schedule.max_steps
        self.elapsed = 0.0  # seconds of training so far (a resumed run's include the earlier runs')
        # on-policy steps and the tokens sampled in them so far (this process), logged with every row as totals, so
        # a table reads them from the last row whatever log_every is; kept in the checkpoint like elapsed_s
        self.totals = {"on_policy_steps": 0, "sample_tokens_total": 0}

    def resume(self, resume: bool) -> int:
        """The step to start from: the checkpoint's with ``resume`` (its weights and optimizer put back), else 0
        (and an earlier metrics file removed)."""
        accel, s = self.accel, self.student
        if not (resume and has_checkpoint(self.out)):
            if accel.is_main_process and os.path.isfile(self.metrics_path):
                os.remove(self.metrics_path)
            return 0
        weights, opt_state, state = load_checkpoint(self.out, s.what)
        step, self.elapsed = state["step"], state.get("elapsed_s", 0.0)
        self.totals.update(state.get("totals") or self.rebuilt_totals(step))
        try:
            s.load(weights)
            s.optimizer_at(step - 1 if state.get("stage", "B") == "A" else s.warmup_steps).load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError, ToEError) as e:  # another shape, optimizer groups or stage
            raise ToEError(f"--resume: {self.out}/checkpoint does not fit this run ({str(e).splitlines()[0][:120]}): "
                           "start again with --overwrite true, or a new --out") from None
        if accel.is_main_process:
            keep_logged_rows(self.metrics_path, step)
        return step

    def rebuilt_totals(self, step: int) -> dict:
        """The totals of a checkpoint written before they were kept: the on-policy steps from the schedule (as
        ``samples`` is), the sampled tokens from the logged rows kept (exact when every step was logged)."""
        warmup, ratio, seed = self.student.warmup_steps, self.objective.on_policy.ratio, self.schedule.seed
        tokens = 0
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                tokens = sum(json.loads(r).get("sample_tokens") or 0 for r in f if logged_step(r) <= step)
        on = sum(is_on_policy(ratio, seed, i) for i in range(max(0, step - warmup))) if self.teacher is not None else 0
        return {"on_policy_steps": on, "sample_tokens_total": tokens}

    def start(self, resume: bool = False) -> int:
        """Prepares the model for the processes and, with ``resume``, puts the checkpoint back (a checkpoint that
        does not fit is refused here, before the caller writes anything); returns the step training starts from."""
        os.makedirs(self.out, exist_ok=True)
        self.wrapped = self.accel.prepare(self.student.model)  # DDP syncs only parameters that require grad
        self.first_step = self.resume(resume)
        return self.first_step

    def run(self) -> int:
        """Trains from :meth:`start`'s step to the end; returns the steps done."""
        accel, s, sched, obj = self.accel, self.student, self.schedule, self.objective
        wrapped, step = self.wrapped, self.first_step
        warmup, total, seed = s.warmup_steps, self.total, sched.seed
        bar = tqdm(total=total, initial=step, desc=s.command, disable=None if accel.is_local_main_process else True)
        per_proc = sched.batch_size // accel.num_processes
        stop_ids = eos_ids(s.model, self.tok)
        t0 = time.perf_counter() - self.elapsed
        t_last, tokens_since = time.perf_counter(), 0
        while step < total:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            if step < warmup:
                loss, row = s.warmup_step(step, g)
                row = {"step": step + 1, "stage": "A", "loss": finite_loss(accel, loss, step + 1, "A"), **row}
                opt = s.optimizer_at(step)
                opt.zero_grad(set_to_none=True)
                with accel.no_sync(wrapped):  # identical picks on every process: nothing to all-reduce
                    accel.backward(loss)
                opt.step()
            else:
                b_step = step - warmup
                torch.manual_seed(seed * 1_000_003 + b_step)  # any dropout draws the same after a resume
                batch = [self.examples[i] for i in batch_indices(len(self.examples), sched.batch_size, b_step, seed)]
                mine = batch[accel.process_index * per_proc: (accel.process_index + 1) * per_proc]
                on = self.teacher is not None and is_on_policy(obj.on_policy.ratio, seed, b_step)
                row, tokens, sampled = self.step(wrapped, mine, b_step, step, on, g, stop_ids)
                tokens_since += tokens
                if self.teacher is not None:  # samples drawn so far, and this step's sampled tokens (all processes)
                    self.totals["on_policy_steps"] += int(on)
                    self.totals["sample_tokens_total"] += sampled
                    row.update(samples=per_proc * accel.num_processes * self.totals["on_policy_steps"],
                               sample_tokens=sampled, **self.totals)
            step += 1
            bar.update(1)
            bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.4f}",
                            **({"samples": row["samples"]} if "samples" in row else {}))
            now = time.perf_counter()
            self.elapsed = now - t0
            if self.logs(step) and accel.is_main_process:
                row["elapsed_s"] = self.elapsed
                row["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9) if tokens_since else None
                t_last, tokens_since = now, 0
                self.log(row, step, bar)
            self.save(step)
        bar.close()
        return step

    def step(self, wrapped, mine: list, b_step: int, step: int, on: bool, g: torch.Generator, stop_ids: list[int]
             ) -> tuple[dict, int, int]:
        """One step of the objective: (its metrics row, its tokens, the tokens it sampled on-policy here). With
        ``accumulation`` > 1 the batch's forward and backward run in that many micro-batches whose gradients add up
        to the batch's (every loss is normalised by the whole batch's token count) before the one optimizer step."""
        accel, s, obj = self.accel, self.student, self.objective
        with s.sampling():  # on-policy, the student samples as it runs at inference
            b = step_batch(s.model, mine, self.tok.pad_token_id, stop_ids, obj.on_policy, on,
                           self.schedule.seed * 1_000_003 + b_step * accel.num_processes + accel.process_index,
                           accel.device)
        # Normalise by the *global* token count so 2 processes give the same gradient as 1 (DDP averages).
        n_tok = accel.reduce(b["loss_mask"].sum().to(accel.device).float(), reduction="sum") / accel.num_processes
        # the state loss's denominator, the whole batch's (one micro-batch: the same value its own sum gives)
        state_total = b["state_norm2"].sum() if self.accumulation > 1 and "state_target" in b else None
        opt = s.optimizer_at(step)
        opt.zero_grad(set_to_none=True)
        micro = micro_batches(b, self.accumulation)
        values, parts, extras = [], [], []
        for i, mb in enumerate(micro):
            # gradients all-reduce once, with the last micro-batch's backward
            with accel.no_sync(wrapped) if i < len(micro) - 1 else contextlib.nullcontext():
                stage, value, part, extra = self.micro_step(wrapped, mb, b_step, step, on, g, n_tok,
                                                            (i, len(micro)), state_total)
            values.append(value), parts.append(part), extras.append(extra)
        opt.step()
        row = {"step": step + 1, "stage": stage, "objective": "on_policy" if on else "off_policy", "loss": sum(values),
               **global_mean(accel, summed(parts)), **s.combine(extras)}
        # every process's sampled tokens (each samples its share of the batch; the main process logs the total)
        sampled = int(accel.reduce(b["loss_mask"].sum().to(accel.device), reduction="sum")) if on else 0
        return row, int(b["attention_mask"].sum()) * accel.num_processes, sampled

    def micro_step(self, wrapped, b: dict, b_step: int, step: int, on: bool, g: torch.Generator, n_tok: torch.Tensor,
                   part: tuple[int, int], state_total: torch.Tensor | None) -> tuple[str, float, dict, dict]:
        """The forward and backward of micro-batch ``b`` (``part`` = (i, n); the whole batch without
        accumulation): (stage, its share of the step's loss, its loss parts, the system's own terms' metrics)."""
        accel, s, obj = self.accel, self.student, self.objective
        keep, tail = scored_tail(b, accel.device)  # logits only where a target is scored (the tail)
        t_logits = teacher_logits(self.teacher, b, keep) if on else None  # (B, len(keep), V_T)
        # What the forward runs with stays in place through the backward, which recomputes checkpointed layers
        # (with gradient checkpointing): the same routing mode, the same cached starting states.
        with contextlib.ExitStack() as forward:
            stage = s.forward_context(b, b_step, forward)
            targeted = obj.state_loss_weight > 0 and "state_target" in b  # hooks after a plug-in's: its Δ included
            seen = forward.enter_context(capture_layers(s.state_model(), obj.state_layers)) if targeted else None
            with accel.autocast(), s.recording():
                logits = wrapped(**padded_inputs(b["input_ids"], b["attention_mask"], accel.device),
                                 logits_to_keep=keep).logits  # (B, len(keep), V)
                loss, parts = objective_loss(logits, tail, n_tok.clamp_min(1), t_logits, obj.on_policy.beta,
                                             obj.ce_weight, obj.kd_weight)
                loss, extra = s.regularise(loss, b_step, g, part)
                if targeted:
                    l_state = state_loss([seen[x] for x in obj.state_layers], b["state_target"], b["state_norm2"],
                                         state_total)
                    loss = loss + obj.state_loss_weight * l_state
                    parts = {**parts, "state": l_state.item()}
            value = finite_loss(accel, loss, step + 1, stage)
            accel.backward(loss)
        # the vocabulary-wide tensors (~0.6 GB each at 4 x 256 sampled tokens of a 152k vocabulary) go now, not when
        # the next micro-batch or step reassigns them: else two of them are alive during the next forward
        del logits, t_logits, loss
        return stage, value, parts, extra

    def logs(self, step: int) -> bool:
        """Whether the row of ``step`` (1-based) is logged: every ``log_every`` steps and at the ends of the
        warm-up and of the run."""
        return step % self.schedule.log_every == 0 or step in (self.total, self.student.warmup_steps)

    def log(self, row: dict, step: int, bar) -> None:
        append_jsonl(self.metrics_path, row)
        if bar.disable:
            log_progress(self.student.command, row, self.total)
        if self.report_to:
            self.accel.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)

    def save(self, step: int) -> None:
        """The checkpoint every ``save_every`` steps and at the end of the warm-up (and of the run, where the
        student keeps one); a snapshot every ``snapshot_every`` steps after the warm-up."""
        accel, s, sched, warmup = self.accel, self.student, self.schedule, self.student.warmup_steps
        b_step = step - warmup  # the snapshot first: a run killed while writing it resumes before this step
        if sched.snapshot_every and b_step > 0 and b_step % sched.snapshot_every == 0 and step < self.total \
                and accel.is_main_process:
            final = os.path.join(self.out, "snapshots", f"step-{b_step}")
            shutil.rmtree(final + ".partial", ignore_errors=True)
            s.snapshot(final + ".partial")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(final + ".partial", final)
        due = (step % sched.save_every == 0 and step < self.total) or (warmup and step == warmup) or \
            (step == self.total and s.final_checkpoint)
        if due:
            accel.wait_for_everyone()
            if accel.is_main_process:
                save_checkpoint(self.out, s.trained(), s.optimizer_at(step - 1),
                                {"step": step, "total_steps": self.total, "stage": s.stage(step),
                                 "elapsed_s": self.elapsed, "totals": self.totals}, what=s.what)
                plot_curves(self.metrics_path, os.path.join(self.out, "curves.png"))  # refreshed with each one
