"""The options a study passes to the package's commands (``extract``, ``train``, ``lora`` and each row's own):
each must be a parameter of the command's library function that the study leaves free, checked before any model
loads (:class:`.study_config.StudyConfig` calls :func:`check_row_options`)."""

from __future__ import annotations

from difflib import get_close_matches

from ..errors import ToEError

# Options the study sets itself: a config that sets them too would be ignored or contradict the plan.
STUDY_SETS = {"base", "teacher", "experts", "data", "out", "source", "max_steps", "batch_size", "seed", "template",
              "prompt_field", "response_field", "max_length", "resume", "overwrite", "kind", "lora_rank", "objective",
              "base_adapter", "plugin", "layers", "dtype", "snapshot_every", "teacher_device_map", "dry_run",
              "ce_target"}
# other libraries' names for an option (transformers' TrainingArguments, peft's LoraConfig): what an error suggests
ALIASES = {"learning_rate": "lr", "num_train_epochs": "budget.epochs",
           "per_device_train_batch_size": "budget.batch_size", "train_batch_size": "budget.batch_size"}
EXTRACT_FREE = {"batch_size", "seed"}  # an extraction's own batch size and seed are its to choose


def command_fn(command: str):
    """The library function of the package command ``command`` (imported when first asked: it loads torch and more)."""
    from importlib import import_module

    module = {"extract": "commands.extract", "rebuild": "commands.extract", "train": "commands.train",
              "baseline": "recipes.baseline", "oracle": "commands.oracle"}[command]
    return getattr(import_module(f"..{module}", __package__), command)


def check_options(where: str, options: dict, command: str) -> None:
    """Every key of ``options`` is a parameter of the library function of ``command`` that the study leaves free."""
    from ..options import option_names

    fn = command_fn(command)
    params = option_names(fn)
    for key in options:
        if key in STUDY_SETS and not (command == "extract" and key in EXTRACT_FREE):
            raise ToEError(f"{where}.{key}: the study sets {key} itself (pair, data, budget, row fields): remove it")
        if key not in params:
            free = sorted(params - STUDY_SETS)
            alias = ALIASES.get(key, "")
            budget = alias.startswith("budget.") and command not in ("extract", "rebuild")  # those have their own
            close = [alias] if alias in free or budget else \
                list(dict.fromkeys([p for p in free if p[:4] == key[:4]] + get_close_matches(key, free, 3, 0.7)))[:3]
            raise ToEError(f"{where}.{key}: not an option of `toe {command}`" +
                           (f" (did you mean {', '.join(close)}?)" if close else ""))
    if command in ("extract", "rebuild"):  # (a training's values are checked per row: check_row_values)
        check_values(where, options, fn, {})


def check_values(where: str, options: dict, fn, implied: dict) -> None:
    """The values of ``options`` (with ``implied``: what the study sets for the row, its objective) that belong to an
    option group of ``fn``, checked by building the group (its one-line range, type and cross-field checks), so a
    bad value fails before the study runs anything rather than when its step starts."""
    import dataclasses
    import inspect

    params, by_group = inspect.signature(fn).parameters, {}
    owner = getattr(fn, "option_owner", {})
    for key, value in {**{k: v for k, v in implied.items() if k in owner}, **options}.items():
        if key in owner:
            by_group.setdefault(owner[key], {})[key] = value
    for group, fields in by_group.items():
        try:
            dataclasses.replace(params[group].default, **fields)
        except (ToEError, TypeError, ValueError) as e:
            text = [k for k, v in fields.items() if isinstance(v, str) and _is_number(v)]
            hint = f" (YAML reads {fields[text[0]]} as text: write it with a decimal point, e.g. 1.0e-3)" if text else ""
            raise ToEError(f"{where}: {str(e).splitlines()[0]}{hint}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_row_options(cfg) -> None:
    """The option groups of a :class:`.study_config.StudyConfig` and of each of its rows."""
    def check_accumulation(where: str, options: dict) -> None:
        k = options.get("gradient_accumulation_steps", 1)
        if not isinstance(k, int) or k < 1 or cfg.budget.batch_size % k:
            raise ToEError(f"{where}.gradient_accumulation_steps {k!r}: give a divisor of budget.batch_size "
                           f"({cfg.budget.batch_size})")

    for group, fn in (("extract", "extract"), ("train", "train"), ("lora", "baseline")):
        check_options(group, getattr(cfg, group), fn)
        check_accumulation(group, getattr(cfg, group))
    for r in cfg.rows:
        command = "baseline" if r.kind in ("lora", "control") else "oracle" if r.kind == "oracle" else "train"
        check_options(f"rows.{r.name}.options", r.options, command)
        check_accumulation(f"rows.{r.name}.options", r.options)
        check_row_values(cfg, r, command)
        if r.extract:
            if not r.layers:
                raise ToEError(f"rows.{r.name}.extract: only a row with layers reads an extraction")
            if r.kind == "oracle":
                raise ToEError(f"rows.{r.name}.extract: an oracle reads its plug-in row's extraction: give the "
                               "options to that row")
            check_options(f"rows.{r.name}.extract", r.extract, "extract")
        if r.rebuild:
            if r.kind not in ("toe", "control", "toe_on_lora"):
                raise ToEError(f"rows.{r.name}.rebuild: only a plug-in row has a bank to rebuild")
            check_options(f"rows.{r.name}.rebuild", r.rebuild, "rebuild")
        given = {**cfg.lora, **r.options} if r.kind == "lora" else {}
        cached = [k for k in ("kd_weight", "state_loss_weight") if given.get(k)]
        if cached and not r.layers and r.objective == "off_policy":
            raise ToEError(f"rows.{r.name}: {cached[0]} {given[cached[0]]} reads what an extraction cached (the "
                           "teacher's top-k, its states): give the row layers (the extraction's), or set "
                           f"{cached[0]} 0")


def check_row_values(cfg, row, command: str) -> None:
    """The option values ``row`` trains (or is scored) with: its group's (``lora`` or ``train``) under its own, with
    its objective, as the study will pass them."""
    from ..options import option_names

    fn = command_fn(command)
    takes = option_names(fn)  # the control takes the part of the train group its command has
    group = {} if row.kind == "oracle" else cfg.lora if row.kind == "lora" else cfg.train
    name, implied = "lora" if row.kind == "lora" else "train", {"objective": row.objective}
    if group:  # the group's own values first, so an error names where the value is
        check_values(f"{name} (row {row.name})", {k: v for k, v in group.items() if k in takes}, fn, implied)
    merged = {k: v for k, v in {**group, **row.options}.items() if k in takes}
    check_values(f"rows.{row.name}.options", merged, fn, implied)
