"""`toe baseline`: the comparisons ToE must beat, trained on the same data with the same step budget.

Kinds:
    control  the identical pipeline with the base's own states in place of the teacher's and no distillation:
             ToE's margin over it is what the teacher contributes.
    static   one vector (the mean expert signal) added to every token, only its per-channel scale trained.
    random   a bank of random directions (extracted norms), trained end to end, no route warm-up.
    flat     a flat softmax router ("MoE") over the same bank, trained like ToE.
    lora     peft LoRA on all linear layers: rank matched to the plug-in's parameter count, or --lora_rank.
    sft      full fine-tuning (a reference: it breaks the frozen-base rule).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import time

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..bank import ExpertBank
from ..commands.extract import extract
from ..commands.train import train
from ..config import WEIGHTS_NAME, BaselineConfig, ToEConfig, ToEError
from ..data import DataSpec, batch_indices, file_hash
from ..extraction.build import init_gate_from_geometry
from ..extraction.store import RUN, Extraction, route_key
from ..hf import (
    capture_layers,
    enable_checkpointing,
    is_full_hub_id,
    load_causal_lm,
    load_tokenizer,
    padded_inputs,
)
from ..losses import state_loss
from ..io import (
    append_jsonl,
    atomic_write_json,
    check_extraction,
    check_resume_args,
    claim_out,
    follow_umask,
    releases_out_locks,
)
from ..model import ToEModel
from ..plugin import ToEPlugin
from ..training.checkpoint import (
    RESUMED,
    checkpoint_dir,
    has_checkpoint,
    keep_logged_rows,
    load_checkpoint,
    log_progress,
    peak_memory,
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
from ..training.examples import check_kd_cache, encode_rows, load_examples
from ..training.steps import flush_denormals

ARGS_NAME = "baseline_args.json"  # the arguments of the run in a folder: `--resume` must repeat them


def _plugin_params(experts: str) -> int:
    return sum(t.numel() for t in load_file(os.path.join(experts, WEIGHTS_NAME)).values())


def _modified_plugin(base_model, experts: str, kind: str, out: str, seed: int) -> str:
    """Writes the starting plug-in of a bank/gate baseline into ``out/init`` and returns that folder."""
    model = ToEModel.from_pretrained(base_model, experts, mmap_bank=False)  # a plug-in to train: in RAM
    g = torch.Generator().manual_seed(seed)
    route = Extraction(experts).route_data()
    for layer, block in model.plugin.blocks.items():
        vectors = block.bank.vectors().detach()
        if kind == "static":
            sizes = torch.bincount(route[route_key("leaf", layer)], minlength=len(vectors)).float()
            mean = (vectors * sizes[:, None]).sum(0) / sizes.sum()
            block.bank = ExpertBank(mean.expand_as(vectors).clone(), {**block.bank.info, "baseline": "static mean"})
        elif kind == "random":
            rand = torch.randn(vectors.shape, generator=g)
            rand = rand / rand.norm(dim=-1, keepdim=True) * vectors.norm(dim=-1, keepdim=True)
            block.bank = ExpertBank(rand, {**block.bank.info, "baseline": "random directions"})
    if kind == "flat":
        cfg = ToEConfig(**{**model.toe_config.to_dict(), "shape": "flat",
                           "selection": "topk" if model.toe_config.selection == "beam" else model.toe_config.selection})
        banks = {int(k): b.bank for k, b in model.plugin.blocks.items()}
        plugin = ToEPlugin(cfg, banks)
        for layer, block in plugin.blocks.items():
            init_gate_from_geometry(block.gate, route[route_key("states", layer)].float(), route[route_key("leaf", layer)])
        model.detach()
        model = ToEModel(base_model, plugin)
    path = os.path.join(out, "init")
    with model:
        model.save_pretrained(path)
    return path


def _train_adapter(base_model, tok, examples: list, out: str, max_steps: int, batch_size: int, lr: float,
                   seed: int, gradient_checkpointing: bool, teacher_model=None, on_policy: OnPolicy | None = None,
                   ce_weight: float = 1.0, kd_weight: float = 0.0, save_every: int = 50,
                   resume: bool = False, state_loss_weight: float = 0.0,
                   state_layers: list[int] | None = None, snapshot_every: int = 0) -> list[dict]:
    """Trains whatever requires grad in ``base_model`` (LoRA or all weights) with `toe train`'s Stage-B objective
    (:func:`tree_of_experts.training.distill.objective_loss`) and data order: off-policy CE (+ ``kd_weight`` · top-k KL where
    ``examples`` carry the teacher's cached top-k), and on-policy steps (the adapted model samples, ``teacher_model``
    scores) on the same (seed, step) schedule. Every ``save_every`` steps the trainable tensors and the optimizer go
    to ``out/checkpoint``; ``resume`` continues from there to the uninterrupted run's weights (every random choice
    is a function of (seed, step)). With ``state_loss_weight``, off-policy steps also fit the base's states at
    ``state_layers`` to the teacher's signal (:func:`tree_of_experts.losses.state_loss`)."""
    if gradient_checkpointing:  # LoRA and SFT backpropagate through every layer: activations dominate memory
        enable_checkpointing(base_model)
    trained = {n: p for n, p in base_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=0.0)
    dev = next(base_model.parameters()).device
    base_model.train()
    metrics, n = [], len(examples)
    stop_ids = eos_ids(base_model, tok)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    start, samples_seen, elapsed = 0, 0, 0.0
    if resume and has_checkpoint(out):
        weights, opt_state, state = load_checkpoint(out, "adapter")
        if {n: t.shape for n, t in weights.items()} != {n: p.shape for n, p in trained.items()}:
            raise ToEError(f"--resume: {out}/checkpoint holds other trainable tensors than this run's (another "
                           "--kind, rank or base?): start again with --overwrite true")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(weights[name])
        opt.load_state_dict(opt_state)
        start, samples_seen, elapsed = state["step"], state["samples"], state["elapsed_s"]
        keep_logged_rows(path, start)
    elif os.path.exists(path):
        os.remove(path)
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc="toe baseline", disable=None)
    for step in bar:
        torch.manual_seed(seed * 1_000_003 + step)  # any dropout draws the same after a resume
        batch = [examples[i] for i in batch_indices(n, batch_size, step, seed)]
        on = teacher_model is not None and is_on_policy(on_policy.ratio, seed, step)
        # the same seeds as `toe train` (one process); logits only where a target is scored
        b = step_batch(base_model, batch, tok.pad_token_id, stop_ids, on_policy, on, seed * 1_000_003 + step, dev)
        samples_seen += len(batch) if on else 0
        keep, tail = scored_tail(b, dev)
        t_logits = teacher_logits(teacher_model, b, keep) if on else None
        targeted = state_loss_weight > 0 and "state_target" in b
        with capture_layers(base_model, state_layers) if targeted else contextlib.nullcontext() as seen:
            logits = base_model(**padded_inputs(b["input_ids"], b["attention_mask"], dev), logits_to_keep=keep).logits
        n_tok = b["loss_mask"].sum().clamp_min(1).to(dev).float()
        loss, parts = objective_loss(logits, tail, n_tok, t_logits, on_policy.beta if on_policy else 0.5,
                                     ce_weight, kd_weight)
        if targeted:
            l_state = state_loss([seen[x] for x in state_layers], b["state_target"], b["state_norm2"])
            loss, parts = loss + state_loss_weight * l_state, {**parts, "state": l_state.item()}
        if not math.isfinite(loss.item()):  # stop before the update, as `toe train` does: nothing saved from it
            raise ToEError(f"training stopped at step {step + 1}: the loss is {loss.item()}; nothing was saved from "
                           "this state (earlier checkpoints are intact): lower --lr and start again with --overwrite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step + 1, "objective": "on_policy" if on else "off_policy", "loss": loss.item(), **parts,
               "elapsed_s": time.perf_counter() - t0}
        if teacher_model is not None:
            row.update(samples=samples_seen, sample_tokens=int(b["loss_mask"].sum()) if on else 0)
        del logits, t_logits, loss  # vocabulary-wide: not alive during the next step's forward
        append_jsonl(path, row)
        if bar.disable:
            log_progress("toe baseline", row, max_steps)
        metrics.append(row)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < max_steps:
            snap = os.path.join(out, "snapshots", f"step-{step + 1}")
            base_model.save_pretrained(snap)
            follow_umask(snap)  # safetensors writes 0600 files
        if (step + 1) % save_every == 0 and step + 1 < max_steps:
            save_checkpoint(out, trained, opt, {"step": step + 1, "samples": samples_seen,
                                                "elapsed_s": row["elapsed_s"]}, what="adapter")
    base_model.eval()
    return metrics


@releases_out_locks
def baseline(
    kind: str,
    base: str,
    data: str,
    out: str,
    experts: str | None = None,
    max_steps: int = 200,
    stage_a_steps: int = 100,
    batch_size: int = 8,
    lr: float | None = None,
    bank_lr: float | None = None,
    lora_rank: int | None = None,
    limit: int | None = None,
    prompt_field: str = "question",
    response_field: str = "answer",
    template: str = "Question: {prompt}\nAnswer: ",
    strip_calc: bool = False,
    max_length: int = 512,
    skip_truncated: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    gradient_checkpointing: bool = False,
    save_every: int = 50,
    snapshot_every: int = 0,
    resume: bool = False,
    objective: str = "off_policy",
    teacher: str | None = None,
    on_policy_ratio: float = 1.0,
    beta: float = 0.5,
    sample_max_new_tokens: int = 256,
    sample_temperature: float = 1.0,
    sample_top_p: float = 1.0,
    kd_weight: float | None = None,
    overwrite: bool = False,
    query_norm: bool | None = None,
    cached_states: bool = False,
    state_loss_weight: float = 0.0,
) -> dict:
    """Trains one baseline on the same data and step budget as `toe train`.

    Args:
        kind: one of control, static, random, flat, lora, sft (see the module docstring).
        base: base model id or folder.
        data: training data (the same file ToE was trained on).
        out: output folder: a plug-in folder (control/static/random/flat), a peft adapter (lora) or a model (sft).
        experts: the `toe extract` folder ToE was built from (needed by every kind but sft, and by lora only for its
            parameter-matched rank).
        max_steps: optimisation steps (match `toe train`'s).
        stage_a_steps: route warm-up steps of the plug-in kinds (match `toe train`'s; unused by lora and sft).
        batch_size: sequences per step (match `toe train`'s).
        lr: learning rate (defaults: ToE's for plug-in kinds, 2e-4 for lora, 1e-5 for sft).
        bank_lr: the bank's learning rate for plug-in kinds (default: ToE's).
        lora_rank: LoRA rank (default: matched to the plug-in's parameter count).
        limit: use the first ``limit`` rows of ``data``.
        prompt_field: record field holding the question, as for `toe train`.
        response_field: record field holding the response trained on, as for `toe train`.
        template: prompt template with ``{prompt}``, or "chat", as for `toe train`.
        strip_calc: drop GSM8K's ``<<48/2=24>>`` calculator notes from responses.
        max_length: tokens kept per example (prompt + response + EOS), as for `toe train`.
        skip_truncated: leave out the rows whose prompt fills ``max_length`` and count them in the summary, as for
            `toe train` (refused otherwise).
        dtype: dtype of the base: "float32", "float16", "bfloat16" or "auto" (as stored).
        seed: seed of every random choice, as for `toe train`.
        gradient_checkpointing: recompute activations in backward: the same gradients in much less memory, which
            LoRA and SFT need on long sequences.
        save_every: steps between checkpoints in ``out/checkpoint`` (plug-in kinds: the plug-in; lora and sft: the
            trainable tensors and the optimizer — for sft the whole model and its Adam state, about 3x the model on
            disk — removed once the run has saved its weights).
        snapshot_every: also keep the trained weights every this many steps as ``out/snapshots/step-N`` (plug-in
            kinds: through `toe train`; lora: an adapter folder each); 0: none.
        resume: continue an interrupted run from ``out/checkpoint`` to the uninterrupted run's result (the
            control's extraction resumes from its last complete shard on its own).
        objective: "off_policy" or "on_policy", as for `toe train` (static, random, flat, lora and sft; the control
            stays off-policy without the teacher, by definition). LoRA and SFT run the same objective code.
        teacher: the teacher for on-policy steps (default: the one the extraction read).
        on_policy_ratio: share of the steps that are on-policy with ``objective="on_policy"`` (GKD's λ).
        beta: GKD's β, the generalized JSD of on-policy steps: 0 forward KL, 1 reverse KL, 0.5 the symmetric JSD.
        sample_max_new_tokens: length cap, in tokens, of each continuation the student samples on-policy.
        sample_temperature: temperature of the student's on-policy sampling (1: its own distribution).
        sample_top_p: nucleus mass of the student's on-policy sampling (1: no truncation).
        kd_weight: weight of the teacher's cached top-k KL in off-policy steps (the extraction in ``experts`` must
            have cached it for ``data``). Default: `toe train`'s 1.0 for plug-in kinds, 0 for lora/sft (the CE-only
            adapters of the earlier studies); pass 1.0 to give LoRA ToE's off-policy objective.
        overwrite: replace what another run left in ``out`` (refused otherwise; ``resume`` continues this one).
        query_norm: the gates' query normalisation for plug-in kinds, as `toe train --query_norm` (None: the
            plug-in's own setting), so a control is trained like the ToE row it is compared with.
        cached_states: plug-in kinds train from cached base states at the lowest injection layer, as `toe train
            --cached_states` (the control from its own no-teacher extraction of ``data``); refused for lora and sft,
            which change every layer.
        state_loss_weight: the state loss of `toe train --state_loss_weight` for this baseline too: for lora and
            sft the change of the base's states at the extraction's injection layers (``experts``) against the
            teacher's signal there; plug-in kinds pass it to `toe train`. 0: off.
    """
    args = dict(locals())
    flush_denormals()  # subnormal gradients slow CPU matmuls many-fold as training sharpens the softmax
    BaselineConfig.from_args(args)
    if experts is None and not (kind == "sft" or (kind == "lora" and lora_rank)):
        fix = " or an explicit --lora_rank" if kind == "lora" else ""
        raise ToEError(f"baseline {kind!r} needs --experts (the `toe extract` folder ToE was built from){fix}")
    if cached_states and kind in ("lora", "sft"):
        raise ToEError(f"--cached_states: a {kind} run changes every layer of the base, so no layer's states can be "
                       "cached: drop it")
    if experts is not None:
        check_extraction(experts)
    on_policy = OnPolicy.of(objective, on_policy_ratio, beta, sample_max_new_tokens, sample_temperature, sample_top_p)
    if kind == "control" and objective != "off_policy":
        raise ToEError("the no-teacher control trains without the teacher: drop --objective (it is off-policy CE)")
    if kind in ("lora", "sft") and (kd_weight or 0) > 0:  # the cached top-k is read later: checked now, from the
        # extraction's record of the data it cached (a row tokenized otherwise is caught when the examples load)
        ex = Extraction(experts) if experts else None
        run = ex.run() if ex is not None and ex.has(RUN) else {}
        if not run.get("topk_logprobs") or run.get("data_sha256") != file_hash(data):
            raise ToEError(f"kd_weight={kd_weight} but {experts or 'no --experts'} holds no cached teacher top-k for "
                           f"{data}: extract with --topk_logprobs > 0 on this data, or drop --kd_weight")
        check_kd_cache(ex, run, data, "--kd_weight 0")  # its shards are there, as long as the manifest says
    if on_policy.ratio > 0:  # before anything is written to out
        teacher = resolve_teacher(teacher, experts, base)
    spec = DataSpec(prompt_field, response_field, template, strip_calc)
    tok = load_tokenizer(base)  # rows with nothing of their response left are refused (or counted) before any model
    encoded, kept = encode_rows(data, spec.for_tokenizer(tok), tok, max_length, limit, skip_truncated)
    if resume and not overwrite and os.path.isfile(os.path.join(out, "baseline_summary.json")):
        raise ToEError(f"--resume: {out} holds a finished baseline run (baseline_summary.json): nothing to resume; "
                       "pass --overwrite true to redo it, or a new --out")
    claim_out(out, "baseline", overwrite=overwrite, resume=resume, extra=("init", "extract", ARGS_NAME),
              keep=RESUMED + (ARGS_NAME,) if resume else (),  # --resume --overwrite: continue, replace the rest
              inputs={"base": base, "experts": experts, "teacher": teacher, "data": data})
    args_path = os.path.join(out, ARGS_NAME)
    if resume:
        check_resume_args(args_path, args, {k: p.default for k, p in inspect.signature(baseline).parameters.items()},
                          resume_ignores(objective))
    atomic_write_json(args_path, args)
    data_kw = dict(limit=limit, prompt_field=prompt_field, response_field=response_field, template=template,
                   strip_calc=strip_calc, max_length=max_length)
    train_kw = dict(data=data, max_steps=max_steps, batch_size=batch_size, seed=seed, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, **data_kw)
    # checkpoints and snapshots: `toe train` makes them for plug-in kinds
    plugin_kw = dict(save_every=save_every, resume=resume, snapshot_every=snapshot_every)
    if lr is not None:
        train_kw["lr"] = lr
    if bank_lr is not None and kind not in ("lora", "sft"):
        train_kw["bank_lr"] = bank_lr
    objective_kw = dict(objective=objective, teacher=teacher, on_policy_ratio=on_policy_ratio, beta=beta,
                        sample_max_new_tokens=sample_max_new_tokens, sample_temperature=sample_temperature,
                        sample_top_p=sample_top_p)
    if kd_weight is not None and kind not in ("lora", "sft"):
        train_kw["kd_weight"] = kd_weight
    if query_norm is not None and kind not in ("lora", "sft"):
        train_kw["query_norm"] = query_norm
    if cached_states:
        train_kw["cached_states"] = True
    if state_loss_weight and kind not in ("lora", "sft"):
        train_kw["state_loss_weight"] = state_loss_weight
    if skip_truncated:
        train_kw["skip_truncated"] = True
    summary: dict = {"kind": kind, "out": out, "objective": objective,
                     "skipped_truncated": len(encoded) - len(kept)}  # rows left out by --skip_truncated
    if kind == "control":
        run = Extraction(experts).run()
        cfg = ToEConfig.load(experts)
        control_dir = os.path.join(out, "extract")
        extract(teacher=base, base=base, data=data, out=control_dir, num_leaves=cfg.num_leaves, shape=cfg.shape,
                layers=cfg.layers, teacher_layers=cfg.layers, limit=run.get("limit"), **{
                    k: v for k, v in data_kw.items() if k != "limit"}, gate_rank=cfg.gate_rank, top_k=cfg.top_k,
                selection=cfg.selection, dtype=dtype, seed=seed, topk_logprobs=0)  # it trains without KD
        summary["train"] = train(base=base, experts=control_dir, out=out, no_kd=True, stage_a_steps=stage_a_steps,
                                 **train_kw, **plugin_kw)
    elif kind in ("static", "random", "flat"):
        init = _modified_plugin(load_causal_lm(base, dtype=dtype), experts, kind, out, seed)  # train loads its own
        flags = {"static": dict(freeze_bank=True, skip_stage_a=True), "random": dict(skip_stage_a=True),
                 "flat": {}}[kind]
        summary["train"] = train(base=base, experts=experts, init_plugin=init, out=out,
                                 stage_a_steps=stage_a_steps, **flags, **train_kw, **plugin_kw, **objective_kw)
    else:
        base_model = load_causal_lm(base, dtype=dtype)
        kd = kd_weight or 0.0
        if state_loss_weight and not experts:
            raise ToEError("--state_loss_weight reads the teacher's signal from an extraction: pass --experts")
        examples, has_kd, _ = load_examples(data, spec.for_tokenizer(tok), tok, max_length, limit, experts or "",
                                            kd > 0, skip_truncated=skip_truncated,
                                            without_kd="--kd_weight 0", with_targets=bool(state_loss_weight))
        if state_loss_weight and not any(e.target is not None for e in examples):
            raise ToEError(f"--state_loss_weight needs {experts}'s cached states for {data}: extract from this file "
                           "with the same --template/--max_length/fields, or pass 0")
        if kd > 0 and not has_kd:
            raise ToEError(f"kd_weight={kd} but {experts} holds no cached teacher top-k for {data}: extract with "
                           "--topk_logprobs > 0 on this data, or drop --kd_weight")
        dev = next(base_model.parameters()).device
        teacher_model = load_teacher(teacher, tok, dtype, dev) if on_policy.ratio > 0 else None
        fit = dict(teacher_model=teacher_model, on_policy=on_policy, kd_weight=kd, save_every=save_every,
                   resume=resume, state_loss_weight=state_loss_weight, snapshot_every=snapshot_every,
                   state_layers=Extraction(experts).run()["layers"] if state_loss_weight else None)
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            linear = [m for m in base_model.modules() if isinstance(m, torch.nn.Linear)]
            per_rank = sum(m.in_features + m.out_features for m in linear if m is not base_model.get_output_embeddings())
            target = _plugin_params(experts) if experts else None
            rank = lora_rank or max(1, round(target / per_rank))
            torch.manual_seed(seed)  # peft draws LoRA's A matrices from the global generator
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                              task_type="CAUSAL_LM")
            model = get_peft_model(base_model, lora)
            summary.update(rank=rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                           trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                           plugin_params=target)
            summary["metrics"] = _train_adapter(model, tok, examples, out, max_steps, batch_size, lr or 2e-4, seed,
                                                gradient_checkpointing, **fit)[-1]
            model.save_pretrained(out)  # peft writes an empty template card; adapter_card replaces it below
        else:
            base_model.requires_grad_(True)
            summary["metrics"] = _train_adapter(base_model, tok, examples, out, max_steps, batch_size, lr or 1e-5,
                                                seed, gradient_checkpointing, **fit)[-1]
            base_model.save_pretrained(out)
            tok.save_pretrained(out)
    if kind in ("lora", "sft"):  # peft and transformers save through safetensors, which writes 0600 files
        for name in os.listdir(out):
            if name.endswith(".safetensors"):
                follow_umask(os.path.join(out, name))
    summary.update(peak_memory())
    if kind == "lora":
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(adapter_card(args, summary))
    atomic_write_json(os.path.join(out, "baseline_summary.json"), summary)
    if kind in ("lora", "sft"):  # the saved weights supersede the checkpoint (SFT's is the model + Adam: GBs)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return summary


def adapter_card(args: dict, summary: dict) -> str:
    """The README.md of a LoRA baseline's adapter folder: hub metadata, what was trained how, and how to load it
    (replacing peft's empty template)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = args["base"]
    on_hub = is_full_hub_id(base)
    data = ModelCardData(base_model=base if on_hub else None, library_name="peft", pipeline_tag="text-generation",
                         tags=["lora", "tree-of-experts", "baseline"])
    off = "CE on the training text" + (
        f" + {args['kd_weight']} x top-k KL to the teacher's cached log-probs" if args.get("kd_weight") else "")
    how = f"off-policy: {off}"
    if args["objective"] == "on_policy":
        teacher = f"the teacher `{args['teacher']}`" if args.get("teacher") else "the extraction's teacher"
        how = (f"on-policy: the adapted model samples up to {args['sample_max_new_tokens']} tokens per prompt "
               f"(temperature {args['sample_temperature']}, top-p {args['sample_top_p']}), {teacher} scores every "
               f"token, generalized JSD beta {args['beta']}")
        if args["on_policy_ratio"] < 1:
            how += f", on {args['on_policy_ratio']:.0%} of the steps; the others {off}"
    metrics = summary.get("metrics") or {}
    final = ", ".join([f"step {metrics['step']}"] * ("step" in metrics) + [
        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "elapsed_s"])
    rank = summary.get("rank")
    template = json.dumps(args["template"])  # a newline in it would break the table row
    load = (f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")')
    body = "\n".join([
        f"# LoRA baseline for `{base}`",
        "",
        "Trained by `toe baseline --kind lora`, the comparison a Tree-of-Experts plug-in is measured against: the same "
        "data, step budget and objective code as `toe train`.",
        "",
        "| field | value |",
        "|---|---|",
        f"| rank / alpha / dropout | {rank} / {summary.get('lora_alpha', 2 * rank)} / "
        f"{summary.get('lora_dropout', 0.0)}, every linear layer but the LM head |",
        f"| trainable parameters | {summary.get('trainable_params', 0):,} |",
        f"| objective | {how} |",
        f"| data | `{args['data']}` (template `{template}`, response field `{args['response_field']}`, "
        f"max length {args['max_length']}) |",
        f"| budget | {args['max_steps']} steps x {args['batch_size']} sequences, lr {args['lr'] or 2e-4}, "
        f"seed {args['seed']} |",
        f"| last step | {final or '-'} |",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        load,
        "```",
        "",
        "or `toe eval --base BASE --lora path/to/this/folder ...`; the run's arguments are in `baseline_args.json`, "
        "its per-step metrics in `metrics.jsonl`.",
        "",
    ])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
