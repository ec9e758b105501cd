"""Thin glue to transformers: loading models by id or path, finding decoder layers, fingerprints.

Layer convention used everywhere in ToE: "layer l" is the *output of decoder layer l* (0-based), i.e. the residual
stream after l + 1 blocks. It equals ``output_hidden_states[l + 1]`` for every layer but the last one, because
transformers applies the final norm to ``output_hidden_states[-1]``; ToE reads states with forward hooks on the
decoder layers, never from ``output_hidden_states``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ToEError

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

    from . import __version__

    return {"tree_of_experts": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Qwen/Mistral-style ``model.layers``, GPT-style ``h``)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (inner, getattr(inner, "model", None), getattr(model, "transformer", None)):
        if owner is None:
            continue
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ToEError(f"cannot find the decoder layers of {type(model).__name__}: ToE supports decoder-only causal LMs")


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module of a causal LM that runs its decoder layers (Qwen2Model, GPT2Model, ...: ``get_decoder()``), called by
    the LM with the same input ids, attention mask and cache, and called alone by trainers that apply the LM head
    themselves (trl's fused head)."""
    # get_decoder first: a peft model's base_model is its LoRA wrapper, which generation and a plain PeftModel skip
    stack = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(stack, nn.Module) or stack is model:
        stack = getattr(model, "base_model", None)
    return stack if isinstance(stack, nn.Module) else model


def model_id(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def pick_device(device: str | None) -> str:
    """``device``, or the GPU when one is visible (as `toe extract` and `toe train` pick through accelerate)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(
    name_or_path: str, dtype: str | torch.dtype | None = "auto", device: str | None = None, **kwargs: Any
) -> nn.Module:
    """Loads a causal LM from a hub id or local folder (``gguf_file=...`` passes through), eval mode."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if model_source(name_or_path, "model", **kwargs):
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot load model {name_or_path!r} ({first}): pass a local folder or a reachable hub id") from None
    if device:
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


def enable_checkpointing(model: nn.Module, kwargs: dict | None = None, **options: Any) -> None:
    """Activation checkpointing (recompute in backward): transformers 5.x names it
    ``activation_checkpointing_enable`` and deprecates ``gradient_checkpointing_enable``; older versions have only
    the latter. A peft model forwards either to its base. ``options``: transformers 5.x's ``every_n_layers`` and
    ``offload``.

    Non-reentrant by default, which needs no gradient at the inputs: the hook transformers 5.x puts on the input
    embeddings to make their output require one is removed, else the backward runs through every frozen layer below
    the first trained one for nothing. ``use_reentrant=True`` keeps that hook (a reentrant checkpoint drops the
    gradients of a layer whose inputs need none)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
    # the hook's handle: a list in transformers 5.x, one handle in 4.x (which adds it for peft models only)
    hooked = bool(getattr(model, "_require_grads_hooks", None)) or hasattr(model, "_require_grads_hook")
    if kwargs["use_reentrant"] and not hooked:
        model.enable_input_require_grads()
    elif not kwargs["use_reentrant"] and hooked:
        model.disable_input_require_grads()


def disable_checkpointing(model: nn.Module) -> None:
    """Turns activation checkpointing off again (either transformers name)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` recomputes its activations in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def recompute_frozen_layers(model: nn.Module) -> None:
    """For a frozen base kept in eval mode with checkpointing on: transformers recomputes a decoder layer only while
    that layer is in training mode, so the decoder layers alone are flagged as training (not their submodules:
    dropout stays off). Without checkpointing, nothing changes."""
    if is_checkpointing(model):
        for layer in decoder_layers(model):
            layer.training = True


def checkpoint_frozen_layers(model: nn.Module, kwargs: dict | None = None, **options: Any) -> None:
    """Activation checkpointing for a frozen base kept in eval mode (the plug-in trains, the base must not drop
    out; see :func:`recompute_frozen_layers`)."""
    enable_checkpointing(model, kwargs, **options)
    recompute_frozen_layers(model)


def edit_output(output: Any, fn) -> Any:
    """Applies ``fn`` to a decoder layer's hidden states, whichever output convention the layer uses.

    transformers < 5 returns a tuple ``(hidden, ...)`` from decoder layers; 5.x returns the tensor itself.
    """
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Records the outputs of the given decoder layers (see the layer convention above) during the block."""
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, hidden_of(o))) for i in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def starting_at(model: nn.Module, layer: int, states: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward of ``model`` starts from ``states`` (B, T, D) as the output of decoder layer
    ``layer``: the layers below it pass their input through and that layer returns ``states`` without computing.

    Forward hooks still run on every layer, so a plug-in injecting at ``layer`` adds its Δ to ``states``. This is
    how training starts from an extraction's cached base states instead of running the frozen layers below the
    lowest injection layer; the batch must be the one the states were computed for (same tokens, same padding).
    """
    as_output = (lambda h: (h,)) if layers_return_tuples(model) else (lambda h: h)

    def through(*args, **kwargs):
        return as_output(args[0] if args else kwargs["hidden_states"])

    def cached(*args, **kwargs):
        return as_output(states)

    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ToEError(f"layer {layer} out of range: the model has {len(blocks)} decoder layers")
    saved = [blocks[i].__dict__.get("forward") for i in range(layer + 1)]  # e.g. accelerate's own wrappers
    for i in range(layer + 1):
        blocks[i].forward = through if i < layer else cached  # an instance attribute: Module.__call__ runs it
    try:
        yield
    finally:
        for i, forward in enumerate(saved):
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


def layers_return_tuples(model: nn.Module) -> bool:
    """Whether ``model``'s decoder layers return ``(hidden, ...)`` (many transformers 4.x models) or the tensor
    itself (5.x, and some late 4.x models): found once by a one-token forward stopped after the first layer, then
    remembered on the model."""
    known = getattr(model, "_toe_layers_return_tuples", None)
    if known is not None:
        return known
    seen: dict[str, bool] = {}

    def hook(m, a, output):
        seen["tuple"] = isinstance(output, tuple)
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    except _StopForward:
        pass
    finally:
        handle.remove()
    model._toe_layers_return_tuples = seen["tuple"]
    return seen["tuple"]


class _StopForward(Exception):
    """Raised by a hook once the last needed layer has run."""


def states_until(model: nn.Module, layers: list[int], inputs: dict) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers, running the model only up to the deepest of them.

    Extraction needs the base's residual at the injection layer and nothing above it: stopping there skips the
    upper layers and the LM head (about half the base's cost for a middle layer).
    """
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook(m, a, o, i):
        seen[i] = hidden_of(o)
        if i == last:
            raise _StopForward

    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i in layers]
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def add_to_layers(model: nn.Module, fns: dict[int, Any]) -> Iterator[None]:
    """Adds ``fns[i](h)`` (same shape as h) to the output of decoder layer i during the block."""
    blocks = decoder_layers(model)

    def make(fn):
        return lambda m, a, o: edit_output(o, lambda h: h + fn(h).to(h.dtype))

    handles = [blocks[i].register_forward_hook(make(fn)) for i, fn in fns.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def padded_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device | str) -> dict:
    """Forward kwargs for a left-padded batch, with position ids counted from each row's first real token.

    Without explicit position ids a plain forward numbers left-padded rows from the padding; RoPE models are
    invariant to that shift, absolute-position models are not.
    """
    am = attention_mask.to(device)
    return {"input_ids": input_ids.to(device), "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp_min(0)}


def cache_kwargs(model: nn.Module, cache: Any) -> dict:
    """``{name: cache}``, the KV cache as ``model``'s forward takes it: transformers 5.25 renamed the argument
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); earlier 5.x know the old name only."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned: its ``cache`` field from transformers 5.25 on (``past_key_values`` there
    is a property that warns), ``past_key_values`` before."""
    names = {f.name for f in dataclasses.fields(output)}
    return output.cache if "cache" in names else output.past_key_values


# -- the Hub -------------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import time."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def is_hub_id(name: str) -> bool:
    """``name`` reads as a hub repo id ("org/name" or "name") and is not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_full_hub_id(name: str) -> bool:
    """``name`` is a hub repo id with its owner ("org/name"): what an upload and a card's ``base_model`` take."""
    return is_hub_id(name) and "/" in name


def hub_id_of(path: str) -> tuple[str | None, str | None]:
    """(repo id, commit) of a folder inside the Hugging Face cache (``.../models--org--name/snapshots/<sha>``), else
    (None, None): a base loaded from the cache by path still records where it came from."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/"), parts[i + 2]
    return None, None


def base_hub_id(model: nn.Module) -> str:
    """The base's hub id when it is known (loaded by id, or by a path inside the hub cache), else its path or name."""
    name = model_id(model)
    if os.path.isdir(name):
        return hub_id_of(name)[0] or name
    return name


def hub_local_only(name: str, what: str, revision: str | None = None, token: str | bool | None = None,
                   gguf_file: str | None = None, local_files_only: bool = False, **_: Any) -> bool:
    """Whether transformers should load hub repo ``name`` from the local cache only: when offline, or when the Hub
    cannot be reached but the repo is cached. Raises a one-line ToEError when it is neither reachable nor cached (and
    for an unknown or gated repo) instead of letting transformers retry every file for a minute."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if local_files_only or not is_hub_id(name):
        return local_files_only  # not a hub id: transformers says what is wrong with the path
    cached = isinstance(try_to_load_from_cache(name, gguf_file or "config.json", revision=revision), str)
    if hub_offline():
        if cached:
            return True
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and "
                       f"HF_HUB_OFFLINE is set: download it once online (hf download {name}) or pass a local folder")
    try:
        HfApi(token=token).model_info(name, revision=revision)  # one request, no retries
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        first = str(e).strip().splitlines()[0]
        raise ToEError(f"{what} {name!r} cannot be read from the Hub ({first}): check the id, revision and token") from None
    except HfHubHTTPError:
        return False  # the Hub answered (a server error): transformers' own retries are worth it
    except Exception:  # noqa: BLE001 (no connection: DNS, refused, timeout, as the HTTP client's own types)
        if cached:
            return True
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and the Hub "
                       f"cannot be reached: download it once online (hf download {name}) or pass a local folder") from None
    return False


def resolve_folder(name_or_path: str | os.PathLike, what: str = "plug-in", revision: str | None = None,
                   token: str | bool | None = None, allow_patterns: list[str] | None = None) -> str:
    """A local folder for ``name_or_path``: the folder itself, or a hub repo's snapshot (downloaded, or read from the
    cache when offline). Fails with one line instead of retrying when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise ToEError(f"{what} {name!r} not found: it is neither a local folder nor a hub repo id (org/name)")
    offline = hub_offline()
    try:
        return snapshot_download(name, revision=revision, token=token, allow_patterns=allow_patterns,
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and {why}: "
                       f"download it once online (hf download {name}) or pass a local folder") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise ToEError(f"{what} {name!r} cannot be read from the Hub ({first}): check the id, revision and token") from None


def push_folder(folder: str, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None) -> str:
    """Uploads ``folder`` to the model repo ``repo_id`` (created if missing) in one commit; returns the commit URL.
    No token, no connection and a refused token or repo end in one line that names the fix, not the HTTP client's
    traceback."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not is_full_hub_id(repo_id):
        raise ToEError(f"repo_id={repo_id!r}: give a hub repo id of the form user/name")
    if hub_offline():
        raise ToEError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it to upload")
    if token in (None, True) and not get_token():
        raise ToEError(f"cannot push to {repo_id!r}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN "
                       "to a write token")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or "Upload ToE plug-in")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = {401: "the token was refused: log in again with `hf auth login` or set HF_TOKEN to a valid write token",
               403: "the token may not write there: use a write token of the repo's owner, or a repo_id under your "
                    "own name or organisation",
               404: "no such repo or branch for this token: check repo_id, --revision and the token's owner"}
        raise ToEError(f"cannot push to {repo_id!r} ({first}): "
                       f"{fix.get(status, f'the Hub at {api.endpoint} refused the upload; try again later')}") from None
    except Exception as e:  # noqa: BLE001 (no connection: DNS, refused, timeout, as the HTTP client's own types)
        if not _is_connection_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot push to {repo_id!r}: the Hub at {api.endpoint} cannot be reached ({first}): check the "
                       "network connection, or HF_ENDPOINT if it is set") from None
    return str(getattr(info, "commit_url", info))


def _is_connection_error(e: BaseException) -> bool:
    """Whether ``e`` is the HTTP client failing to talk to a server (requests' errors are OSErrors; httpx's are not,
    and huggingface_hub has used both)."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError) or module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


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
