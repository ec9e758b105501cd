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

import dataclasses
import json
import os
import shutil
import typing

import torch
from safetensors.torch import load_file

from ..bank import ExpertBank
from ..commands.extract import extract
from ..commands.train import train
from ..config import WEIGHTS_NAME, BaselineKind, ToEConfig, ToEError
from ..data import file_hash
from ..extraction.gate_init import init_gate_from_geometry
from ..extraction.store import RUN, Extraction, route_key
from ..hf.layers import enable_checkpointing
from ..hf.hub import is_full_hub_id
from ..hf.loading import load_causal_lm, load_tokenizer
from ..files import atomic_write_json, follow_umask
from ..folders import check_extraction, check_resume_args, claim_out
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
    unused,
)
from ..plugin import ToEPlugin
from ..training.checkpoint import RESUMED, checkpoint_dir, peak_memory
from ..training.distill import check_teacher_map, load_teacher, resolve_teacher, resume_ignores
from ..training.examples import check_kd_cache, encode_rows, load_examples
from ..training.loop import StepObjective, Student, TrainLoop, accelerator, check_batch
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


@grouped
@releases_out_locks
def baseline(
    kind: BaselineKind,
    base: str,
    data: str,
    out: str,
    experts: str | None = None,
    lora_rank: int | None = None,
    text: Text = Text(),
    schedule: Schedule = Schedule(),
    loss: Loss = Loss(),
    fit: Fit = Fit(),
    runtime: Runtime = Runtime(),
) -> dict:
    """Trains one baseline on `toe train`'s data, step budget and training loop.

    Every option of a group can also be given flat (``baseline("lora", ..., kd_weight=1.0)``; on the command line
    ``--kd_weight 1.0`` or ``--loss.kd_weight 1.0``).

    Args:
        kind: one of control, static, random, flat, lora, sft (see the module docstring).
        base: base model id or folder.
        data: training data (the same file ToE was trained on).
        out: output folder: a plug-in folder (control/static/random/flat), a peft adapter (lora) or a model (sft).
        experts: the `toe extract` folder ToE was built from (needed by every kind but sft, and by lora only for its
            parameter-matched rank).
        lora_rank: LoRA rank (default: matched to the plug-in's parameter count).
        text: which rows are read and how they become text, as for `toe train`.
        schedule: steps, batch, seed (match `toe train`'s), logging, checkpoints (lora and sft: the trainable
            tensors and the optimizer — for sft the whole model and its Adam state, about 3x the model on disk —
            removed once the run has saved its weights) and snapshots (lora: an adapter folder each).
        loss: the objective, as for `toe train` (the control stays off-policy without the teacher, by definition).
            ``kd_weight`` defaults to 1.0 for plug-in kinds and 0 for lora and sft (pass 1.0 to give LoRA ToE's
            off-policy objective); ``state_loss_weight`` for lora and sft fits the change of the base's states at
            the extraction's injection layers.
        fit: learning rate (defaults: ToE's for plug-in kinds, 2e-4 for lora, 1e-5 for sft); the other fields
            train plug-in kinds as `toe train`'s (lora and sft refuse them, and ``cached_states``: they change every
            layer of the base).
        runtime: dtype, mixed precision, gradient checkpointing (LoRA and SFT backpropagate through every layer:
            activations dominate their memory), resume (the control's extraction resumes from its last complete
            shard on its own), overwrite, trackers (``device`` is refused: accelerate places the models).
    """
    flush_denormals()  # subnormal gradients slow CPU matmuls many-fold as training sharpens the softmax
    args = flat_args(dict(locals()))
    require("toe baseline", runtime, {"device": ACCELERATE_PLACES})
    if kind not in typing.get_args(BaselineKind):
        raise ToEError(f"kind={kind!r} is unknown: use one of {', '.join(typing.get_args(BaselineKind))}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ToEError(f"lora_rank={lora_rank!r}: must be a whole number >= 1")
    adapter = kind in ("lora", "sft")
    if experts is None and not (kind == "sft" or (kind == "lora" and lora_rank)):
        fix = " or an explicit --lora_rank" if kind == "lora" else ""
        raise ToEError(f"baseline {kind!r} needs --experts (the `toe extract` folder ToE was built from){fix}")
    if adapter:
        unused(f"toe baseline --kind {kind}", fit, [f.name for f in dataclasses.fields(Fit)
                                                   if f.name not in ("lr", "cached_states")], "plug-in training only")
        if fit.cached_states:
            raise ToEError(f"--cached_states: a {kind} run changes every layer of the base, so no layer's states can "
                           "be cached: drop it")
    if experts is not None:
        check_extraction(experts)
    on_policy = loss.on_policy()
    check_teacher_map(runtime.teacher_device_map, on_policy.ratio, 1)  # (the processes: once accelerate starts)
    if kind == "control" and loss.objective != "off_policy":
        raise ToEError("the no-teacher control trains without the teacher: drop --objective (it is off-policy CE)")
    if adapter and loss.kd(0.0) > 0:  # the cached top-k is read later: checked now
        _check_kd_cache(experts, data, loss.kd_weight)
    if adapter and loss.state_loss_weight and not experts:
        raise ToEError("--state_loss_weight reads the teacher's signal from an extraction: pass --experts")
    if on_policy.ratio > 0:  # before anything is written to out
        loss = dataclasses.replace(loss, teacher=resolve_teacher(loss.teacher, experts, base))
    check_batch(schedule.batch_size, runtime.gradient_accumulation_steps)  # every kind, before a control's extraction
    tok = load_tokenizer(base)  # rows with nothing of their response left are refused (or counted) before any model
    spec = text.spec().for_tokenizer(tok)
    encoded, kept = encode_rows(data, spec, tok, text.max_length, text.limit, text.skip_truncated)
    if runtime.resume and not runtime.overwrite and os.path.isfile(os.path.join(out, "baseline_summary.json")):
        raise ToEError(f"--resume: {out} holds a finished baseline run (baseline_summary.json): nothing to resume; "
                       "pass --overwrite true to redo it, or a new --out")
    claim_out(out, "baseline", overwrite=runtime.overwrite, resume=runtime.resume, extra=("init", "extract", ARGS_NAME),
              keep=RESUMED + (ARGS_NAME,) if runtime.resume else (),  # --resume --overwrite: continue, replace the rest
              inputs={"base": base, "experts": experts, "teacher": loss.teacher, "data": data})
    args_path = os.path.join(out, ARGS_NAME)
    if runtime.resume:  # an adapter's record may predate the plug-in-only options it does not read
        check_resume_args(args_path, args, flat_defaults(baseline), resume_ignores(loss.objective) + (
            tuple(f.name for f in dataclasses.fields(Fit) if f.name != "lr") if adapter else ()))
    atomic_write_json(args_path, args)
    summary: dict = {"kind": kind, "out": out, "objective": loss.objective,
                     "skipped_truncated": len(encoded) - len(kept)}  # rows left out by --skip_truncated
    # plug-in kinds train through `toe train`, in this folder (which this run has claimed)
    plugin_runtime = dataclasses.replace(runtime, overwrite=False)
    if kind == "control":
        run = Extraction(experts).run()
        cfg = ToEConfig.load(experts)
        control_dir = os.path.join(out, "extract")
        extract(teacher=base, base=base, data=data, out=control_dir, num_leaves=cfg.num_leaves, shape=cfg.shape,
                layers=cfg.layers, teacher_layers=cfg.layers, limit=run.get("limit"),
                prompt_field=text.prompt_field, response_field=text.response_field, template=text.template,
                strip_calc=text.strip_calc, max_length=text.max_length, gate_rank=cfg.gate_rank, top_k=cfg.top_k,
                selection=cfg.selection, dtype=runtime.dtype, seed=schedule.seed, topk_logprobs=0)  # no KD
        summary["train"] = train(base=base, experts=control_dir, data=data, out=out, text=text, schedule=schedule,
                                 loss=dataclasses.replace(loss, no_kd=True), fit=fit, runtime=plugin_runtime)
    elif kind in ("static", "random", "flat"):
        init = _modified_plugin(load_causal_lm(base, dtype=runtime.dtype), experts, kind, out, schedule.seed)
        flags = {"static": dict(freeze_bank=True, skip_stage_a=True), "random": dict(skip_stage_a=True),
                 "flat": {}}[kind]
        summary["train"] = train(base=base, experts=experts, init_plugin=init, data=data, out=out, text=text,
                                 schedule=schedule, loss=loss, fit=dataclasses.replace(fit, **flags),
                                 runtime=plugin_runtime)
    else:
        summary.update(_train_adapter(kind, base, data, out, experts, lora_rank, tok, spec, text, schedule, loss,
                                      fit, runtime))
    if adapter:  # peft and transformers save through safetensors, which writes 0600 files
        _follow_umask(out)
    summary.update(peak_memory())
    if kind == "lora":
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(adapter_card(args, summary))
    atomic_write_json(os.path.join(out, "baseline_summary.json"), summary)
    if adapter:  # the saved weights supersede the checkpoint (SFT's is the model + Adam: GBs)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return summary


def _check_kd_cache(experts: str | None, data: str, kd_weight: float | None) -> None:
    """Refuses KD for an adapter when ``experts`` holds no cached teacher top-k for ``data``, checked from the
    extraction's record of the data it cached (a row tokenized otherwise is caught when the examples load) and its
    shards (there, as long as the manifest says)."""
    ex = Extraction(experts) if experts else None
    run = ex.run() if ex is not None and ex.has(RUN) else {}
    if not run.get("topk_logprobs") or run.get("data_sha256") != file_hash(data):
        raise ToEError(f"kd_weight={kd_weight} but {experts or 'no --experts'} holds no cached teacher top-k "
                       f"for {data}: extract with --topk_logprobs > 0 on this data, or drop --kd_weight")
    check_kd_cache(ex, run, data, "--kd_weight 0")


def _follow_umask(out: str) -> None:
    """Gives the safetensors files in ``out`` the permissions the umask asks for."""
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            follow_umask(os.path.join(out, name))


def _train_adapter(kind: str, base: str, data: str, out: str, experts: str | None, lora_rank: int | None, tok, spec,
                   text: Text, schedule: Schedule, loss: Loss, fit: Fit, runtime: Runtime) -> dict:
    """Trains a LoRA adapter (every linear layer but the LM head) or the whole base (SFT) through the shared
    training loop (:mod:`tree_of_experts.training.loop`), with `toe train`'s objective and data order, and saves
    it in ``out``; returns the summary's fields."""
    on_policy = loss.on_policy()
    kd = loss.kd(0.0)
    accel = accelerator(runtime.mixed_precision, runtime.report_to, out)
    check_teacher_map(runtime.teacher_device_map, on_policy.ratio, accel.num_processes)
    base_model = load_causal_lm(base, dtype=runtime.dtype)
    examples, has_kd, _ = load_examples(data, spec, tok, text.max_length, text.limit, experts or "", kd > 0,
                                        skip_truncated=text.skip_truncated, without_kd="--kd_weight 0",
                                        with_targets=bool(loss.state_loss_weight), device=accel.device)
    if loss.state_loss_weight and not any(e.has("target") for e in examples):
        raise ToEError(f"--state_loss_weight needs {experts}'s cached states for {data}: extract from this file "
                       "with the same --template/--max_length/fields, or pass 0")
    if kd > 0 and not has_kd:
        raise ToEError(f"kd_weight={kd} but {experts} holds no cached teacher top-k for {data}: extract with "
                       "--topk_logprobs > 0 on this data, or drop --kd_weight")
    teacher_model = load_teacher(loss.teacher, tok, runtime.dtype, accel.device, runtime.teacher_map()) \
        if on_policy.ratio > 0 else None
    summary: dict = {}
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        linear = [m for m in base_model.modules() if isinstance(m, torch.nn.Linear)]
        per_rank = sum(m.in_features + m.out_features for m in linear if m is not base_model.get_output_embeddings())
        target = _plugin_params(experts) if experts else None
        rank = lora_rank or max(1, round(target / per_rank))
        torch.manual_seed(schedule.seed)  # peft draws LoRA's A matrices from the global generator
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        model = get_peft_model(base_model, lora)
        summary.update(rank=rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                       trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       plugin_params=target)
    else:
        model = base_model.requires_grad_(True)
    if runtime.gradient_checkpointing:  # LoRA and SFT backpropagate through every layer: activations dominate memory
        enable_checkpointing(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    student = Student(model, torch.optim.AdamW(trained, lr=fit.lr or (2e-4 if kind == "lora" else 1e-5),
                                               weight_decay=0.0))
    objective = StepObjective(on_policy, loss.ce_weight, kd, loss.state_loss_weight,
                          Extraction(experts).run()["layers"] if loss.state_loss_weight else [])
    loop = TrainLoop(student, examples, tok, out, schedule, objective, accel, teacher_model, runtime.report_to,
                     runtime.gradient_accumulation_steps)
    model.train()
    loop.start(runtime.resume)
    loop.run()
    model.eval()
    with open(loop.metrics_path) as f:
        summary["metrics"] = [json.loads(r) for r in f][-1]
    model.save_pretrained(out)  # peft writes an empty template card for LoRA; adapter_card replaces it
    if kind == "sft":
        tok.save_pretrained(out)
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
