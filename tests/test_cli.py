"""The `toe` command line: option spelling, help for every option, one-line errors."""

from __future__ import annotations


def test_cli_accepts_dashes_and_positional_report_dirs():
    from tree_of_experts.cli import _normalise

    # a flat option goes to its group (`--num_leaves` is `--tree.num_leaves`), spelled with dashes or not
    assert _normalise(["extract", "--num-leaves", "8", "--out=x"]) == ["extract", "--tree.num_leaves", "8", "--out=x"]
    assert _normalise(["report", "a", "b", "--out", "r"]) == ["report", "--run_dirs", '["a", "b"]', "--out", "r"]
    # a list the shell split at its spaces, as an option value or after `=`; a comma elsewhere stays where it is
    assert _normalise(["extract", "--layers", "5,", "11,", "17", "--out", "x"]) == [
        "extract", "--capture.layers", "[5,11,17]", "--out", "x"]
    assert _normalise(["extract", "--teacher-layers=5,", "11"]) == ["extract", "--capture.teacher_layers=[5,11]"]
    assert _normalise(["extract", "--capture.layers", "5,", "11"]) == ["extract", "--capture.layers", "[5,11]"]
    assert _normalise(["eval", "--template", "Q,", "x"]) == ["eval", "--template", "Q,", "x"]


def test_cli_every_option_has_its_own_help():
    """`toe --help` shows each docstring's first line, `toe CMD --help` each `Args:` entry: the first line must be
    one whole sentence, and every parameter needs an entry of its own (one shared by several shows on none)."""
    import inspect

    from docstring_parser import parse

    from tree_of_experts.cli import _commands

    for name, fn in _commands().items():
        lines = inspect.cleandoc(fn.__doc__).splitlines()
        assert lines[0].endswith(".") and len(lines[0]) <= 90 and (len(lines) == 1 or not lines[1].strip()), name
        described = {p.arg_name: p.description for p in parse(fn.__doc__).params}
        assert set(described) == set(inspect.signature(fn).parameters), (name, set(described))
        assert all(d and d.strip() for d in described.values()), name


def test_cli_errors_are_one_line(capsys, tmp_path):
    from tree_of_experts.cli import main

    assert main(["generate", "--base", str(tmp_path), "--plugin", str(tmp_path / "none"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toe: error:")


def test_a_typed_backslash_n_in_a_template_is_a_newline():
    from tree_of_experts.cli import _normalise

    typed = "Question: {prompt}" + "\\" + "nAnswer: "  # what a shell passes for "Question: {prompt}\nAnswer: "
    assert _normalise(["eval", "--template", typed]) == ["eval", "--template", "Question: {prompt}\nAnswer: "]
    assert _normalise(["eval", f"--template={typed}"]) == ["eval", "--template=Question: {prompt}\nAnswer: "]
    assert _normalise(["eval", "--template", "chat"]) == ["eval", "--template", "chat"]


def test_generate_labels_several_completions_and_refuses_a_zero_budget(tmp_path, capsys):
    """Several prompts or samples print under a header each (one prints bare); a zero token budget is one line, not
    transformers' traceback."""
    from tree_of_experts.cli import _show, main

    _show([{"prompt": "a\nb", "sample": 0, "completion": "one"}, {"prompt": "a\nb", "sample": 1, "completion": "two"}])
    assert capsys.readouterr().out == "=== 'a b', sample 0 ===\none\n\n=== 'a b', sample 1 ===\ntwo\n"
    _show([{"prompt": "a", "completion": "only"}])
    assert capsys.readouterr().out == "only\n"
    assert main(["generate", "--base", str(tmp_path), "--prompt", "x", "--max_new_tokens", "0"]) == 2
    assert "max_new_tokens=0" in capsys.readouterr().err


def test_help_shows_a_default_template_as_it_is_typed(capsys):
    """`toe train --help` shows the default template's newline as `\\n` (what the option takes), not as a space."""
    import pytest

    from tree_of_experts.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "default: Question: {prompt}" + "\\" + "nAnswer: )" in out


def test_bad_options_give_one_line_naming_the_fix(capsys):
    """A typo'd option, an abbreviation, a value of the wrong type, an unknown command: one line each, exit code 2,
    never jsonargparse's usage dump or a guessed option."""
    from tree_of_experts.cli import main

    cases = {("train", "--objetive", "on_policy"): "unrecognized arguments: --objetive on_policy (see `toe train --help`)",
             ("train", "--max_step", "3"): "unrecognized arguments: --max_step 3",
             ("train", "--max_steps", "x"): "--max_steps x: expected int (see `toe train --help`)",
             ("extract", "--layers", "a,b"): "--layers a,b: expected list[int], None",
             ("trian",): "invalid choice: 'trian'"}
    for argv, want in cases.items():
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and len(err.splitlines()) == 1, err
    assert "(see `toe --help`)" in (main(["trian"]), capsys.readouterr().err)[1]
