"""transformers' Trainer on a ToEModel, resuming from and reloading its plug-in-only checkpoints.

``Trainer(model=toe_model, ...)`` already trains the plug-in alone and its checkpoints hold the plug-in alone
(``ToEModel.save_pretrained``). What plain Trainer cannot do is read them back: ``resume_from_checkpoint`` and
``load_best_model_at_end`` look for ``model.safetensors`` or a peft adapter. :class:`PluginCheckpoints` teaches a
Trainer class to read a plug-in checkpoint (as sentence-transformers' trainer reads its own format):

    from tree_of_experts.trainer import ToETrainer            # transformers.Trainer + PluginCheckpoints
    ToETrainer(model=toe_model, args=args, train_dataset=data).train(resume_from_checkpoint=True)

    class ToESFTTrainer(PluginCheckpoints, trl.SFTTrainer): ...  # any Trainer subclass (mixin first)

Anything else in a checkpoint folder (optimizer, scheduler, RNG states, trainer state) is Trainer's own and it
restores it as usual; a checkpoint without a plug-in goes to the Trainer class's own loader.
"""

from __future__ import annotations

import os

from .config import WEIGHTS_NAME, ToEError
from .files import load_tensors
from .model import ToEModel


def _plugin_file(folder: str | os.PathLike | None) -> str | None:
    path = os.path.join(folder, WEIGHTS_NAME) if folder else None
    return path if path and os.path.isfile(path) else None


class PluginCheckpoints:
    """Mixin for ``transformers.Trainer`` and its subclasses: resume from, and load the best of, plug-in checkpoints.
    Put it first in the bases (``class T(PluginCheckpoints, Trainer)``) so its loaders run before Trainer's."""

    def _toe_model(self, model=None) -> ToEModel | None:
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return None  # sharded parameters: their own checkpoint formats, Trainer's loaders (untested with ToE)
        model = model if model is not None else self.model
        accelerator = getattr(self, "accelerator", None)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator else model
        return unwrapped if isinstance(unwrapped, ToEModel) else None

    def _load_plugin(self, folder: str, model=None) -> bool:
        """Loads ``folder``'s plug-in tensors into the trained ToEModel; False when there is nothing of ours to load."""
        path, toe = _plugin_file(folder), self._toe_model(model)
        if path is None or toe is None:
            return False
        fix = f"resume from a checkpoint this run wrote (a {WEIGHTS_NAME} of the same plug-in)"
        state = load_tensors(path, fix)
        try:
            toe.plugin.load_state_dict(state)
        except RuntimeError as e:
            why = " ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
            raise ToEError(f"{folder} holds another plug-in than the one being trained ({why}): {fix}") from None
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_plugin(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_plugin(self.state.best_model_checkpoint):
            super()._load_best_model()


def __getattr__(name: str):
    if name == "ToETrainer":  # built on first use: importing transformers' Trainer is slow
        from transformers import Trainer

        trainer = type("ToETrainer", (PluginCheckpoints, Trainer), {
            "__doc__": "transformers.Trainer that resumes from and reloads plug-in-only checkpoints "
                       "(:class:`PluginCheckpoints`).", "__module__": __name__})
        globals()["ToETrainer"] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
