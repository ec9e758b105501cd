"""Batched text generation with a base + plug-in (the library side of `toe generate`)."""

from __future__ import annotations

import json
import os

import torch

from .config import ToEError
from .data import chat_template
from .hf import load_causal_lm, load_tokenizer, pick_device


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """One prompt, or one per line of a text file (or the ``prompt`` field of each row of a JSONL file)."""
    if (prompt is None) == (prompts_file is None):
        raise ToEError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if prompt is not None:
        return [prompt]
    if not os.path.isfile(prompts_file):
        raise ToEError(f"prompts file {prompts_file!r} not found")
    with open(prompts_file) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if prompts_file.endswith(".jsonl"):
        rows = [json.loads(line) for line in lines]
        if not all("prompt" in r for r in rows):
            raise ToEError(f"{prompts_file}: every JSONL row needs a 'prompt' field (or pass a plain text file)")
        return [r["prompt"] for r in rows]
    return lines


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8, **gen
) -> list[str]:
    """Greedy (or ``gen``-configured) completions for ``prompts``, batched with left padding."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        gen.setdefault("do_sample", False)
        if gen.get("stop_strings"):
            gen["tokenizer"] = tokenizer  # transformers needs it to match stop strings
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **gen)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


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
) -> list[dict]:
    """Generates completions with the base (and the plug-in, when given).

    Args:
        base: hub id or local folder of the base model.
        plugin: plug-in folder (from `toe extract` / `toe train`); omit to run the bare base.
        prompt: one prompt.
        prompts_file: a text file with one prompt per line, or JSONL with a "prompt" field.
        max_new_tokens: generation budget per prompt (greedy decoding).
        batch_size: prompts per batch (left-padded).
        chat: wrap each prompt in the tokenizer's chat template.
        dtype: torch dtype name for the base.
        device: "cpu", "cuda", ... (default: the GPU when one is visible).
        compile: compile the plug-in's hook computation with torch.compile (see ``ToEPlugin.compile``).

    Returns:
        One {"prompt", "completion"} dict per prompt.
    """
    from .model import ToEModel

    prompts = read_prompts(prompt, prompts_file)
    tokenizer = load_tokenizer(base)
    rendered = prompts
    if chat:
        template = chat_template(tokenizer, "drop --chat and write the prompt format into the prompts")
        rendered = [template.replace("{prompt}", p) for p in prompts]
    model = load_causal_lm(base, dtype=dtype, device=pick_device(device))
    if plugin is not None:
        model = ToEModel.from_pretrained(model, plugin)
        if compile:
            model.plugin.compile()
    texts = generate_texts(model, tokenizer, rendered, max_new_tokens, batch_size)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)]
