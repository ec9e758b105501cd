"""Every command takes its options in groups: at most 12 parameters, each option declared once, the flat spellings of
earlier releases (Python keywords, `--option` on the command line) still working, and the records flat."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os

import pytest

from tree_of_experts import ToEError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def test_no_command_takes_more_than_twelve_parameters():
    from tree_of_experts.cli import _commands

    sizes = {name: len(inspect.signature(fn).parameters) for name, fn in _commands().items()}
    assert all(n <= 12 for n in sizes.values()), {k: v for k, v in sizes.items() if v > 12}


def test_a_group_field_is_never_a_plain_parameter_of_the_command_that_takes_its_group():
    """`@grouped` refuses that when the module is imported; this names the offending command if one slipped in."""
    from tree_of_experts.cli import _commands
    from tree_of_experts.options import OptionGroup

    for name, fn in _commands().items():
        params = inspect.signature(fn).parameters
        for p in params.values():
            if isinstance(p.default, OptionGroup):
                clash = {f.name for f in dataclasses.fields(p.default)} & set(params)
                assert not clash, (name, p.name, clash)


def _recorded(monkeypatch, module: str, name: str) -> list[dict]:
    """Replaces the command ``module.name`` by one with its signature (and flat spellings) that records its
    keyword arguments instead of running."""
    mod = importlib.import_module(module)
    calls: list[dict] = []

    @functools.wraps(getattr(mod, name))
    def fake(*args, **kwargs):
        calls.append(kwargs)
        return {"summary": "recorded"}

    monkeypatch.setattr(mod, name, fake)
    return calls


def test_flat_command_line_spellings_reach_their_groups(monkeypatch, capsys):
    from tree_of_experts.cli import main
    from tree_of_experts.options import flat_args

    calls = _recorded(monkeypatch, "tree_of_experts.commands.extract", "extract")
    assert main(["extract", "--teacher", "T", "--base", "B", "--data", "D", "--out", "O", "--num_leaves", "8",
                 "--batch_size", "4", "--layers", "0,1", "--heldout_frac", "0.25", "--max_length", "64",
                 "--max_disk", "1MB", "--dtype", "bfloat16", "--overwrite", "true", "--tree.top_k", "2"]) == 0
    got = flat_args(calls[-1])
    assert (got["num_leaves"], got["top_k"], got["batch_size"], got["layers"], got["heldout_frac"]) == (8, 2, 4,
                                                                                                        [0, 1], 0.25)
    assert (got["max_length"], got["max_disk"], got["dtype"], got["overwrite"]) == (64, "1MB", "bfloat16", True)

    calls = _recorded(monkeypatch, "tree_of_experts.commands.evaluate", "evaluate")
    assert main(["eval", "--base", "B", "--data", "D", "--limit", "5", "--skip", "2", "--task", "math",
                 "--plugin", "P", "--plugin_top_k", "2", "--max_new_tokens", "16", "--batch_size", "4",
                 "--resume", "true", "--device", "cpu"]) == 0
    got = flat_args(calls[-1])
    assert (got["limit"], got["skip"], got["task"], got["plugin"], got["plugin_top_k"]) == (5, 2, "math", "P", 2)
    assert (got["max_new_tokens"], got["batch_size"], got["resume"], got["device"]) == (16, 4, True, "cpu")

    calls = _recorded(monkeypatch, "tree_of_experts.commands.oracle", "oracle")
    assert main(["oracle", "--teacher", "T", "--base", "B", "--experts", "E", "--data", "D", "--out", "O",
                 "--lambdas", "[0.5]", "--generate", "true", "--ce_target", "trace", "--batch_size", "1"]) == 0
    got = flat_args(calls[-1])
    assert (list(got["lambdas"]), got["generate"], got["ce_target"], got["batch_size"]) == ([0.5], True, "trace", 1)
    capsys.readouterr()


def test_a_flat_config_file_is_read_into_the_groups(monkeypatch, tmp_path):
    from tree_of_experts.cli import main
    from tree_of_experts.options import flat_args

    cfg = tmp_path / "extract.yaml"
    cfg.write_text("num_leaves: 16\nshape: deep\nlayers: [1]\nbatch_size: 2\ndtype: float16\n")
    calls = _recorded(monkeypatch, "tree_of_experts.commands.extract", "extract")
    assert main(["extract", "--config", str(cfg), "--teacher", "T", "--base", "B", "--data", "D", "--out", "O"]) == 0
    got = flat_args(calls[-1])
    assert (got["num_leaves"], got["shape"], got["layers"], got["batch_size"], got["dtype"]) == (16, "deep", [1], 2,
                                                                                                 "float16")


@pytest.mark.parametrize("argv, want", [
    (["extract", "--teacher", "T", "--base", "B", "--data", "D", "--out", "O", "--shape", "nope"],
     "toe: error: --shape nope: use one of 'balanced', 'deep'"),
    (["eval", "--base", "B", "--task", "chess"], "toe: error: --task chess: use one of 'gsm8k', 'math', 'code'"),
    (["eval", "--base", "B", "--scoring.ce_target", "x"],
     "toe: error: --scoring.ce_target x: use one of 'gold_clean', 'gold', 'trace'"),
    (["rebuild", "--source", "S", "--out", "O", "--signal", "pca"],
     "toe: error: --signal pca: use one of 'fusion_map', 'ridge'"),
])
def test_a_choice_out_of_its_literal_is_one_line(capsys, argv, want):
    from tree_of_experts.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(want) and len(err.splitlines()) == 1, err


def test_help_shows_the_groups_with_their_fields_help(capsys):
    from tree_of_experts.cli import main

    for command, shown in (("extract", ("--tree.num_leaves", "N leaves of the tree", "--capture.layers",
                                        "--fusion.ridge_lambdas", "--disk.max_disk", "--runtime.device")),
                           ("eval", ("--systems.plugin_top_k", "inference-time sweep", "--scoring.task",
                                     "--scoring.temperature", "--limit")),
                           ("bench", ("--workload.reps", "--sweeps.routing_exponents")),
                           ("demo", ("--tree.num_leaves", "--pipeline.train_steps", "--fit.lr"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # the help wraps its lines
        for text in shown:
            assert text in out, (command, text)


def test_python_callers_pass_flat_keywords_and_values_are_checked_in_one_line():
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.extract import extract, rebuild

    with pytest.raises(ToEError, match=r"^shape='nope' is unknown: use one of 'balanced', 'deep'$"):
        extract(teacher="T", base="B", data="D", out="O", shape="nope")
    with pytest.raises(ToEError, match="top_k=9 with num_leaves=8"):
        rebuild("S", "O", num_leaves=8, top_k=9)
    with pytest.raises(ToEError, match="state_tokens=0: give at least 1"):
        extract(teacher="T", base="B", data="D", out="O", state_tokens=0)
    with pytest.raises(ToEError, match="plugin_top_p=0 keeps no leaf"):
        evaluate(base="B", data="D", plugin="P", plugin_top_p=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_leafs'"):
        extract(teacher="T", base="B", data="D", out="O", num_leafs=8)


@pytest.mark.parametrize("call, want", [
    (lambda: __import__("tree_of_experts.commands.evaluate", fromlist=["x"]).evaluate(
        base="B", data="D", mixed_precision="bf16"), "toe eval: --mixed_precision has no effect here"),
    (lambda: __import__("tree_of_experts.commands.evaluate", fromlist=["x"]).evaluate(
        base="B", data="D", ceiling_only=True), "toe eval: --ceiling_only has no effect here"),
    (lambda: __import__("tree_of_experts.commands.evaluate", fromlist=["x"]).traces(
        teacher="T", data="D", out="o.jsonl", temperature=0.7), "toe traces: --temperature has no effect here"),
    (lambda: __import__("tree_of_experts.commands.extract", fromlist=["x"]).extract(
        teacher="T", base="B", data="D", out="O", skip_truncated=True), "toe extract: --skip_truncated has no effect"),
    (lambda: __import__("tree_of_experts.commands.extract", fromlist=["x"]).rebuild(
        "S", "O", device="cuda"), "toe rebuild: --device has no effect here"),
    (lambda: __import__("tree_of_experts.commands.oracle", fromlist=["x"]).oracle(
        teacher="T", base="B", experts="E", data="D", out="O", lora="L"), "toe oracle: --lora has no effect here"),
    (lambda: __import__("tree_of_experts.commands.train", fromlist=["x"]).train(
        base="B", experts="E", data="D", out="O", device="cpu"), "toe train: --device has no effect here"),
    (lambda: __import__("tree_of_experts.commands.oracle", fromlist=["x"]).oracle(
        teacher="T", base="B", experts="E", data="D", out="O", teacher_device_map="auto"),
     "toe oracle: --teacher_device_map has no effect here"),
    (lambda: __import__("tree_of_experts.commands.generate", fromlist=["x"]).generate(
        base="B", prompt="p", teacher_device_map="auto"), "toe generate: --teacher_device_map has no effect here"),
    (lambda: __import__("tree_of_experts.commands.train", fromlist=["x"]).train(
        base="B", experts="E", data="D", out="O", teacher_device_map="auto"), "off-policy training runs none"),
    (lambda: __import__("tree_of_experts.recipes.baseline", fromlist=["x"]).baseline(
        kind="lora", base="B", data="D", out="O", lora_rank=2, teacher_device_map="auto"),
     "off-policy training runs none"),
    (lambda: __import__("tree_of_experts.commands.evaluate", fromlist=["x"]).evaluate(
        base="B", data="D", teacher_device_map="auto"), "--teacher_device_map places the teacher row's model"),
])
def test_an_option_a_command_does_not_read_is_refused_never_ignored(call, want):
    with pytest.raises(ToEError, match=want):
        call()


def test_extraction_records_keep_their_flat_keys():
    """build.json of a finished extraction is compared key by key on a rerun: the keys every earlier extraction
    wrote must stay the ones written now."""
    from tree_of_experts.extraction.resume import REBUILT, build_record
    from tree_of_experts.options import Capture, Fusion, Text, Tree

    record = build_record(Text(), Tree(), Fusion(), Capture(), "float32", 0)
    assert set(record) == {"num_leaves", "shape", "selection", "top_k", "gate_rank", "sample_rate", "max_rows",
                           "signal", "signal_lambda", "limit", "heldout_frac", "max_length", "shard_size",
                           "projector_epochs", "projector_lr", "dtype", "ridge_lambdas", "seed"}
    assert record["ridge_lambdas"] == [0.25, 0.5, 1.0] and REBUILT < set(record)


def test_study_options_may_name_group_fields():
    from tree_of_experts.recipes.study_options import check_options

    check_options("extract", {"num_leaves": 8, "shard_size": 4, "batch_size": 2}, "extract")
    check_options("rebuild", {"num_leaves": 4, "shape": "deep"}, "rebuild")
    check_options("train", {"stage_a_steps": 2, "log_every": 1}, "train")
    check_options("rows.o.options", {"lambdas": [0.25], "ceiling_only": True}, "oracle")
    with pytest.raises(ToEError, match="not an option of `toe extract`"):
        check_options("extract", {"num_leafs": 8}, "extract")


def test_eval_from_the_command_line_with_flat_spellings(tmp_path, capsys):
    """A real `toe eval` run on the tiny model, every option spelled as before option groups."""
    from tree_of_experts.cli import main
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tiny_qwen2(seed=0).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    out = tmp_path / "ev"
    assert main(["eval", "--base", str(tmp_path / "base"), "--data", FIXTURE, "--out", str(out), "--limit", "2",
                 "--skip", "1", "--max_new_tokens", "3", "--batch_size", "2", "--ce_target", "gold",
                 "--dtype", "float32"]) == 0
    args = json.loads((out / "metrics.json").read_text())["args"]
    assert (args["limit"], args["skip"], args["max_new_tokens"], args["ce_target"]) == (2, 1, 3, "gold")
    assert args["routing"] == {"selection": None, "top_k": None, "top_p": None}
    capsys.readouterr()
