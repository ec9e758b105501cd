"""Hostile inputs through the CLI, one table across every command (issue #17): every case exits non-zero with one
sentence on the last stderr line, no traceback, and leaves any folder that existed before byte-identical. Cases
marked ``no_model`` must fail before a model is loaded (loading one fails the test). The counterpart: --overwrite and
--resume do what they say. (Tests of one module's own checks live in that module's test file.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_world
from safetensors.torch import load_file, save_file

from tree_of_experts.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
TRAIN = ["--max_steps", "2", "--stage_a_steps", "1", "--batch_size", "4", "--save_every", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny pair, an extraction (N = 8), a trained plug-in with a checkpoint, an eval folder and a traces file."""
    w = make_world(tmp_path_factory)
    (w / "eval").mkdir()
    (w / "eval" / "metrics.json").write_text('{"args": {}, "systems": {}}\n')
    (w / "eval" / "base.jsonl").write_text('{"prompt": "p", "ce": 1.0, "ce_tokens": 3}\n')
    (w / "traces.jsonl").write_text('{"question": "q", "answer": "a", "trace": "t"}\n')
    return w


def copy(w: Path, name: str, tmp: Path) -> str:
    """A private copy of ``w/name`` in ``tmp`` (a case may damage or must not touch it)."""
    src, dst = w / name, tmp / name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return str(dst)


def edit_json(path: str, **changes) -> None:
    data = json.loads(Path(path).read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    Path(path).write_text(json.dumps(data))


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def poison(folder: str) -> None:
    """Writes a NaN into the plug-in's scale and an inf into its bank."""
    path = os.path.join(folder, "toe_model.safetensors")
    state = load_file(path)
    state["blocks.0.scale"][0] = float("nan")
    state["blocks.0.bank.norm"][1] = float("inf")
    save_file(state, path)


def snapshot(path: str) -> dict[str, tuple[bytes, int]] | None:
    """{relative path: (bytes, mode)} of every file under ``path`` (or of the file itself)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": (Path(path).read_bytes(), os.stat(path).st_mode)}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            out[rel] = (Path(full).read_bytes() if os.path.isfile(full) else b"<dir>", os.lstat(full).st_mode)
    return out


@dataclass
class Case:
    """argv, the existing files or folders that must come out byte-identical, a regex the error must match, and
    whether the command must fail before loading any model."""

    argv: list[str]
    keep: list[str]
    match: str
    no_model: bool = True


def train_args(w: Path, out: str, *extra: str, experts: str | None = None) -> list[str]:
    return ["train", "--base", str(w / "base"), "--experts", experts or str(w / "ex"), "--data", FIXTURE, *TRAIN,
            "--out", out, *extra]


def extract_args(w: Path, out: str, *extra: str) -> list[str]:
    return ["extract", "--teacher", str(w / "teacher"), "--base", str(w / "base"), "--data", FIXTURE,
            "--num_leaves", "8", "--shard_size", "8", "--heldout_frac", "0.25", "--batch_size", "4",
            "--gate_rank", "8", "--out", out, *extra]


def eval_args(w: Path, out: str, *extra: str) -> list[str]:
    return ["eval", "--base", str(w / "base"), "--data", FIXTURE, "--limit", "2", "--out", out, *extra]


def _trained(w, t):  # a trained plug-in folder, copied
    return copy(w, "trained", t)


CASES = {
    # -- data is lost ------------------------------------------------------------------------------------------------
    "train over a trained plug-in": lambda w, t: Case(
        train_args(w, o := _trained(w, t)), [o], r"holds another run's files.*--overwrite.*--resume"),
    "train --out equal to --experts": lambda w, t: Case(
        train_args(w, x := copy(w, "ex", t), experts=x), [x], r"is the --experts folder"),
    "extract over a trained plug-in": lambda w, t: Case(
        extract_args(w, o := _trained(w, t)), [o], r"not a `toe extract`.*--overwrite"),
    "extract over an extraction with other settings": lambda w, t: Case(
        extract_args(w, o := copy(w, "ex", t), "--max_length", "64"), [o], r"other settings \(max_length\).*--overwrite"),
    "rebuild over a trained plug-in": lambda w, t: Case(
        ["rebuild", "--source", str(w / "ex"), "--out", o := _trained(w, t), "--num_leaves", "4", "--gate_rank", "8"],
        [o, str(w / "ex")], r"holds a `toe train` run \(train_args\.json.*not a `toe rebuild` run: pass a new --out"),
    "baseline over a trained plug-in": lambda w, t: Case(
        ["baseline", "--kind", "static", "--base", str(w / "base"), "--experts", str(w / "ex"), "--data", FIXTURE,
         "--out", o := _trained(w, t), *TRAIN], [o], r"holds a `toe train` run.*--overwrite replaces only.*--resume"),
    "eval over a trained plug-in": lambda w, t: Case(eval_args(w, o := _trained(w, t)), [o], r"--overwrite"),
    "eval over an eval folder": lambda w, t: Case(eval_args(w, o := copy(w, "eval", t)), [o], r"metrics\.json"),
    "oracle over an eval folder": lambda w, t: Case(
        ["oracle", "--teacher", str(w / "teacher"), "--base", str(w / "base"), "--experts", str(w / "ex"),
         "--data", FIXTURE, "--out", o := copy(w, "eval", t)], [o], r"holds a `toe eval` run \(metrics\.json\).*new --out"),
    "report over a trained plug-in": lambda w, t: Case(
        ["report", str(w / "eval"), "--out", o := _trained(w, t)], [o, str(w / "eval")], r"--overwrite"),
    "traces over an existing file": lambda w, t: Case(
        ["traces", "--teacher", str(w / "teacher"), "--data", FIXTURE, "--out", o := copy(w, "traces.jsonl", t)],
        [o], r"exists: pass --overwrite"),
    "resume with another --lr": lambda w, t: Case(
        train_args(w, o := _trained(w, t), "--resume", "true", "--lr", "0.5"), [o], r"--lr 0\.001 -> 0\.5"),
    "resume with another --limit and --experts": lambda w, t: Case(
        train_args(w, o := _trained(w, t), "--resume", "true", "--limit", "8", experts=copy(w, "ex", t)), [o],
        r"other arguments.*--experts .*--limit null -> 8"),
    # -- work is wasted: refused before any model loads ------------------------------------------------------------
    "num_leaves 0": lambda w, t: Case(extract_args(w, str(t / "x"), "--num_leaves", "0"), [], r"num_leaves=0"),
    "num_leaves -4": lambda w, t: Case(extract_args(w, str(t / "x"), "--num_leaves", "-4"), [], r"num_leaves=-4"),
    "num_leaves 3 balanced": lambda w, t: Case(
        extract_args(w, str(t / "x"), "--num_leaves", "3"), [], r"power of two \(use 2 or 4"),
    "unknown shape": lambda w, t: Case(
        extract_args(w, str(t / "x"), "--shape", "ball"), [], r"--shape ball: use one of 'balanced', 'deep'"),
    "unknown selection": lambda w, t: Case(
        extract_args(w, str(t / "x"), "--selection", "top"), [], r"--selection top: use one of 'dense', 'topk'"),
    "top_k above N": lambda w, t: Case(extract_args(w, str(t / "x"), "--top_k", "16"), [], r"top_k=16 .*\[1, N\]"),
    "num_leaves above the tokens": lambda w, t: Case(
        extract_args(w, str(t / "x"), "--num_leaves", "4194304"), [], r"4194304 but only about \d+ tokens"),
    "rebuild num_leaves above the tokens": lambda w, t: Case(
        ["rebuild", "--source", str(w / "ex"), "--out", str(t / "x"), "--num_leaves", "65536"], [str(w / "ex")],
        r"65536 but only about \d+ tokens"),
    "negative lr": lambda w, t: Case(train_args(w, str(t / "x"), "--lr=-0.001"), [], r"lr=-0\.001"),
    "absurd lr": lambda w, t: Case(train_args(w, str(t / "x"), "--lr", "1e6"), [], r"lr=1000000\.0"),
    "batch_size 0": lambda w, t: Case(train_args(w, str(t / "x"), "--batch_size", "0"), [], r"batch_size=0"),
    "unknown train_selection": lambda w, t: Case(
        train_args(w, str(t / "x"), "--train_selection", "sparse"), [], r"--train_selection sparse: use one of "),
    "eval plugin_top_k 0": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--plugin_top_k", "0"), [], r"plugin_top_k=0"),
    # `toe eval` checks every input before the base's pass (a wrong path found after it costs hours)
    "eval --plugin missing": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--plugin", str(t / "nope")), [], r"plug-in .*nope' not found"),
    "eval --plugin for another base": lambda w, t: Case(
        ["eval", "--base", str(w / "teacher"), "--data", FIXTURE, "--limit", "2", "--out", str(t / "x"), "--plugin",
         str(w / "trained")], [str(w / "trained")], r"does not fit .*load the base it was built for"),
    "eval --plugin_top_k above N": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--plugin", str(w / "trained"), "--plugin_top_k", "100"), [], r"top_k=100"),
    "eval --plugin_top_k without --plugin": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--plugin_top_k", "2"), [], r"route a plug-in: pass --plugin"),
    "eval --lora missing": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--lora", str(t / "nope")), [], r"LoRA adapter .* not found"),
    "eval --lora not an adapter": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--lora", str(w / "trained")), [], r"no adapter_config\.json"),
    "eval --teacher missing": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--teacher", str(t / "nope")), [], r"teacher .*nope' not found"),
    "eval scoring nothing": lambda w, t: Case(
        eval_args(w, str(t / "x"), "--ce", "false", "--accuracy", "false"), [], r"nothing to score"),
    "train off-policy with on-policy options": lambda w, t: Case(
        train_args(w, str(t / "x"), "--beta", "0.3", "--sample_max_new_tokens", "8"), [],
        r"--beta, --sample_max_new_tokens set on-policy training, but --objective is off_policy"),
    "train --base_adapter missing": lambda w, t: Case(
        train_args(w, str(t / "x"), "--base_adapter", str(t / "nope")), [], r"LoRA adapter .* not found"),
    "baseline off-policy with on-policy options": lambda w, t: Case(
        ["baseline", "--kind", "lora", "--lora_rank", "1", "--base", str(w / "base"), "--data", FIXTURE, "--out",
         str(t / "x"), "--on_policy_ratio", "0.5"], [], r"--on_policy_ratio sets on-policy training"),
    "extract --base missing": lambda w, t: Case(
        ["extract", "--teacher", str(w / "teacher"), "--base", str(t / "nope"), "--data", FIXTURE, "--out",
         str(t / "x")], [], r"nope' not found: it is neither a local folder nor a hub repo id"),
    "--experts is a trained plug-in": lambda w, t: Case(
        train_args(w, str(t / "x"), experts=(e := _trained(w, t))), [e], r"holds a trained plug-in"),
    # -- bad input ---------------------------------------------------------------------------------------------------
    "NaN in a plug-in (inspect)": lambda w, t: Case(
        ["inspect", "--plugin", p := copy(w, "ex", t)], [p], r"NaN or inf values"),
    "NaN in a plug-in (generate)": lambda w, t: Case(
        ["generate", "--base", str(w / "base"), "--plugin", p := copy(w, "ex", t), "--prompt", "what is"], [p],
        r"NaN or inf values", no_model=False),
    "format_version 0": lambda w, t: Case(["inspect", "--plugin", p := copy(w, "ex", t)], [p], r"format_version=0"),
    "format_version missing": lambda w, t: Case(
        ["inspect", "--plugin", p := copy(w, "ex", t)], [p], r"has no format_version"),
    "corrupt extraction shard": lambda w, t: Case(
        train_args(w, str(t / "x"), experts=(x := copy(w, "ex", t))), [x],
        r"lacks or holds damaged shards/shard-00001\.safetensors.*rerun the `toe extract` command"),
    "another plug-in saved into an extraction": lambda w, t: Case(
        train_args(w, str(t / "x"), experts=(x := copy(w, "ex", t))), [x],
        r"injects at layers \[0, 1\] but its route data was built for \[\d\].*extract again"),
    "corrupt extraction settings": lambda w, t: Case(
        train_args(w, str(t / "x"), experts=(x := copy(w, "ex", t))), [x], r"run\.json is corrupt"),
    "corrupt checkpoint weights": lambda w, t: Case(
        train_args(w, o := _trained(w, t), "--resume", "true"), [o], r"plugin\.safetensors is unreadable.*without "
        r"--resume", no_model=False),
    "corrupt checkpoint state": lambda w, t: Case(
        train_args(w, o := _trained(w, t), "--resume", "true"), [o], r"state\.json is corrupt.*without --resume",
        no_model=False),
    "corrupt optimizer state": lambda w, t: Case(
        train_args(w, o := _trained(w, t), "--resume", "true"), [o], r"optimizer\.pt is unreadable", no_model=False),
}

# What each case breaks in its copies before the command runs.
DAMAGE = {
    "NaN in a plug-in (inspect)": lambda c: poison(c.keep[0]),
    "NaN in a plug-in (generate)": lambda c: poison(c.keep[0]),
    "format_version 0": lambda c: edit_json(os.path.join(c.keep[0], "toe_config.json"), format_version=0),
    "format_version missing": lambda c: edit_json(os.path.join(c.keep[0], "toe_config.json"), format_version=...),
    "corrupt extraction shard": lambda c: truncate(os.path.join(c.keep[0], "shards", "shard-00001.safetensors")),
    "corrupt extraction settings": lambda c: truncate(os.path.join(c.keep[0], "run.json")),
    "another plug-in saved into an extraction": lambda c: edit_json(os.path.join(c.keep[0], "toe_config.json"),
                                                                   layers=[0, 1]),
    "corrupt checkpoint weights": lambda c: truncate(os.path.join(c.keep[0], "checkpoint", "plugin.safetensors")),
    "corrupt checkpoint state": lambda c: Path(c.keep[0], "checkpoint", "state.json").write_text('{"step": '),
    "corrupt optimizer state": lambda c: truncate(os.path.join(c.keep[0], "checkpoint", "optimizer.pt")),
}


def no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded before the command refused its arguments")


def check_refused(argv: list[str], capsys) -> str:
    """Runs the CLI; asserts a non-zero exit and one sentence on the last stderr line, no traceback; returns it."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0, f"accepted: {argv}"
    assert "Traceback" not in err
    last = lines[-1]
    assert last.startswith("toe: error: "), last
    message = last[len("toe: error: "):]
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    return message


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_in_one_line_and_touches_nothing(name, world, tmp_path, capsys, monkeypatch):
    case = CASES[name](world, tmp_path)
    if name in DAMAGE:
        DAMAGE[name](case)
    before = {path: snapshot(path) for path in case.keep}
    out = case.argv[case.argv.index("--out") + 1] if "--out" in case.argv else None
    new_out = out is not None and not os.path.exists(out)
    if case.no_model:
        import transformers

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
    message = check_refused(case.argv, capsys)
    assert re.search(case.match, message), message
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
    assert not (new_out and os.path.exists(out)), f"--out {out} was created by a refused command"


def test_overwrite_replaces_the_old_run_and_resume_continues_it(world, tmp_path, capsys):
    """The refusals are not a blanket "no": --overwrite replaces the old run's files (no mixing), --resume with the
    same arguments continues, and files that are not a run's stay."""
    out = copy(world, "ex", tmp_path)
    Path(out, "notes.txt").write_text("mine")
    assert main(extract_args(world, out, "--max_length", "64", "--overwrite", "true")) == 0
    assert json.loads(Path(out, "run.json").read_text())["max_length"] == 64
    assert Path(out, "notes.txt").read_text() == "mine"
    (tmp_path / "again").mkdir()
    trained = copy(world, "trained", tmp_path / "again")
    assert main(train_args(world, trained, "--resume", "true", "--log_every", "5")) == 0  # log_every may change
    # an off-policy run saved before on-policy options were refused for it: they never took effect, so --resume
    # need not repeat them (and cannot: they are refused now)
    saved = Path(trained, "train_args.json")
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "beta": 0.9, "sample_max_new_tokens": 32}))
    assert main(train_args(world, trained, "--resume", "true")) == 0
