"""`toe bench --parts bank_scale`: a plug-in of N = 2^10 ... 2^20 leaves saved, loaded mapped and into RAM, and run.

For each N a one-layer plug-in (beam selection, random bank and gate) is built on the bench's base and saved in a
temporary folder; then, for a mapped and an in-RAM load in turn, each from a cold page cache: the load time, the
memory resident after the load and after decoding (``new_tokens`` tokens, K leaves a step), and the decode
tokens/s against the bare base (interleaved, as the generation part times it). Resident memory is this process's
anonymous memory plus its resident pages of the plug-in file (read from /proc/self/smaps, after giving freed heap
memory back to the system): what the plug-in holds, not what the interpreter happens to keep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import time

import torch

from .config import WEIGHTS_NAME
from .extraction.capture import default_layer
from .hf.layers import decoder_layers
from .model import ToEModel
from .tensorfile import evict


def _trim() -> None:
    """Gives freed heap memory back to the system (glibc), so that a later allocation is seen, not reused."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes(path: str) -> dict[str, int] | None:
    """This process's resident anonymous bytes and resident bytes of its maps of ``path`` (None off Linux)."""
    if not os.path.exists("/proc/self/smaps"):
        return None
    anon = mapped = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a map's first line: "start-end perms offset dev inode [path]"
                inside = line.rstrip().endswith(path)
            elif head == "Rss:" and inside:
                mapped += int(line.split()[1]) * 1024
            elif head == "Anonymous:":
                anon += int(line.split()[1]) * 1024
    return {"anon": anon, "file": mapped}


def _delta(after: dict | None, before: dict | None) -> dict | None:
    return None if after is None or before is None else {k: after[k] - before[k] for k in after}


@torch.no_grad()
def bench_bank_scale(base_model, exponents: list[int], top_k: int, prompt_len: int, new_tokens: int, reps: int,
                     device: torch.device, generation) -> dict:
    """The rows described in the module docstring, one per N = 2^e.

    Args:
        generation: ``bench_generation`` of the bench (passed in: the timing code stays in one place).
    """
    layer = max(default_layer(len(decoder_layers(base_model))), 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, base_model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for i, e in enumerate([exponents[0], *exponents]):  # the first row warms up the code paths: not kept
        n = 2**e
        row: dict = {"num_leaves": n}
        with tempfile.TemporaryDirectory(prefix="toe-bank-scale-") as folder:
            fresh = ToEModel.fresh(base_model, layers=[layer], num_leaves=n, top_k=top_k, selection="beam")
            with torch.no_grad():
                fresh.plugin.blocks[str(layer)].scale.fill_(0.1)  # a non-zero scale: the plug-in computes
            fresh.detach()
            t0 = time.perf_counter()
            fresh.plugin.save(folder)
            row["save_s"] = time.perf_counter() - t0
            sizes = {k: v.numel() * v.element_size() for k, v in fresh.plugin.state_dict().items()}
            row["bank_bytes"] = sum(v for k, v in sizes.items() if ".bank." in k)
            row["gate_node_bytes"] = sum(v for k, v in sizes.items() if ".gate.nodes." in k)
            del fresh
            path = os.path.join(folder, WEIGHTS_NAME)
            row["file_bytes"] = os.path.getsize(path)
            for mode, mmap in (("mapped", True), ("in_ram", False)):
                evict(path)  # a cold load, as after a reboot or a download
                _trim()
                before = resident_bytes(path)
                t0 = time.perf_counter()
                model = ToEModel.from_pretrained(base_model, folder, mmap_bank=mmap)
                load_s = time.perf_counter() - t0
                loaded = _delta(resident_bytes(path), before)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
                decoded = _delta(resident_bytes(path), before)
                speed = generation(base_model, model, 1, prompt_len, new_tokens, reps, device)
                row[mode] = {"load_s": load_s, "resident_after_load": loaded, "resident_after_decode": decoded,
                             "decode_ratio": speed["decode_ratio"], "decode_tokens_per_s": speed["toe"]["decode"],
                             "base_decode_tokens_per_s": speed["base"]["decode"],
                             "plugin_us_per_step": speed["step"]["plugin_us"]}
                model.detach()
                del model
        rows += [row] if i else []
    out = {"rows": rows, "layer": layer, "top_k": top_k, "hidden": base_model.config.hidden_size,
           "new_tokens": new_tokens, "selection": "beam"}
    by_n = {r["num_leaves"]: r for r in rows}
    lo, hi = 2 ** min(exponents), 2 ** max(exponents)
    if lo != hi:
        out["span"] = [lo, hi]
        for mode in ("mapped", "in_ram"):
            a, b = by_n[lo][mode], by_n[hi][mode]
            out[f"{mode}_hi_over_lo"] = {
                "load_s": b["load_s"] / a["load_s"],
                "decode_tokens_per_s": b["decode_tokens_per_s"]["median"] / a["decode_tokens_per_s"]["median"]}
    return out


def _mib(d: dict | None) -> str:
    return "n/a" if d is None else f"{(d['anon'] + d['file']) / 2**20:.1f} ({d['file'] / 2**20:.1f})"


def markdown(part: dict) -> str:
    """The bank-scale table of one bench run."""
    lines = [f"Bank scale: one injection layer ({part['layer']}), hidden {part['hidden']}, beam K = {part['top_k']}, "
             f"batch 1, {part['new_tokens']} decoded tokens; each load from a cold page cache. Resident: MiB this "
             "process gained (anonymous + the plug-in file's resident pages; the file's share in brackets).", "",
             "| N | file MiB | save s | load s mapped / in RAM | resident after load, mapped / in RAM | resident after "
             "decode, mapped / in RAM | decode tok/s ToE/base, mapped / in RAM |", "|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        m, ram = r["mapped"], r["in_ram"]
        lines.append(
            f"| 2^{r['num_leaves'].bit_length() - 1} | {r['file_bytes'] / 2**20:.1f} | {r['save_s']:.2f} | "
            f"{m['load_s']:.3f} / {ram['load_s']:.3f} | {_mib(m['resident_after_load'])} / "
            f"{_mib(ram['resident_after_load'])} | {_mib(m['resident_after_decode'])} / "
            f"{_mib(ram['resident_after_decode'])} | {m['decode_ratio']['median']:.3f} / "
            f"{ram['decode_ratio']['median']:.3f} |")
    if "span" in part:
        lo, hi = (n.bit_length() - 1 for n in part["span"])
        for mode, name in (("mapped", "mapped"), ("in_ram", "in RAM")):
            s = part[f"{mode}_hi_over_lo"]
            lines.append(f"\n{name}, 2^{hi} over 2^{lo}: load time {s['load_s']:.2f}×, decode tokens/s "
                         f"{s['decode_tokens_per_s']:.2f}×.")
    return "\n".join(lines) + "\n"
