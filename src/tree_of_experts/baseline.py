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

import json
import os
import time

import torch
from safetensors.torch import load_file

from .bank import ExpertBank
from .cluster import init_gate_from_geometry
from .config import WEIGHTS_NAME, ToEConfig, ToEError
from .data import DataSpec, batch_indices, encode, pad_left, read_jsonl
from .extract import extract
from .hf import enable_checkpointing, load_causal_lm, load_tokenizer, padded_inputs
from .io import append_jsonl, atomic_write_json
from .losses import tail_positions, token_nll
from .model import ToEModel
from .plugin import ToEPlugin
from .train import train

KINDS = ("control", "static", "random", "flat", "lora", "sft")


def _plugin_params(experts: str) -> int:
    return sum(t.numel() for t in load_file(os.path.join(experts, WEIGHTS_NAME)).values())


def _modified_plugin(base_model, experts: str, kind: str, out: str, seed: int) -> str:
    """Writes the starting plug-in of a bank/gate baseline into ``out/init`` and returns that folder."""
    model = ToEModel.from_pretrained(base_model, experts)
    g = torch.Generator().manual_seed(seed)
    route = load_file(os.path.join(experts, "route_data.safetensors"))
    for layer, block in model.plugin.blocks.items():
        vectors = block.bank.vectors().detach()
        if kind == "static":
            sizes = torch.bincount(route[f"leaf.{layer}"], minlength=len(vectors)).float()
            mean = (vectors * sizes[:, None]).sum(0) / sizes.sum()
            block.bank = ExpertBank(mean.expand_as(vectors).clone(), {**block.bank.info, "baseline": "static mean"})
        elif kind == "random":
            rand = torch.randn(vectors.shape, generator=g)
            rand = rand / rand.norm(dim=-1, keepdim=True) * vectors.norm(dim=-1, keepdim=True)
            block.bank = ExpertBank(rand, {**block.bank.info, "baseline": "random directions"})
    if kind == "flat":
        cfg = ToEConfig(**{**model.config.to_dict(), "shape": "flat",
                           "selection": "topk" if model.config.selection == "beam" else model.config.selection})
        banks = {int(k): b.bank for k, b in model.plugin.blocks.items()}
        plugin = ToEPlugin(cfg, banks)
        for layer, block in plugin.blocks.items():
            init_gate_from_geometry(block.gate, route[f"states.{layer}"].float(), route[f"leaf.{layer}"])
        model.detach()
        model = ToEModel(base_model, plugin)
    path = os.path.join(out, "init")
    model.save_pretrained(path)
    model.detach()
    return path


def _train_adapter(base_model, tok, data: str, spec: DataSpec, out: str, max_steps: int, batch_size: int, lr: float,
                   limit: int | None, max_length: int, seed: int, gradient_checkpointing: bool) -> list[dict]:
    """Plain CE training of whatever requires grad in ``base_model`` (LoRA or all weights), same data order as
    `toe train`'s Stage B."""
    if gradient_checkpointing:  # LoRA and SFT backpropagate through every layer: activations dominate memory
        enable_checkpointing(base_model)
    rows = read_jsonl(data, spec, limit)
    spec = spec.for_tokenizer(tok)
    examples = [encode(tok, spec.prompt(r), spec.response(r), max_length) for r in rows]
    params = [p for p in base_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev = next(base_model.parameters()).device
    base_model.train()
    metrics, n = [], len(examples)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)
    t0 = time.perf_counter()
    for step in range(max_steps):
        batch = [examples[i] for i in batch_indices(n, batch_size, step, seed)]
        ids, am = pad_left([e.input_ids for e in batch], tok.pad_token_id)
        mask = pad_left([e.loss_mask.long() for e in batch], 0)[0].bool()
        keep = tail_positions(mask, dev)  # logits only where a target is scored, as in `toe train`
        logits = base_model(**padded_inputs(ids, am, dev), logits_to_keep=keep).logits
        tail = slice(-len(keep), None)
        loss = token_nll(logits, ids[:, tail].to(dev), mask[:, tail].to(dev)).sum() / mask.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step + 1, "loss": loss.item(), "ce": loss.item(), "elapsed_s": time.perf_counter() - t0}
        append_jsonl(path, row)
        metrics.append(row)
    base_model.eval()
    return metrics


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
    dtype: str = "float32",
    seed: int = 0,
    gradient_checkpointing: bool = False,
    save_every: int = 50,
    resume: bool = False,
) -> dict:
    """Trains one baseline on the same data and step budget as `toe train`.

    Args:
        kind: one of control, static, random, flat, lora, sft (see the module docstring).
        base: base model id or folder.
        data: training JSONL (the same file ToE was trained on).
        out: output folder: a plug-in folder (control/static/random/flat), a peft adapter (lora) or a model (sft).
        experts: the `toe extract` folder ToE was built from (needed by every kind but sft, and by lora only for its
            parameter-matched rank).
        max_steps, stage_a_steps, batch_size: the budget (match `toe train`'s).
        lr: learning rate (defaults: ToE's for plug-in kinds, 2e-4 for lora, 1e-5 for sft).
        bank_lr: the bank's learning rate for plug-in kinds (default: ToE's).
        lora_rank: LoRA rank (default: matched to the plug-in's parameter count).
        limit, prompt_field, response_field, template, strip_calc, max_length: the data, as for `toe train`.
        dtype, seed, gradient_checkpointing: as for `toe train` (checkpointing recomputes activations in backward:
            the same gradients in much less memory, which LoRA and SFT need on long sequences).
        save_every, resume: checkpoints of the plug-in kinds (control, static, random, flat), as for `toe train`:
            ``resume`` continues an interrupted run from ``out/checkpoint`` (the control's extraction resumes from
            its last complete shard on its own).
    """
    if kind not in KINDS:
        raise ToEError(f"kind={kind!r}: use one of {KINDS}")
    if experts is None and not (kind == "sft" or (kind == "lora" and lora_rank)):
        fix = " or an explicit --lora_rank" if kind == "lora" else ""
        raise ToEError(f"baseline {kind!r} needs --experts (the `toe extract` folder ToE was built from){fix}")
    if resume and kind in ("lora", "sft"):
        raise ToEError(f"--resume continues the plug-in baselines (control, static, random, flat); a {kind} run "
                       "restarts: drop --resume")
    spec = DataSpec(prompt_field, response_field, template, strip_calc)
    data_kw = dict(limit=limit, prompt_field=prompt_field, response_field=response_field, template=template,
                   strip_calc=strip_calc, max_length=max_length)
    train_kw = dict(data=data, max_steps=max_steps, batch_size=batch_size, seed=seed, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, **data_kw)
    plugin_kw = dict(save_every=save_every, resume=resume)  # checkpointing: `toe train` does it for plug-in kinds
    if lr is not None:
        train_kw["lr"] = lr
    if bank_lr is not None and kind not in ("lora", "sft"):
        train_kw["bank_lr"] = bank_lr
    summary: dict = {"kind": kind, "out": out}
    if kind == "control":
        with open(os.path.join(experts, "run.json")) as f:
            run = json.load(f)
        cfg = ToEConfig.load(experts)
        control_dir = os.path.join(out, "extract")
        extract(teacher=base, base=base, data=data, out=control_dir, num_leaves=cfg.num_leaves, shape=cfg.shape,
                layers=cfg.layers, teacher_layers=cfg.layers, limit=run.get("limit"), **{
                    k: v for k, v in data_kw.items() if k != "limit"}, gate_rank=cfg.gate_rank, top_k=cfg.top_k,
                selection=cfg.selection, dtype=dtype, seed=seed)
        summary["train"] = train(base=base, experts=control_dir, out=out, no_kd=True, stage_a_steps=stage_a_steps,
                                 **train_kw, **plugin_kw)
    elif kind in ("static", "random", "flat"):
        init = _modified_plugin(load_causal_lm(base, dtype=dtype), experts, kind, out, seed)  # train loads its own
        flags = {"static": dict(freeze_bank=True, skip_stage_a=True), "random": dict(skip_stage_a=True),
                 "flat": {}}[kind]
        summary["train"] = train(base=base, experts=experts, init_plugin=init, out=out,
                                 stage_a_steps=stage_a_steps, **flags, **train_kw, **plugin_kw)
    else:
        tok = load_tokenizer(base)
        base_model = load_causal_lm(base, dtype=dtype)
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            linear = [m for m in base_model.modules() if isinstance(m, torch.nn.Linear)]
            per_rank = sum(m.in_features + m.out_features for m in linear if m is not base_model.get_output_embeddings())
            target = _plugin_params(experts) if experts else None
            rank = lora_rank or max(1, round(target / per_rank))
            torch.manual_seed(seed)  # peft draws LoRA's A matrices from the global generator
            model = get_peft_model(base_model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
            summary.update(rank=rank, trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                           plugin_params=target)
            summary["metrics"] = _train_adapter(model, tok, data, spec, out, max_steps, batch_size, lr or 2e-4, limit,
                                                max_length, seed, gradient_checkpointing)[-1]
            model.save_pretrained(out)
        else:
            base_model.requires_grad_(True)
            summary["metrics"] = _train_adapter(base_model, tok, data, spec, out, max_steps, batch_size, lr or 1e-5,
                                                limit, max_length, seed, gradient_checkpointing)[-1]
            base_model.save_pretrained(out)
            tok.save_pretrained(out)
    atomic_write_json(os.path.join(out, "baseline_summary.json"), summary)
    return summary
