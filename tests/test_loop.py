"""The shared training loop reproduces every trained system's losses from before it existed, and the option groups
are the interface (typed, declared once, flat spellings routed)."""

import dataclasses
import importlib.util
import json
import os

import pytest

from tree_of_experts.errors import ToEError
from tree_of_experts.options import Fit, Loss, Schedule, Text, flat_args, grouped

HERE = os.path.dirname(__file__)
spec = importlib.util.spec_from_file_location("make_loop_reference", os.path.join(HERE, "fixtures",
                                                                                   "make_loop_reference.py"))
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return reference.world(tmp_path_factory.mktemp("loop"))


@pytest.mark.parametrize("name", list(reference.RUNS))
def test_every_trained_system_gives_its_old_losses_through_the_shared_loop(world, name):
    import torch

    torch.set_num_threads(1)
    with open(os.path.join(HERE, "fixtures", "loop_reference.json")) as f:
        before = json.load(f)[name]
    # adapters logged every step before the loop (which logs every `log_every` steps, as `toe train` did)
    now = reference.run(name, world, **({"log_every": 1} if name in ("lora-off", "lora-on", "sft") else {}))
    assert [r["step"] for r in now] == [r["step"] for r in before]
    for old, new in zip(before, now):
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, old["step"], key)
            else:
                assert new[key] == value, (name, old["step"], key)


def test_groups_check_their_values_in_one_line():
    with pytest.raises(ToEError, match=r"max_steps=0: must be a whole number >= 1"):
        Schedule(max_steps=0)
    with pytest.raises(ToEError, match=r"objective='on-policy' is unknown: use one of 'off_policy', 'on_policy'"):
        Loss(objective="on-policy")
    with pytest.raises(ToEError, match=r"sample_temperature"):
        Loss(objective="on_policy", sample_temperature=0.0)
    with pytest.raises(ToEError, match=r"--beta set"):  # a sampling option on an off-policy run
        Loss(beta=0.2)
    with pytest.raises(ToEError, match=r"lr=5.0: must be a finite number in \[0.0, 1.0\]"):
        Fit(lr=5.0)


def test_flat_keywords_are_routed_to_their_group_and_unknown_ones_refused():
    @grouped
    def command(out: str, text: Text = Text(), loss: Loss = Loss()) -> dict:
        return flat_args(dict(locals()))

    got = command("o", max_length=64, loss=Loss(ce_weight=0.5), kd_weight=2.0)
    assert (got["max_length"], got["ce_weight"], got["kd_weight"], got["template"]) == (64, 0.5, 2.0,
                                                                                        Text().template)
    assert command.option_owner["beta"] == "loss"
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenght'"):
        command("o", max_lenght=64)


def test_an_option_is_declared_once():
    seen: dict[str, str] = {}
    from tree_of_experts import options

    for group in options.GROUPS:
        for f in dataclasses.fields(group):
            assert f.name not in seen, f"{f.name} in {group.__name__} and {seen[f.name]}"
            seen[f.name] = group.__name__

    with pytest.raises(TypeError, match="declared twice"):
        @grouped
        def clash(max_length: int = 1, text: Text = Text()):
            pass


def test_train_and_baseline_take_the_groups_and_record_flat_arguments(world, tmp_path):
    from tree_of_experts.commands.train import train

    out = tmp_path / "p"
    train(base=str(world / "base"), experts=str(world / "ex"), data=reference.DATA, out=str(out),
          schedule=Schedule(max_steps=1, batch_size=2), fit=Fit(stage_a_steps=0), max_length=128)
    args = json.loads((out / "train_args.json").read_text())
    assert (args["max_steps"], args["batch_size"], args["max_length"], args["stage_a_steps"]) == (1, 2, 128, 0)
    assert args["kd_weight"] == 1.0 and args["lr"] == 1e-3  # the command's own defaults, recorded


def test_every_field_of_a_group_has_its_help():
    from docstring_parser import parse_from_object

    from tree_of_experts import options

    for group in options.GROUPS:
        described = {p.arg_name: p.description for p in parse_from_object(group).params}
        for f in dataclasses.fields(group):
            assert (described.get(f.name) or "").strip(), f"{group.__name__}.{f.name} has no help"


def test_the_flat_and_the_nested_cli_spellings_train_the_same_run(world, tmp_path):
    from tree_of_experts.cli import main

    common = ["train", "--base", str(world / "base"), "--experts", str(world / "ex"), "--data", reference.DATA]
    assert main([*common, "--out", str(tmp_path / "flat"), "--max_steps", "1", "--batch-size", "2",
                 "--stage_a_steps", "0", "--ce_weight", "0.5"]) == 0
    assert main([*common, "--out", str(tmp_path / "nested"), "--schedule.max_steps", "1",
                 "--schedule.batch_size", "2", "--fit.stage_a_steps", "0", "--loss.ce_weight", "0.5"]) == 0
    flat, nested = (json.loads((tmp_path / d / "train_args.json").read_text()) for d in ("flat", "nested"))
    assert {k: v for k, v in flat.items() if k != "out"} == {k: v for k, v in nested.items() if k != "out"}
    assert (flat["max_steps"], flat["batch_size"], flat["ce_weight"]) == (1, 2, 0.5)
    config = tmp_path / "run.yaml"  # a config written with the flat names of earlier releases
    config.write_text(f"base: {world / 'base'}\nexperts: {world / 'ex'}\ndata: {reference.DATA}\n"
                      f"out: {tmp_path / 'config'}\nmax_steps: 1\nbatch_size: 2\nstage_a_steps: 0\nce_weight: 0.5\n")
    assert main(["train", "--config", str(config)]) == 0
    from_config = json.loads((tmp_path / "config" / "train_args.json").read_text())
    assert {k: v for k, v in from_config.items() if k != "out"} == {k: v for k, v in flat.items() if k != "out"}


def test_training_stops_on_a_non_finite_loss_and_saves_nothing_from_it(world, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import tree_of_experts.training.loop as loop_mod
    from tree_of_experts.commands.train import train

    real, calls = loop_mod.objective_loss, []

    def diverging(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) >= 2 else (loss, parts)

    monkeypatch.setattr(loop_mod, "objective_loss", diverging)
    out = tmp_path / "run"
    with pytest.raises(ToEError, match=r"training stopped at step 3 \(stage B\): the loss is nan"):
        train(base=str(world / "base"), experts=str(world / "ex"), data=reference.DATA, out=str(out), max_steps=4,
              stage_a_steps=1, batch_size=4, save_every=1)
    assert not (out / "toe_model.safetensors").exists() and not (out / "train_summary.json").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2  # the last finite step
    ckpt = load_file(str(out / "checkpoint" / "plugin.safetensors"))
    assert all(torch.isfinite(v).all() for v in ckpt.values())


@pytest.mark.parametrize("name, extra", [
    ("plugin-off", {"cached_states": True, "usage_weight": 0.0}),  # the route term (drawn once a step) stays on
    ("lora-off", {}),  # CE + KD + the state loss
    ("lora-on", {"on_policy_ratio": 1.0}),  # every step on-policy
    ("sft", {}),
])
def test_micro_batches_give_the_whole_batch_s_gradients(world, name, extra, monkeypatch):
    """``gradient_accumulation_steps`` 2: each step's 4 sequences run as two micro-batches whose gradients add up
    to the batch's: every optimizer step sees the gradients of the whole batch, and the losses step by step are
    the same. (A plug-in's usage term is each micro-batch's own: off here.)"""
    import torch

    torch.set_num_threads(1)
    seen = []
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        original = cls.step

        def step(self, *a, original=original, **k):
            seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
            return original(self, *a, **k)

        monkeypatch.setattr(cls, "step", step)
    whole = reference.run(name, world, log_every=1, overwrite=True, **extra)
    grads_whole, seen[:] = list(seen), []
    split = reference.run(name, world, log_every=1, overwrite=True, gradient_accumulation_steps=2, **extra)
    assert len(seen) == len(grads_whole) > 0
    for i, (a, b) in enumerate(zip(grads_whole, seen)):
        assert len(a) == len(b) and all(torch.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(a, b)), (name, i)
    assert [r["step"] for r in split] == [r["step"] for r in whole]
    for a, b in zip(whole, split):
        for key in ("loss", "ce", "kd", "jsd", "state", "route"):
            if a.get(key) is None:
                assert b.get(key) is None
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, a["step"], key)


def test_micro_batches_drop_their_own_padding_and_a_bad_split_is_refused():
    import torch

    from tree_of_experts.training.loop import check_batch, micro_batches

    am = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    b = {"input_ids": am * 7, "attention_mask": am, "loss_mask": am.bool(),
         "state_target": torch.zeros(4, 2, 4, 3), "state_norm2": torch.ones(4, 2, 4)}
    first, second = micro_batches(b, 2)
    assert first["input_ids"].shape == (2, 1) and first["state_target"].shape == (2, 2, 1, 3)
    assert second["input_ids"].shape == (2, 4) and second["state_norm2"].shape == (2, 2, 4)
    assert micro_batches(b, 1) == [b]
    check_batch(8, 4, 2)
    with pytest.raises(ToEError, match="gradient_accumulation_steps=3 must divide each process's 4 sequences"):
        check_batch(8, 3, 2)
    with pytest.raises(ToEError, match="batch_size=6 must divide evenly over 4 processes"):
        check_batch(6, 1, 4)
    with pytest.raises(ToEError, match="gradient_accumulation_steps=0"):
        from tree_of_experts.options import Runtime

        Runtime(gradient_accumulation_steps=0)
