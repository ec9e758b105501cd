"""Training-step cost of projecting every position onto the vocabulary vs only the tail that holds the targets.

`toe train` (and the LoRA/SFT baselines) pass ``logits_to_keep = tail_positions(loss_mask)`` to the model: with left
padding every response sits at the end of its row, so prompt and padding positions need no vocabulary projection.
This script times one Stage-B-like step of a ToE plug-in (forward, CE, backward, Adam) both ways, interleaved on the
same batch, and prints the ratio and the logits tensor's size. The losses are checked equal.

Usage: python runs/bench_tail_logits.py [--base FOLDER] [--batch 4] [--prompt 100] [--response 300] [--reps 5]
                                        [--dtype float32] [--out FILE.json]
  Without --base: a 2-layer model with Qwen2.5's vocabulary (151,936) and hidden size 896, which overstates the
  vocabulary's share of a 24-layer model's step; with --base the real model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tree_of_experts import ToEModel
from tree_of_experts.hf.loading import load_causal_lm
from tree_of_experts.hf.layers import padded_inputs
from tree_of_experts.files import atomic_write_json
from tree_of_experts.losses import tail_positions, token_nll
from tree_of_experts.toy import tiny_qwen2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens of the longest row")
    ap.add_argument("--response", type=int, default=300, help="response tokens of the longest row")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", help="the base's dtype (toe train's default: float32)")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = (load_causal_lm(args.base, dtype=args.dtype) if args.base
            else tiny_qwen2(hidden_size=896, num_layers=2, vocab_size=151936).to(getattr(torch, args.dtype)))
    layer = base.config.num_hidden_layers // 2
    model = ToEModel.fresh(base, layers=[layer], num_leaves=64)
    with torch.no_grad():
        for block in model.plugin.blocks.values():
            block.scale.fill_(1.0)
    t = args.prompt + args.response
    ids = torch.randint(3, base.config.vocab_size, (args.batch, t))
    am = torch.ones_like(ids)
    mask = torch.zeros(args.batch, t, dtype=torch.bool)
    for i in range(args.batch):  # rows of different lengths, left-padded, each response at the end
        pad = 7 * i
        am[i, :pad] = 0
        mask[i, max(pad + 1, t - args.response + 11 * i) :] = True
    params = [p for p in model.plugin.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    keep = tail_positions(mask, "cpu")

    def step(tail: bool) -> float:
        n = len(keep) if tail else t
        kw = {"logits_to_keep": keep} if tail else {}
        logits = model(**padded_inputs(ids, am, "cpu"), **kw).logits
        loss = token_nll(logits, ids[:, -n:], mask[:, -n:]).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item()

    assert abs(step(True) - step(False)) < 1e-4  # the same loss both ways (warm-up too)
    times = {"full": [], "tail": []}
    for _ in range(args.reps):
        for name in ("full", "tail"):
            t0 = time.perf_counter()
            step(name == "tail")
            times[name].append(time.perf_counter() - t0)
    ratios = sorted(f / k for f, k in zip(times["full"], times["tail"]))
    result = {
        "model": args.base or "2-layer Qwen2, hidden 896, vocab 151936",
        "batch": args.batch, "positions": t, "kept": len(keep), "targets": int(mask.sum()),
        "full_s_best": min(times["full"]), "tail_s_best": min(times["tail"]),
        "speedup_median": ratios[len(ratios) // 2],
        "logits_mb": {"full": args.batch * t * base.config.vocab_size * 4 / 2**20,
                      "tail": args.batch * len(keep) * base.config.vocab_size * 4 / 2**20},
        "threads": torch.get_num_threads(), "dtype": args.dtype,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
