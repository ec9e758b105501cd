"""A plug-in folder on disk: checking it fits a base, writing its weights and ``toe_config.json`` (with the records
that make it portable), and its model card."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from .config import ToEConfig, ToEError
from .files import atomic_write_text
from .hf.hub import base_hub_id, hub_id_of, is_full_hub_id, is_hub_id, model_id, resolve_folder
from .hf.loading import arch_fingerprint, versions
from .plugin import ToEPlugin

CARD_NAME = "README.md"
ADAPTER_DIR = "base_adapter"  # where a plug-in folder keeps the LoRA adapter its base runs with


def check_base(config: ToEConfig, base: nn.Module) -> None:
    """Refuses a base whose architecture differs from the one the plug-in was built for, naming the field."""
    check_base_config(config, base.config, model_id(base))


def check_base_config(config: ToEConfig, base_config: Any, name: str) -> None:
    """:func:`check_base` on the base's transformers config alone (a command's check before any model loads)."""
    arch, digest = arch_fingerprint(base_config)
    if config.base_config_hash and digest != config.base_config_hash:
        diffs = [f"{k}: plug-in {config.base_arch.get(k)!r} vs base {arch.get(k)!r}"
                 for k in sorted(set(arch) | set(config.base_arch)) if arch.get(k) != config.base_arch.get(k)]
        detail = "; ".join(diffs) or "config hash differs"
        raise ToEError(
            f"this plug-in was built for {config.base_model or 'another base'} and does not fit "
            f"{name} ({detail}): load the base it was built for"
        )
    if base_config.hidden_size != config.hidden_size:
        raise ToEError(f"plug-in hidden_size={config.hidden_size} but the base has {base_config.hidden_size}")


def check_plugin_fits(plugin: str | os.PathLike, base_config: Any, base: str, selection: str | None = None,
                      top_k: int | None = None, top_p: float | None = None) -> ToEConfig:
    """Refuses, with one line, a plug-in that is missing, does not fit the base (``base_config``, its transformers
    config, read without weights) or cannot route with the given overrides (as :meth:`ToEModel.selection` would):
    what a command checks before it loads any model."""
    config = ToEConfig.load(resolve_folder(plugin, "plug-in"))
    check_base_config(config, base_config, base)
    return config.with_routing(selection, top_k, top_p)


def new_config(base: nn.Module, **fields: Any) -> ToEConfig:
    """A ToEConfig for ``base`` with its fingerprint filled in; ``fields`` are ToEConfig fields."""
    arch, digest = arch_fingerprint(base.config)
    fields.setdefault("hidden_size", base.config.hidden_size)
    return ToEConfig(
        base_model=base_hub_id(base),
        base_revision=getattr(base.config, "_commit_hash", None) or hub_id_of(model_id(base))[1],
        base_arch=arch,
        base_config_hash=digest,
        versions=versions(),
        **fields,
    )


def save_plugin(directory: str | os.PathLike, plugin: ToEPlugin, *, state: dict[str, torch.Tensor] | None = None,
                base_id: str | None = None, teacher_id: str | None = None, publish: bool = False,
                eval_dir: str | None = None, license: str | None = None, repo_id: str | None = None,
                datasets: list[str] | None = None) -> None:
    """Writes a plug-in folder: ``toe_config.json``, ``toe_model.safetensors`` and a ``README.md`` card.

    Args:
        state: a ToEModel state dict whose ``plugin.*`` tensors are written instead of the live ones.
        base_id: the base's hub id, recorded as ``base_model`` (config and card) instead of a local path.
        teacher_id: the teacher's hub id, recorded instead of the teacher the bank was extracted from.
        publish: the folder is for upload: it must name no local path (see :func:`recorded_config`).
        eval_dir: a `toe eval` output folder; its metrics go into the card.
        license: the card's license.
        repo_id: where the folder is published, for the card's loading snippet.
        datasets: hub data set ids for the card; by default read from ``train_args.json`` in ``directory``.
    """
    record = functools.partial(recorded_config, base_id=base_id, teacher_id=teacher_id, publish=publish)
    record(plugin.config)  # a bad id or a local base refused before anything is written
    if state is not None:
        state = {k[len("plugin."):]: v for k, v in state.items() if k.startswith("plugin.")}
        if state.keys() != plugin.state_dict().keys():
            raise ToEError("state_dict does not hold this model's plugin.* tensors: pass ToEModel.state_dict()")
    plugin.save(directory, state=state, record=record)
    config = ToEConfig.load(directory)  # as written: base_model may be base_id
    source = getattr(plugin, "adapter_source", None)
    if plugin.config.base_adapter and source:  # ToE on a LoRA-adapted base: the adapter travels with the plug-in
        dest = os.path.join(directory, plugin.config.base_adapter)
        if os.path.realpath(source) != os.path.realpath(dest):
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        if publish:  # peft records the base the adapter was trained on, often by its local path: the base's id
            _rename_adapter_base(dest, config.base_model)
    n_params = sum(p.numel() for p in plugin.parameters())
    datasets = training_datasets(directory) if datasets is None else datasets
    card = model_card(config, n_params, datasets=datasets,
                      evals=read_eval(eval_dir) if eval_dir else None, license=license, repo_id=repo_id)
    atomic_write_text(os.path.join(directory, CARD_NAME), card)


def _rename_adapter_base(adapter: str, base_id: str) -> None:
    """Names the base of the peft adapter folder ``adapter`` by ``base_id`` where peft recorded a local path (its
    config's ``base_model_name_or_path`` and its card)."""
    config_path, card_path = os.path.join(adapter, "adapter_config.json"), os.path.join(adapter, CARD_NAME)
    with open(config_path) as f:
        fields = json.load(f)
    old = fields.get("base_model_name_or_path")
    if not old or is_hub_id(old):
        return
    atomic_write_text(config_path, json.dumps({**fields, "base_model_name_or_path": base_id}, indent=2) + "\n")
    if os.path.isfile(card_path):
        with open(card_path) as f:
            atomic_write_text(card_path, f.read().replace(old, base_id))


def recorded_config(config: ToEConfig, base_id: str | None = None, teacher_id: str | None = None,
                    publish: bool = False) -> ToEConfig:
    """The config a plug-in folder records: ``base_id`` / ``teacher_id`` (hub ids) in place of the base and teacher
    the plug-in was built from. For an upload (``publish``) no path of this machine may stay, as it would mean
    nothing elsewhere and tells how the machine is laid out: a base that is a local folder needs ``base_id`` (one
    line otherwise), and a teacher that is a local folder is left out unless ``teacher_id`` names it."""
    for option, value in (("base_id", base_id), ("teacher_id", teacher_id)):
        if value is not None and not is_hub_id(value):
            raise ToEError(f"{option}={value!r} is not a hub repo id: give the id the model is published under "
                           "(org/name)")
    base = base_id or config.base_model
    if publish and not is_hub_id(base):
        raise ToEError(f"the plug-in's base is the local folder {config.base_model!r}: pass --base_id org/name (the "
                       "hub id the base is published under), so that the pushed plug-in records no local path")
    teacher = teacher_id or config.teacher_model
    if publish and teacher is not None and not is_hub_id(teacher):
        teacher = None
    banks = {layer: {**info, "teacher": teacher} if "teacher" in info else info
             for layer, info in config.bank_info.items()}
    names = {"base_name": base} if base_id else {}
    return dataclasses.replace(config, base_model=base, teacher_model=teacher, bank_info=banks, **names)


def training_datasets(folder: str | os.PathLike) -> list[str]:
    """Hub data set ids a plug-in was trained on, from ``train_args.json`` next to it (``hf:org/name:split`` data)."""
    path = os.path.join(folder, "train_args.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f).get("data")
    if isinstance(data, str) and data.startswith("hf:"):
        name = data[3:].split(":")[0]
        return [name] if is_hub_id(name) else []
    return []


def read_eval(eval_dir: str) -> dict:
    """``metrics.json`` of a `toe eval` folder: {"task", "data", "systems": {name: summary}}."""
    path = os.path.join(eval_dir, "metrics.json")
    if not os.path.isfile(path):
        raise ToEError(f"{path} not found: eval_dir must be a `toe eval` output folder")
    with open(path) as f:
        metrics = json.load(f)
    args = metrics.get("args", {})
    return {"task": args.get("task") or "eval", "data": args.get("data"), "systems": metrics.get("systems", {})}


def data_name(data: str | None) -> str | None:
    """``--data`` as a card shows it: a hub data set as it is, a local file or folder by its own name."""
    if not data or not data.startswith("hf:"):
        return os.path.basename(data) if data else data
    name, sep, rest = data[3:].partition(":")
    return data if is_hub_id(name) else "hf:" + os.path.basename(os.path.normpath(name)) + sep + rest


def in_subfolders(subfolder: str, siblings: list[str]) -> str:
    """The sentence of an adapter card that says which subfolders hold the adapters and which one it describes."""
    names = sorted(set(siblings) | {subfolder})
    if len(names) == 1:
        return f" The plug-in is the peft adapter (`peft_type` TOE) in the subfolder `{subfolder}`."
    listed = ", ".join(f"`{n}`" for n in names)
    return (f" The folder holds ToE peft adapters (`peft_type` TOE) in its subfolders {listed}; this card describes "
            f"`{subfolder}` (each subfolder's README.md describes its own).")


def model_card(config: ToEConfig, n_params: int, *, datasets: list[str] | None = None, evals: dict | None = None,
               license: str | None = None, repo_id: str | None = None, adapter: bool = False,
               subfolder: str | None = None, siblings: list[str] = ()) -> str:
    """The plug-in's README.md: hub metadata (huggingface_hub.ModelCardData) and a table of what the plug-in is.
    ``adapter``: the card of the plug-in as a peft adapter folder (library peft, loaded by AutoPeftModelForCausalLM);
    ``subfolder``: the adapter lies in that subfolder of the card's folder (a named peft adapter), beside the ToE
    adapters in ``siblings`` (the folder's adapter subfolders, ``subfolder`` among them or not)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    on_hub = is_full_hub_id(config.base_model)  # a local path is no hub metadata
    results, metric_names = [], []
    for name, value in (evals or {}).get("systems", {}).get("toe", {}).items():
        if name in ("accuracy", "ce") and isinstance(value, (int, float)):
            metric = "accuracy" if name == "accuracy" else "cross_entropy"
            metric_names.append(metric)
            results.append(EvalResult(task_type="text-generation", dataset_type=evals["task"],
                                      dataset_name=evals["task"], metric_type=metric, metric_value=value))
    data = ModelCardData(
        base_model=config.base_model if on_hub else None,
        library_name="peft" if adapter else "tree-of-experts",
        license=license,
        tags=["tree-of-experts", "toe", "peft" if adapter else "plug-in"],
        datasets=datasets or None,
        metrics=metric_names or None,
        model_name=repo_id or f"ToE plug-in for {config.base_model}",
        eval_results=results or None,
    )
    where = repo_id or "path/to/this/folder"
    load = f'ToEModel.from_pretrained("{where}")' if on_hub else f'ToEModel.from_pretrained("{config.base_model}", "{where}")'
    snippet = ["from tree_of_experts import ToEModel", f"model = {load}"]
    if adapter:  # AutoPeftModelForCausalLM would pass a subfolder on to the base's load: PeftModel takes it alone
        snippet = ["import tree_of_experts  # registers the TOE peft method with peft", "from peft import "
                   "AutoPeftModelForCausalLM", f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")'] \
            if not subfolder else ["import tree_of_experts  # registers the TOE peft method with peft",
                                   "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                                   f'base = AutoModelForCausalLM.from_pretrained("{config.base_model}")',
                                   f'model = PeftModel.from_pretrained(base, "{where}", subfolder="{subfolder}")']
    lines = [
        f"# ToE {'peft adapter' if adapter else 'plug-in'} for `{config.base_model}`",
        "",
        "A Tree-of-Experts plug-in: a tree gate and an expert bank added to the residual stream of a frozen base. "
        "The base's weights are not stored here and never change."
        + (" This folder is the plug-in as a peft adapter (`peft_type` TOE)." if adapter and not subfolder else "")
        + (in_subfolders(subfolder, siblings) if subfolder else ""),
        "",
        "| field | value |",
        "|---|---|",
        f"| base | `{config.base_model}` (revision `{config.base_revision or '-'}`, config sha256 "
        f"`{config.base_config_hash[:12]}`) |",
        f"| teacher | `{config.teacher_model or '-'}` (layers {config.teacher_layers or '-'}) |",
        f"| injection layers | {config.layers} |",
        f"| tree | {config.shape}, N = {config.num_leaves}, depth {config.depth} |",
        f"| selection | {config.selection} (K = {config.top_k}, p = {config.top_p}) |",
        f"| gate rank / clip κ | {config.gate_rank} / {config.clip} |",
        f"| parameters | {n_params:,} |",
        "",
        "```python",
        *snippet,
        "```",
        "",
    ]
    if not on_hub and not adapter:
        lines += ["The base is recorded as a local path: `toe push --base_id org/name` records its hub id.", ""]
    if evals:
        lines += [f"Evaluation (`toe eval`, task {evals['task']}, data `{data_name(evals['data'])}`):", "",
                  "| system | n | accuracy | CE |", "|---|---|---|---|"]
        for name, m in evals["systems"].items():
            acc, ce = m.get("accuracy"), m.get("ce")
            lines.append(f"| {name} | {m.get('n', '-')} | {'-' if acc is None else f'{acc:.4f}'} | "
                         f"{'-' if ce is None else f'{ce:.4f}'} |")
        lines.append("")
    for layer, info in config.bank_info.items():
        if info:
            lines.append(f"Bank at layer {layer}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
