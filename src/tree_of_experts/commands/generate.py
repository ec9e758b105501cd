"""`toe generate`: completions from a base + plug-in (chat template optional)."""

from __future__ import annotations

from ..errors import ToEError
from ..data import chat_template
from ..hf.loading import load_causal_lm, load_tokenizer, pick_device
from ..inference import Sampling, generate_texts, read_prompts, seeded


def generate(
    base: str,
    plugin: str | None = None,
    prompt: str | None = None,
    prompts_file: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    chat: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    compile: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Generates completions with the base (and the plug-in, when given).

    Args:
        base: hub id or local folder of the base model.
        plugin: plug-in folder (from `toe extract` / `toe train`); omit to run the bare base.
        prompt: one prompt, as given (a shell passes "\\n" as two characters: write $'...\\n...' for a newline).
        prompts_file: a text file with one prompt per line (as written: a multi-line prompt goes in a data file), or
            a data file (.jsonl, .json, .csv, .parquet) with a "prompt" field.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per batch (left-padded).
        chat: wrap each prompt in the tokenizer's chat template.
        dtype: torch dtype name for the base.
        device: "cpu", "cuda", ... (default: the GPU when one is visible).
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
    sampling = Sampling(temperature, top_p, num_samples, seed)
    prompts = read_prompts(prompt, prompts_file)
    tokenizer = load_tokenizer(base)
    rendered = prompts
    if chat:
        template = chat_template(tokenizer, "drop --chat and write the prompt format into the prompts")
        rendered = [template.replace("{prompt}", p) for p in prompts]
    device = pick_device(device)
    model = load_causal_lm(base, dtype=dtype, device=device)
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
