"""`toe export`: a base and a plug-in as one self-contained transformers model folder, for serving.

The folder loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (so ``pipeline``,
lm-eval's ``hf`` model and servers that run transformers models take it unchanged) and needs torch and transformers
only. It holds the base's config and weights (``base.*``), the plug-in's tensors (``plugin.*``, float32) and the
modeling code of ``assets/export``, with copies of ``tree.py`` and ``bank.py`` (they import only torch), so the
exported model runs the library's own routing code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from importlib import resources

from ..errors import ToEError
from ..hf.hub import is_full_hub_id, is_hub_id
from ..hf.loading import load_tokenizer
from ..folders import inside, local_path
from ..run_kinds import describe, folder_kind
from ..files import follow_umask
from ..model import ToEModel

TEMPLATE = resources.files("tree_of_experts") / "assets" / "export"  # the modeling code written into the folder
CODE = ("configuration_toe.py", "modeling_toe.py")
LIBRARY_CODE = {"toe_tree.py": "tree.py", "toe_bank.py": "bank.py",  # exported name: library module
                "toe_positions.py": "positions.py"}
# What an export folder holds (the tokenizer's files vary with its kind): --overwrite replaces a folder holding
# nothing else, as the whole folder is renamed away.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "README.md", "*.py", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model")


def export(base: str, plugin: str, out: str, base_id: str | None = None, dtype: str = "auto",
           overwrite: bool = False, verify: bool = True) -> dict:
    """Writes a transformers model folder: the base with the plug-in attached.

    The folder in ``out`` loads with ``trust_remote_code=True``; its logits and greedy tokens equal ToEModel's.

    Args:
        base: the base model (hub id or local folder); its tokenizer is copied too when it has one.
        plugin: the plug-in folder (or hub id) built for ``base``.
        out: the folder to write; written in a temporary folder next to it, then renamed into place.
        base_id: the base's hub id, for the model card, when ``base`` is a local folder.
        dtype: dtype of the base weights written ("auto" keeps the base's); the plug-in is always float32.
        overwrite: replace an earlier export in ``out`` (a folder holding anything else is refused).
        verify: load the written folder once more (as transformers will) and check that its logits on a short probe
            equal ToEModel's before moving it into place; needs memory for a second copy of the base.

    Returns:
        {"out", "files", "tokenizer"} where "tokenizer" says whether the base's tokenizer was copied.
    """
    from huggingface_hub import save_torch_state_dict

    out = os.path.abspath(out)
    check_export_out(out, overwrite, {"base": base, "plugin": plugin})
    if base_id is not None and not is_hub_id(base_id):
        raise ToEError(f"base_id={base_id!r} is not a hub repo id: give the id the base is published under (org/name)")
    model = ToEModel.from_pretrained(base, plugin, dtype=dtype)
    try:
        tok = load_tokenizer(base)
    except ToEError:
        tok = None
    base_name = base_id or model.toe_config.base_model
    toe = {**model.toe_config.to_dict(), "base_model": base_name}
    text_config = model.config.to_dict()
    text_config["_name_or_path"] = base_name
    config = {
        "architectures": ["ToEForCausalLM"],
        "model_type": "toe",
        "auto_map": {"AutoConfig": "configuration_toe.ToEExportConfig",
                     "AutoModelForCausalLM": "modeling_toe.ToEForCausalLM"},
        "text_config": text_config,
        "toe": toe,
        "dtype": str(model.dtype).removeprefix("torch."),
        "tie_word_embeddings": text_config.get("tie_word_embeddings", False),
        **{k: text_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
                                       "bos_token_id", "eos_token_id", "pad_token_id") if k in text_config},
    }
    # The plug-in stays float32 (the gate computes in float32); tensors tied in the base (embeddings and LM head)
    # are written once and tied again at load.
    state = model.state_dict()
    tied = _tied_names(model.base)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        model.generation_config.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size="5GB", metadata={"format": "pt"},
                              shared_tensors_to_discard=[f"base.{name}" for name in tied])
        for name in CODE:
            if not (TEMPLATE / name).is_file():
                raise ToEError(f"the export template {name} is missing from the installed package: reinstall it")
            shutil.copyfile(str(TEMPLATE / name), os.path.join(tmp, name))
        package = resources.files("tree_of_experts")
        for name, source in LIBRARY_CODE.items():
            shutil.copyfile(str(package / source), os.path.join(tmp, name))
        if tok is not None:
            tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_card(base_name, model, tokenizer=tok is not None))
        if verify:
            _verify(tmp, model)
        follow_umask(tmp)  # mkdtemp made it 0700, and safetensors writes its weights 0600
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "files": sorted(os.listdir(out)), "tokenizer": tok is not None}


def check_export_out(out: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """Refuses an ``out`` that the export, which replaces the whole folder, would lose anything in: a file, a folder
    holding an input, another kind of run (even with ``overwrite``, naming it), files an export does not write; an
    earlier export needs ``overwrite``."""
    if os.path.isfile(out):
        raise ToEError(f"--out {out} is a file: pass a new folder")
    for option, value in inputs.items():
        path = local_path(value)
        if path and inside(path, out) is not None:
            raise ToEError(f"--{option} {value} lies inside --out {out}: `toe export` replaces the whole folder: pass "
                           "a new --out")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not names:
        return
    kind, evidence = folder_kind(out)
    if kind not in (None, "export"):
        raise ToEError(f"--out {out} holds {describe(kind)} ({', '.join(evidence[:4])}): `toe export` replaces the "
                       "whole folder, so it writes only into a new folder or over an earlier export (even with "
                       "--overwrite): pass a new --out")
    other = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in EXPORT_FILES)]
    if other:
        shown = ", ".join(other[:4]) + (", ..." if len(other) > 4 else "")
        raise ToEError(f"--out {out} holds files that `toe export` does not write ({shown}): it replaces the whole "
                       "folder, so it writes only into a new folder or over an earlier export: pass a new --out")
    if kind is None:
        raise ToEError(f"--out {out} holds {', '.join(names[:4])} but no earlier export (no modeling_toe.py): pass a "
                       "new --out")
    if not overwrite:
        raise ToEError(f"--out {out} holds an earlier export: pass --overwrite true to replace it, or a new --out")


def _verify(folder: str, model: ToEModel) -> None:
    """Refuses a written folder whose logits differ from ``model``'s on a short probe (B=1, T=8)."""
    import torch
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(model.device)
    ids = torch.arange(1, 9, device=model.device)[None] % model.config.vocab_size  # (1, 8)
    with torch.no_grad():
        gap = (exported(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max().item()
    if gap != 0:
        raise ToEError(f"the exported model's logits differ from ToEModel's by up to {gap:.3g}: the export template "
                       "does not implement this plug-in (a gate option newer than the template?); please report it")


def _tied_names(base) -> list[str]:
    """Names of the base's tensors tied to another one (the LM head to the embeddings), as the base declares them."""
    keys = getattr(base, "all_tied_weights_keys", None)  # transformers 5.x: {tied: source}
    if keys is None:
        keys = getattr(base, "_tied_weights_keys", None) or []  # 4.x: a list of tied names
    if not getattr(base.config, "tie_word_embeddings", False):
        return []
    return sorted(keys)


def _replace(tmp: str, out: str) -> None:
    """Moves the finished folder ``tmp`` to ``out``; an existing ``out`` is renamed aside first and removed last."""
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.old-")
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _card(base_name: str, model: ToEModel, tokenizer: bool = True) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = model.toe_config
    data = ModelCardData(base_model=base_name if is_full_hub_id(base_name) else None,
                         library_name="transformers", pipeline_tag="text-generation",
                         tags=["tree-of-experts", "toe", "custom_code"])
    body = "\n".join([
        f"# `{base_name}` with a Tree-of-Experts plug-in",
        "",
        f"Exported by `toe export`: the base's weights and a ToE plug-in ({cfg.shape} tree, N = {cfg.num_leaves}, "
        f"{cfg.selection} K = {cfg.top_k}, layers {cfg.layers}) in one folder. It needs torch and transformers only:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        f'tok = AutoTokenizer.from_pretrained("{"path/to/this/folder" if tokenizer else base_name}")  # the base\'s',
        'ids = model.generate(**tok("Question: ...", return_tensors="pt"), max_new_tokens=256)',
        "```",
        "",
        "Runtimes that do not run the folder's code (model type `toe`) refuse it rather than serve the bare base.",
        "",
    ])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
