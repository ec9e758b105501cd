"""The record of which build of an extraction a plug-in was trained from (folders.check_same_build)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tree_of_experts import ToEError
from tree_of_experts.folders import BANK_KEY, BUILD_KEY, bank_fingerprint, build_settings, check_same_build

RUN = {"teacher": "/machine-a/teacher", "base": "/machine-a/base", "data_sha256": "ab" * 32, "layers": [1],
       "teacher_arch": "t" * 64, "base_arch": "b" * 64, "state_examples": list(range(100))}
BUILD = {"num_leaves": 8, "shape": "balanced", "seed": 0}


def extraction(folder, bank, run=RUN, build=BUILD):
    os.makedirs(folder, exist_ok=True)
    save_file(bank, os.path.join(folder, "toe_model.safetensors"))
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "build.json").write_text(json.dumps(build))


def trained_from(run, experts, finished=True, settings=True):
    os.makedirs(run, exist_ok=True)
    args = {BANK_KEY: bank_fingerprint(experts), **({BUILD_KEY: build_settings(experts)} if settings else {})}
    (run / "train_args.json").write_text(json.dumps(args))
    if finished:
        (run / "train_summary.json").write_text("{}")


def test_a_bank_built_again_with_the_same_settings_stands_and_other_settings_are_refused(tmp_path, caplog):
    bank = {"direction": torch.randn(8, 4), "leaf": torch.arange(8)}
    experts, run = tmp_path / "ex", tmp_path / "run"
    extraction(experts, bank)
    trained_from(run, experts, finished=False)
    assert len(json.dumps(json.loads((run / "train_args.json").read_text())[BUILD_KEY])) < 1000  # a long list hashed
    # captured again on another machine (other model paths): another bank, the same settings: the run stands
    extraction(experts, {**bank, "direction": bank["direction"].flip(0)},
               run={**RUN, "teacher": "/machine-b/teacher", "base": "/machine-b/base"})
    caplog.set_level("INFO")
    check_same_build(run, experts, "redo")
    assert "captured or built again with the same settings" in caplog.text
    for run_json, build_json, setting in [(RUN, {**BUILD, "seed": 1}, "build.seed"),
                                          ({**RUN, "state_examples": list(range(1, 101))}, BUILD,
                                           "capture.state_examples"),
                                          ({**RUN, "base_arch": "c" * 64}, BUILD, "capture.base_arch")]:
        extraction(experts, {**bank, "direction": bank["direction"] + 1}, run=run_json, build=build_json)
        with pytest.raises(ToEError, match=f"earlier build .*other settings: {setting}\\): redo"):
            check_same_build(run, experts, "redo", finished_ok=True)
    extraction(experts, bank, build={**BUILD, "seed": 1})  # the same bank: nothing to compare
    check_same_build(run, experts, "redo")


def test_a_run_that_records_the_sha256_alone_passes_only_when_finished_and_asked(tmp_path, caplog):
    bank = {"w": torch.randn(8, 4)}
    experts, run = tmp_path / "ex", tmp_path / "run"
    extraction(experts, bank)
    trained_from(run, experts, finished=False, settings=False)
    extraction(experts, {"w": bank["w"] * 2})
    with pytest.raises(ToEError, match="earlier build .*its bank has changed"):  # never resumes on an unproven build
        check_same_build(run, experts, "redo", finished_ok=True)
    (run / "train_summary.json").write_text("{}")
    with pytest.raises(ToEError, match="earlier build"):
        check_same_build(run, experts, "redo")
    check_same_build(run, experts, "redo", finished_ok=True)
    assert "records none of its settings" in caplog.text
