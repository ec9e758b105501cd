"""The package's layers: core and library below, then commands, then recipes and the CLI on top. A command never
imports another command (shared pieces live in the library layers), and nothing below the commands imports them."""

from __future__ import annotations

import ast
import pathlib

import tree_of_experts

ROOT = pathlib.Path(tree_of_experts.__file__).parent
TOP = {"commands", "recipes", "cli"}  # what the library layers must not import


def imported(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports, as dotted names below tree_of_experts (relative imports resolved)."""
    package = list(path.relative_to(ROOT).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names.update(".".join(parts + [a.name]) if not node.module else ".".join(parts)
                             for a in node.names)
            elif node.module and node.module.startswith("tree_of_experts."):
                names.add(node.module.split(".", 1)[1])
    return names


def test_commands_do_not_import_commands():
    for path in (ROOT / "commands").glob("*.py"):
        others = {n for n in imported(path) if n.split(".")[0] in {"commands", "recipes", "cli"}}
        assert not others, f"{path.name} imports {sorted(others)}: move the shared piece into a library module"


def test_library_layers_do_not_import_commands():
    for path in ROOT.rglob("*.py"):
        layer = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if layer in TOP:
            continue
        up = {n for n in imported(path) if n.split(".")[0] in TOP}
        assert not up, f"{path.relative_to(ROOT)} imports {sorted(up)}"


def test_every_cli_command_lives_in_commands_or_recipes():
    from tree_of_experts.cli import _commands

    for name, fn in _commands().items():
        module = getattr(fn, "__wrapped__", fn).__module__
        assert module.split(".")[1] in ("commands", "recipes"), f"toe {name} is defined in {module}"


def test_the_import_check_sees_relative_imports():
    # the guard itself: a relative import from a subpackage resolves to the module it names
    path = ROOT / "commands" / "train.py"
    assert "training.distill" in imported(path) and "config" in imported(path)


def test_the_commands_are_functions_of_the_package():
    import subprocess
    import sys

    import tree_of_experts
    from tree_of_experts.commands.train import train

    assert tree_of_experts.train is train and tree_of_experts.evaluate.__module__ == "tree_of_experts.commands.evaluate"
    light = subprocess.run([sys.executable, "-c", "import sys, tree_of_experts; "
                            "print(any(m.startswith('tree_of_experts.commands') for m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # importing the package does not import the commands


MAX_FUNCTION_LINES = 120  # issue #33: a function reads top to bottom in a screen or two (the commands' own ~100)
# the largest module is at most ~400 lines (issue #33)
MAX_MODULE_LINES = 400


def too_long(source: str, name: str) -> list[str]:
    """The functions and methods of ``source`` longer than MAX_FUNCTION_LINES (from the ``def`` line to the last,
    docstring included), and the module itself when it is longer than MAX_MODULE_LINES."""
    lines = len(source.splitlines())
    found = [f"{name} ({lines} lines)"] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_or_module_is_too_long():
    # the check itself first: it catches a function one line too long, nested ones too, and a long module
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    assert too_long(f"def f():\n{body}", "m") == []
    assert too_long(f"def f():\n{body}    y = 0\n", "m") == [f"m:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    nested = "class C:\n    def g(self):\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "        y = 0\n"
    assert too_long(nested, "m") == [f"m:2 g ({MAX_FUNCTION_LINES + 1} lines)"]
    assert too_long("x = 0\n" * (MAX_MODULE_LINES + 1), "m") == [f"m ({MAX_MODULE_LINES + 1} lines)"]
    found = [hit for path in sorted(ROOT.rglob("*.py"))
             for hit in too_long(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, f"split these into named steps: {found}"
