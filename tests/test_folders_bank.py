"""The record of which build of an extraction a plug-in was trained from (folders.bank_record, check_same_build)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tree_of_experts import ToEError
from tree_of_experts.folders import BANK_KEY, BANK_VALUES_KEY, bank_record, check_same_build, same_bank_values


def write_bank(folder, tensors):
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "toe_model.safetensors"))


def trained_from(run, experts, finished=True, values=True):
    digest, sampled = bank_record(experts)
    os.makedirs(run, exist_ok=True)
    args = {BANK_KEY: digest, **({BANK_VALUES_KEY: sampled} if values else {})}
    (run / "train_args.json").write_text(json.dumps(args))
    if finished:
        (run / "train_summary.json").write_text("{}")


def test_a_bank_rounded_differently_is_the_same_build_and_a_changed_one_is_not(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = {"blocks.0.bank.direction": torch.randn(64, 16, generator=g), "blocks.0.scale": torch.full((1,), 0.5),
            "blocks.0.leaf": torch.arange(64, dtype=torch.int64)}
    experts, run = tmp_path / "ex", tmp_path / "run"
    write_bank(experts, bank)
    trained_from(run, experts, finished=False)
    check_same_build(run, experts, "redo")
    write_bank(experts, {k: v * (1 + 1e-6) if v.is_floating_point() else v for k, v in bank.items()})
    assert bank_record(experts)[0] != json.loads((run / "train_args.json").read_text())[BANK_KEY]
    check_same_build(run, experts, "redo")  # float rounding: the same build
    changed = {**bank, "blocks.0.bank.direction": bank["blocks.0.bank.direction"].flip(0)}  # the leaves reordered
    write_bank(experts, changed)
    with pytest.raises(ToEError, match="earlier build .*: redo"):
        check_same_build(run, experts, "redo")
    write_bank(experts, {**bank, "blocks.0.bank.direction": torch.randn(32, 16, generator=g)})  # other N
    with pytest.raises(ToEError, match="earlier build"):
        check_same_build(run, experts, "redo")


def test_a_run_that_records_the_sha256_alone_passes_only_when_finished_and_asked(tmp_path, caplog):
    bank = {"w": torch.randn(8, 4)}
    experts, run = tmp_path / "ex", tmp_path / "run"
    write_bank(experts, bank)
    trained_from(run, experts, finished=False, values=False)
    write_bank(experts, {"w": bank["w"] * (1 + 1e-6)})
    with pytest.raises(ToEError, match="earlier build"):  # an unfinished run never resumes on an unproven build
        check_same_build(run, experts, "redo", finished_ok=True)
    (run / "train_summary.json").write_text("{}")
    with pytest.raises(ToEError, match="earlier build"):
        check_same_build(run, experts, "redo")
    check_same_build(run, experts, "redo", finished_ok=True)
    assert "records none of its values" in caplog.text


def test_sampled_values_compare_shapes_names_and_values():
    a = {"w": {"shape": [2, 2], "values": [1.0, -2.0, 0.5, 0.0]}}
    assert same_bank_values(a, {"w": {"shape": [2, 2], "values": [1.0, -2.0 + 1e-5, 0.5, 0.0]}})
    assert not same_bank_values(a, {"w": {"shape": [2, 2], "values": [1.0, -2.0, 0.6, 0.0]}})
    assert not same_bank_values(a, {"w": {"shape": [4], "values": [1.0, -2.0, 0.5, 0.0]}})
    assert not same_bank_values(a, {"v": a["w"]})
    zeros = {"w": {"shape": [3], "values": [0.0, 0.0, 0.0]}}
    assert same_bank_values(zeros, zeros) and not same_bank_values(zeros, {"w": {"shape": [3], "values": [0, 1e-3, 0]}})
