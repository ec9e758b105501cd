"""A bank mapped from the plug-in file: the same logits as in RAM, pages read only where routing goes, frozen."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import PLUGIN_CASES, randomize

from tree_of_experts import ToEConfig, ToEError, ToEModel
from tree_of_experts import plugin as plugin_module
from tree_of_experts.config import WEIGHTS_NAME
from tree_of_experts.plugin import ToEPlugin
from tree_of_experts.tensorfile import map_tensors, write_tensors

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def greedy(model, batch, n=5):
    return model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0)


CASES = [*PLUGIN_CASES, dict(layers=[0, 1], num_leaves=1 << 14, selection="beam", top_k=4, gate_rank=8),
         dict(layers=[1], num_leaves=1 << 14, selection="beam", top_k=4, gate_rank=8, bank_dtype="float16")]


@pytest.mark.parametrize("fields", CASES)
def test_mapped_bank_gives_the_in_ram_logits_bit_exactly(base, batch, fields, tmp_path):
    model = randomize(ToEModel.fresh(base, **fields))
    ref_logits, ref_tokens = logits(model, batch), greedy(model, batch)
    model.save_pretrained(tmp_path)
    model.detach()
    assert not torch.equal(ref_logits, logits(base, batch))  # the plug-in changes the output
    layer = str(fields["layers"][-1])
    out = {}
    for mmap in (True, False):
        with ToEModel.from_pretrained(base, tmp_path, mmap_bank=mmap) as loaded:
            out[mmap] = logits(loaded, batch), greedy(loaded, batch), loaded.plugin.blocks[layer].bank
    (mapped, mapped_tokens, bank), (in_ram, ram_tokens, ram_bank) = out[True], out[False]
    assert bank.mapped and not ram_bank.mapped
    assert torch.equal(mapped, in_ram) and torch.equal(mapped_tokens, ram_tokens)
    if fields.get("bank_dtype", "float32") == "float32":
        assert torch.equal(mapped, ref_logits) and torch.equal(mapped_tokens, ref_tokens)
    else:  # the file holds float16 values: mapped they stay float16, in RAM they are float32, the logits the same
        assert bank.direction.dtype == torch.float16 and ram_bank.direction.dtype == torch.float32
        half_bank = (1 << 14) * 32 * 2 + (1 << 14) * 2
        gate = ((1 << 14) - 1) * (8 + 1) * 4 + (32 + 1) * 8 * 4 + 32 * 4 * 2
        assert os.path.getsize(tmp_path / WEIGHTS_NAME) < half_bank + gate + 4096


def test_a_mapped_bank_mixes_densely_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """Dense routing over a mapped bank reads it in blocks (here 3 rows) instead of making its N × D float32 copy
    on every forward: the same mix as the bank read into RAM, to float rounding."""
    from tree_of_experts import bank as bank_module

    folder, _ = plugin_folder(tmp_path, 16, 8)
    mapped, in_ram = (ToEPlugin.load(folder, mmap=m).blocks["0"].bank for m in (True, False))
    probs = torch.softmax(torch.randn(2, 5, 16), -1)
    monkeypatch.setattr(bank_module, "DENSE_BLOCK_BYTES", 3 * 4 * 8)
    assert mapped.mapped and torch.allclose(mapped.mix_dense(probs), in_ram.mix_dense(probs), atol=1e-6)


def test_a_large_bank_in_ram_mixes_from_its_rows_and_keeps_no_second_copy(tmp_path, monkeypatch):
    """Above CACHE_MAX_BYTES of float32 vectors an in-RAM bank is mixed as a mapped one (the K rows; dense: blocks of
    rows), so inference holds it once: the same mix as the cached vectors give, to float rounding."""
    from tree_of_experts import bank as bank_module

    folder, _ = plugin_folder(tmp_path, 16, 8)
    small, large = (ToEPlugin.load(folder, mmap=False).blocks["0"].bank for _ in range(2))
    monkeypatch.setattr(bank_module, "CACHE_MAX_BYTES", 16 * 8 * 4 - 1)  # this bank is one byte over
    monkeypatch.setattr(bank_module, "DENSE_BLOCK_BYTES", 3 * 4 * 8)
    idx, w = torch.randint(0, 16, (2, 5, 4)), torch.softmax(torch.randn(2, 5, 4), -1)
    probs = torch.softmax(torch.randn(2, 5, 16), -1)
    with torch.no_grad():
        assert large.by_rows and not large.mapped
        got, got_dense = large.mix(idx, w), large.mix_dense(probs)
        assert large._cached is None  # no N × D copy kept
        monkeypatch.setattr(bank_module, "CACHE_MAX_BYTES", 1 << 30)
        assert not small.by_rows
        assert torch.allclose(got, small.mix(idx, w), atol=1e-6)
        assert torch.allclose(got_dense, small.mix_dense(probs), atol=1e-6) and small._cached is not None


@pytest.mark.parametrize("offsets", [["0", "12"], [0.0, 12.0], [None, 12]])
def test_a_header_whose_offsets_are_not_whole_numbers_is_named(tmp_path, offsets):
    """A header entry JSON can hold but safetensors does not write: TensorFileError naming the entry (what
    ToEPlugin.load turns into one line), never a TypeError from deep in the arithmetic."""
    import json
    import struct

    from tree_of_experts.tensorfile import TensorFileError, read_header

    head = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": offsets}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(12))
    with pytest.raises(TensorFileError, match="a: malformed header entry"):
        read_header(tmp_path / "x.safetensors")


def test_files_are_read_by_safetensors_and_safetensors_files_are_mapped(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7).half(), "c": torch.arange(3), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.0), "bf": torch.randn(3).bfloat16(), "strided": torch.randn(4, 6).t()}
    write_tensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"}, dtypes={"a": torch.float16})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    ours = {**tensors, "a": tensors["a"].half()}
    for read, expected in ((load_file(tmp_path / "ours.safetensors"), ours),
                           (map_tensors(tmp_path / "ours.safetensors"), ours),
                           (map_tensors(tmp_path / "theirs.safetensors"), tensors)):
        assert read.keys() == expected.keys()
        for key, value in expected.items():
            assert read[key].dtype == value.dtype and torch.equal(read[key], value), key
    mapped = map_tensors(tmp_path / "theirs.safetensors")
    mapped["a"][0, 0] = 100.0  # copy on write: the file keeps its value
    assert load_file(tmp_path / "theirs.safetensors")["a"][0, 0] == tensors["a"][0, 0]


def plugin_folder(tmp_path, num_leaves: int, hidden: int, **fields) -> tuple[str, int]:
    """A saved plug-in of one layer with a random bank; returns the folder and its mappable bytes."""
    config = ToEConfig(hidden_size=hidden, layers=[0], num_leaves=num_leaves, selection="beam", top_k=4,
                       gate_rank=8, **fields)
    plugin = ToEPlugin(config)
    with torch.no_grad():
        plugin.blocks["0"].scale.fill_(1.0)  # not the no-op of a fresh plug-in
    plugin.save(tmp_path)
    mappable = sum(v.numel() * v.element_size() for k, v in plugin.state_dict().items()
                   if k.endswith(plugin_module.MAPPABLE))
    return str(tmp_path), mappable


# Measured in a fresh interpreter: memory this one freed earlier would be reused and hide what a load reads.
MEASURE = """
import ctypes, dataclasses, json, sys, torch
from tree_of_experts.config import ToEConfig, WEIGHTS_NAME
from tree_of_experts.plugin import ToEPlugin
from tree_of_experts.tensorfile import evict

def mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(field + ":"))

def trim():  # gives freed heap memory back to the system: a later allocation must show up, not reuse it
    ctypes.CDLL("libc.so.6").malloc_trim(0)

def resident(path):  # MB resident of the process's own (anonymous) memory and of its maps of path
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return mb("RssAnon") + total / 1024

folder, what = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    import tree_of_experts.tensorfile
    tree_of_experts.tensorfile.CHUNK_BYTES = int(sys.argv[3])
path = folder + "/" + WEIGHTS_NAME
config = ToEConfig.load(folder)
warm = ToEPlugin(dataclasses.replace(config, num_leaves=16))  # first calls page in code, make pools: not counted
warm.blocks["0"](torch.randn(1, 16, config.hidden_size), torch.ones(1, 16))
del warm
out = {}
if what == "save":  # the bank in float16: ours, then safetensors' save_file of the converted tensors
    plugin = ToEPlugin.load(folder, mmap=False)
    plugin.config.bank_dtype = "float16"
    for name in ("ours", "theirs"):
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set, to the current one
            f.write("5")
        trim()
        before = mb("VmRSS")
        if name == "ours":
            plugin.save(folder + "/resaved")
        else:
            from safetensors.torch import save_file
            save_file({k: v.half() if ".bank." in k else v for k, v in plugin.state_dict().items()},
                      folder + "/theirs.safetensors")
        out[name] = mb("VmHWM") - before
else:  # mapped, then in RAM
    h = torch.randn(1, 16, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for mmap in (True, False):
        evict(path)
        trim()
        before = resident(path)
        plugin = ToEPlugin.load(folder, mmap=mmap)
        load = resident(path) - before
        with torch.no_grad():
            delta, _ = plugin.blocks["0"](h, torch.ones(1, 16))
        out["mapped" if mmap else "in_ram"] = dict(load=load, routed=resident(path) - before,
                                                    delta=delta.flatten().tolist())
print(json.dumps(out))
"""


def measure(*args: str) -> dict:
    import json
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(plugin_module.__file__), os.pardir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_proc
def test_mapped_load_reads_only_the_rows_it_routes_to(tmp_path):
    # 2^16 leaves × 64 floats: a 16 MB bank and 2 MB of gate node weights, evicted from the page cache before each
    # load. Bounds, with slack for the interpreter's own allocations: loading mapped grows the resident set by < 10%
    # of those bytes, 16 tokens routed by a beam of 4 (≤ 64 bank rows and ≤ 16·4·16 node rows, one 4 KB page each
    # at most) by < 25%. Read into RAM, the load grows it by > 90% of them: the measurement can fail.
    folder, nbytes = plugin_folder(tmp_path, 1 << 16, 64)
    mapped, in_ram = measure(folder, "load").values()
    size = nbytes / 2**20
    assert mapped["load"] < 0.10 * size and mapped["routed"] < 0.25 * size, (mapped["load"], mapped["routed"], size)
    assert in_ram["load"] > 0.9 * size, (in_ram["load"], size)
    assert mapped["delta"] == in_ram["delta"] and any(mapped["delta"])


@needs_proc
def test_saving_a_bank_writes_it_without_a_second_copy(tmp_path):
    # A float32 bank saved as float16: the save's peak resident set beyond what the loaded plug-in holds stays under
    # half the bank's float16 bytes (it converts 256 KB at a time here, 64 MB by default; the rest is the
    # interpreter's own churn, measured at 0.7-2.6 MB of the 8 MB). Converting the whole bank first, as safetensors'
    # save_file needs (and < 0.6 also copies every tensor to bytes), peaks above 90% of them: the bound can fail.
    folder, _ = plugin_folder(tmp_path, 1 << 16, 64)
    half = (1 << 16) * 64 * 2 / 2**20
    ours, theirs = measure(folder, "save", str(1 << 18)).values()
    assert ours < 0.5 * half and theirs > 0.9 * half, (ours, theirs, half)
    resaved = map_tensors(os.path.join(folder, "resaved", WEIGHTS_NAME))
    for key, value in map_tensors(os.path.join(folder, WEIGHTS_NAME)).items():
        assert torch.equal(value.to(resaved[key].dtype), resaved[key]), key
        assert resaved[key].dtype == (torch.float16 if ".bank." in key else torch.float32)


def test_training_a_mapped_bank_is_refused(base, batch, tmp_path):
    randomize(ToEModel.fresh(base, layers=[0], num_leaves=8, selection="topk", top_k=2)).save_pretrained(tmp_path)
    model = ToEModel.from_pretrained(base, tmp_path, mmap_bank=True)
    bank = model.plugin.blocks["0"].bank
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(bank.direction) not in trainable and id(model.plugin.blocks["0"].gate.nodes.weight) not in trainable
    model(**batch).logits.sum().backward()  # the rest of the gate and the scale still train
    assert bank.direction.grad is None and model.plugin.blocks["0"].scale.grad is not None
    bank.direction.requires_grad_(True)
    with pytest.raises(ToEError, match=r"mapped from its file.*mmap=False"):
        model(**batch)
    with torch.no_grad():
        model(**batch)  # inference is fine


def test_load_maps_by_default_above_the_size_threshold(tmp_path, monkeypatch):
    folder, nbytes = plugin_folder(tmp_path, 1 << 10, 16)
    assert not ToEPlugin.load(folder).blocks["0"].bank.mapped
    monkeypatch.setattr(plugin_module, "MMAP_AUTO_BYTES", nbytes)
    assert ToEPlugin.load(folder).blocks["0"].bank.mapped
    assert not ToEPlugin.load(folder, mmap=False).blocks["0"].bank.mapped
