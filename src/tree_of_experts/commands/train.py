"""`toe train`: route warm-up (Stage A), distillation (Stage B) and optional dense -> top-K anneal (Stage C).

Setup here (checks before anything is written, the plug-in, its optimizers); the steps run in the training loop
every trained system shares (:mod:`tree_of_experts.training.loop`), with :class:`PluginStudent` saying what a
plug-in adds: Stage A, its routing modes, cached starting states, and the route and usage terms. Every random
choice is a function of (seed, step), so ``resume=True`` continues from the last checkpoint and ends bit-identical
to an uninterrupted run. Runs unchanged on CPU, one GPU or many (``accelerate launch``, DDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os

import torch

from ..config import ToEConfig, ToEError
from ..data import file_hash
from ..extraction.store import REBUILT_BY, ROUTE, Extraction
from ..hf.loading import adapter_folder, load_causal_lm, load_tokenizer
from ..hf.layers import checkpoint_frozen_layers, layers_return_tuples, starting_at
from ..files import atomic_write_json
from ..folders import (BANK_KEY, BUILD_KEY, bank_fingerprint, build_settings, check_extraction, check_resume_args,
                       check_same_build, claim_out)
from ..locks import releases_out_locks
from ..model import ToEModel
from ..options import (
    ACCELERATE_PLACES,
    Fit,
    Loss,
    Runtime,
    Schedule,
    Text,
    flat_args,
    flat_defaults,
    grouped,
    require,
)
from ..training.checkpoint import RESUMED, peak_memory, plot_curves
from ..training.distill import check_teacher_map, load_teacher, resolve_teacher, resume_ignores
from ..training.examples import load_examples
from ..training.loop import StepObjective, Student, TrainLoop, accelerator, averaged, check_batch
from ..training.steps import flush_denormals, global_usage, level_accuracy, node_levels, sampled_route_loss
from ..tree import effective_leaves

log = logging.getLogger(__name__)

@grouped
@releases_out_locks
def train(
    base: str | torch.nn.Module,
    experts: str,
    data: str,
    out: str,
    text: Text = Text(),
    schedule: Schedule = Schedule(),
    loss: Loss = Loss(),
    fit: Fit = Fit(),
    runtime: Runtime = Runtime(),
    tokenizer: str | None = None,
    init_plugin: str | None = None,
    base_adapter: str | None = None,
) -> dict:
    """Trains a ToE plug-in on a frozen base.

    Every option of a group can also be given flat (``train(..., beta=0.3, max_steps=50)``; on the command line
    ``--beta 0.3`` or ``--loss.beta 0.3``).

    Args:
        base: hub id or folder of the base model, or a loaded model (with ``tokenizer`` then required).
        experts: a `toe extract` output folder (bank, tree, initial gate, route labels, cached teacher top-k).
        data: training data, in any format `toe extract --data` reads (the extraction's own file enables KD from
            its cache).
        out: plug-in folder to write (metrics.jsonl, curves.png and checkpoint/ go there too).
        text: which rows are read and how they become text.
        schedule: steps (Stage B + C; Stage A's are ``fit.stage_a_steps``), batch, seed, logging and checkpoints.
        loss: the objective (off- or on-policy, the loss weights; ``kd_weight`` defaults to 1.0 here).
        fit: learning rates (``lr`` defaults to 1e-3 here), Stage A, the route and usage terms, routing while
            training, cached starting states.
        runtime: dtype, mixed precision, gradient checkpointing, resume/overwrite, trackers (``device`` is refused:
            accelerate places the models, one device per process).
        tokenizer: tokenizer id or folder (default: the base's).
        init_plugin: start from this plug-in folder instead of the extraction's (baselines: static vector, random
            bank, flat router); route labels and the teacher's cached top-k still come from ``experts``.
        base_adapter: a peft LoRA adapter folder (`toe baseline --kind lora` output) merged into the base before
            training: ToE on top of LoRA. The plug-in folder keeps a copy and merges it whenever it is loaded.
            Stage A's route warm-up still reads the extraction's cached states of the bare base (the labels are
            the extraction's), and ``fit.cached_states`` is refused (the adapted base's states differ).

    Returns:
        A summary: final metrics, steps, the plug-in folder.
    """
    flush_denormals()  # subnormal gradients slow CPU matmuls many-fold as training sharpens the softmax
    # the run's record (train_args.json) holds this command's own defaults, which `--resume` compares
    loss = dataclasses.replace(loss, kd_weight=1.0 if loss.kd_weight is None else loss.kd_weight)
    fit = dataclasses.replace(fit, lr=1e-3 if fit.lr is None else fit.lr)
    args = flat_args(dict(locals()))
    require("toe train", runtime, {"device": ACCELERATE_PLACES})
    if fit.anneal_steps > schedule.max_steps:
        raise ToEError(f"anneal_steps={fit.anneal_steps} > max_steps={schedule.max_steps}: anneal at most the "
                       "Stage-B steps")
    on_policy = loss.on_policy()
    accel = accelerator(runtime.mixed_precision, runtime.report_to, out)
    check_batch(schedule.batch_size, runtime.gradient_accumulation_steps, accel.num_processes)
    check_teacher_map(runtime.teacher_device_map, on_policy.ratio, accel.num_processes)
    if not isinstance(base, str) and tokenizer is None:
        raise ToEError("train() got a loaded base model: pass tokenizer= (an id or folder) as well")
    check_extraction(experts)
    args[BANK_KEY], args[BUILD_KEY] = bank_fingerprint(experts), build_settings(experts)  # which build it trains from
    teacher = resolve_teacher(loss.teacher, experts, base) if on_policy.ratio > 0 else loss.teacher
    if base_adapter:  # checked (a hub id fetched) before anything loads; the run's args keep what was given
        base_adapter = _adapter_folder(base_adapter, fit, loss)
    # The data is read and checked before the output folder is claimed: a bad argument loses nothing.
    tok = load_tokenizer(tokenizer or base)
    cached_layer = _check_cached_states(experts, data, init_plugin, runtime.dtype) if fit.cached_states else None
    # What the run leaves out, said once here and in the summary; what the extraction lacks for the rest is refused.
    left_out = leaves_out(experts, fit.skip_stage_a, fit.stage_a_steps, fit.route_weight, loss.no_kd,
                          loss.kd_weight, on_policy.ratio)
    for part, why in left_out.items():
        log.warning("toe train: no %s (%s)", part, why)
    wants_kd = loss.kd(1.0) > 0 and on_policy.ratio < 1  # on-policy steps distil the live teacher
    examples, has_kd, skipped = load_examples(data, text.spec().for_tokenizer(tok), tok, text.max_length, text.limit,
                                              experts, wants_kd, cached_layer, text.skip_truncated,
                                              with_targets=loss.state_loss_weight > 0, device=accel.device)
    _check_examples(examples, experts, data, fit.cached_states, loss.state_loss_weight > 0)
    use_kd = has_kd and loss.kd(1.0) > 0
    if loss.ce_weight == 0 and not use_kd and not loss.state_loss_weight:
        raise ToEError("ce_weight=0 leaves no loss: it needs the teacher's cached top-k (an extraction with "
                       "--topk_logprobs > 0, kd_weight > 0 and no --no_kd), a --state_loss_weight, or ce_weight > 0")
    if accel.is_main_process or not runtime.overwrite:  # read-only unless overwriting, which only the main process does
        _claim(out, runtime, accel.is_main_process, args, resume_ignores(loss.objective), {
            "experts": experts, "init_plugin": init_plugin, "teacher": teacher,
            "base": base if isinstance(base, str) else None, "data": data, "tokenizer": tokenizer,
            "base_adapter": base_adapter})
    accel.wait_for_everyone()
    if isinstance(base, str):
        base = load_causal_lm(base, dtype=runtime.dtype, device=str(accel.device))
    model = ToEModel.from_pretrained(base, init_plugin or experts, base_adapter=base_adapter, mmap_bank=False)
    _set_query_norm(model, fit.query_norm)
    teacher_model = load_teacher(teacher, tok, runtime.dtype, accel.device, runtime.teacher_map()) \
        if on_policy.ratio > 0 else None
    if runtime.gradient_checkpointing:
        checkpoint_frozen_layers(model.base)
    if fit.cached_states:
        layers_return_tuples(model.base)  # found now, outside any recording of routes
    student = PluginStudent(model, fit, schedule.max_steps, Extraction(experts).route_data(), cached_layer, accel)
    objective = StepObjective(on_policy, loss.ce_weight, loss.kd_weight if use_kd else 0.0, loss.state_loss_weight,
                          list(model.toe_config.layers))
    loop = TrainLoop(student, examples, tok, out, schedule, objective, accel, teacher_model, runtime.report_to,
                     runtime.gradient_accumulation_steps)
    loop.start(runtime.resume)  # a checkpoint that does not fit is refused before anything is written
    if accel.is_main_process:
        atomic_write_json(os.path.join(out, "train_args.json"), args)
    if runtime.report_to:
        accel.init_trackers("toe", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    step = loop.run()
    if runtime.report_to:
        accel.end_training()
    accel.wait_for_everyone()
    # kd: whether steps distilled the cached top-k log-probs (off-policy steps only)
    summary = {"out": out, "steps": step, "stage_a_steps": student.warmup_steps, "kd": use_kd and on_policy.ratio < 1,
               "examples": len(examples), "skipped_truncated": skipped,  # rows left out by --skip_truncated
               "left_out": left_out, "processes": accel.num_processes}
    if accel.is_main_process:
        _save(model, out, loop.metrics_path, summary)
    return summary


def _claim(out: str, runtime: Runtime, lock: bool, args: dict, ignores: tuple, inputs: dict) -> None:
    """Claims ``out`` for the run (``lock``: this process holds the folder's lock for the run), and under --resume
    refuses other arguments than the interrupted run's (those in ``ignores`` may differ)."""
    # --resume with --overwrite continues from the checkpoint and replaces the rest, as `toe eval` does
    claim_out(out, "train", overwrite=runtime.overwrite, resume=runtime.resume, keep=RESUMED if runtime.resume else (),
              inputs=inputs, lock=lock)
    if runtime.resume:
        check_resume_args(os.path.join(out, "train_args.json"), args, flat_defaults(train), ignores)
        check_same_build(out, args["experts"], "start again with --overwrite true (without --resume)")


def _adapter_folder(base_adapter: str, fit: Fit, loss: Loss) -> str:
    """The folder of the LoRA adapter merged into the base (a hub id fetched); refuses the options that read the
    bare base's cached states, which the adapter changes."""
    if fit.cached_states:
        raise ToEError("--cached_states reads the bare base's states, which a --base_adapter (merged LoRA) "
                       "changes: drop one of them")
    if loss.state_loss_weight > 0:
        raise ToEError("--state_loss_weight targets the bare base's cached states, which a --base_adapter "
                       "changes: drop one of them")
    return adapter_folder(base_adapter)


def _set_query_norm(model: ToEModel, query_norm: bool | None) -> None:
    """Overrides the plug-in's query normalisation with ``--query_norm``, in its config and every gate (None: the
    plug-in's own)."""
    if query_norm is None:
        return
    model.plugin.config.query_norm = query_norm
    for block in model.plugin.blocks.values():
        block.gate.query_norm = query_norm


def _save(model: ToEModel, out: str, metrics_path: str, summary: dict) -> None:
    """Writes the trained plug-in, curves.png and train_summary.json (``summary`` completed with the curves, the
    last Stage-B metrics row and the peak memory)."""
    model.save_pretrained(out)
    summary["curves"] = plot_curves(metrics_path, os.path.join(out, "curves.png"))
    with open(metrics_path) as f:
        rows = [json.loads(r) for r in f]
    last_b = [r for r in rows if r["stage"] != "A"]
    summary["final"] = last_b[-1] if last_b else rows[-1]
    summary.update(peak_memory())
    atomic_write_json(os.path.join(out, "train_summary.json"), summary)


class PluginStudent(Student):
    """A ToE plug-in in the shared loop: only the plug-in trains (gates, scales and, unless frozen, the bank), after
    ``fit.stage_a_steps`` of route warm-up (Stage A: per-level BCE on the extraction's cached base states, levels
    opening top-down over the first half); Stage B adds a decaying route loss and the usage regulariser; Stage C
    (the last ``fit.anneal_steps``) routes with the plug-in's own selection."""

    command, what, final_checkpoint = "toe train", "plug-in", True

    def __init__(self, model: ToEModel, fit: Fit, max_steps: int, route_data: dict, cached_layer: int | None, accel):
        with torch.no_grad():
            for block in model.plugin.blocks.values():
                if not block.scale.any():
                    block.scale.fill_(fit.scale_init)
        groups = model.plugin.parameter_groups()
        for p in groups["bank"]:
            p.requires_grad_(not fit.freeze_bank)
        # The bank is a memory with its own learning rate (memory layers train their values faster than the
        # router); Adam without weight decay, so nothing pulls unused leaves towards zero.
        opt = torch.optim.Adam([{"params": groups["gate"], "lr": fit.lr}, {"params": groups["scale"], "lr": fit.scale_lr},
                                {"params": [p for p in groups["bank"] if p.requires_grad], "lr": fit.bank_lr}])
        super().__init__(model, opt)
        self.gates = [b.gate for b in model.plugin.blocks.values()]
        self.opt_a = torch.optim.Adam([p for g in self.gates for p in g.parameters()], lr=fit.stage_a_lr)
        self.cfg, self.fit, self.max_steps, self.accel = model.toe_config, fit, max_steps, accel
        self.route_data, self.cached_layer = route_data, cached_layer
        self.route_weight = fit.route_weight if route_data else 0.0  # without: refused or said (leaves_out)
        self.warmup_steps = 0 if fit.skip_stage_a else fit.stage_a_steps
        self.levels = node_levels(self.cfg.shape, self.cfg.num_leaves)
        self.depth = int(self.levels.max()) + 1
        self.base_dtype = next(model.base.parameters()).dtype
        self.records = None

    def trained(self) -> dict[str, torch.Tensor]:
        return self.model.plugin.state_dict()

    def load(self, weights) -> None:
        self.model.plugin.load_state_dict(weights)

    def optimizer_at(self, step: int) -> torch.optim.Optimizer:
        return self.opt_a if step < self.warmup_steps else self.optimizer

    def warmup_step(self, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        open_levels = min(self.depth, 1 + int(2 * self.depth * step / max(self.warmup_steps, 1)))
        loss, accs = 0.0, []
        for layer, gate in zip(self.cfg.layers, self.gates):
            l_route, node_acc = sampled_route_loss(gate, self.route_data, layer, self.fit.route_batch_size, g,
                                                   self.accel.device, self.levels >= open_levels)
            loss = loss + l_route
            accs.append(level_accuracy(node_acc.cpu(), self.levels))
        return loss, {"route_acc_per_level": accs[0], "open_levels": open_levels}

    def sampling(self):
        return self.model.selection(self.cfg.selection)

    def forward_context(self, batch: dict, b_step: int, stack: contextlib.ExitStack) -> str:
        if "states" in batch:  # an off-policy batch of cached states: the layers below them do not run
            states = batch["states"].to(self.accel.device, self.base_dtype)
            stack.enter_context(starting_at(self.model.base, self.cached_layer, states))
        annealing = self.fit.anneal_steps and b_step >= self.max_steps - self.fit.anneal_steps
        selection = self.cfg.selection if annealing else self.fit.train_selection
        stack.enter_context(self.model.selection(selection))
        return "C" if selection != self.fit.train_selection else "B"

    @contextlib.contextmanager
    def recording(self):
        with self.model.plugin.recording() as records:
            self.records = records
            try:
                yield records
            finally:
                self.records = None

    def regularise(self, loss: torch.Tensor, b_step: int, g: torch.Generator, part: tuple[int, int] = (0, 1)
                   ) -> tuple[torch.Tensor, dict]:
        i, n = part
        dev = self.accel.device
        aux_route, aux_usage = torch.zeros((), device=dev), torch.zeros((), device=dev)
        eff, ratio, usages = [], [], []
        for rec in self.records.values():
            if rec.route.leaf_logp is not None:  # log N - entropy of the usage over every process's tokens
                u = global_usage(rec.route, rec.mask, self.accel)  # (N,)
                aux_usage = aux_usage + (math.log(u.numel()) - torch.log(effective_leaves(u)))
                eff.append(effective_leaves(u).item())
                usages.append((u.detach(), float(rec.mask.sum())))
            ratio.append(rec.delta_ratio.item())
        w_route = self.route_weight * max(0.0, 1.0 - b_step / self.max_steps)
        if w_route > 0 and i == 0:  # the route term reads the route data, not the batch: once per step
            for layer, gate in zip(self.cfg.layers, self.gates):
                aux_route = aux_route + sampled_route_loss(gate, self.route_data, layer, self.fit.route_batch_size,
                                                           g, dev)[0]
        # the usage term is the micro-batch's own (its gradient needs the tokens in the graph), 1/n of it in each
        loss = loss + w_route * aux_route + self.fit.usage_weight * aux_usage / n
        extra = {"route": aux_route.item(), "usage": aux_usage.item(), "effective_leaves": eff, "delta_ratio": ratio}
        return loss, {**extra, "_usage": usages} if n > 1 else extra

    def combine(self, extras: list[dict]) -> dict:
        """The step's metrics from its micro-batches': the route term as drawn (once), and the leaf usage (its
        penalty and effective leaves) of the whole batch, from the micro-batches' usage weighted by their tokens."""
        if len(extras) == 1:
            return extras[0]
        row = averaged([{k: v for k, v in e.items() if k != "_usage"} for e in extras])
        row["route"] = sum(e["route"] for e in extras)
        whole = [sum(e["_usage"][j][0] * e["_usage"][j][1] for e in extras)
                 / max(sum(e["_usage"][j][1] for e in extras), 1.0) for j in range(len(extras[0]["_usage"]))]
        row["effective_leaves"] = [effective_leaves(u).item() for u in whole]
        row["usage"] = sum(math.log(u.numel()) - math.log(e) for u, e in zip(whole, row["effective_leaves"]))
        return row

    def state_model(self) -> torch.nn.Module:
        return self.model.base

    def snapshot(self, path: str) -> None:
        self.model.save_pretrained(path)


def _check_cached_states(experts: str, data: str, init_plugin: str | None, dtype: str) -> int:
    """The layer whose cached base states ``--cached_states`` starts from; refuses (one line) an extraction that
    cannot serve them."""
    run = Extraction(experts).run()
    if run.get("data_sha256") != file_hash(data):
        raise ToEError(f"--cached_states needs the extraction's own data: {experts} was extracted from another "
                       f"file than {data} (pass that file, or drop --cached_states)")
    if run.get("dtype") != dtype:
        raise ToEError(f"--cached_states: {experts} cached the base's states in dtype {run.get('dtype')}, this "
                       f"run is --dtype {dtype}: pass --dtype {run.get('dtype')}, or drop --cached_states")
    cached_layer = min(ToEConfig.load(init_plugin or experts).layers)
    if cached_layer not in run["layers"]:
        raise ToEError(f"--cached_states: {experts} cached no base states at layer {cached_layer} (the plug-in's "
                       "lowest injection layer): drop --cached_states")
    light = Extraction(experts).light_keys()  # a disk budget's light shards
    if light is not None and f"base.{run['layers'].index(cached_layer)}" not in light:
        raise ToEError(f"--cached_states: {experts} kept states for a sample of its examples only, and no base state "
                       f"at layer {cached_layer} for the others (--cache_low_states false, or not the extraction's "
                       "lowest layer): extract with --cache_low_states true, or drop --cached_states")
    return cached_layer


def _check_examples(examples: list, experts: str, data: str, cached_states: bool, state_loss: bool) -> None:
    """Refuses examples that lack what the run reads from the extraction (cached states, state targets)."""
    if state_loss and not any(e.has("target") for e in examples):
        raise ToEError(f"--state_loss_weight needs the extraction's cached states for {data}: {experts} was extracted "
                       "from another file or tokenized otherwise (same --template/--max_length/fields), or pass 0")
    if not cached_states:
        return
    run = Extraction(experts).run()
    if run.get("limit") is not None and len(examples) > run["limit"]:
        raise ToEError(f"--cached_states: {experts} cached only the first {run['limit']} rows of {data}: pass "
                       f"--limit {run['limit']}, or drop --cached_states")
    missing = sum(not e.has("state") for e in examples)
    if missing:
        raise ToEError(f"--cached_states: {missing} of {len(examples)} rows were tokenized otherwise than in {experts}: "
                       "use the extraction's --template/--max_length/--prompt_field/--response_field, or drop "
                       "--cached_states")


def leaves_out(experts: str, skip_stage_a: bool, stage_a_steps: int, route_weight: float, no_kd: bool,
               kd_weight: float, on_policy_ratio: float) -> dict[str, str]:
    """{part of the training left out: why} for what the options asked to leave out; refuses (one line, naming
    the command that rebuilds it or the option that leaves it out) an extraction that lacks route data a run
    uses: Stage A's labels, and the Stage-B route loss's."""
    out = {}
    if skip_stage_a or stage_a_steps == 0:
        out["route warm-up (Stage A)"] = "--skip_stage_a true" if skip_stage_a else "--stage_a_steps 0"
    if not Extraction(experts).has(ROUTE):
        if "route warm-up (Stage A)" not in out:
            raise ToEError(f"--experts {experts} lacks {ROUTE} (the route labels of Stage A): {REBUILT_BY}, or pass "
                           "--skip_stage_a true to train without the route warm-up")
        if route_weight > 0:
            out["route loss in Stage B"] = f"{experts} has no {ROUTE} for it"
    if no_kd or kd_weight == 0:
        out["distillation of the cached top-k"] = "--no_kd true" if no_kd else "--kd_weight 0"
    elif on_policy_ratio >= 1:
        out["distillation of the cached top-k"] = "every step is on-policy"
    return out
