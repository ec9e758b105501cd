"""Loading models and tokenizers by hub id or folder, and what identifies a base: its architecture fingerprint, a
sample of its weights, the library versions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import ToEError
from .hub import hub_local_only, is_hub_id, resolve_folder
from .layers import decoder_layers

# Architecture fields that must match for a plug-in (or a cached extraction) to be valid on a base.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
)


def arch_fingerprint(config: Any) -> tuple[dict[str, Any], str]:
    """The base config fields that must match, and their sha256."""
    arch = {k: getattr(config, k, None) for k in ARCH_KEYS}
    arch = {k: v for k, v in arch.items() if v is not None and isinstance(v, (int, float, str, bool))}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    return arch, digest


def sample_indices(n: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced indices in [0, n), in integer arithmetic (a float32 linspace rounds the last index of
    a 136M-element embedding up to n itself)."""
    return torch.tensor([i * (n - 1) // max(count - 1, 1) for i in range(count)], dtype=torch.long)


def weight_sample(model: nn.Module, count: int = 8) -> list[float] | None:
    """``count`` evenly spaced values of the input embedding and of the last decoder layer's first weight: a cheap
    fingerprint of the weights (two bases with the same architecture, other training, differ here). None when the
    weights are not plain floating-point tensors in memory (meta device, quantized)."""
    try:
        tensors = [model.get_input_embeddings().weight, next(decoder_layers(model)[-1].parameters())]
    except (AttributeError, NotImplementedError, StopIteration, ToEError):
        return None
    out = []
    for w in tensors:
        if not w.is_floating_point() or w.is_meta or not w.is_contiguous() or w.numel() == 0:
            return None
        flat = w.detach().view(-1)
        out += flat[sample_indices(flat.numel(), count).to(flat.device)].float().cpu().tolist()
    return out


def same_weights(recorded: list[float], sample: list[float], rtol: float = 2e-2) -> bool:
    """Whether two :func:`weight_sample` lists come from the same weights, up to a cast (bf16 keeps ~3 digits)."""
    return len(recorded) == len(sample) and all(abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-8
                                                for a, b in zip(recorded, sample))


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"tree_of_experts": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def pick_device(device: str | None) -> str:
    """``device``, or the GPU when one is visible (as `toe extract` and `toe train` pick through accelerate)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str | None, option: str = "--teacher_device_map") -> str | dict | None:
    """A device map as transformers' ``from_pretrained(device_map=...)`` takes it: one of its strategies (auto,
    balanced, balanced_low_0, sequential: accelerate spreads the layers over the visible GPUs, then the CPU, then the
    disk), or a JSON file {module name: device} (``"cuda:0"``, ``0``, ``"cpu"``, ``"disk"``). Checked before any
    model loads; None stays None."""
    if value is None or value in DEVICE_MAP_STRATEGIES:
        return value
    if not os.path.isfile(value):
        raise ToEError(f"{option} {value!r}: give one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                       "{module name: device}")
    try:
        with open(value) as f:
            mapping = json.load(f)
    except (OSError, ValueError) as e:
        raise ToEError(f"{option} {value}: not a JSON file ({e}): write {{module name: device}}") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(k, str) for k in mapping):
        raise ToEError(f"{option} {value}: write a JSON object {{module name: device}}, e.g. "
                       '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}')
    return mapping


def check_one_process(device_map: str | dict | None, num_processes: int) -> None:
    """Refuses a teacher device map under several processes (each would spread a copy over the same devices)."""
    if device_map and num_processes > 1:
        raise ToEError("--teacher_device_map spreads one teacher over this machine's devices: run one process "
                       "(not `accelerate launch` with several)")


def load_causal_lm(
    name_or_path: str, dtype: str | torch.dtype | None = "auto", device: str | None = None,
    device_map: str | dict | None = None, **kwargs: Any
) -> nn.Module:
    """Loads a causal LM from a hub id or local folder (``gguf_file=...`` passes through), eval mode.

    ``device_map`` (see :func:`parse_device_map`) places the model over several devices with accelerate instead of
    on ``device``: for a teacher larger than one device. Weights it offloads to the disk go to a temporary folder,
    removed with the model."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if model_source(name_or_path, "model", **kwargs):
        kwargs["local_files_only"] = True
    offload = None
    if device_map is not None:
        offload = tempfile.mkdtemp(prefix="toe-offload-")
        kwargs.update(device_map=device_map, offload_folder=offload)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        raise ToEError(f"cannot load model {name_or_path!r} ({first}): pass a local folder or a reachable hub id") from None
    if offload:
        weakref.finalize(model, shutil.rmtree, offload, True)
    elif device:
        model.to(device)
    return model.eval()


def model_source(name: str, what: str = "model", **kwargs: Any) -> bool:
    """Checks that ``name`` can be loaded from, before anything loads: a local folder, or a hub id that is reachable
    or cached (see :func:`hub_local_only`, whose answer it returns: load from the cache only). One line otherwise."""
    if os.path.isdir(name):
        return bool(kwargs.get("local_files_only"))
    if not is_hub_id(name):
        raise ToEError(f"{what} {name!r} not found: it is neither a local folder nor a hub repo id (org/name)")
    return hub_local_only(name, what, **kwargs)


def load_config(name_or_path: str, what: str = "model", **kwargs: Any) -> Any:
    """The model's transformers config alone (no weights): for checks before a model loads."""
    from transformers import AutoConfig

    if model_source(name_or_path, what, **kwargs):
        kwargs["local_files_only"] = True
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot load the config of {what} {name_or_path!r} ({first}): pass a model folder or "
                       "hub id") from None


def decoder_layer_count(name_or_path: str, **kwargs: Any) -> int | None:
    """The model's decoder layer count read from its config alone (cheap: no weights), or None where the config
    does not say (then check after loading, with :func:`decoder_layers`)."""
    try:
        config = load_config(name_or_path, **kwargs)
    except ToEError:
        return None  # the load reports it, with its own message
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def load_tokenizer(name_or_path: str, **kwargs: Any):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cls = AutoTokenizer
    config_path = os.path.join(name_or_path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            declared = json.load(f).get("tokenizer_class")
        # A plain `tokenizers` tokenizer saved next to a model: AutoTokenizer would pick the model family's
        # tokenizer class (e.g. Qwen2Tokenizer) and silently drop its pre-tokenizer.
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            cls = PreTrainedTokenizerFast
    elif model_source(name_or_path, "tokenizer", **kwargs):
        kwargs["local_files_only"] = True
    try:
        tok = cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot load tokenizer {name_or_path!r} ({first}): pass a local folder or hub id") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def merge_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """``model`` with the peft adapter in the local folder ``adapter`` (see :func:`adapter_folder`) merged into its
    weights (in place; returns the plain transformers model): the base a ToE plug-in trained on top of LoRA runs on."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def adapter_folder(adapter: str | os.PathLike) -> str:
    """The local folder of a peft adapter: ``adapter`` itself, or a hub repo's snapshot. One line, before any model
    loads, when it is neither (a missing relative path reads as a hub id: the Hub is asked, and says no)."""
    folder = resolve_folder(adapter, "LoRA adapter")
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ToEError(f"LoRA adapter {os.fspath(adapter)!r} is not a peft adapter folder (no adapter_config.json): "
                       "pass the folder `toe baseline --kind lora` wrote")
    return folder
