"""What a training batch pays to read its cached fields from an extraction's shards (training/examples.py
``ShardRef``): the teacher's top-k and the low state, and with state targets the states at every injection layer
and the fusion map applied to them, for batches of 4 examples, one CPU thread.

    PYTHONPATH=src python runs/train_read_cost.py EXTRACTION [OUT]   # default OUT: results/scale/train-read.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from tree_of_experts.extraction.fusion import extraction_signal
from tree_of_experts.extraction.store import Extraction, read_rows
from tree_of_experts.files import atomic_write_json
from tree_of_experts.training.examples import ShardRef, shard_stamp


def main(folder: str, out: str = "results/scale/train-read.json") -> None:
    torch.set_num_threads(1)
    ex = Extraction(folder)
    layers = ex.run()["layers"]
    signal = extraction_signal(ex, layers)[0]
    refs = [(r.path, r.rows) for r in ex.example_refs(with_states=True)][:32]
    result = {"command": f"PYTHONPATH=src python runs/train_read_cost.py {folder}", "examples": len(refs),
              "mean_tokens": sum(b - a for _, (a, b) in refs) / len(refs), "threads": 1}
    # full shards only (their low state is base.0); the stamp as training takes it, so the reads are checked alike
    for name, make in (("kd_low_state", lambda p, r: ShardRef(p, r, shard_stamp(p), kd=True, state_key="base.0")),
                       ("kd_low_state_targets", lambda p, r: ShardRef(p, r, shard_stamp(p), kd=True, state_key="base.0",
                                                                      signal=signal, num_layers=len(layers)))):
        shard_refs = [make(p, r) for p, r in refs]
        ids = [read_rows(r.path, r.rows, ["input_ids"])["input_ids"] for r in shard_refs]
        t = time.perf_counter()
        for r, x in zip(shard_refs, ids):
            r.read(x)
        result[f"{name}_s_per_batch_of_4"] = (time.perf_counter() - t) / len(shard_refs) * 4
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    atomic_write_json(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
