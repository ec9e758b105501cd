"""`toe` command line: one typed library function per subcommand (jsonargparse gives --config and --print_config)."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import sys
import typing
import warnings
from argparse import ArgumentError

from .errors import ToEError


def _commands() -> dict:
    from .commands.bench import bench
    from .commands.evaluate import eval_from_traces, evaluate, traces
    from .commands.export import export
    from .commands.extract import extract, rebuild
    from .commands.generate import generate
    from .commands.hub import inspect, push
    from .commands.oracle import oracle
    from .commands.report import report
    from .commands.train import train
    from .recipes.baseline import baseline
    from .recipes.demo import demo
    from .recipes.study import study

    commands = {"generate": generate, "extract": extract, "rebuild": rebuild, "train": train, "eval": evaluate,
                "traces": traces, "eval-traces": eval_from_traces, "report": report, "demo": demo,
                "baseline": baseline, "oracle": oracle, "bench": bench, "inspect": inspect, "export": export,
                "push": push, "study": study}
    return {name: _as_command(fn) for name, fn in commands.items()}


def _as_command(fn):
    """``fn`` as the command line shows it: a parameter that also takes a loaded model from Python (``str |
    nn.Module``) takes a hub id or folder there, so `--help` does not list every torch Module class."""
    import torch

    sig, hints = inspect.signature(fn), typing.get_type_hints(fn)

    def plain(t):
        args = typing.get_args(t)
        if torch.nn.Module not in args:
            return t
        return str | None if type(None) in args else str

    params = [p.replace(annotation=plain(hints.get(p.name, p.annotation))) for p in sig.parameters.values()]
    if all(p.annotation is hints.get(p.name, p.annotation) for p in params):
        return fn

    @functools.wraps(fn)
    def command(*args, **kwargs):
        return fn(*args, **kwargs)

    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {**{p.name: p.annotation for p in params}, "return": hints.get("return")}
    return command


def _report_positionals(argv: list[str]) -> list[str]:
    """`toe report A B --out X` -> `toe report --run_dirs '["A", "B"]' --out X`."""
    dirs, rest, i = [], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            rest.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                rest.append(argv[i + 1])
                i += 1
        else:
            dirs.append(arg)
        i += 1
    if not dirs and any(a.split("=")[0] in ("--run_dirs", "--run-dirs") for a in rest):
        return argv
    return ["report", "--run_dirs", json.dumps(dirs), *rest]  # none: report() says how to pass them


def _int_list(value: str) -> str:
    """`9` or `5,11,17` -> `[9]` / `[5,11,17]`; anything else (already a list, a typo) goes to the parser as is."""
    return f"[{value}]" if re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", value) else value


def _str_list(value: str) -> str:
    """`a:b,c:d` -> `["a:b", "c:d"]`; a JSON list goes to the parser as is."""
    return value if value.lstrip().startswith("[") else json.dumps([v.strip() for v in value.split(",") if v.strip()])


def _unescape(value: str) -> str:
    """A typed `\\n` (shells pass it as two characters) is a newline."""
    return value.replace("\\n", "\n").replace("\\t", "\t")


# Options whose value is rewritten before parsing: integer lists that also take `9` or `5,11,17`, string lists that
# also take `a:b,c:d`, and prompt templates.
CONVERT = {"--layers": _int_list, "--teacher_layers": _int_list, "--batches": _int_list,
           "--routing_exponents": _int_list, "--seeds": _int_list, "--pairs": _str_list, "--rows": _str_list,
           "--targets": _str_list, "--parts": _str_list, "--template": _unescape}


LISTS = tuple(k for k, f in CONVERT.items() if f in (_int_list, _str_list))  # options whose value is a comma list


def _join_split_lists(argv: list[str]) -> list[str]:
    """`--layers 5, 11, 17` (the shell split the list at its spaces) -> `--layers 5,11,17`."""
    out: list[str] = []
    for arg in argv:
        owner = out[-1] if out and "=" in out[-1] else (out[-2] if len(out) > 1 else "")
        if out[-1:] and out[-1].endswith(",") and not arg.startswith("-") and \
                "--" + owner[2:].partition("=")[0].replace("-", "_").rpartition(".")[2] in LISTS:
            out[-1] += arg
        else:
            out.append(arg)
    return out


def _normalise(argv: list[str]) -> list[str]:
    """Accepts --num-leaves as well as --num_leaves, `--layers 5,11,17` (or `9`, or `5, 11, 17`) for a list of
    layers, `--pairs a:b,c:d`, `--template "Q: {prompt}\nA: "` (a typed backslash-n is a newline), and `toe report
    DIR DIR ...` (positional run folders)."""
    if argv[:1] == ["report"]:
        argv = _report_positionals(argv)
    if argv[:1] == ["study"] and len(argv) > 1 and not argv[1].startswith("-"):  # `toe study CONFIG --out DIR`
        argv = ["study", "--file", argv[1], *argv[2:]]
    owner = getattr(_commands().get(argv[0]), "option_owner", {}) if argv else {}
    out: list[str] = []
    for arg in _join_split_lists(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if name == "config" and eq and owner:
                value = _nested_config(value, owner)
            convert = CONVERT.get("--" + name.rpartition(".")[2])
            name = "--" + (f"{owner[name]}.{name}" if name in owner else name)  # --beta: --loss.beta
            arg = name + eq + (convert(value) if eq and convert else value)
        elif out and out[-1] == "--config" and owner:
            arg = _nested_config(arg, owner)
        elif out and CONVERT.get("--" + out[-1][2:].rpartition(".")[2]):
            arg = CONVERT["--" + out[-1][2:].rpartition(".")[2]](arg)
        out.append(arg)
    return out


def _nested_config(path: str, owner: dict[str, str]) -> str:
    """A run config written with the flat option names of earlier releases (``max_steps: 50``) as the option
    groups read it (``schedule: {max_steps: 50}``); a nested one, or one that is not a readable file, as given."""
    import os

    import yaml

    if not os.path.isfile(path):
        return path
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError:
            return path  # jsonargparse says what is wrong with it
    if not isinstance(cfg, dict) or not any(k in owner for k in cfg):
        return path
    nested: dict = {}
    for key, value in cfg.items():
        if key in owner:
            nested.setdefault(owner[key], {})[key] = value
        else:
            nested[key] = value
    for group, fields in nested.items():
        if group in owner.values() and isinstance(cfg.get(group), dict):
            fields.update(cfg[group])
    return yaml.safe_dump(nested, sort_keys=False)


def _help_formatter():
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """Shows a default holding a newline or tab as typed on the command line (``\\n``), not as a space."""

        def _get_help_string(self, action) -> str:
            text = super()._get_help_string(action)
            if isinstance(action.default, str) and ("\n" in action.default or "\t" in action.default):
                typed = action.default.replace("\n", "\\n").replace("\t", "\\t").replace("%", "%%")
                text = text.replace("%(default)s", typed)
            return text

    return HelpFormatter


def _show(result) -> None:
    if result is None:
        return
    if isinstance(result, dict) and "summary" in result and isinstance(result["summary"], str):
        print(result["summary"])
        return
    if isinstance(result, dict) and "rows" in result and isinstance(result["rows"], list):
        print(f"results in {result.get('out') or result.get('markdown')}")
        return
    if isinstance(result, list) and result and isinstance(result[0], dict) and "completion" in result[0]:
        if len(result) == 1:
            print(result[0]["completion"])
            return
        for i, row in enumerate(result):  # several prompts or samples: each under a header saying which
            prompt = " ".join(row["prompt"].split())
            prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            sample = f", sample {row['sample']}" if "sample" in row else ""
            print(f"{'' if i == 0 else chr(10)}=== {prompt!r}{sample} ===")
            print(row["completion"])
        return
    print(json.dumps(result, indent=2, default=str))


def _lm_eval(argv: list[str]) -> None:
    """`toe lm-eval ARGS`: lm-eval's own CLI with model type ``toe`` registered, ARGS passed as given (lm-eval has no
    discovery of models outside its source tree)."""
    try:
        from .harness import cli
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ToEError("toe lm-eval needs lm-eval: pip install 'tree-of-experts[lmeval]'") from None
    cli(argv)


def _close_progress_bars() -> None:
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _argument_error(e: Exception) -> str:
    """jsonargparse's multi-line type error in one line: ``--KEY VALUE: expected TYPES``."""
    text = str(e)
    required = re.match(r"the following arguments are required: (.*)", text.strip())
    if required:  # `train.experts, train.out` -> `--experts, --out`
        names = [f"--{name.strip().split('.')[-1]}" for name in required.group(1).split(",")]
        return f"missing {', '.join(names)}"
    key = re.match(r'Parser key "([^"]+)":', text)
    if not key:
        return text.strip().splitlines()[0] if text.strip() else type(e).__name__
    value = re.search(r"(?:Given value|Got value): (.*)", text)
    choices = re.search(r"Expected a typing\.Literal\[(.*?)\]", text)
    if choices:  # a choice out of its Literal
        return f"--{key.group(1)} {value.group(1).strip() if value else ''}: use one of {choices.group(1)}"
    types = re.search(r"Subtypes: \[(.*)\]", text) or re.search(r"Expected a (<class '[^']+'>|\S+)", text)
    wanted = re.sub(r"<class '([^']+)'>", r"\1", types.group(1)).replace("NoneType", "None") if types else "another type"
    return f"--{key.group(1)} {value.group(1).strip() if value else ''}: expected {wanted}".replace(" :", ":")


def _as_typed(message: str, argv: list[str]) -> str:
    """An error's ``--group.field`` as the user spelled it: ``--field`` where that is what the command line says."""
    typed = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}

    def spelled(m: re.Match) -> str:
        name = m.group(1)
        leaf = name.rpartition(".")[2]
        return f"--{leaf}" if name not in typed and leaf in typed else f"--{name}"

    return re.sub(r"--([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)", spelled, message)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # an option group's help is in its fields

    # toe's own progress at INFO; other libraries' INFO chatter (e.g. a temp folder's "weights saved to") stays quiet
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tree_of_experts").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"toe {__version__}")
        return 0

    from .training.steps import flush_denormals

    flush_denormals()  # every command: subnormal floats slow CPU matmuls many-fold
    # peft reads transformers' renamed `is_gradient_checkpointing` on every model it wraps: a warning at every step
    # of a study that no command line can act on (the library's Python API leaves the user's warnings alone)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        if argv[:1] == ["lm-eval"]:
            _lm_eval(argv[1:])
            return 0
        result = CLI(_commands(), args=_normalise(argv), as_positional=False, formatter_class=_help_formatter(),
                     exit_on_error=False, allow_abbrev=False,  # a typo'd option is an error, never a guess
                     epilog="toe lm-eval ARGS: lm-eval's own command line with the model type `toe` registered "
                            "(e.g. --model toe --model_args base=B,plugin=P --tasks gsm8k)")
    except ArgumentError as e:
        command = next((a for a in argv if not a.startswith("-")), None)
        known = command in _commands() if command else False
        where = f"toe {command} --help" if known and "invalid choice" not in str(e) else "toe --help"
        hint = ""
        if argv[:1] and argv[0].startswith("--config"):  # a config that names no subcommand
            hint = "; a config goes after its command: toe CMD --config FILE (`toe CMD --print_config` writes one)"
        print(f"toe: error: {_as_typed(_argument_error(e), argv).rstrip('.')}{hint} (see `{where}`)", file=sys.stderr)
        return 2
    except ToEError as e:
        _close_progress_bars()  # a bar left open would redraw after the error and hide it
        print(f"toe: error: {e}", file=sys.stderr)
        return 2
    _show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
