"""lm-evaluation-harness integration: model type ``toe`` = a Hugging Face causal LM with a ToE plug-in attached.

Python::

    from tree_of_experts.lm_eval import ToELM
    import lm_eval
    lm = ToELM(pretrained="Qwen/Qwen2.5-1.5B", plugin="path/to/plugin", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])

Command line (registers the model type, then runs lm-eval's own CLI)::

    python -m tree_of_experts.lm_eval --model toe --model_args pretrained=B,plugin=P --tasks gsm8k

The plug-in works through forward hooks on the base, so every lm-eval code path (loglikelihood, rolling
perplexity, generate_until with the KV cache) runs with it.
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .model import ToEModel


@register_model("toe")
class ToELM(HFLM):
    """HFLM whose model carries a ToE plug-in.

    Args:
        pretrained: base model id, folder, or loaded model.
        plugin: ToE plug-in folder.
        **kwargs: everything HFLM accepts (batch_size, device, dtype, ...).
    """

    def __init__(self, pretrained, plugin: str, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        self.toe = ToEModel.from_pretrained(self.model, plugin)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
