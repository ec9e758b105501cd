"""Nothing lost, nothing silent, round two (issue #35): one run per output folder (an flock that a killed run does not
leave behind), plug-in configs and tensors checked by type, range and magnitude when read, every file a command
writes following the umask, `toe traces` into a new folder, and no training on rows whose response max_length cuts
away. Refusals go through the CLI as a user meets them: exit 2, one `toe: error:` line, existing files untouched."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_world
from safetensors.torch import load_file, save_file
from test_safety import FIXTURE, check_refused, copy, edit_json, no_model_loads, snapshot, train_args

import tree_of_experts.training.loop as loop_mod
import tree_of_experts
from tree_of_experts.cli import main
from tree_of_experts.config import ToEError
from tree_of_experts.locks import LOCK_NAME, OutLock, releases_out_locks
from tree_of_experts.folders import claim_out
from tree_of_experts.run_kinds import run_files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny pair, an extraction (N = 8) and a trained plug-in (2 steps, checkpointed)."""
    w = make_world(tmp_path_factory)
    return w


def refused(argv: list[str], capsys, monkeypatch, keep: list[str] = (), no_model: bool = True) -> str:
    """Runs a command that must be refused: exit 2, one line, ``keep`` byte-identical, and (``no_model``) no model
    loaded; returns the message."""
    import transformers

    before = {path: snapshot(path) for path in keep}
    with monkeypatch.context() as patch:
        if no_model:
            patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
        message = check_refused(argv, capsys)
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
    return message


def is_locked(folder: str | Path) -> bool:
    """Whether some open file holds the folder's flock (a new open file description conflicts even in-process)."""
    path = os.path.join(folder, LOCK_NAME)
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- 1. a lock per output folder -----------------------------------------------------------------------------------
HANG_AFTER_CHECKPOINT = """
import sys, time
import tree_of_experts.training.loop as loop_mod  # the training loop `toe train` runs
real = loop_mod.save_checkpoint
def save_then_hang(*args, **kwargs):  # a run that is still going: it has saved a checkpoint and works on
    real(*args, **kwargs)
    print("saved", flush=True)
    time.sleep(600)
loop_mod.save_checkpoint = save_then_hang
from tree_of_experts.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_running_folder_is_refused_naming_the_run_and_freed_when_it_is_killed(world, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "run"
    script = tmp_path / "hang.py"
    script.write_text(HANG_AFTER_CHECKPOINT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(tree_of_experts.__file__))}
    proc = subprocess.Popen([sys.executable, str(script), *train_args(world, str(out))], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "saved", "the first run did not reach its first checkpoint"
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and "train" in holder["argv"]
        # a second train, a resume of it, and another command into the same folder: refused, naming the first
        for argv in (train_args(world, str(out)), train_args(world, str(out), "--resume", "true"),
                     ["eval", "--base", str(world / "base"), "--data", FIXTURE, "--limit", "2", "--out", str(out),
                      "--overwrite", "true"]):
            message = refused(argv, capsys, monkeypatch, keep=[str(out)])
            assert f"is being written by another run (pid {proc.pid} on " in message, message
            assert "hang.py train" in message and message.endswith("wait for it to finish, or pass another --out")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out / LOCK_NAME).exists() and not is_locked(out)  # kill -9 leaves the file; the kernel took the lock
    assert main(train_args(world, str(out), "--resume", "true")) == 0  # the killed run continues
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3  # 1 Stage-A + 2 Stage-B steps, continued from the checkpoint at step 1
    # the killed run's row (end of Stage A) and the resumed run's (the end): one run's rows, none twice
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == [1, 3]
    assert not (out / LOCK_NAME).exists()  # released at the end, and the file goes with it


def test_locks_are_released_when_commands_return_or_fail_in_process(world, tmp_path, capsys, monkeypatch):
    """Tests (and library callers) run many commands in one process: none may leave its folder locked."""
    import tree_of_experts.commands.train as train_mod
    from tree_of_experts.commands.train import train

    out = tmp_path / "run"
    assert main(train_args(world, str(out))) == 0
    assert not (out / LOCK_NAME).exists() and not is_locked(out)
    # a refusal inside the lock (resume with other arguments) releases it and leaves the folder as it was
    refused(train_args(world, str(out), "--resume", "true", "--lr", "0.5"), capsys, monkeypatch, keep=[str(out)])
    assert not (out / LOCK_NAME).exists()
    # an exception in the middle of the run, from Python: released too
    def boom(*args, **kwargs):
        assert is_locked(out), "the folder is not locked while the run writes into it"
        raise RuntimeError("boom")

    monkeypatch.setattr(loop_mod, "objective_loss", boom)  # the loss of the training loop `toe train` runs
    with pytest.raises(RuntimeError, match="boom"):
        train(base=str(world / "base"), experts=str(world / "ex"), data=FIXTURE, out=str(out), max_steps=2,
              stage_a_steps=1, batch_size=4, overwrite=True)
    monkeypatch.undo()
    assert not is_locked(out) and not (out / LOCK_NAME).exists()
    # a command that fails after it locked a new folder leaves no folder behind (the lock made it)
    def stop(*args, **kwargs):
        assert is_locked(tmp_path / "new" / "deeper")
        raise ToEError("stopped")

    monkeypatch.setattr(train_mod, "load_causal_lm", stop)
    new = str(tmp_path / "new" / "deeper")
    assert refused(train_args(world, new), capsys, monkeypatch, no_model=False) == "stopped"
    assert not (tmp_path / "new").exists()


def test_the_same_process_reenters_its_own_lock_and_a_scope_releases_it(tmp_path):
    out = tmp_path / "run"

    @releases_out_locks
    def outer() -> None:
        claim_out(out, "train")
        inner()  # a recipe's command calling another into its own folder (baseline -> train)
        assert is_locked(out), "the inner command released the outer one's lock"

    @releases_out_locks
    def inner() -> None:
        claim_out(out, "train")

    outer()
    assert not is_locked(out) and not out.exists()  # made for the lock, left empty: removed with it
    with claim_out(out, "train"):  # outside a command the caller holds the lock it gets
        with pytest.raises(ToEError, match=r"is being written by another run \(pid \d+"):
            OutLock(out)  # another open of the file (as another process would): refused
    assert not is_locked(out)


def test_overwrite_keeps_the_lock_and_a_stale_lock_file_is_not_a_run(world, tmp_path, monkeypatch):
    import tree_of_experts.commands.train as train_mod

    out = copy(world, "trained", tmp_path)
    Path(out, LOCK_NAME).write_text('{"pid": 1, "host": "gone", "argv": "toe train"}\n')  # left by a kill -9
    assert LOCK_NAME not in run_files(out)
    real, seen = train_mod.load_causal_lm, []

    def check_lock(*args, **kwargs):  # after --overwrite removed the old run: the lock is still there, and held
        seen.append(is_locked(out))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "load_causal_lm", check_lock)
    assert main(train_args(world, out, "--overwrite", "true")) == 0
    assert seen == [True] and not os.path.exists(os.path.join(out, LOCK_NAME))
    # a folder holding nothing but a stale lock file is a new folder: no --overwrite needed
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_NAME).write_text("")
    assert main(train_args(world, str(fresh))) == 0


# -- 2. plug-in configs and tensors, checked when read -------------------------------------------------------------
def config(**changes):
    """Edits a plug-in folder's toe_config.json (``...`` removes a field)."""
    return lambda folder: edit_json(os.path.join(folder, "toe_config.json"), **changes)


def weights(name: str, index, value: float):
    """Sets one value of the tensor ``name`` in a plug-in folder's weights."""
    def damage(folder: str) -> None:
        path = os.path.join(folder, "toe_model.safetensors")
        state = load_file(path)
        state[name][index] = value
        save_file(state, path)

    return damage


# name: (damage, what the message must say); a config that is wrong in itself is also refused by `toe eval` before
# any model loads
DAMAGED = {
    "top_k a float": (config(top_k=4.0), r"toe_config\.json: top_k=4\.0 must be a whole number \(write 4\)$"),
    "num_leaves missing": (config(num_leaves=...), r"toe_config\.json has no num_leaves: .*re-save the plug-in"),
    "hidden_size a string": (config(hidden_size="32"), r"hidden_size='32' must be a whole number$"),
    "layers of floats": (config(layers=[0.5]), r"layers=\[0\.5\] must be a list of whole numbers"),
    "intensity a number": (config(intensity=1), r"intensity=1 must be true or false"),
    "top_k above N": (config(top_k=99), r"top_k=99 with num_leaves=8: K must be in \[1, N\]"),
    "negative N": (config(num_leaves=-8), r"num_leaves=-8: a tree needs at least 2 leaves"),
    "negative top_p": (config(top_p=-0.5), r"top_p=-0\.5: must be in \(0, 1\]"),
    "clip NaN": (config(clip=math.nan), r"clip=nan: the norm clip κ must be a finite number > 0"),
    "gate_rank 0": (config(gate_rank=0), r"gate_rank=0: must be >= 1"),
    "N the tensors do not have": (config(num_leaves=16), r"has shape \(8, 32\) but toe_config\.json implies "
                                  r"\(16, 32\)"),
    "an absurd leaf norm": (weights("blocks.0.bank.norm", 3, 3e5),
                            r"blocks\.0\.bank\.norm holds a value of magnitude 3e\+05, beyond the plausible 10000"),
    "an absurd gate weight": (weights("blocks.0.gate.nodes.weight", (0, 0), -2e4),
                              r"blocks\.0\.gate\.nodes\.weight holds a value of magnitude 2e\+04, beyond the "
                              r"plausible 10000"),
    "an infinite scale": (weights("blocks.0.scale", 0, math.inf), r"NaN or inf values"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_plugin_is_refused_naming_the_field_and_the_fix(name, world, tmp_path, capsys, monkeypatch):
    plugin = copy(world, "trained", tmp_path)
    damage, match = DAMAGED[name]
    damage(plugin)
    commands = [["inspect", "--plugin", plugin]]
    if damage.__name__ == "<lambda>" and "tensors" not in name:  # a config is read before any model loads, the
        # tensors (and their shapes) when the plug-in loads, after the base
        commands.append(["eval", "--base", str(world / "base"), "--data", FIXTURE, "--limit", "2", "--plugin", plugin,
                         "--out", str(tmp_path / "ev")])
    for argv in commands:
        message = refused(argv, capsys, monkeypatch, keep=[plugin])
        assert re.search(match, message), message
    assert not (tmp_path / "ev").exists()


def test_the_magnitude_bound_is_the_stated_one(world, tmp_path):
    from tree_of_experts.plugin import MAX_ABS, ToEPlugin

    assert MAX_ABS == 1e4 and "1e4" in ToEPlugin.load.__doc__
    plugin = copy(world, "trained", tmp_path)
    weights("blocks.0.bank.norm", 0, -1e4)(plugin)
    assert ToEPlugin.load(plugin).blocks["0"].bank.norm[0] == -1e4  # at the bound: loads
    weights("blocks.0.bank.norm", 0, -1.001e4)(plugin)
    with pytest.raises(ToEError, match="magnitude 1e\\+04, beyond the plausible 10000"):
        ToEPlugin.load(plugin)


# -- 3. the umask --------------------------------------------------------------------------------------------------
def modes_under(folder: str | Path) -> dict[str, int]:
    """{relative path: permission bits} of everything under ``folder`` (the folder itself as "."), links left out."""
    found = {".": stat.S_IMODE(os.stat(folder).st_mode)}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                found[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def wrong_modes(folder: str | Path, mask: int) -> dict[str, str]:
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    return {rel: oct(mode) for rel, mode in modes_under(folder).items()
            if mode != (want_dir if os.path.isdir(os.path.join(folder, rel)) else want_file)}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_follows_the_umask(world, tmp_path, umask, mask):
    umask(mask)
    assert main(["export", "--base", str(world / "base"), "--plugin", str(world / "trained"), "--out",
                 str(tmp_path / "exp")]) == 0
    assert wrong_modes(tmp_path / "exp", mask) == {}
    if mask == 0o022:
        modes = modes_under(tmp_path / "exp")
        assert modes["."] == 0o755 and modes["model.safetensors"] == 0o644


def test_every_folder_and_file_the_writing_commands_make_follows_the_umask(world, tmp_path, umask):
    umask(0o022)
    base = str(world / "base")
    outs = {"train": train_args(world, str(tmp_path / "train")),
            "lora": ["baseline", "--kind", "lora", "--lora_rank", "1", "--base", base, "--data", FIXTURE, "--max_steps",
                     "1", "--batch_size", "4", "--save_every", "1", "--out", str(tmp_path / "lora")],
            "eval": ["eval", "--base", base, "--data", FIXTURE, "--limit", "2", "--max_new_tokens", "4", "--plugin",
                     str(world / "trained"), "--out", str(tmp_path / "eval")],
            "rebuild": ["rebuild", "--source", str(world / "ex"), "--out", str(tmp_path / "rebuild"), "--num_leaves",
                        "4", "--gate_rank", "8"]}
    for name, argv in outs.items():
        assert main(argv) == 0, name
        assert wrong_modes(tmp_path / name, 0o022) == {}, name


# -- 4. `toe traces` into a new folder -----------------------------------------------------------------------------
def test_traces_makes_its_folder_or_refuses_one_it_cannot_make(world, tmp_path, capsys, monkeypatch):
    common = ["traces", "--teacher", str(world / "teacher"), "--data", FIXTURE, "--limit", "2", "--max_new_tokens",
              "4", "--batch_size", "1", "--keep_incorrect", "true"]
    out = tmp_path / "new" / "deeper" / "traces.jsonl"
    assert main([*common, "--out", str(out)]) == 0
    assert out.is_file() and not Path(str(out) + ".partial").exists()
    (tmp_path / "a_file").write_text("mine")
    message = refused([*common, "--out", str(tmp_path / "a_file" / "traces.jsonl")], capsys, monkeypatch,
                      keep=[str(tmp_path / "a_file")])
    assert "a_file is a file, not a folder: pass a path inside a folder" in message


# -- 5. no training on nothing -------------------------------------------------------------------------------------
def test_rows_whose_response_max_length_cuts_away_are_refused_or_skipped_and_counted(world, tmp_path, capsys,
                                                                                    monkeypatch):
    from tree_of_experts.data import encode
    from tree_of_experts.toy import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = [json.loads(line) for line in open(FIXTURE)]
    cut = [encode(tok, f"Question: {r['question']}\nAnswer: ", r["answer"], 20).response_cut_away for r in rows]
    assert 0 < sum(cut) < len(rows)  # the case is real: some rows keep part of their response, some keep none
    base = str(world / "base")
    lora = ["baseline", "--kind", "lora", "--lora_rank", "1", "--base", base, "--data", FIXTURE, "--max_steps", "1",
            "--batch_size", "4", "--save_every", "1"]
    counted = rf"{sum(cut)} of {len(rows)} rows have a prompt that fills max_length=20 tokens, so nothing of their "
    for argv in (train_args(world, str(tmp_path / "t"), "--max_length", "20"),
                 [*lora, "--max_length", "20", "--out", str(tmp_path / "l")]):
        message = refused(argv, capsys, monkeypatch)  # before any model loads, and nothing is created
        assert re.search(counted + r"response is left \(the first is row \d+\): raise --max_length to "
                                       r"at least \d+ \(\d+ keeps every one whole\), or pass --skip_truncated true",
                                       message), message
        assert not os.path.exists(argv[argv.index("--out") + 1])
    # every row cut away: skipping would leave nothing, so the fix is the length
    message = refused(train_args(world, str(tmp_path / "t"), "--max_length", "6", "--skip_truncated", "true"), capsys,
                      monkeypatch)
    assert f"{len(rows)} of {len(rows)} rows" in message and "skip_truncated" not in message
    # skipped on request, and said so
    # (--no_kd: the extraction cached the teacher's top-k for the rows cut at its own max_length, not at 20)
    assert main(train_args(world, str(tmp_path / "t"), "--max_length", "20", "--skip_truncated", "true",
                           "--no_kd", "true")) == 0
    summary = json.loads((tmp_path / "t" / "train_summary.json").read_text())
    assert summary["skipped_truncated"] == sum(cut) and summary["examples"] == len(rows) - sum(cut)
    assert main([*lora, "--max_length", "20", "--skip_truncated", "true", "--out", str(tmp_path / "l")]) == 0
    assert json.loads((tmp_path / "l" / "baseline_summary.json").read_text())["skipped_truncated"] == sum(cut)
    # `toe eval` refuses the same condition with the same check, now before any model loads
    message = refused(["eval", "--base", base, "--data", FIXTURE, "--limit", "4", "--max_length", "12", "--out",
                       str(tmp_path / "e")], capsys, monkeypatch)
    assert "4 of 4 items have a prompt that fills max_length=12 tokens, so nothing of their target" in message
    assert not (tmp_path / "e").exists()


def test_a_kept_row_is_trained_on_as_before():
    """The refusal does not move the boundary: a row with one response token left is still an example."""
    from tree_of_experts.data import encode
    from tree_of_experts.toy import tiny_tokenizer

    tok = tiny_tokenizer()
    prompt, response = "Question: what is 12 times 7 then?\nAnswer: ", "84 it is"
    n_prompt = encode(tok, prompt, response, 1024).prompt_length
    gone, kept = encode(tok, prompt, response, n_prompt + 1), encode(tok, prompt, response, n_prompt + 2)
    assert gone.response_cut_away and int(gone.loss_mask.sum()) == 1
    assert not kept.response_cut_away and kept.cut and int(kept.loss_mask.sum()) == 2
    assert torch.equal(kept.input_ids[:-1], encode(tok, prompt, response, 1024).input_ids[: n_prompt + 1])
