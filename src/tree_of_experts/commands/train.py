"""`toe train`: route warm-up (Stage A), distillation (Stage B) and optional dense -> top-K anneal (Stage C).

One function, top to bottom: setup -> Stage A steps -> Stage B steps -> checkpoint / log -> save the plug-in.
Every random choice is a function of (seed, step), so ``resume=True`` continues from the last checkpoint and ends
bit-identical to an uninterrupted run. Runs unchanged on CPU, one GPU or many (``accelerate launch``, DDP).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..config import ToEConfig, ToEError, TrainConfig
from ..data import DataSpec, batch_indices, file_hash
from ..extraction.store import REBUILT_BY, ROUTE, Extraction
from ..hf import (
    adapter_folder,
    capture_layers,
    checkpoint_frozen_layers,
    layers_return_tuples,
    load_causal_lm,
    load_tokenizer,
    padded_inputs,
    starting_at,
)
from ..io import (
    append_jsonl,
    atomic_write_json,
    check_extraction,
    check_resume_args,
    claim_out,
    releases_out_locks,
)
from ..model import ToEModel
from ..training.checkpoint import (
    RESUMED,
    has_checkpoint,
    keep_logged_rows,
    load_checkpoint,
    log_progress,
    peak_memory,
    plot_curves,
    save_checkpoint,
)
from ..training.distill import (
    OnPolicy,
    eos_ids,
    is_on_policy,
    load_teacher,
    objective_loss,
    resolve_teacher,
    resume_ignores,
    scored_tail,
    step_batch,
    teacher_logits,
)
from ..training.examples import load_examples
from ..training.steps import (
    finite_loss,
    flush_denormals,
    global_mean,
    global_usage,
    level_accuracy,
    node_levels,
    sampled_route_loss,
)
from ..losses import state_loss
from ..tree import effective_leaves

log = logging.getLogger(__name__)


@releases_out_locks
def train(
    base: str | torch.nn.Module,
    experts: str,
    data: str,
    out: str,
    max_steps: int = 200,
    stage_a_steps: int = 100,
    batch_size: int = 8,
    route_batch_size: int = 512,
    lr: float = 1e-3,
    scale_lr: float = 1e-2,
    scale_init: float = 1.0,
    bank_lr: float = 1e-4,
    stage_a_lr: float = 1e-2,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    route_weight: float = 0.1,
    usage_weight: float = 0.01,
    no_kd: bool = False,
    freeze_bank: bool = False,
    skip_stage_a: bool = False,
    train_selection: str = "dense",
    anneal_steps: int = 0,
    limit: int | None = None,
    prompt_field: str = "question",
    response_field: str = "answer",
    template: str = "Question: {prompt}\nAnswer: ",
    strip_calc: bool = False,
    max_length: int = 512,
    skip_truncated: bool = False,
    log_every: int = 10,
    save_every: int = 50,
    snapshot_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    cached_states: bool = False,
    tokenizer: str | None = None,
    init_plugin: str | None = None,
    objective: str = "off_policy",
    teacher: str | None = None,
    on_policy_ratio: float = 1.0,
    beta: float = 0.5,
    sample_max_new_tokens: int = 256,
    sample_temperature: float = 1.0,
    sample_top_p: float = 1.0,
    query_norm: bool | None = None,
    base_adapter: str | None = None,
    state_loss_weight: float = 0.0,
    report_to: str | None = None,
) -> dict:
    """Trains a ToE plug-in on a frozen base.

    Args:
        base: hub id or folder of the base model, or a loaded model (with ``tokenizer`` then required).
        experts: a `toe extract` output folder (bank, tree, initial gate, route labels, cached teacher top-k).
        data: training data, in any format `toe extract --data` reads (the extraction's own file enables KD from
            its cache).
        out: plug-in folder to write (metrics.jsonl, curves.png and checkpoint/ go there too).
        max_steps: Stage B (+C) optimisation steps.
        stage_a_steps: route warm-up steps on cached base states (0 or skip_stage_a to skip).
        batch_size: global batch of sequences (split across processes).
        route_batch_size: cached states per Stage A step.
        lr: learning rate of the gate in Stages B and C.
        scale_lr: learning rate of the per-channel scales s.
        bank_lr: learning rate of the expert bank (unused with ``freeze_bank``).
        stage_a_lr: learning rate of the gate in Stage A (the route warm-up).
        scale_init: where the scales of a fresh plug-in (all zero: an exact no-op, as `toe extract` saves it) start
            in Stage B. 1.0 injects the bank at its extracted size, the trained fusion map's own size; 0 starts
            from the no-op, which needs many steps before the plug-in has any effect. Scales that are not all
            zero (a trained or baseline plug-in) are kept.
        kd_weight: weight of top-k KL to the teacher (when cached).
        ce_weight: weight of the next-token CE on the data. 0 trains on the teacher's distribution alone (top-k KL):
            the plug-in then learns what the teacher predicts, not the data's house style.
        route_weight: initial weight of the route loss in Stage B, decaying linearly to 0.
        usage_weight: weight of the usage regulariser (log N - entropy of leaf usage).
        no_kd: turn distillation off (no top-k KL to the teacher's cached log-probs).
        freeze_bank: keep the bank at its extracted vectors (only the gate and the scales train).
        skip_stage_a: no route warm-up.
        train_selection: routing in Stage B: "dense" (the default: every leaf gets gradient), "topk", "topp" or
            "beam".
        anneal_steps: Stage C, the last ``anneal_steps`` steps route with the plug-in's own selection (top-K).
        limit: use the first ``limit`` rows of ``data``.
        prompt_field: record field holding the question (GSM8K: "question", MATH: "problem").
        response_field: record field holding the response trained on (GSM8K: "answer"; `toe traces` output: "trace").
        template: prompt template with ``{prompt}`` where the question goes, or "chat" for the tokenizer's chat
            template.
        strip_calc: drop GSM8K's ``<<48/2=24>>`` calculator notes from responses.
        max_length: tokens kept per example (prompt + response + EOS); longer examples are cut.
        skip_truncated: leave out the rows whose prompt fills ``max_length`` (nothing of their response would be
            trained on; refused otherwise, with the max_length that keeps them) and count them in the summary.
        log_every: steps between rows of ``out/metrics.jsonl``.
        save_every: steps between checkpoints in ``out/checkpoint`` (one is also saved at the end of each stage).
        snapshot_every: also keep the plug-in every this many Stage-B steps as ``out/snapshots/step-N`` (a plug-in
            folder each: learning curves score them); 0: none.
        resume: continue from ``out/checkpoint`` (with the arguments the run was started with).
        overwrite: replace what another run left in ``out`` (refused otherwise).
        seed: seed of every random choice.
        dtype: dtype of the frozen base: "float32", "float16", "bfloat16" or "auto" (as stored).
        mixed_precision: accelerate's autocast in training steps: "no", "fp16" or "bf16".
        gradient_checkpointing: recompute the frozen layers' activations in backward (saves memory).
        tokenizer: tokenizer id or folder (default: the base's).
        init_plugin: start from this plug-in folder instead of the extraction's (baselines: static vector, random
            bank, flat router); route labels and the teacher's cached top-k still come from ``experts``.
        objective: "off_policy" trains on the data's traces (CE + the teacher's cached top-k KL); "on_policy" makes
            ``on_policy_ratio`` of the Stage-B steps on-policy (GKD): the plug-in-equipped base samples continuations
            of the batch's prompts and the loss is the generalized JSD (``beta``) between its next-token
            distributions and the live teacher's on those samples; the other steps stay off-policy.
        teacher: the teacher for on-policy steps (default: the one the extraction read, from its manifest).
        on_policy_ratio: share of the Stage-B steps that are on-policy with ``objective="on_policy"`` (GKD's λ,
            in [0, 1]).
        beta: GKD's β, the generalized JSD of on-policy steps: 0 forward KL, 1 reverse KL, 0.5 the symmetric JSD.
        sample_max_new_tokens: length cap, in tokens, of each continuation the student samples on-policy.
        sample_temperature: temperature of the student's on-policy sampling (1: its own distribution).
        sample_top_p: nucleus mass of the student's on-policy sampling (1: no truncation).
        query_norm: switch the gates' query normalisation on or off (None keeps the plug-in's; see
            :class:`tree_of_experts.config.ToEConfig`). It adds no parameters; the trained plug-in records it.
        cached_states: off-policy steps start from the extraction's cached base states at the lowest injection
            layer instead of running the frozen layers below it (the same loss up to the cache's fp16 rounding;
            needs ``data`` to be the extraction's own file; on-policy samples are new text and run in full).
        state_loss_weight: weight of the state loss on off-policy steps: the relative squared error between the
            base's states at the injection layers (plug-in included) and where the teacher's signal puts them,
            h⁰ + δ from the extraction's cache (:func:`tree_of_experts.losses.state_loss`: 1 when the plug-in
            changes nothing, 0 when it adds exactly δ). Needs the extraction's own data file (its cached states);
            on-policy steps (the student's own samples) have no cached target and skip it. 0: off.
        report_to: log every metrics row to accelerate's trackers as well ("tensorboard", "wandb", "mlflow", "all"...;
            default None: metrics.jsonl and curves.png only). Files of local trackers go to ``out/trackers``.
        base_adapter: a peft LoRA adapter folder (`toe baseline --kind lora` output) merged into the base before
            training: ToE on top of LoRA. The plug-in folder keeps a copy and merges it whenever it is loaded.
            Stage A's route warm-up still reads the extraction's cached states of the bare base (the labels are
            the extraction's), and ``cached_states`` is refused (the adapted base's states differ).

    Returns:
        A summary: final metrics, steps, the plug-in folder.
    """
    from accelerate import Accelerator

    args = dict(locals())
    flush_denormals()  # subnormal gradients slow CPU matmuls many-fold as training sharpens the softmax
    TrainConfig.from_args(args)
    on_policy = OnPolicy.of(objective, on_policy_ratio, beta, sample_max_new_tokens, sample_temperature, sample_top_p)
    acc = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=report_to,
                      project_dir=os.path.join(out, "trackers") if report_to else None)
    spec = DataSpec(prompt_field, response_field, template, strip_calc)
    if batch_size % acc.num_processes:
        raise ToEError(f"batch_size={batch_size} must divide evenly over {acc.num_processes} processes")
    if not isinstance(base, str) and tokenizer is None:
        raise ToEError("train() got a loaded base model: pass tokenizer= (an id or folder) as well")
    check_extraction(experts)
    if on_policy.ratio > 0:
        teacher = resolve_teacher(teacher, experts, base)
    if cached_states:
        run = Extraction(experts).run()
        if base_adapter:
            raise ToEError("--cached_states reads the bare base's states, which a --base_adapter (merged LoRA) "
                           "changes: drop one of them")
        if run.get("data_sha256") != file_hash(data):
            raise ToEError(f"--cached_states needs the extraction's own data: {experts} was extracted from another "
                           f"file than {data} (pass that file, or drop --cached_states)")
        if run.get("dtype") != dtype:
            raise ToEError(f"--cached_states: {experts} cached the base's states in dtype {run.get('dtype')}, this "
                           f"run is --dtype {dtype}: pass --dtype {run.get('dtype')}, or drop --cached_states")
    if base_adapter:  # checked (a hub id fetched) before anything loads; the run's args keep what was given
        base_adapter = adapter_folder(base_adapter)
    # The data is read and checked before the output folder is claimed: a bad argument loses nothing.
    tok = load_tokenizer(tokenizer or base)
    spec = spec.for_tokenizer(tok)
    cached_layer = min(ToEConfig.load(init_plugin or experts).layers) if cached_states else None
    if cached_states and cached_layer not in run["layers"]:
        raise ToEError(f"--cached_states: {experts} cached no base states at layer {cached_layer} (the plug-in's "
                       "lowest injection layer): drop --cached_states")
    light = Extraction(experts).light_keys() if cached_states else None  # a disk budget's light shards
    if light is not None and f"base.{run['layers'].index(cached_layer)}" not in light:
        raise ToEError(f"--cached_states: {experts} kept states for a sample of its examples only, and no base state "
                       f"at layer {cached_layer} for the others (--cache_low_states false, or not the extraction's "
                       "lowest layer): extract with --cache_low_states true, or drop --cached_states")
    if state_loss_weight < 0 or not math.isfinite(state_loss_weight):
        raise ToEError(f"state_loss_weight={state_loss_weight}: a loss weight is finite and >= 0")
    if state_loss_weight > 0 and base_adapter:
        raise ToEError("--state_loss_weight targets the bare base's cached states, which a --base_adapter changes: "
                       "drop one of them")
    # What the run leaves out, said once here and in the summary; what the extraction lacks for the rest is refused.
    left_out = leaves_out(experts, skip_stage_a, stage_a_steps, route_weight, no_kd, kd_weight, on_policy.ratio)
    for part, why in left_out.items():
        log.warning("toe train: no %s (%s)", part, why)
    wants_kd = not no_kd and kd_weight > 0 and on_policy.ratio < 1  # on-policy steps distil the live teacher
    examples, has_kd, skipped = load_examples(data, spec, tok, max_length, limit, experts, wants_kd, cached_layer,
                                              skip_truncated, with_targets=state_loss_weight > 0)
    if state_loss_weight > 0 and not any(e.target is not None for e in examples):
        raise ToEError(f"--state_loss_weight needs the extraction's cached states for {data}: {experts} was extracted "
                       "from another file or tokenized otherwise (same --template/--max_length/fields), or pass 0")
    if cached_states and run.get("limit") is not None and len(examples) > run["limit"]:
        raise ToEError(f"--cached_states: {experts} cached only the first {run['limit']} rows of {data}: pass "
                       f"--limit {run['limit']}, or drop --cached_states")
    missing = sum(e.state is None for e in examples) if cached_states else 0
    if missing:
        raise ToEError(f"--cached_states: {missing} of {len(examples)} rows were tokenized otherwise than in {experts}: "
                       "use the extraction's --template/--max_length/--prompt_field/--response_field, or drop "
                       "--cached_states")
    use_kd = has_kd and not no_kd and kd_weight > 0
    if ce_weight < 0 or kd_weight < 0:
        raise ToEError(f"ce_weight={ce_weight}, kd_weight={kd_weight}: loss weights must be >= 0")
    if ce_weight == 0 and not use_kd and not state_loss_weight:
        raise ToEError("ce_weight=0 leaves no loss: it needs the teacher's cached top-k (an extraction with "
                       "--topk_logprobs > 0, kd_weight > 0 and no --no_kd), a --state_loss_weight, or ce_weight > 0")
    if acc.is_main_process or not overwrite:  # read-only unless overwriting, which only the main process does
        # --resume with --overwrite continues from the checkpoint and replaces the rest, as `toe eval` does
        # (the main process holds the folder's lock for the run)
        claim_out(out, "train", overwrite=overwrite, resume=resume, keep=RESUMED if resume else (), inputs={
            "experts": experts, "init_plugin": init_plugin, "teacher": teacher,
            "base": base if isinstance(base, str) else None, "data": data, "tokenizer": tokenizer,
            "base_adapter": base_adapter}, lock=acc.is_main_process)
        if resume:
            defaults = {k: v.default for k, v in inspect.signature(train).parameters.items()}
            check_resume_args(os.path.join(out, "train_args.json"), args, defaults, resume_ignores(objective))
    acc.wait_for_everyone()
    if isinstance(base, str):
        base = load_causal_lm(base, dtype=dtype, device=str(acc.device))
    model = ToEModel.from_pretrained(base, init_plugin or experts, base_adapter=base_adapter, mmap_bank=False)
    if query_norm is not None:
        model.plugin.config.query_norm = query_norm
        for block in model.plugin.blocks.values():
            block.gate.query_norm = query_norm
    teacher_model = load_teacher(teacher, tok, dtype, acc.device) if on_policy.ratio > 0 else None
    if gradient_checkpointing:
        checkpoint_frozen_layers(model.base)
    cfg = model.toe_config
    base_dtype = next(model.base.parameters()).dtype
    if cached_states:
        layers_return_tuples(model.base)  # found now, outside any recording of routes
    route_data = Extraction(experts).route_data()
    if not route_data:  # a run that needed it was refused (leaves_out); this one said what it leaves out
        route_weight = 0.0
    stage_a = 0 if skip_stage_a else stage_a_steps
    levels = node_levels(cfg.shape, cfg.num_leaves)
    depth = int(levels.max()) + 1

    with torch.no_grad():
        for block in model.plugin.blocks.values():
            if not block.scale.any():
                block.scale.fill_(scale_init)
    groups = model.plugin.parameter_groups()
    for p in groups["bank"]:
        p.requires_grad_(not freeze_bank)
    # The bank is a memory with its own learning rate (memory layers train their values faster than the router);
    # Adam without weight decay, so nothing pulls unused leaves towards zero.
    opt = torch.optim.Adam([{"params": groups["gate"], "lr": lr}, {"params": groups["scale"], "lr": scale_lr},
                            {"params": [p for p in groups["bank"] if p.requires_grad], "lr": bank_lr}])
    gates = [b.gate for b in model.plugin.blocks.values()]
    opt_a = torch.optim.Adam([p for g in gates for p in g.parameters()], lr=stage_a_lr)
    wrapped = acc.prepare(model)  # DDP syncs only parameters that require grad: the plug-in's

    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    step = 0
    if resume and has_checkpoint(out):
        weights, opt_state, state = load_checkpoint(out)
        try:
            model.plugin.load_state_dict(weights)
            (opt_a if state["stage"] == "A" else opt).load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as e:  # another plug-in shape, optimizer groups or stage
            raise ToEError(f"--resume: {out}/checkpoint does not fit this run ({str(e).splitlines()[0][:120]}): "
                           "start again with --overwrite true, or a new --out") from None
        step = state["step"]
        if acc.is_main_process:
            keep_logged_rows(metrics_path, step)
    elif acc.is_main_process and os.path.isfile(metrics_path):
        os.remove(metrics_path)
    if acc.is_main_process:
        atomic_write_json(os.path.join(out, "train_args.json"), args)
    if report_to:
        acc.init_trackers("toe", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})

    total = stage_a + max_steps
    bar = tqdm(total=total, initial=step, desc="toe train", disable=None if acc.is_local_main_process else True)
    per_proc = batch_size // acc.num_processes
    n_examples = len(examples)
    t_last, tokens_since = time.perf_counter(), 0
    samples_seen = batch_size * sum(is_on_policy(on_policy.ratio, seed, s) for s in range(max(0, step - stage_a)))
    stop_ids = eos_ids(model.base, tok)
    while step < total:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        row: dict = {"step": step + 1}
        if step < stage_a:
            # Stage A: per-level BCE on cached base states; levels open top-down over the first half.
            stage = "A"
            open_levels = min(depth, 1 + int(2 * depth * step / max(stage_a, 1)))
            loss = 0.0
            accs = []
            for layer, gate in zip(cfg.layers, gates):
                l_route, node_acc = sampled_route_loss(gate, route_data, layer, route_batch_size, g, acc.device,
                                                       levels >= open_levels)
                loss = loss + l_route
                accs.append(level_accuracy(node_acc.cpu(), levels))
            loss_value = finite_loss(acc, loss, step + 1, "A")
            opt_a.zero_grad(set_to_none=True)
            with acc.no_sync(wrapped):  # identical picks on every process: nothing to all-reduce
                acc.backward(loss)
            opt_a.step()
            row.update(stage="A", loss=loss_value, route_acc_per_level=accs[0], open_levels=open_levels)
        else:
            # Stage B: CE (+ KD) through the fused model; decaying route loss; usage regulariser. Stage C: top-K.
            stage = "B"
            b_step = step - stage_a
            global_batch = [examples[i] for i in batch_indices(n_examples, batch_size, b_step, seed)]
            mine = global_batch[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]
            on = teacher_model is not None and is_on_policy(on_policy.ratio, seed, b_step)
            with model.selection(cfg.selection):  # on-policy, the student samples as it runs at inference
                b = step_batch(model, mine, tok.pad_token_id, stop_ids, on_policy, on,
                               seed * 1_000_003 + b_step * acc.num_processes + acc.process_index, acc.device)
            selection = cfg.selection if (anneal_steps and b_step >= max_steps - anneal_steps) else train_selection
            stage = "C" if selection != train_selection else "B"
            # Normalise by the *global* token count so 2 processes give the same gradient as 1 (DDP averages).
            n_tok = acc.reduce(b["loss_mask"].sum().to(acc.device).float(), reduction="sum") / acc.num_processes
            keep, tail = scored_tail(b, acc.device)  # logits only where a target is scored (the tail)
            t_logits = teacher_logits(teacher_model, b, keep) if on else None  # (B, len(keep), V_T)
            # What the forward runs with stays in place through the backward, which recomputes checkpointed layers
            # (with --gradient_checkpointing): the same routing mode, the same cached starting states.
            forward = contextlib.ExitStack()
            if "states" in b:  # an off-policy batch of cached states: the layers below them do not run
                forward.enter_context(starting_at(model.base, cached_layer, b["states"].to(acc.device, base_dtype)))
            forward.enter_context(model.selection(selection))
            targeted = state_loss_weight > 0 and "state_target" in b  # hooks after the plug-in's: its Δ included
            seen = forward.enter_context(capture_layers(model.base, cfg.layers)) if targeted else None
            with forward:
                with acc.autocast(), model.plugin.recording() as records:
                    logits = wrapped(**padded_inputs(b["input_ids"], b["attention_mask"], acc.device),
                                     logits_to_keep=keep).logits  # (B, len(keep), V)
                    loss, parts = objective_loss(logits, tail, n_tok, t_logits, on_policy.beta, ce_weight,
                                                 kd_weight if use_kd else 0.0)
                    aux_route = torch.zeros((), device=acc.device)
                    aux_usage = torch.zeros((), device=acc.device)
                    eff, ratio = [], []
                    for layer, rec in records.items():
                        if rec.route.leaf_logp is not None:  # log N - entropy of the usage over every process's tokens
                            u = global_usage(rec.route, rec.mask, acc)  # (N,)
                            aux_usage = aux_usage + (math.log(u.numel()) - torch.log(effective_leaves(u)))
                            eff.append(effective_leaves(u).item())
                        ratio.append(rec.delta_ratio.item())
                    w_route = route_weight * max(0.0, 1.0 - b_step / max_steps)
                    if w_route > 0:
                        for layer, gate in zip(cfg.layers, gates):
                            aux_route = aux_route + sampled_route_loss(gate, route_data, layer, route_batch_size, g,
                                                                       acc.device)[0]
                    loss = loss + w_route * aux_route + usage_weight * aux_usage
                    if targeted:
                        l_state = state_loss([seen[x] for x in cfg.layers], b["state_target"], b["state_norm2"])
                        loss = loss + state_loss_weight * l_state
                        parts = {**parts, "state": l_state.item()}
                loss_value = finite_loss(acc, loss, step + 1, stage)
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
            opt.step()
            tokens_since += int(b["attention_mask"].sum()) * acc.num_processes
            row.update(stage=stage, objective="on_policy" if on else "off_policy", loss=loss_value,
                       **global_mean(acc, parts),
                       route=aux_route.item(), usage=aux_usage.item(), effective_leaves=eff, delta_ratio=ratio)
            if teacher_model is not None:  # samples drawn so far, and this step's sampled tokens (this process)
                samples_seen += len(mine) * acc.num_processes if on else 0
                row.update(samples=samples_seen, sample_tokens=int(b["loss_mask"].sum()) if on else 0)
            # the step's vocabulary-wide tensors (~0.6 GB each at 4 x 256 sampled tokens of a 152k vocabulary) go
            # now, not when the next step reassigns them: else two steps' worth are alive during the next forward
            del logits, t_logits, loss, records
        step += 1
        bar.update(1)
        bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.4f}",
                        **({"samples": row["samples"]} if "samples" in row else {}))
        if acc.is_main_process and (step % log_every == 0 or step == total or step == stage_a):
            now = time.perf_counter()
            row["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9) if tokens_since else None
            t_last, tokens_since = now, 0
            append_jsonl(metrics_path, row)
            if bar.disable:
                log_progress("toe train", row, total)
            if report_to:
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        if step % save_every == 0 or step == total or step == stage_a:
            acc.wait_for_everyone()
            if acc.is_main_process:
                in_a = bool(stage_a) and step <= stage_a
                save_checkpoint(out, model.plugin.state_dict(), opt_a if in_a else opt,
                                {"step": step, "stage": "A" if in_a else "B"})
                plot_curves(metrics_path, os.path.join(out, "curves.png"))  # refreshed with every checkpoint
        if snapshot_every and step > stage_a and (step - stage_a) % snapshot_every == 0 and step < total \
                and acc.is_main_process:
            model.save_pretrained(os.path.join(out, "snapshots", f"step-{step - stage_a}"))
    bar.close()
    if report_to:
        acc.end_training()
    acc.wait_for_everyone()
    # kd: whether steps distilled the cached top-k log-probs (off-policy steps only)
    summary = {"out": out, "steps": step, "stage_a_steps": stage_a, "kd": use_kd and on_policy.ratio < 1,
               "examples": n_examples, "skipped_truncated": skipped,  # rows left out by --skip_truncated
               "left_out": left_out, "processes": acc.num_processes}
    if acc.is_main_process:
        model.save_pretrained(out)
        summary["curves"] = plot_curves(metrics_path, os.path.join(out, "curves.png"))
        with open(metrics_path) as f:
            rows = [json.loads(r) for r in f]
        last_b = [r for r in rows if r["stage"] != "A"]
        summary["final"] = last_b[-1] if last_b else rows[-1]
        summary.update(peak_memory())
        atomic_write_json(os.path.join(out, "train_summary.json"), summary)
    return summary


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
