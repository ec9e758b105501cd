"""Trains the toy teacher/base pair that `toe demo` ships (src/tree_of_experts/assets/toy/).

The teacher learns key-value arithmetic with the true values; the base learns the same format with random values
(plus explicit-number sums for both). Usage: python runs/make_toy_world.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import os

import torch

from tree_of_experts.files import atomic_write_json
from tree_of_experts.toy import tiny_qwen2, toy_rows, toy_tokenizer, toy_values, train_toy_lm

VALUES_SEED = 1234


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "src", "tree_of_experts", "assets",
                                                 "toy"))
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones
    tok = toy_tokenizer()
    values = toy_values(VALUES_SEED)
    specs = {
        # name: (width, layers, seed, values used in training: None = random per problem)
        "teacher": (64, 4, 1, values),
        "base": (48, 4, 2, None),
    }
    report = {"values_seed": VALUES_SEED, "steps": args.steps}
    for name, (width, layers, seed, vals) in specs.items():
        model = tiny_qwen2(hidden_size=width, num_layers=layers, vocab_size=len(tok), seed=seed, heads=4)
        losses = train_toy_lm(model, tok, lambda s, v=vals, o=seed: toy_rows(64, o * 100_000 + s, v, 0.3), args.steps)
        model.eval()
        path = os.path.join(args.out, name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        report[name] = {"width": width, "layers": layers, "final_train_loss": sum(losses[-50:]) / 50,
                        "parameters": sum(p.numel() for p in model.parameters())}
        print(name, report[name])
    atomic_write_json(os.path.join(args.out, "world.json"), report)


if __name__ == "__main__":
    main()
