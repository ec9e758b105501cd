"""One output-folder policy for every writer, CLI and API alike (issue #35): --overwrite replaces only a run of the
command's own kind and only its files, never an input and never another kind of run (an extraction, a trained
plug-in, an eval, a whole results folder); `toe export`, which replaces its whole folder, and
``ToEModel.save_pretrained`` follow it too. Refusals as a user meets them: exit 2, one `toe: error:` line naming
the fix, every file that existed before byte-identical."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_world
from test_safety import FIXTURE, copy, no_model_loads, snapshot, train_args

from tree_of_experts.cli import main
from tree_of_experts.config import ToEError
from tree_of_experts.run_kinds import RECORD_NAME, folder_kind


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny pair, an extraction, a trained plug-in (with its checkpoint) and an eval folder, all made by the
    commands."""
    from tree_of_experts.commands.evaluate import evaluate

    w = make_world(tmp_path_factory)
    evaluate(base=str(w / "base"), data=FIXTURE, out=str(w / "eval"), limit=2, max_new_tokens=4)
    return w


def refused(argv: list[str], capsys, monkeypatch, keep: list[str]) -> str:
    """Runs a command that must be refused before any model loads: exit 2, one line, ``keep`` byte-identical."""
    import transformers

    before = {path: snapshot(path) for path in keep}
    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
        capsys.readouterr()
        assert main(argv) == 2, f"not refused with exit 2: {argv}"
        main_err = capsys.readouterr().err
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
    lines = [line for line in main_err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("toe: error: ") and "Traceback" not in main_err, main_err
    return lines[-1][len("toe: error: "):]


def export_args(w: Path, out: str, *extra: str, plugin: str | None = None) -> list[str]:
    return ["export", "--base", str(w / "base"), "--plugin", plugin or str(w / "trained"), "--out", out, *extra]


def eval_args(w: Path, out: str, *extra: str, data: str = FIXTURE) -> list[str]:
    return ["eval", "--base", str(w / "base"), "--data", data, "--limit", "2", "--max_new_tokens", "4", "--out", out,
            *extra]


def test_commands_record_the_kind_of_run_they_wrote(world):
    """The record names the command; a folder without one (older runs) is read from its marker files."""
    for name, kind in (("ex", "extract"), ("trained", "train"), ("eval", "eval")):
        record = json.loads((world / name / RECORD_NAME).read_text())
        assert record["command"] == kind and record["files"], record
        assert folder_kind(world / name)[0] == kind
    assert folder_kind(world / "trained" / "checkpoint")[0] == "checkpoint"
    assert not (world / "ex" / ".toe.lock").exists()  # the lock goes with the run; the record stays


def test_export_overwrite_never_replaces_another_run(world, tmp_path, capsys, monkeypatch):
    """`toe export --overwrite true` used to delete everything in --out: a trained plug-in, an extraction, or a
    whole results folder with its extraction, plug-ins and evals."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("ex", "trained", "eval"):
        copy(world, name, results)
    for out, match in ((copy(world, "trained", tmp_path), r"holds a `toe train` run \(train_args\.json"),
                       (copy(world, "ex", tmp_path), r"holds an extraction \(`toe extract`\) \(run\.json"),
                       (copy(world, "eval", tmp_path), r"holds a `toe eval` run \(metrics\.json")):
        message = refused(export_args(world, out, "--overwrite", "true", plugin=str(world / "trained")), capsys,
                          monkeypatch, keep=[out])
        assert re.search(match, message) and message.endswith("pass a new --out"), message
    message = refused(export_args(world, str(results), "--overwrite", "true"), capsys, monkeypatch,
                      keep=[str(results)])
    assert "does not write (eval, ex, trained)" in message and message.endswith("pass a new --out"), message
    # the plug-in given lies inside --out: the export would remove what it reads
    message = refused(export_args(world, str(results), "--overwrite", "true", plugin=str(results / "trained")),
                      capsys, monkeypatch, keep=[str(results)])
    assert f"--plugin {results / 'trained'} lies inside --out {results}" in message, message

    # an earlier export is replaced with --overwrite (and only with it); a file of the user's in it is not lost
    out = tmp_path / "exported"
    assert main(export_args(world, str(out))) == 0
    assert folder_kind(out)[0] == "export"
    message = refused(export_args(world, str(out)), capsys, monkeypatch, keep=[str(out)])
    assert "an earlier export: pass --overwrite true" in message
    assert main(export_args(world, str(out), "--overwrite", "true")) == 0
    (out / "notes.txt").write_text("mine")
    message = refused(export_args(world, str(out), "--overwrite", "true"), capsys, monkeypatch, keep=[str(out)])
    assert "does not write (notes.txt)" in message


def test_overwrite_never_removes_an_input(world, tmp_path, capsys, monkeypatch):
    """`toe eval --overwrite true --data X/base.jsonl --out X` used to delete its own input data."""
    x = copy(world, "eval", tmp_path)
    shutil.copy(FIXTURE, os.path.join(x, "base.jsonl"))  # the items, saved where an eval writes its base rows
    for extra in (("--overwrite", "true"), ()):  # without --overwrite the run would write over it
        message = refused(eval_args(world, x, *extra, data=os.path.join(x, "base.jsonl")), capsys, monkeypatch,
                          keep=[x])
        assert f"--data {x}/base.jsonl lies inside --out {x}" in message and "pass a new --out" in message, message
    shutil.copy(FIXTURE, os.path.join(x, "items.jsonl"))  # any input inside a folder --overwrite clears
    message = refused(eval_args(world, x, "--overwrite", "true", data=os.path.join(x, "items.jsonl")), capsys,
                      monkeypatch, keep=[x])
    assert "--overwrite would remove it" in message
    # a train run's --experts (or --data) inside its --out
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(world / "ex", out / "ex")
    shutil.copytree(world / "trained" / "checkpoint", out / "checkpoint")
    message = refused(train_args(world, str(out), "--overwrite", "true", experts=str(out / "ex")), capsys,
                      monkeypatch, keep=[str(out)])
    assert f"--experts {out / 'ex'} lies inside --out {out}" in message
    # not a blanket no: a data file in a new output folder is read, kept, and the run writes beside it
    y = tmp_path / "y"
    y.mkdir()
    shutil.copy(FIXTURE, y / "items.jsonl")
    assert main(eval_args(world, str(y), data=str(y / "items.jsonl"))) == 0
    assert (y / "items.jsonl").read_bytes() == Path(FIXTURE).read_bytes() and (y / "metrics.json").exists()


def test_overwrite_replaces_only_its_own_kind_of_run(world, tmp_path, capsys, monkeypatch):
    """Another command's run is refused even with --overwrite (naming it, with or without a record); a run of the
    same command is replaced, and only its files go."""
    cases = [
        (train_args(world, o := copy(world, "ex", tmp_path), "--overwrite", "true", experts=str(world / "ex")), o,
         r"holds an extraction \(`toe extract`\) \(run\.json.*not a `toe train` run: pass a new --out"),
        (["extract", "--teacher", str(world / "teacher"), "--base", str(world / "base"), "--data", FIXTURE,
          "--out", o := copy(world, "trained", tmp_path), "--overwrite", "true"], o, r"holds a `toe train` run"),
        (eval_args(world, o := str(tmp_path / "t2" / "trained"), "--overwrite", "true"), o,
         r"holds a `toe train` run"),
        (["rebuild", "--source", str(world / "ex"), "--out", o := str(tmp_path / "e2" / "eval"),
          "--num_leaves", "4", "--gate_rank", "8", "--overwrite", "true"], o, r"holds a `toe eval` run"),
    ]
    (tmp_path / "t2").mkdir()
    (tmp_path / "e2").mkdir()
    copy(world, "trained", tmp_path / "t2")
    copy(world, "eval", tmp_path / "e2")
    os.remove(tmp_path / "t2" / "trained" / RECORD_NAME)  # a folder written before the record: its markers say
    for argv, out, match in cases:
        message = refused(argv, capsys, monkeypatch, keep=[out])
        assert re.search(match, message), message
        assert "--overwrite replaces only" in message
    # a stray file of another command's in a folder of this kind: not removed, and named
    out = copy(world, "eval", tmp_path / "t2")
    shutil.copy(world / "trained" / "curves.png", os.path.join(out, "curves.png"))
    message = refused(eval_args(world, out, "--overwrite", "true"), capsys, monkeypatch, keep=[out])
    assert "does not write (curves.png)" in message, message
    # the same kind: replaced, the user's notes stay
    out = str(tmp_path / "again")
    shutil.copytree(world / "trained", out)
    Path(out, "notes.txt").write_text("mine")
    assert main(train_args(world, out, "--overwrite", "true", "--max_steps", "1")) == 0
    assert json.loads(Path(out, "train_summary.json").read_text())["steps"] == 2  # this run's (the old one: 3)
    assert Path(out, "notes.txt").read_text() == "mine"


def test_save_pretrained_refuses_another_kind_of_run(world, tmp_path):
    """``ToEModel.save_pretrained`` into an extraction used to replace its untrained plug-in (which a later `toe
    train` then starts from); into an eval or a checkpoint folder it mixed files. A plug-in folder is replaced."""
    from tree_of_experts import ToEModel

    model = ToEModel.from_pretrained(str(world / "base"), str(world / "trained"))
    for name, match in (("ex", r"holds an extraction \(`toe extract`\) \(run\.json"),
                        ("eval", r"holds a `toe eval` run \(metrics\.json"),
                        ("trained", r"holds a `toe train` run \(train_args\.json"),
                        (os.path.join("trained", "checkpoint"), r"holds a training checkpoint \(state\.json")):
        folder = copy(world, name, tmp_path) if os.sep not in name else str(world / name)
        before = snapshot(folder)
        with pytest.raises(ToEError, match=match + r".*not a plug-in folder: save into a new folder"):
            model.save_pretrained(folder)
        assert snapshot(folder) == before
    plugin = tmp_path / "plugin"
    model.save_pretrained(plugin)
    (plugin / "notes.txt").write_text("mine")
    model.save_pretrained(plugin)  # a plug-in folder of its own kind is replaced in place
    assert folder_kind(plugin)[0] == "plugin" and (plugin / "notes.txt").read_text() == "mine"
    assert ToEModel.from_pretrained(str(world / "base"), str(plugin)).toe_config == model.toe_config

