"""Several injection layers as a first-class path, through the CLI on the tiny pair: `--layers 0,1` (or `1`)
extracts one tree + bank per layer in one teacher pass; train, oracle (set-wide and per-layer O1/O2) and inspect
handle the set."""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from tree_of_experts.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def extract_args(pair, out, layers):
    return ["extract", "--teacher", str(pair / "teacher"), "--base", str(pair / "base"), "--data", FIXTURE,
            "--out", str(out), "--num-leaves", "4", "--shard-size", "8", "--batch-size", "4", "--gate-rank", "4",
            "--layers", layers]


def test_layer_sets_end_to_end(pair, tmp_path, capsys):
    ex = tmp_path / "ex"
    assert main(extract_args(pair, ex, "0,1")) == 0
    manifest = json.load(open(ex / "manifest.json"))
    assert manifest["layers"] == [0, 1] and len(manifest["teacher_layers"]) == 2
    weights = load_file(ex / "toe_model.safetensors")
    assert {k.split(".")[1] for k in weights if k.startswith("blocks.")} == {"0", "1"}  # one block per layer
    route = load_file(ex / "route_data.safetensors")
    assert {"leaf.0", "leaf.1", "states.0", "states.1"} <= set(route)

    out = tmp_path / "p"
    assert main(["train", "--base", str(pair / "base"), "--experts", str(ex), "--data", FIXTURE, "--out", str(out),
                 "--max-steps", "3", "--stage-a-steps", "2", "--batch-size", "4"]) == 0
    rows = [json.loads(r) for r in open(out / "metrics.jsonl")]
    assert len(rows[-1]["delta_ratio"]) == 2  # both layers inject

    capsys.readouterr()
    assert main(["inspect", "--plugin", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"] == [0, 1] and set(shown["banks"]) == {"0", "1"}
    for layer in ("0", "1"):  # the bank as extracted next to the bank as trained
        bank = shown["banks"][layer]
        assert bank["bank_before_training"]["common_share"] is not None and bank["leaf_movement"] > 0

    assert main(["oracle", "--teacher", str(pair / "teacher"), "--base", str(pair / "base"), "--experts", str(ex),
                 "--data", FIXTURE, "--out", str(tmp_path / "o"), "--plugin", str(out), "--limit", "4",
                 "--ce-target", "gold"]) == 0
    systems = json.load(open(tmp_path / "o" / "oracle.json"))["systems"]
    for name in ("O1 trained map", "O2 oracle routing"):
        assert name in systems and all(f"{name} @ layer {layer} alone" in systems for layer in (0, 1))
    one = systems["O1 trained map @ layer 0 alone"]["ce"]
    assert one != systems["O1 trained map"]["ce"] and one != systems["base"]["ce"]


def test_one_integer_is_a_layer_set_of_one(pair, tmp_path):
    assert main(extract_args(pair, tmp_path / "ex", "1")) == 0
    assert json.load(open(tmp_path / "ex" / "manifest.json"))["layers"] == [1]


def test_query_norm_is_recorded_and_changes_routing(pair, tmp_path):
    import torch

    from tree_of_experts import ToEModel
    from tree_of_experts.commands.train import train
    from tree_of_experts.toy import tiny_qwen2

    ex = tmp_path / "ex"
    assert main(extract_args(pair, ex, "1")) == 0
    for flag in (True, False):
        train(base=str(pair / "base"), experts=str(ex), data=FIXTURE, out=str(tmp_path / f"q{flag}"), max_steps=1,
              stage_a_steps=1, batch_size=4, query_norm=flag, lr=0.0, stage_a_lr=0.0, scale_lr=0.0, bank_lr=0.0)
    gates = [ToEModel.from_pretrained(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), tmp_path / f"q{f}")
             .plugin.blocks["1"].gate for f in (True, False)]
    assert gates[0].query_norm and not gates[1].query_norm
    h = torch.randn(1, 5, 32)
    z = gates[0].features(h)
    assert torch.allclose(z.mean(-1), torch.zeros(1, 5), atol=1e-5)  # normalised query
    assert not torch.allclose(gates[0](h, "dense").leaf_logp, gates[1](h, "dense").leaf_logp)
