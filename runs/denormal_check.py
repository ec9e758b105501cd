"""Why `toe` flushes subnormal floats on CPU: the output projection's backward, (N, V) gradient times the (V, H)
weight, with and without subnormal entries in the gradient (what a trained model's softmax leaves on most of a
152k vocabulary), timed side by side in one process on one thread.

Usage: OMP_NUM_THREADS=1 python runs/denormal_check.py [OUT_JSON]   (default results/cpu/denormal_check.json)
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch

from tree_of_experts.files import atomic_write_json


def main(out: str, n: int = 100, v: int = 151936, h: int = 896) -> dict:
    g0 = torch.Generator().manual_seed(0)
    weight = torch.randn(v, h, generator=g0) * 0.02
    rows = {}
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        grad = torch.randn(n, v, generator=g0) * 1e-3
        grad[:, 1000:] = 1e-40  # subnormal in fp32 (stored as 0 once flushing is on)
        subnormal = int(((grad != 0) & (grad.abs() < torch.finfo(torch.float32).tiny)).sum())
        t = time.perf_counter()
        grad @ weight
        rows["flush" if flush else "no_flush"] = {"seconds": time.perf_counter() - t, "subnormal_entries": subnormal}
    torch.set_flush_denormal(False)
    result = {"shape": [n, v, h], "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              **rows, "slowdown": rows["no_flush"]["seconds"] / rows["flush"]["seconds"]}
    atomic_write_json(out, result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "results/cpu/denormal_check.json"), indent=1))
