"""ToE as a peft method, ``peft_type="TOE"``: peft and what builds on it (trl's ``peft_config=``,
``AutoPeftModelForCausalLM``, the Hub's adapter metadata) take a ToE plug-in as they take a LoRA adapter.

- :class:`ToEPeftConfig`: the plug-in's ``toe_config.json`` under ``toe``; saved as ``adapter_config.json``.
- :class:`ToELayer`: the method's one peft tuner layer: the plug-ins by adapter name, the active ones' hooks on the base.
- :class:`ToETuner`: what ``get_peft_model(base, ToEPeftConfig(...))`` wraps the base in (peft's ``BaseTuner``).
- :func:`plugin_to_adapter` / :func:`adapter_to_plugin`: a plug-in folder as a peft adapter folder, and back.

Importing this module registers the method with peft; ``import tree_of_experts`` imports it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ToEConfig, ToEError
from .hf.layers import recompute_frozen_layers
from .hf.hub import hub_id_of, is_full_hub_id, resolve_folder
from .files import atomic_write_text, read_json_object
from .plugin_folder import CARD_NAME, check_base, model_card, new_config, save_plugin
from .model import freeze
from .plugin import ToEPlugin, shapes_only

if not hasattr(BaseTuner, "_get_adapter_state_dict"):  # how a tuner names its tensors on disk: peft >= 0.21
    raise ImportError("the TOE peft method needs peft >= 0.21 (tested on 0.21.2): pip install -U peft")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The plug-in's tensor `blocks.0.scale` is `base_model.toe.toe_plugin.blocks.0.scale` in an adapter file: a PeftModel's
# `base_model` is the ToETuner, whose `toe` is the ToELayer, whose `toe_plugin` holds the plug-ins by adapter name
# (the name is left out on disk, as peft does).
ADAPTER_KEY_PREFIX = "base_model.toe.toe_plugin."
# ends the text of the card a folder gets for the ToE adapters in its subfolders (peft's lines follow it)
SUBFOLDERS_MARK = "<!-- tree-of-experts: the card of this folder's adapter subfolders -->"


def _add_peft_type(name: str) -> None:
    """Adds ``name`` to peft's ``PeftType`` enum: ``register_peft_method`` takes only names listed there, and the enum
    lists peft's own methods. Python's Enum has no public way to add a member, so it is stored as the enum machinery
    stores one (``PeftType.TOE``, ``PeftType("TOE")`` and ``list(PeftType)`` then work as for peft's own; checked on
    Python 3.10 to 3.13)."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)


_add_peft_type("TOE")


def toe_config(fields: dict[str, Any]) -> ToEConfig:
    """A ToEConfig from ``ToEPeftConfig.toe``; one line for a field ToEConfig does not have."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ToEConfig)})
    if unknown:
        raise ToEError(f"ToEPeftConfig.toe has unknown fields {unknown}: give ToEConfig fields (layers, num_leaves, "
                       "shape, selection, top_k, ...) or upgrade tree-of-experts")
    return ToEConfig(**fields)


@dataclass
class ToEPeftConfig(PeftConfig):
    """The peft config of a ToE plug-in: its ``toe_config.json`` under ``toe``, written as ``adapter_config.json``.

    ``ToEPeftConfig.from_plugin(folder)`` starts the adapter from a plug-in (a `toe extract` folder: its extracted bank),
    ``ToEPeftConfig(toe={"layers": [11], "num_leaves": 64})`` from a random bank.
    """

    toe: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "the plug-in's ToEConfig fields (layers, num_leaves, shape, selection, top_k, ...: what toe_config.json holds); "
        "hidden_size and the base's fingerprint are filled in from the base by get_peft_model")})
    init_from: str | None = field(default=None, metadata={"help": (
        "a plug-in or extraction folder (toe_config.json + toe_model.safetensors) whose tensors the adapter starts "
        "from; read by get_peft_model and not saved: a saved adapter holds its own tensors")})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TOE
        self.task_type = self.task_type or "CAUSAL_LM"  # ToE plugs into decoder-only causal LMs only
        missing = [name for name in ("layers", "num_leaves") if name not in self.toe]
        if missing:
            raise ToEError(f"ToEPeftConfig.toe has no {' and '.join(missing)}: use ToEPeftConfig.from_plugin(folder) "
                           "or give them, e.g. ToEPeftConfig(toe={'layers': [11], 'num_leaves': 64})")
        toe_config({"hidden_size": 1, **self.toe})  # ToEConfig's own checks, before any model loads
        if self.toe.get("base_adapter"):
            raise ToEError(f"the plug-in runs on a LoRA-adapted base (base_adapter={self.toe['base_adapter']!r}): the "
                           "peft method plugs into a bare base; load it with ToEModel.from_pretrained")

    @classmethod
    def from_plugin(cls, folder: str | os.PathLike, **peft_fields: Any) -> ToEPeftConfig:
        """A config whose adapter starts from the plug-in in ``folder``: a `toe extract` output folder (its plug-in
        holds the extracted bank), a trained plug-in, or a plug-in's hub repo id. ``peft_fields``: PeftConfig fields
        (``inference_mode``...)."""
        folder = resolve_folder(folder, "plug-in")
        return cls(toe=ToEConfig.load(folder).to_dict(), init_from=folder, **peft_fields)

    def to_dict(self) -> dict[str, Any]:
        # a saved adapter holds its own tensors: the folder it started from is no part of it (nor a path to publish)
        return {**super().to_dict(), "init_from": None}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's ``adapter_config.json``, and the ToE card as the folder's README.md (see :func:`write_adapter_card`):
        ``PeftModel.save_pretrained`` and trl's ``save_model`` reach it after writing peft's blank template card."""
        super().save_pretrained(save_directory, **kwargs)
        if not self.toe.get("hidden_size"):  # a config not yet built on a base (get_peft_model): no card to write
            return
        config = card_config(toe_config(self.toe), self.base_model_name_or_path)
        write_adapter_card(save_directory, config)
        # a named adapter is saved in a subfolder (peft): the folder above, the one a user pushes, gets a card that
        # names the folder's ToE subfolders where it holds no adapter of its own and only peft's blank template
        here = os.path.abspath(save_directory)
        root = os.path.dirname(here)
        if not os.path.isfile(os.path.join(root, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(root, CARD_NAME)):
            write_adapter_card(root, config, subfolder=os.path.basename(here), siblings=toe_subfolders(root))


def toe_subfolders(folder: str) -> list[str]:
    """The subfolders of ``folder`` that hold a ToE peft adapter (named adapters that peft saved there)."""
    return [name for name in sorted(os.listdir(folder))
            if (read_json_object(os.path.join(folder, name, ADAPTER_CONFIG)) or {}).get("peft_type") == "TOE"]


def card_config(config: ToEConfig, base: str | None) -> ToEConfig:
    """``config`` as the card of an adapter that names ``base`` (peft's ``base_model_name_or_path``: the base
    ``AutoPeftModelForCausalLM`` loads) shows it: that base where it is a hub id (a folder of the hub cache by its
    id) or the plug-in records none; a local path never replaces the plug-in's recorded hub id."""
    base = base and (hub_id_of(base)[0] or base)
    keep = not base or base == config.base_model or (is_full_hub_id(config.base_model or "") and not is_full_hub_id(base))
    return config if keep else dataclasses.replace(config, base_model=base)


def write_adapter_card(folder: str | os.PathLike, config: ToEConfig, subfolder: str | None = None,
                       siblings: list[str] = ()) -> None:
    """Writes the ToE card as ``folder``'s README.md where there is none, or only peft's blank template, or a card
    this function wrote for the folder's subfolders (a card with any text of the user's own is left as it is). The
    hub metadata peft put in the template (tags, pipeline, a hub ``base_model``) and its framework-versions lines are
    kept. ``subfolder``: the adapter lies in that subfolder of ``folder`` (a named adapter), the card loads it from
    there and names ``siblings``, the folder's other ToE adapter subfolders."""
    from huggingface_hub import ModelCard

    path = os.path.join(folder, CARD_NAME)
    old = ModelCard.load(path) if os.path.isfile(path) else None
    peft_lines = peft_additions(old.text) if old is not None else ""
    if peft_lines is None:
        return
    n_params = sum(p.numel() for p in shapes_only(config).parameters())  # nothing allocated: a GB bank too
    card = ModelCard(model_card(config, n_params, adapter=True, subfolder=subfolder, siblings=siblings))
    card.data.pipeline_tag = "text-generation"
    for key, value in (old.data.to_dict() if old is not None else {}).items():
        if key == "tags":
            value = sorted(set(value) | set(card.data.tags or []))
        elif key == "base_model" and not is_full_hub_id(str(value)):  # peft records a local path as it is
            continue
        if value is not None and (key == "tags" or card.data.to_dict().get(key) is None):
            card.data[key] = value
    mark = "\n\n" + SUBFOLDERS_MARK if subfolder else ""  # a card a default adapter saved here later replaces
    card.text = card.text.rstrip("\n") + mark + ("\n\n" + peft_lines if peft_lines else "") + "\n"
    atomic_write_text(path, str(card))


def peft_additions(text: str) -> str | None:
    """What peft added to its blank model card template in ``text`` (its framework-versions and training-procedure
    lines), or to ToE's card for a folder's adapter subfolders; None when ``text`` is neither (a card someone wrote
    or edited)."""
    from huggingface_hub import ModelCard, ModelCardData

    blank = ModelCard.from_template(ModelCardData()).text.strip()
    body = text.strip()
    if SUBFOLDERS_MARK in body:  # ToE's card for the adapters in the folder's subfolders: peft's lines follow it
        rest = body.split(SUBFOLDERS_MARK, 1)[1].strip()
    elif body.startswith(blank):
        rest = body[len(blank):].strip()
    else:
        return None
    ok = ("### Framework versions", "## Training procedure", "- ", "The following `bitsandbytes`")
    return rest if all(not line.strip() or line.startswith(ok) for line in rest.splitlines()) else None



def build_plugin(config: ToEPeftConfig, base: nn.Module) -> ToEPlugin:
    """The plug-in ``config`` describes, for ``base``: checked against the base it records (or recording ``base``),
    with the tensors of ``config.init_from`` when it names a folder. ``config.toe`` then records the base too."""
    toe = toe_config(config.toe) if config.toe.get("base_config_hash") else new_config(base, **config.toe)
    check_base(toe, base)
    plugin = ToEPlugin.load(config.init_from, toe) if config.init_from else ToEPlugin(toe)
    if not next(plugin.parameters()).is_meta:  # meta under peft's low_cpu_mem_usage: the load assigns the tensors
        plugin.to(next(base.parameters()).device)
    plugin.attach(base, share=True).detach()  # checks the layers, records the base's weight sample
    config.toe = toe.to_dict()
    return plugin


class ToELayer(nn.Module, BaseTunerLayer):
    """The method's one peft tuner layer: the plug-ins by adapter name, and the active ones' hooks on the base. peft
    switches, disables and deletes adapters through it; disabled, no hook is on the base, so the base computes
    exactly what it computes alone."""

    adapter_layer_names = ("toe_plugin",)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.toe_plugin = nn.ModuleDict()
        object.__setattr__(self, "base", base)  # not a submodule: the base's weights are the tuner's `model`'s

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)  # the active plug-ins train, the others do not
        self.sync_hooks()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.sync_hooks()

    def delete_adapter(self, adapter_name: str) -> None:
        self.toe_plugin[adapter_name].detach()
        super().delete_adapter(adapter_name)
        self.sync_hooks()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # peft's version reads the weight of a wrapped layer; this layer wraps none: the base's device, float32 kept
        plugin = self.toe_plugin[adapter_name]
        if not any(p.is_meta for p in plugin.parameters()):
            plugin.to(device or next(self.base.parameters()).device)

    def sync_hooks(self) -> None:
        """Puts the active plug-ins' hooks on the base, and no other's (none while the adapters are disabled)."""
        for name, plugin in self.toe_plugin.items():
            if name in self.active_adapters and not self.disable_adapters:
                plugin.attach(self.base, share=True)  # several active adapters: their plug-ins add up
            else:
                plugin.detach()


class ToETuner(BaseTuner):
    """What ``get_peft_model(base, ToEPeftConfig(...))`` wraps the base in: a :class:`ToELayer` (``toe``) whose plug-ins
    hook into the base's decoder layers. The base is frozen, and stays in eval mode while the plug-ins train (as under
    ToEModel); nothing of the base is replaced or copied."""

    prefix = "toe_"
    tuner_layer_cls = ToELayer
    # the plug-ins live on the tuner, not in the base's modules: peft's inject_adapter_in_model (what transformers'
    # `load_adapter` and `AutoModelForCausalLM.from_pretrained(adapter)` call) would drop them and leave the bare
    # base; this flag makes it refuse, naming get_peft_model (PeftModel.from_pretrained loads a saved adapter)
    uses_shared_state = True
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        """Builds the adapter's plug-in (see :func:`build_plugin`) and attaches it if the adapter is active."""
        config = self.peft_config[adapter_name]
        if "toe" not in self._modules:
            self.toe = ToELayer(model)
        freeze(model)
        self.toe.toe_plugin[adapter_name] = build_plugin(config, model)
        self.toe.set_adapter(self.active_adapters)
        if config.inference_mode:
            self.toe.toe_plugin[adapter_name].requires_grad_(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("TOE replaces no module of the base: its plug-in attaches through forward hooks")

    def train(self, mode: bool = True) -> ToETuner:
        """The plug-ins follow ``mode``; the base stays in eval mode (no dropout), its decoder layers flagged to
        recompute when activation checkpointing is on (see :func:`tree_of_experts.hf.recompute_frozen_layers`)."""
        nn.Module.train(self, mode)
        self.model.eval()
        if mode:
            recompute_frozen_layers(self.model)
        return self

    # peft's BaseTuner looks for its tuner layers inside the base; TOE's one layer is the tuner's own `toe`
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.toe.enable_adapters(enabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.toe.set_adapter(adapter_name, inference_mode)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        self.toe.delete_adapter(adapter_name)
        self.active_adapter = self.toe.active_adapters

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.toe.set_requires_grad(adapter_names, requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass  # the plug-in is float32 and computes in float32 whatever the base's dtype (plugin.py)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ToEError("a ToE plug-in cannot be merged into the base's weights: its update depends on each token's "
                       "hidden state; keep the PeftModel, or unload() for the bare base")

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter()
        for plugin in self.toe.toe_plugin.values():
            plugin.detach()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f".toe_plugin.{adapter_name}.", ".toe_plugin.", 1)


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.TOE) is None:  # once per process, whatever re-imports this module
        register_peft_method(name="toe", config_cls=ToEPeftConfig, model_cls=ToETuner)


_register()


# -- a plug-in folder as a peft adapter folder, and back ------------------------------------------------------------
def plugin_to_adapter(plugin: str | os.PathLike, out: str | os.PathLike,
                      base_model_name_or_path: str | None = None) -> str:
    """Writes the plug-in ``plugin`` (a folder of toe_config.json + toe_model.safetensors, or a hub repo id) as the
    peft adapter folder ``out`` (adapter_config.json + adapter_model.safetensors) that ``PeftModel.from_pretrained``
    loads; returns ``out``.

    Args:
        base_model_name_or_path: the base the adapter names (``AutoPeftModelForCausalLM`` loads it); by default the
            base the plug-in records.
    """
    config = ToEPeftConfig.from_plugin(plugin)  # (a hub id: its snapshot, config.init_from)
    loaded = ToEPlugin.load(config.init_from, toe_config(config.toe))  # the plug-in's own checks: shapes, finite values
    config.base_model_name_or_path = base_model_name_or_path or loaded.config.base_model or None
    config.save_pretrained(os.fspath(out))
    save_file({ADAPTER_KEY_PREFIX + k: v.contiguous() for k, v in loaded.state_dict().items()},
              os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return os.fspath(out)


def adapter_to_plugin(adapter: str | os.PathLike, out: str | os.PathLike) -> str:
    """Writes the TOE peft adapter ``adapter`` (a folder or hub repo id) as the plug-in folder ``out`` (toe_config.json,
    toe_model.safetensors and a README.md card) that ``ToEModel.from_pretrained`` loads; returns ``out``."""
    folder = resolve_folder(adapter, "ToE adapter")
    config = PeftConfig.from_pretrained(folder)
    if not isinstance(config, ToEPeftConfig):
        raise ToEError(f"{adapter} is a {config.peft_type} adapter, not a ToE one (peft_type TOE)")
    plugin = ToEPlugin(toe_config(config.toe))
    if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
        raise ToEError(f"{adapter} has no {ADAPTER_WEIGHTS}: save the adapter with safe_serialization=True (the "
                       "default) and convert it again")
    state = {k.removeprefix(ADAPTER_KEY_PREFIX): v for k, v in load_file(os.path.join(folder, ADAPTER_WEIGHTS)).items()}
    expected = plugin.state_dict().keys()
    if state.keys() != expected:
        raise ToEError(f"{adapter}: {ADAPTER_WEIGHTS} does not match its {ADAPTER_CONFIG}: missing "
                       f"{sorted(expected - state.keys())[:3]}, unexpected {sorted(state.keys() - expected)[:3]}")
    plugin.load_state_dict(state)
    save_plugin(out, plugin)
    return os.fspath(out)
