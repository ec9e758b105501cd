"""Artifacts are checked whole when read (issue #35): an extraction that lacks what a command would use (route data
for Stage A, shards with the teacher's top-k for distillation) is refused in one line naming the command that
rebuilds it, or, where the user asked for less (--skip_stage_a, --no_kd, --kd_weight 0), the run says what it left
out; a rerun of `toe extract` over a finished folder checks its shards against the manifest's sizes and sha256 and
captures again what is damaged instead of returning it as it is."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_world
from safetensors.torch import load_file
from test_output_policy import refused
from test_safety import FIXTURE, copy, train_args

from tree_of_experts.cli import main
from tree_of_experts.extraction.store import Extraction, shard_record

EXTRACT = ["--num_leaves", "8", "--shard_size", "8", "--heldout_frac", "0.25", "--batch_size", "4", "--gate_rank",
           "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny pair and an extraction of it (3 shards of 8 rows, the teacher's top-k cached)."""
    w = make_world(tmp_path_factory, trained=False)
    return w


def extract_args(w: Path, out: str, *extra: str) -> list[str]:
    return ["extract", "--teacher", str(w / "teacher"), "--base", str(w / "base"), "--data", FIXTURE, *EXTRACT,
            "--out", out, *extra]


def summary(out: str) -> dict:
    return json.loads(Path(out, "train_summary.json").read_text())


def test_the_manifest_records_every_shard(world):
    ex = Extraction(world / "ex")
    records = ex.shard_records()
    assert sorted(records) == [os.path.relpath(p, ex.folder) for p in ex.shard_paths()] and len(records) == 3
    for rel, record in records.items():
        assert record == shard_record(ex.path(rel))
    assert ex.damaged_shards(full=True) == [] and ex.missing_pieces() == []


def test_train_refuses_an_extraction_without_route_data_unless_stage_a_is_skipped(world, tmp_path, capsys,
                                                                                   monkeypatch, caplog):
    """Stage A used to be skipped silently (rc 0) when route_data.safetensors was gone."""
    ex = copy(world, "ex", tmp_path)
    os.remove(os.path.join(ex, "route_data.safetensors"))
    message = refused(train_args(world, str(tmp_path / "run"), experts=ex), capsys, monkeypatch, keep=[ex])
    assert message.startswith(f"--experts {ex} lacks route_data.safetensors (the route labels of Stage A)")
    assert "rerun the `toe extract` command that wrote it" in message and "--skip_stage_a true" in message
    assert not (tmp_path / "run").exists()
    # asked for: the run says what it leaves out, in its log and its summary
    out = str(tmp_path / "skipped")
    with caplog.at_level(logging.WARNING):
        assert main(train_args(world, out, "--skip_stage_a", "true", experts=ex)) == 0
    err = caplog.text
    assert "no route warm-up (Stage A) (--skip_stage_a true)" in err
    assert "no route loss in Stage B" in err
    left = summary(out)["left_out"]
    assert left["route warm-up (Stage A)"] == "--skip_stage_a true" and "route loss in Stage B" in left
    assert summary(out)["stage_a_steps"] == 0 and summary(out)["kd"] is True


@pytest.mark.parametrize("damage", ["deleted", "truncated", "all deleted"])
def test_train_refuses_missing_shards_instead_of_training_without_kd(world, tmp_path, capsys, monkeypatch, caplog,
                                                                      damage):
    """Deleted shards used to give a run without distillation, rc 0, `kd: false`."""
    ex = copy(world, "ex", tmp_path)
    shard = os.path.join(ex, "shards", "shard-00001.safetensors")
    if damage == "deleted":
        os.remove(shard)
    elif damage == "truncated":
        data = Path(shard).read_bytes()
        Path(shard).write_bytes(data[: len(data) - 100])
    else:
        shutil.rmtree(os.path.join(ex, "shards"))
        os.mkdir(os.path.join(ex, "shards"))
    message = refused(train_args(world, str(tmp_path / "run"), experts=ex), capsys, monkeypatch, keep=[ex])
    named = "shards/shard-00001.safetensors" if damage != "all deleted" else "shards/shard-00000.safetensors"
    assert f"--experts {ex} lacks or holds damaged {named}" in message, message
    assert "rerun the `toe extract` command that wrote it" in message and message.endswith(
        "or pass --no_kd true to train without distillation")
    # asked for: trained without distillation, and said so
    for flag in (["--no_kd", "true"], ["--kd_weight", "0"]):
        out = str(tmp_path / f"run{flag[0]}")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(train_args(world, out, *flag, "--stage_a_steps", "0", experts=ex)) == 0
        assert f"no distillation of the cached top-k ({' '.join(flag)})" in caplog.text
        assert summary(out)["kd"] is False
        assert summary(out)["left_out"]["distillation of the cached top-k"] == " ".join(flag)


def test_train_refuses_a_top_k_cache_that_does_not_fit(world, tmp_path, capsys, monkeypatch):
    """No top-k cached, another data file, other tokens: each refused, naming --no_kd."""
    from tree_of_experts.commands.extract import extract

    bare = str(tmp_path / "bare")
    extract(teacher=str(world / "teacher"), base=str(world / "base"), data=FIXTURE, out=bare, num_leaves=8,
            shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8, topk_logprobs=0)
    message = refused(train_args(world, str(tmp_path / "a"), experts=bare), capsys, monkeypatch, keep=[bare])
    assert "cached no teacher top-k log-probs" in message and "--no_kd true" in message
    other = tmp_path / "other.jsonl"
    other.write_text(Path(FIXTURE).read_text() + Path(FIXTURE).read_text().splitlines()[0] + "\n")
    argv = train_args(world, str(tmp_path / "b"))
    argv[argv.index("--data") + 1] = str(other)
    message = refused(argv, capsys, monkeypatch, keep=[str(world / "ex")])
    assert f"for another data file than {other}" in message and "--no_kd true" in message
    message = refused(train_args(world, str(tmp_path / "c"), "--max_length", "24"), capsys, monkeypatch, keep=[])
    assert "were tokenized otherwise than in" in message and "--no_kd true" in message
    assert main(train_args(world, str(tmp_path / "d"), "--no_kd", "true", experts=bare)) == 0


def test_extract_rerun_checks_its_shards_and_captures_the_damaged_ones(world, tmp_path, caplog, monkeypatch):
    """A finished extraction used to be "reused as it is" whatever happened to its shards since."""
    import transformers

    from tree_of_experts.commands.extract import extract

    ex = copy(world, "ex", tmp_path)
    original = {p: Path(p).read_bytes() for p in Extraction(ex).shard_paths()}
    kw = dict(teacher=str(world / "teacher"), base=str(world / "base"), data=FIXTURE, out=ex, num_leaves=8,
              shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)
    from test_safety import no_model_loads

    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):  # whole: no model loads
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
        extract(**kw)
    assert "shards checked against the manifest's hashes; reused as it is" in caplog.text

    flipped, deleted = sorted(original)[0], sorted(original)[2]
    data = bytearray(original[flipped])
    data[-1] ^= 0xFF  # one bit pattern changed in the last tensor's bytes: same size, another hash
    Path(flipped).write_bytes(bytes(data))
    os.remove(deleted)
    os.remove(os.path.join(ex, "route_data.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        extract(**kw)
    assert "lacks or has damaged route_data.safetensors, shards/shard-00000.safetensors, " \
           "shards/shard-00002.safetensors: capturing and building them again" in caplog.text, caplog.text
    for path, content in original.items():  # captured again, bit for bit
        assert Path(path).read_bytes() == content, path
    assert Extraction(ex).damaged_shards(full=True) == [] and Extraction(ex).missing_pieces() == []
    assert load_file(os.path.join(ex, "route_data.safetensors")).keys() == \
        load_file(str(world / "ex" / "route_data.safetensors")).keys()


def test_every_reader_of_the_shards_refuses_a_missing_one(world, tmp_path):
    """`toe rebuild` (like the oracle, --reuse_capture and the training targets) reads the shards through
    Extraction.iter_shards: a shard the manifest lists but the folder lacks is refused, not read around."""
    from tree_of_experts.config import ToEError
    from tree_of_experts.extraction.store import Extraction

    ex = copy(world, "ex", tmp_path)
    first = Extraction(ex).shard_paths()[0]
    os.remove(first)
    with pytest.raises(ToEError, match="rerun the `toe extract`"):
        next(Extraction(ex).iter_shards())
    assert main(["rebuild", "--source", ex, "--out", str(tmp_path / "rb"), "--num_leaves", "4"]) == 2
