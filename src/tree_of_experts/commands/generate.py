"""`toe generate`: completions from a base + plug-in (chat template optional)."""

from __future__ import annotations

from ..errors import ToEError
from ..data import chat_template
from ..hf.loading import load_causal_lm, load_tokenizer, pick_device
from ..inference import Sampling, generate_texts, read_prompts, seeded
from ..options import TRAINING_ONLY, Prompts, Runtime, grouped, refuse_unused


@grouped
def generate(
    base: str,
    plugin: str | None = None,
    prompts: Prompts = Prompts(),
    runtime: Runtime = Runtime(),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    compile: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Generates completions with the base (and the plug-in, when given).

    Every option of a group can also be given flat (``--prompt TEXT`` or ``--prompts.prompt TEXT``).

    Args:
        base: hub id or local folder of the base model.
        plugin: plug-in folder (from `toe extract` / `toe train`); omit to run the bare base.
        prompts: the prompt, or a file of prompts, and whether each is wrapped in the chat template.
        runtime: dtype and device of the base (default: the GPU when one is visible); nothing is written, so
            ``resume``, ``overwrite`` and the training-only fields are refused.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per batch (left-padded).
        compile: compile the plug-in's hook computation with torch.compile (see ``ToEPlugin.compile``).
        temperature: decoding temperature; 0 (default) is greedy, a positive one samples (see `Sampling`).
        top_p: nucleus mass when sampling (1: the whole distribution).
        num_samples: sampled completions per prompt.
        seed: seed of the sampling draws.

    Returns:
        One {"prompt", "completion"} dict per prompt; with ``num_samples`` > 1, one per sample, numbered by
        ``"sample"``.
    """
    from ..model import ToEModel

    if max_new_tokens < 1 or batch_size < 1:
        raise ToEError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: both must be >= 1")
    refuse_unused("toe generate", runtime, ("dtype", "device"),
                  {**TRAINING_ONLY, "": "toe generate prints its completions and writes nothing"})
    sampling = Sampling(temperature, top_p, num_samples, seed)
    given = prompts
    prompts = read_prompts(given.prompt, given.prompts_file)  # the texts, from here on
    tokenizer = load_tokenizer(base)
    rendered = prompts
    if given.chat:
        template = chat_template(tokenizer, "drop --chat and write the prompt format into the prompts")
        rendered = [template.replace("{prompt}", p) for p in prompts]
    device = pick_device(runtime.device)
    model = load_causal_lm(base, dtype=runtime.dtype, device=device)
    if plugin is not None:
        model = ToEModel.from_pretrained(model, plugin)
        if compile:
            model.plugin.compile()
    with seeded(sampling.seed, device):
        texts = generate_texts(model, tokenizer, rendered, max_new_tokens, batch_size, sampling)
    if num_samples == 1:
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)]
    return [{"prompt": prompts[i // num_samples], "sample": i % num_samples, "completion": c}
            for i, c in enumerate(texts)]
