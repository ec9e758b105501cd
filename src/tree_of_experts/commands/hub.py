"""`toe inspect` (what a plug-in folder holds, and how its bank moved in training) and `toe push`
(a plug-in folder to the Hugging Face Hub)."""

from __future__ import annotations

import os
import tempfile

from ..hf.hub import push_folder, resolve_folder
from ..plugin_folder import save_plugin, training_datasets
from ..plugin import ToEPlugin


def inspect(plugin: str) -> dict:
    """Describes a plug-in folder's config, size, scales and bank geometry, without the base.

    Gives the config, the parameter count and, per injection layer, the learned scale and the geometry of the bank
    as stored (e_i) and as injected for a one-leaf route (s ⊙ e_i) — ``common_share`` near 1 means the leaves are
    one shared vector and routing cannot matter (:func:`tree_of_experts.bank.geometry`).

    Args:
        plugin: a plug-in folder (`toe extract`, `toe train` or `toe baseline` output).
    """
    from ..bank import geometry

    module = ToEPlugin.load(plugin)
    config = module.config
    start = _training_start(plugin)  # the plug-in training started from, for a before/after view of the bank
    layers = {}
    for layer, block in module.blocks.items():
        bank = block.bank.vectors().detach()
        scale = block.scale.detach()
        layers[layer] = {"scale_abs_mean": float(scale.abs().mean()), "bank": geometry(bank),
                         "injected": geometry(scale * bank)}
        if start is not None and layer in start.blocks:
            before = start.blocks[layer].bank.vectors().detach()
            layers[layer]["bank_before_training"] = geometry(before)
            layers[layer]["leaf_movement"] = float((bank - before).norm(dim=-1).mean() / before.norm(dim=-1).mean())
    # a plug-in trained on a LoRA-adapted base runs on base + that adapter (kept in the folder, merged on load)
    adapter = os.path.join(plugin, config.base_adapter) if config.base_adapter else None
    return {"plugin": str(plugin), "base": config.base_model, "base_adapter": adapter, "teacher": config.teacher_model,
            "layers": config.layers, "teacher_layers": config.teacher_layers, "shape": config.shape,
            "num_leaves": config.num_leaves, "selection": config.selection, "top_k": config.top_k,
            "parameters": sum(p.numel() for p in module.parameters()), "banks": layers}


def _training_start(plugin: str | os.PathLike) -> ToEPlugin | None:
    """The plug-in a `toe train` output started from (its ``init_plugin`` or ``experts`` in train_args.json), if
    that folder is still there."""
    import json

    path = os.path.join(plugin, "train_args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        args = json.load(f)
    start = args.get("init_plugin") or args.get("experts")
    if not start or not os.path.isfile(os.path.join(start, "toe_model.safetensors")):
        return None
    return ToEPlugin.load(start)


def push(plugin: str, repo_id: str, base_id: str | None = None, teacher_id: str | None = None,
         eval_dir: str | None = None, license: str | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False) -> str:
    """Uploads a plug-in folder to the Hugging Face Hub.

    Pushes ``toe_config.json``, ``toe_model.safetensors`` and a card rebuilt with the hub metadata; the token comes
    from ``hf auth login`` or ``HF_TOKEN``. The upload records no path of this machine: a plug-in built on a local
    base folder needs ``base_id``, and a teacher recorded as a local folder is left out unless ``teacher_id`` is
    given (the folder on disk is not changed).

    Args:
        plugin: a plug-in folder (`toe extract`, `toe train` or `toe baseline` output).
        repo_id: the model repo to create or update (user/name).
        base_id: the base's hub id; required when the plug-in was built on a local folder, so that
            ``ToEModel.from_pretrained(repo_id)`` finds the base and the card links to it.
        teacher_id: the teacher's hub id, recorded in place of a local teacher folder (which is otherwise left out).
        eval_dir: a `toe eval` output folder whose metrics go into the card.
        license: the card's license (usually the base's, e.g. apache-2.0).
        private: create the repo as private.
        revision: the branch to push to.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The commit URL.
    """
    module = ToEPlugin.load(resolve_folder(plugin, "plug-in"))
    with tempfile.TemporaryDirectory() as tmp:
        save_plugin(tmp, module, base_id=base_id, teacher_id=teacher_id, publish=True, eval_dir=eval_dir,
                    license=license, repo_id=repo_id, datasets=training_datasets(plugin))
        return push_folder(tmp, repo_id, private=private, revision=revision, create_pr=create_pr)
