"""Config of a Tree-of-Experts model exported by `toe export` (loaded with ``trust_remote_code=True``)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class ToEExportConfig(PretrainedConfig):
    """A base causal LM's config (``text_config``) and the plug-in's (``toe``, the fields of ``toe_config.json``).

    The model type is "toe", not the base's: a runtime that does not run this folder's code then refuses the model
    instead of serving the bare base without the plug-in.
    """

    model_type = "toe"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: dict | PretrainedConfig | None = None, toe: dict[str, Any] | None = None,
                 **kwargs: Any):
        if isinstance(text_config, dict):
            fields = dict(text_config)
            text_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        self.text_config = text_config
        self.toe = dict(toe or {})
        super().__init__(**kwargs)
