"""ToEModel: a frozen base causal LM with a ToE plug-in attached, loadable and savable like a peft adapter."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import ToEConfig, ToEError
from .folders import check_plugin_out
from .hf.hub import is_hub_id, model_id, push_folder, resolve_folder
from .hf.layers import decoder_stack, disable_checkpointing, enable_checkpointing, recompute_frozen_layers
from .hf.loading import adapter_folder, load_causal_lm, merge_adapter
from .plugin import ToEPlugin
from .plugin_folder import ADAPTER_DIR, check_base, new_config, save_plugin


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
            load_kwargs: go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``revision``, ``gguf_file``...)
                when the base is loaded here (refused with a loaded one). In the one-argument form ``revision`` is
                the plug-in repo's, as transformers reads it (the base's is the config's ``base_revision``).
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
        if plugin is None and "revision" in load_kwargs:  # the repo loaded is the plug-in's, as in transformers
            if plugin_revision is not None:
                raise TypeError("ToEModel.from_pretrained(plugin, revision=..., plugin_revision=...): give one; "
                                "revision is the plug-in's here (the base's comes from its config: base_revision)")
            plugin_revision = load_kwargs.pop("revision")
        if load_kwargs and isinstance(base_or_plugin, nn.Module):
            raise TypeError(f"ToEModel.from_pretrained: {sorted(load_kwargs)} would load the base, which is already "
                            "loaded: load it with them, then pass it")
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
        return cls(base, plugin).eval()  # as transformers returns a model: eval mode (a trainer sets train mode)

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
        if kwargs.get("push_to_hub"):
            raise TypeError("ToEModel.save_pretrained(push_to_hub=True): use model.push_to_hub(repo_id), which writes "
                            "the card with the base and teacher ids")
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
