"""tree_of_experts.inference: the generation log an interrupted eval resumes from, and the fingerprint that says a
folder holds the same model."""

from __future__ import annotations

import os

import pytest

from tree_of_experts import ToEError


def test_generation_log_keeps_whole_batches_of_the_same_settings(tmp_path):
    from tree_of_experts.inference import GenerationLog

    path = str(tmp_path / "gen.partial")
    log = GenerationLog(path, {"system": "base", "max_new_tokens": 8})
    log.put(0, ["a", "b"], ["1", "2"])
    log.put(2, ["c", "d"], ["3", "4"])
    with open(path, "a") as f:
        f.write('{"key": "cut off by the interrupt')  # a half-written line
    again = GenerationLog(path, {"system": "base", "max_new_tokens": 8})
    assert again.get(0, ["a", "b"]) == ["1", "2"] and again.get(2, ["c", "d"]) == ["3", "4"]
    assert again.get(2, ["c", "x"]) is None  # other prompts at the same place
    assert again.reused == 2
    assert open(path).read().count("\n") == 2 and open(path).read().endswith("\n")  # the cut line is gone
    with pytest.raises(ToEError, match=r"other settings \(max_new_tokens\)"):  # resuming another run is refused
        GenerationLog(path, {"system": "base", "max_new_tokens": 9})
    assert GenerationLog(path, {"system": "toe"}, tag="toe").get(0, ["a", "b"]) is None  # another system's file lines
    with open(path) as f:
        whole = f.read()
    with open(path, "w") as f:
        f.write(whole[:-1])  # the last line is whole but its newline was cut: the next line must not join it
    third = GenerationLog(path, {"system": "base", "max_new_tokens": 8})
    third.put(4, ["e"], ["5"])
    fourth = GenerationLog(path, {"system": "base", "max_new_tokens": 8})
    got = [fourth.get(0, ["a", "b"]), fourth.get(2, ["c", "d"]), fourth.get(4, ["e"])]
    assert got == [["1", "2"], ["3", "4"], ["5"]]
    again.close()
    assert not os.path.exists(path)


def test_a_kept_copy_of_a_run_folder_is_the_same_model(tmp_path):
    # an eval cut on the training's own folder resumes on its kept or restored copy (other run records), not on
    # other weights
    from tree_of_experts.inference import folder_fingerprint

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "base_adapter").mkdir()
    for name, text in [("toe_model.safetensors", "w"), ("toe_config.json", "{}"), ("metrics.jsonl", "{}\n"),
                       ("checkpoint/state.json", "{}"), ("base_adapter/adapter_model.safetensors", "a")]:
        (run / name).write_text(text)
    kept = tmp_path / "kept"
    (kept / "base_adapter").mkdir(parents=True)
    for name in ("toe_model.safetensors", "toe_config.json", "base_adapter/adapter_model.safetensors"):
        (kept / name).write_text((run / name).read_text())
    (kept / "command.sh").write_text("toe train ...\n")
    (kept / "inspect.json").write_text("{}")
    (kept / ".restored").write_text("")
    assert folder_fingerprint(str(kept)) == folder_fingerprint(str(run))
    (kept / "base_adapter" / "adapter_model.safetensors").write_text("b")  # other adapter weights: another model
    assert folder_fingerprint(str(kept)) != folder_fingerprint(str(run))
