"""ToEModel: a frozen base causal LM with a ToE plug-in attached, loadable and savable like a peft adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import ToEConfig, ToEError
from .hf.loading import adapter_folder, arch_fingerprint, load_causal_lm, merge_adapter, versions
from .hf.hub import base_hub_id, hub_id_of, is_full_hub_id, is_hub_id, model_id, push_folder, resolve_folder
from .hf.layers import decoder_stack, disable_checkpointing, enable_checkpointing, recompute_frozen_layers
from .files import atomic_write_text
from .folders import check_plugin_out
from .plugin import ToEPlugin


def freeze(model: nn.Module) -> nn.Module:
    """The one place the base is frozen: no gradients, no optimizer state, eval mode (no dropout)."""
    model.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` frozen (as :func:`freeze`) inside the block, its ``requires_grad`` flags restored after it: for
    library code that trains something next to a model it does not own (the extraction's fusion maps)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


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


class _NotSupportedFilter(logging.Filter):
    """Drops the one message transformers' pipelines log for every ``pipeline(model=toe_model)``: "The model
    'ToEModel' is not supported for text-generation. Supported models are [...]" (4.7 KB). The pipeline checks the
    model's class name against the causal LM classes it knows and peft's wrappers, listed by name in transformers;
    ToEModel, a wrapper too, cannot be on that list, and the pipeline runs it correctly. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The model 'ToEModel' is not supported for")


# the logger of transformers.pipelines.base, where Pipeline.check_model_type logs it
logging.getLogger("transformers.pipelines.base").addFilter(_NotSupportedFilter())


class ToEModel(PreTrainedModel):
    """A frozen base with a plug-in attached. Calling it returns the base's output (``.logits`` etc.).

    It is a ``PreTrainedModel`` so that transformers takes it where it takes a model (``pipeline``, ``Trainer``, and
    what builds on them): ``config``, ``generation_config``, ``device`` and ``dtype`` are the base's, the plug-in's
    own config is ``toe_config``, and ``save_pretrained`` / ``push_to_hub`` write the plug-in alone.

    Args:
        base: a transformers causal LM; it is frozen here.
        plugin: the plug-in to attach (checked against the base).
    """

    def __init__(self, base: nn.Module, plugin: ToEPlugin):
        # nn.Module's init, not PreTrainedModel's: that one builds a generation config and re-checks (rewrites) the
        # attention settings of `config`, and here the config is the base's, shared, not owned.
        nn.Module.__init__(self)
        check_base(plugin.config, base)
        self.base = freeze(base)
        self.plugin = plugin.to(next(base.parameters()).device)
        self.plugin.attach(self.base)
        self.name_or_path = model_id(base)

    # -- what transformers reads -------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The base's transformers config (what pipelines and trainers read); the plug-in's is ``toe_config``."""
        return self.base.config

    @property
    def toe_config(self) -> ToEConfig:
        return self.plugin.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base.generation_config = value

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @property
    def base_model(self) -> nn.Module:
        """transformers' "main body of the model": the base's decoder stack (its ``last_hidden_state``), where the
        plug-in's hooks sit. trl's SFTTrainer runs it and applies the LM head itself (its fused, chunked head)."""
        return decoder_stack(self.base)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def train(self, mode: bool = True) -> ToEModel:
        """Sets the plug-in's mode; the base stays in eval mode (frozen, no dropout) whatever a trainer asks, but
        with activation checkpointing on its decoder layers train along (they recompute only in training mode)."""
        nn.Module.train(self, mode)
        self.base.eval()
        if mode:
            recompute_frozen_layers(self.base)
        return self

    # transformers' Trainer and trl's trainers call these for `gradient_checkpointing=True` (trl's default): the
    # frozen base's decoder layers recompute their activations in the backward, the plug-in's gradients unchanged
    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **options: Any) -> None:
        """Activation checkpointing of the frozen base (non-reentrant unless ``use_reentrant=True`` is given)."""
        enable_checkpointing(self.base, activation_checkpointing_kwargs, **options)
        self.train(self.training)  # flags the decoder layers to recompute while the model trains

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """transformers < 5's name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        disable_checkpointing(self.base)
        self.train(self.training)

    def gradient_checkpointing_disable(self) -> None:
        """transformers < 5's name of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    # -- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_or_plugin: str | os.PathLike | nn.Module,
        plugin: str | os.PathLike | None = None,
        *,
        plugin_revision: str | None = None,
        token: str | bool | None = None,
        base_adapter: str | os.PathLike | None = None,
        mmap_bank: bool | None = None,
        **load_kwargs: Any,
    ) -> ToEModel:
        """Loads a base and a plug-in: ``from_pretrained(base, plugin)``, or ``from_pretrained(plugin)`` with the base
        the plug-in records (``base_model`` in its config, as ``AutoPeftModelForCausalLM`` does).

        Args:
            base_or_plugin: the base (hub id, local folder or a loaded model), or the plug-in when ``plugin`` is None.
                A loaded model is not copied (unless ``base_adapter`` is merged, below): the plug-in's hooks go onto
                it, so it runs the plug-in too until :meth:`detach` (or inside :meth:`disabled`, or after the ``with``
                block the ToEModel opened).
            plugin: a plug-in folder or hub repo id.
            plugin_revision: the plug-in's hub revision (branch, tag or commit).
            token: hub token, for the plug-in and the base.
            base_adapter: a peft (LoRA) adapter folder to merge into the base first, so the plug-in runs (and trains)
                on top of it; the plug-in then records it and ``save_pretrained`` copies it into the plug-in folder.
                A plug-in saved that way merges its own copy when loaded. A loaded base passed in is copied before
                the merge (it stays the bare base for its other users), at the cost of a second copy in memory.
            mmap_bank: map each layer's bank and gate node weights from the plug-in file instead of reading them into
                RAM (pages are read as routing touches them; frozen; see :meth:`ToEPlugin.load`). None: mapped when
                they hold 1 GiB or more.
            load_kwargs: go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``revision``, ``gguf_file``...).
        """
        paths = (str, os.PathLike)
        if isinstance(base_or_plugin, nn.Module) and not hasattr(base_or_plugin, "config"):
            raise TypeError(f"ToEModel.from_pretrained: a loaded base must be a transformers causal LM, not "
                            f"{type(base_or_plugin).__name__} (it has no .config)")
        if not isinstance(base_or_plugin, (*paths, nn.Module)):
            raise TypeError(f"ToEModel.from_pretrained: the base is a hub id, a local folder or a loaded causal LM, not "
                            f"{type(base_or_plugin).__name__}")
        if plugin is None and not isinstance(base_or_plugin, paths):
            raise TypeError("ToEModel.from_pretrained(base, plugin): with a loaded base, pass the plug-in (a folder or "
                            "hub repo id) as well")
        if plugin is not None and not isinstance(plugin, paths):
            raise TypeError(f"ToEModel.from_pretrained: the plug-in is a folder or hub repo id (str or os.PathLike), "
                            f"not {type(plugin).__name__}")
        plugin_dir = resolve_folder(base_or_plugin if plugin is None else plugin, "plug-in", plugin_revision, token)
        config = ToEConfig.load(plugin_dir)
        base = base_or_plugin
        if plugin is None:
            base = config.base_model
            if not base:
                raise ToEError(f"{plugin_dir} records no base model: load it with ToEModel.from_pretrained(base, plugin)")
            if config.base_revision and is_hub_id(base):
                load_kwargs.setdefault("revision", config.base_revision)
        if isinstance(base, (str, os.PathLike)):
            if token is not None:
                load_kwargs.setdefault("token", token)
            try:
                base = load_causal_lm(os.fspath(base), **load_kwargs)
            except ToEError as e:
                if plugin is not None:
                    raise
                raise ToEError(f"{e}; the base comes from the plug-in's config, so pass it explicitly: "
                               "ToEModel.from_pretrained(base, plugin)") from None
        check_base(config, base)  # before reading the weights: the cheap, likely error first
        adapter = base_adapter or (os.path.join(plugin_dir, config.base_adapter) if config.base_adapter else None)
        if adapter is not None:
            adapter = adapter_folder(adapter)  # a hub id: its snapshot, which save_pretrained copies
            if base is base_or_plugin:  # the caller's model (others may score it bare): merge into a copy of it
                import copy

                base = copy.deepcopy(base)
            base = merge_adapter(base, adapter)
            if base_adapter is not None:  # a new system: its base is the adapted one, fingerprinted as such
                config.base_adapter, config.base_weight_sample = ADAPTER_DIR, None
        plugin = ToEPlugin.load(plugin_dir, config, mmap=mmap_bank)
        if adapter is not None:
            plugin.adapter_source = adapter
        return cls(base, plugin)

    @classmethod
    def fresh(cls, base: nn.Module, **fields: Any) -> ToEModel:
        """A new plug-in with a random bank on ``base`` (``fields``: ToEConfig fields such as layers, num_leaves)."""
        return cls(base, ToEPlugin(new_config(base, **fields)))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        base_id: str | None = None,
        eval_dir: str | None = None,
        license: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes the plug-in alone, never the base's weights: ``toe_config.json``, ``toe_model.safetensors`` and a
        ``README.md`` card.

        Args:
            save_directory: a new folder or a plug-in folder (replaced); one holding another kind of run (an
                extraction, an eval, a training checkpoint...) is refused, unless the command writing that run
                saves its own plug-in there.
            state_dict: a state dict of this model to write instead of the live tensors (its ``plugin.*`` entries), as
                transformers' Trainer passes one.
            is_main_process: only the main process writes (distributed training).
            base_id: the base's hub id, recorded instead of a local path (``base_model`` in the config and card).
            eval_dir: a `toe eval` output folder whose ``metrics.json`` goes into the card.
            license: the card's license (usually the base's, e.g. "apache-2.0").
            kwargs: transformers' other ``save_pretrained`` options (``safe_serialization``, ``max_shard_size``...),
                accepted for its callers and ignored: a plug-in is always one safetensors file.
        """
        if not is_main_process:
            return
        check_plugin_out(save_directory)  # an extraction's, an eval's or a checkpoint's folder is refused
        save_plugin(save_directory, self.plugin, state=state_dict, base_id=base_id, eval_dir=eval_dir,
                    license=license)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_id: str | None = None,
        teacher_id: str | None = None,
        eval_dir: str | None = None,
        license: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Uploads the plug-in (what ``save_pretrained`` writes) to the hub model repo ``repo_id``; returns the commit
        URL. Load it back with ``ToEModel.from_pretrained(repo_id)`` or ``from_pretrained(base, repo_id)``.

        The upload records no path of this machine: a base loaded from a local folder needs ``base_id`` (its hub
        id), and a teacher recorded as a local folder is left out unless ``teacher_id`` names it (see
        :func:`recorded_config`)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_plugin(tmp, self.plugin, base_id=base_id, teacher_id=teacher_id, publish=True, eval_dir=eval_dir,
                        license=license, repo_id=repo_id)
            return push_folder(tmp, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                               commit_message=commit_message)

    # -- running ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base's forward with the plug-in injecting: input_ids (B, T) -> the base's output (``.logits`` (B, T, V),
        ``.loss`` with ``labels``). The inputs are named so that Trainer keeps those dataset columns; ``kwargs`` (the
        cache, ``logits_to_keep``...) go to the base as they are."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, labels=labels)
        return self.base(**{k: v for k, v in named.items() if v is not None}, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base.generate(*args, **kwargs)

    def attach(self) -> ToEModel:
        self.plugin.attach(self.base)
        return self

    def __enter__(self) -> ToEModel:
        """``with ToEModel.from_pretrained(base, plugin) as model:`` the plug-in is attached inside the block and its
        hooks are removed from the base after it (the base is then the bare base again)."""
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.plugin.detach()

    def detach(self) -> nn.Module:
        """Removes the hooks and returns the bare base."""
        self.plugin.detach()
        return self.base

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Runs the base without the plug-in inside the block, re-attaching afterwards if the plug-in was attached.
        A plug-in trained on a LoRA-adapted base (``--base_adapter``) keeps that adapter merged: the block runs base
        + LoRA, the system the plug-in was added to."""
        was = self.plugin.is_attached
        self.plugin.detach()
        try:
            yield self.base
        finally:
            if was:
                self.plugin.attach(self.base)

    @contextlib.contextmanager
    def selection(self, mode: str | None = None, top_k: int | None = None, top_p: float | None = None
                  ) -> Iterator[None]:
        """Routes with ``mode`` ("dense", "topk", "topp", "beam"), K and p inside the block; None keeps the configured
        value. Nothing is retrained: an inference-time sweep of K or p on a plug-in trained with another one."""
        self.plugin.config.with_routing(mode, top_k, top_p)  # the config's own checks (one-line ToEErrors)
        gates = [block.gate for block in self.plugin.blocks.values()]
        previous = self.plugin.selection, [(g.top_k, g.top_p) for g in gates]
        self.plugin.selection = mode or self.plugin.selection
        for g in gates:
            g.top_k = min(top_k, g.num_leaves) if top_k is not None else g.top_k
            g.top_p = top_p if top_p is not None else g.top_p
        try:
            yield
        finally:
            self.plugin.selection = previous[0]
            for g, (k, p) in zip(gates, previous[1]):
                g.top_k, g.top_p = k, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.plugin.parameters() if p.requires_grad]


CARD_NAME = "README.md"
ADAPTER_DIR = "base_adapter"  # where a plug-in folder keeps the LoRA adapter its base runs with


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


def model_card(config: ToEConfig, n_params: int, *, datasets: list[str] | None = None, evals: dict | None = None,
               license: str | None = None, repo_id: str | None = None) -> str:
    """The plug-in's README.md: hub metadata (huggingface_hub.ModelCardData) and a table of what the plug-in is."""
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
        library_name="tree-of-experts",
        license=license,
        tags=["tree-of-experts", "toe", "plug-in"],
        datasets=datasets or None,
        metrics=metric_names or None,
        model_name=repo_id or f"ToE plug-in for {config.base_model}",
        eval_results=results or None,
    )
    where = repo_id or "path/to/this/folder"
    load = f'ToEModel.from_pretrained("{where}")' if on_hub else f'ToEModel.from_pretrained("{config.base_model}", "{where}")'
    lines = [
        f"# ToE plug-in for `{config.base_model}`",
        "",
        "A Tree-of-Experts plug-in: a tree gate and an expert bank added to the residual stream of a frozen base. "
        "The base's weights are not stored here and never change.",
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
        "from tree_of_experts import ToEModel",
        f"model = {load}",
        "```",
        "",
    ]
    if not on_hub:
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
