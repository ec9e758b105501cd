"""lm-evaluation-harness integration: model type ``toe`` = a Hugging Face causal LM with a ToE plug-in attached.

Python::

    from tree_of_experts.harness import ToELM
    import lm_eval
    lm = ToELM(base="Qwen/Qwen2.5-1.5B", plugin="path/to/plugin", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])

Command line: lm-eval (0.4.x) finds models only in its own source tree (no entry points, and ``--include_path``
adds tasks, not models), so ``toe lm-eval`` registers ``toe`` and then runs lm-eval's own CLI with the same
arguments::

    toe lm-eval --model toe --model_args base=B,plugin=P --tasks gsm8k --batch_size 8
    python -m tree_of_experts.harness ...   # the same

The plug-in works through forward hooks on the base, so every lm-eval code path (loglikelihood, rolling
perplexity, generate_until with the KV cache) runs with it.
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import ToEError
from .hf.loading import load_tokenizer
from .model import ToEModel


@register_model("toe")
class ToELM(HFLM):
    """HFLM whose model carries a ToE plug-in.

    Args:
        base: base model id or folder (``pretrained``, HFLM's name for it, works too), or a loaded model.
        plugin: ToE plug-in folder.
        tokenizer: tokenizer id/folder or object; default: the base's, loaded by toe's own loader (lm-eval's
            AutoTokenizer picks the model family's class for a plain `tokenizers` tokenizer and tokenizes wrongly).
        **kwargs: everything HFLM accepts (batch_size, device, dtype, ...).
    """

    def __init__(self, base=None, plugin: str | None = None, pretrained=None, tokenizer=None, **kwargs):
        if (base is None) == (pretrained is None):
            raise ToEError("give the base model once: --model_args base=MODEL,plugin=FOLDER")
        if plugin is None:
            raise ToEError("the toe model needs a plug-in: --model_args base=MODEL,plugin=FOLDER (or --model hf for "
                           "the bare base)")
        base = base if base is not None else pretrained
        if tokenizer is None and isinstance(base, str):
            tokenizer = base
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        super().__init__(pretrained=base, tokenizer=tokenizer, **kwargs)
        self.toe = ToEModel.from_pretrained(self.model, plugin)
        self._model = self.toe.base  # a plug-in on a LoRA-adapted base hooks a merged copy: lm-eval scores that one


def cli(argv: list[str] | None = None) -> None:
    """Runs lm-eval's command line with ``argv`` (default: this process's), model type ``toe`` registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = ["lm-eval", *argv]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":  # `python -m tree_of_experts.harness ARGS`, the same as `toe lm-eval ARGS`
    try:
        cli()
    except ToEError as e:
        print(f"toe: error: {e}", file=sys.stderr)
        sys.exit(2)
