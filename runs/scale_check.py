"""The disk formula of docs/scale.md against what `toe extract --max_disk` writes, and the plans at real sizes.

    PYTHONPATH=src python runs/scale_check.py [OUT]      # default OUT: results/scale

Part 1 extracts the tests' tiny pair (32/48 wide) on the arithmetic fixture (1x) and on it four times over with
varied numbers (4x), each without a budget and under ``--max_disk 2MB``, and records every folder's size next to the
plan (bytes per token, the sample, the disk total; peak RSS is checked by tests/test_extract_budget.py, in a fresh
process). Part 2 prints the plan of the seed's setting (Qwen2.5-1.5B base, DeepSeek-R1-Distill-Qwen-7B teacher,
3 injection layers, top-32, bf16) for 1M tokens at a few budgets, from the shipped shape configs (no weights).
Writes OUT/scale.json and OUT/scale.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from tree_of_experts.commands.extract import extract
from tree_of_experts.extraction.budget import Asked, config_sizes, human, plan_extraction
from tree_of_experts.extraction.capture import Example
from tree_of_experts.shapes import shape_config
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "arith.jsonl")
ARGS = dict(num_leaves=8, shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def four_times(path: str) -> str:
    rows = [json.loads(line) for line in open(FIXTURE)]
    with open(path, "w") as f:
        for c in range(4):
            for r in rows:
                a, b = (int(x) + k * c for x, k in zip(re.findall(r"\d+", r["question"]), (13, 7)))
                f.write(json.dumps({"question": f"what is {a} plus {b}?",
                                    "answer": f"{a} plus {b} is <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}) + "\n")
    return path


def peak_growth(kw: dict, data: str, out: str) -> int:
    """The budgeted extraction's peak resident memory above what its process held just before it (after a
    warm-up extraction: imports, kernels, allocator pools), in a fresh process: its high-water mark after the run
    minus its resident set before."""
    script = f"""
import json, resource
from tree_of_experts.commands.extract import extract
kw = {kw!r}
extract(data={FIXTURE!r}, out={out + '-warm'!r}, limit=8, **kw)
rss = int(next(x for x in open('/proc/self/status') if x.startswith('VmRSS')).split()[1]) * 1024
extract(data={data!r}, out={out!r}, max_disk='2MB', **kw)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def tiny(tmp: str) -> list[dict]:
    tok = tiny_tokenizer()
    for name, width, layers, seed in (("base", 32, 2, 0), ("teacher", 48, 3, 1)):
        tiny_qwen2(hidden_size=width, num_layers=layers, seed=seed).save_pretrained(os.path.join(tmp, name))
        tok.save_pretrained(os.path.join(tmp, name))
    kw = dict(teacher=os.path.join(tmp, "teacher"), base=os.path.join(tmp, "base"), **ARGS)
    rows = []
    for corpus, data in (("1x", FIXTURE), ("4x", four_times(os.path.join(tmp, "4x.jsonl")))):
        grew = peak_growth(kw, data, os.path.join(tmp, f"{corpus}-rss")) if corpus == "4x" else None
        s = extract(data=data, out=os.path.join(tmp, f"{corpus}-2MB"), max_disk="2MB", **kw)
        plain = extract(data=data, out=os.path.join(tmp, f"{corpus}-plain"), **kw)
        p, out = s["disk_plan"], os.path.join(tmp, f"{corpus}-2MB")
        shards = sum(os.path.getsize(os.path.join(out, "shards", f)) for f in os.listdir(os.path.join(out, "shards")))
        rows.append({
            "corpus": corpus, "tokens": p["tokens"], "light_bytes_per_token": p["light_bytes_per_token"],
            "full_bytes_per_token": p["full_bytes_per_token"], "state_tokens": p["state_tokens"],
            "unbudgeted_folder_bytes": folder_bytes(os.path.join(tmp, f"{corpus}-plain")),
            "folder_bytes": folder_bytes(out), "plan_disk_bytes": p["disk_total"], "plan_disk": p["disk"],
            "shard_bytes": shards, "formula_shard_bytes": p["disk"]["shards"], "shard_files": len(os.listdir(
                os.path.join(out, "shards"))), "plan_peak_ram_bytes": p["peak_ram"],
            "peak_rss_growth_bytes": grew,  # the budgeted run's peak above its process's resident memory before it
            "unbudgeted_ridge_r2": plain["projector"][0]["heldout_r2"], "ridge_r2": s["projector"][0]["heldout_r2"],
        })
    return rows


def real_sizes() -> list[dict]:
    sizes = config_sizes(shape_config("qwen2.5-1.5b"), shape_config("deepseek-r1-distill-qwen-7b"), "bfloat16", False)
    examples = [Example(i, torch.zeros(200, dtype=torch.long), None, None, torch.arange(200)) for i in range(5000)]
    out = []
    for budget in (None, 20 * 10**9, 10 * 10**9, 7 * 10**9):
        plan = plan_extraction(examples, sizes, Asked(
            layers=3, topk=32, kd=True, cache_low_states=True, heldout_frac=0.1, shard_size=64, batch_size=8,
            num_leaves=64, shape="balanced", gate_rank=64, max_rows=200_000, max_disk=budget))
        out.append({"max_disk": budget, **plan.to_dict(), "text": plan.text()})
    return out


def main(dest: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = tiny(tmp)
    real = real_sizes()
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "scale.json"), "w") as f:
        json.dump({"command": "PYTHONPATH=src python runs/scale_check.py", "tiny": rows, "real_sizes": real}, f,
                  indent=1)
    lines = ["| corpus | T | light / full B per token | S (tokens with states) | folder, no budget | folder under "
             "2MB | plan (bound) | shards: written / formula |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['tokens']} | {r['light_bytes_per_token']} / {r['full_bytes_per_token']} | "
                     f"{r['state_tokens']} | {r['unbudgeted_folder_bytes']:,} | {r['folder_bytes']:,} | "
                     f"{r['plan_disk_bytes']:,} | {r['shard_bytes']:,} / {r['formula_shard_bytes']:,} "
                     f"({r['shard_files']} files) |")
    lines += ["", "| --max_disk | S (share of T = 1M) | shards | route data | total | peak RAM (capture / build) |",
              "|---|---|---|---|---|---|"]
    for r in real:
        lines.append(f"| {human(r['max_disk']) if r['max_disk'] else 'none'} | {r['state_tokens']:,} "
                     f"({100 * r['state_tokens'] / r['tokens']:.1f} %) | {human(r['disk']['shards'])} | "
                     f"{human(r['disk']['route_data'])} | {human(r['disk_total'])} | {human(r['ram']['capture'])} / "
                     f"{human(r['ram']['build'])} |")
    with open(os.path.join(dest, "scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "results", "scale"))
