"""How much the batch size of greedy decoding alone moves graded accuracy: the same system's answers to the same
items, decoded in batches of 8 (results/real_pair_v2/acc-batch8/ROW) and of 25 (results/real_pair_v2/acc/ROW).

A batch's padding changes the float order of its matmuls, which can flip a near-tie of greedy decoding; every study
row uses the same batches, so this is the noise floor of a cross-batch comparison, not of the study's own pairs.

Usage: python runs/real_pair_v2_batch_check.py [RES] (default results/real_pair_v2); writes RES/acc-batch8/check.json
and prints it.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from tree_of_experts.files import atomic_write_json
from tree_of_experts.stats import paired_bootstrap


def answers(folder: str) -> dict[str, dict]:
    rows = {}
    for path in glob.glob(os.path.join(folder, "*.jsonl")):
        if os.path.basename(path).startswith("generations"):
            continue
        for line in open(path):
            r = json.loads(line)
            rows[r["prompt"]] = r
    return rows


def main(res: str) -> dict:
    out = {}
    for folder in sorted(glob.glob(os.path.join(res, "acc-batch8", "*", ""))):
        row = os.path.basename(folder.rstrip("/"))
        other = os.path.join(res, "acc", row)
        if not os.path.isfile(os.path.join(other, "metrics.json")):
            continue
        a, b = answers(folder), answers(other)
        items = sorted(a.keys() & b.keys())
        if not items or len(items) != len(a):
            raise SystemExit(f"{row}: the two folders do not hold the same items ({len(a)} vs {len(b)})")
        acc8 = [float(a[k]["correct"]) for k in items]
        acc25 = [float(b[k]["correct"]) for k in items]
        out[row] = {"n": len(items),
                    "accuracy_batch8": sum(acc8) / len(items), "accuracy_batch25": sum(acc25) / len(items),
                    "same_text": sum(a[k]["completion"] == b[k]["completion"] for k in items) / len(items),
                    "grade_flips": sum(x != y for x, y in zip(acc8, acc25)),
                    "batch25_minus_batch8": paired_bootstrap(acc25, acc8)}
    atomic_write_json(os.path.join(res, "acc-batch8", "check.json"), out)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "results/real_pair_v2"), indent=1))
