"""Output folders: which command's run a folder holds, what --overwrite may replace and --resume continue, and the
checks of a command's input folders and resumed arguments."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import ToEError
from .files import read_json
from .locks import HELD_LOCKS, LOCK_SCOPE, OutLock, take_lock
from .run_kinds import (
    FINISHED,
    REPLACES_ITSELF,
    RESUME_MARKER,
    RESUMES_BY_RERUN,
    RUN_FILES,
    describe,
    folder_kind,
    kind_of,
    run_files,
    same_file,
    top_stats,
)

log = logging.getLogger(__name__)


RUN_FILES["rebuild"] = RUN_FILES["extract"]


def _claimed_here(folder: str) -> bool:
    """Whether this process holds the lock of ``folder`` or of a folder above it (a command writing its run)."""
    return any(lock.held and inside(folder, lock.out) is not None for lock in list(HELD_LOCKS.values()))


def check_plugin_out(directory: str | os.PathLike) -> None:
    """Refuses to save a plug-in into a folder holding another kind of run (an extraction, whose untrained plug-in
    `toe train` starts from; an eval; a training checkpoint...), naming it; a plug-in folder is replaced. A command
    saving into the folder it claimed (:func:`claim_out`) has applied the policy already."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory) or _claimed_here(directory):
        return
    kind, evidence = folder_kind(directory)
    if kind in (None, "plugin"):
        return
    raise ToEError(f"save_pretrained: {directory} holds {describe(kind)} ({', '.join(evidence[:4])}), not a plug-in "
                   "folder: save into a new folder (its own files would be replaced or mixed with the plug-in's)")


def claim_out(out: str | os.PathLike, command: str, *, overwrite: bool = False, resume: bool = False,
              inputs: Mapping[str, Any] | None = None, extra: Iterable[str] = (), keep: Iterable[str] = (),
              lock: bool = True) -> OutLock | None:
    """Checks that ``command`` may write into the folder ``out`` and locks it for the run; call it before any model
    is loaded, from a command decorated with :func:`releases_out_locks`.

    Refuses, with one line naming the folder and the options: ``out`` being one of the command's ``inputs``
    ({option: path}) or holding one where ``overwrite`` would remove it or the run write over it, an existing file,
    a folder another process is writing into (its :class:`OutLock`), a folder holding another kind of run
    (:func:`folder_kind`) or files the command does not write (both even with ``overwrite``), or a folder holding a
    run of this command unless ``overwrite`` (its files, see ``RUN_FILES``, and ``extra`` names are then removed) or
    it may continue it (``resume``; an extraction rerun; a report regenerated). ``keep``: names ``overwrite`` leaves
    in place (what a resumed run reuses). ``lock``: False checks only (the other processes of a multi-process run,
    whose main process holds the lock). A command re-entering a folder its process claimed (a recipe's step) skips
    the kind checks; the first claim records the kind of run in RECORD_NAME when the run has written its files.

    Returns:
        The lock (None without ``lock``), held until the decorated command returns; called outside one, release
        it yourself (``with claim_out(...):``).
    """
    out = os.fspath(out)
    _check_inputs(out, command, inputs or {}, overwrite, extra)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ToEError(f"--out {out} is a file: pass a folder")
    held = take_lock(out) if lock else None
    reentered = held is not None and held._depth > 1  # a recipe's command writing into its own claimed folder
    try:  # checked under the lock: no other run changes the folder between the check and the writes
        _check_out(out, command, overwrite, resume, extra, keep, reentered)
    except BaseException:
        if held is not None:
            held.release()
        raise
    if held is not None and not reentered:
        held.command, held._before = command, top_stats(out)
    scope = LOCK_SCOPE.get()
    if held is not None and scope is not None:
        scope.append(held)
    return held


def local_path(value: Any) -> str | None:
    """The local file or folder an input option names (``hf:FOLDER[:SPLIT]`` data included), None for a hub id."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    value = os.fspath(value)
    if value.startswith("hf:") and not os.path.exists(value):
        value = value[3:].split(":")[0]
    return value if os.path.exists(value) else None


def inside(path: str, folder: str) -> str | None:
    """``path``'s first name under ``folder`` ("." for the folder itself); None when it lies outside."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    if path == folder:
        return "."
    if not path.startswith(folder.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(path, folder).split(os.sep)[0]


def _check_inputs(out: str, command: str, inputs: Mapping[str, Any], overwrite: bool, extra: Iterable[str]) -> None:
    """Refuses an input that is the output folder, or lies inside it where the run would remove (``overwrite``) or
    write over it (a name of the command's own files): nothing a command reads is lost to its output."""
    if not os.path.isdir(out):
        return
    writes = set(RUN_FILES.get(command, ())) | set(extra)
    for option, value in inputs.items():
        path = local_path(value)
        top = inside(path, out) if path else None
        if top is None:
            continue
        if top == ".":
            if os.path.isdir(path):
                raise ToEError(f"--out {out} is the --{option} folder: write to a new folder (the command would "
                               "replace files it reads)")
            continue
        if overwrite or any(fnmatch.fnmatchcase(top, p) for p in writes):
            how = "--overwrite would remove it" if overwrite else f"`toe {command}` writes {top} there"
            raise ToEError(f"--{option} {value} lies inside --out {out} ({how}): an output folder never takes a "
                           "command's inputs: move it out, or pass a new --out")


def _check_out(out: str, command: str, overwrite: bool, resume: bool, extra: Iterable[str],
               keep: Iterable[str], reentered: bool = False) -> None:
    found = run_files(out)
    if not found:
        return
    kind, evidence = folder_kind(out)
    if not reentered and kind is not None and kind != kind_of(command):
        shown = ", ".join(evidence[:4])
        resumes = "; --resume continues only its own runs" if command in RESUME_MARKER else ""
        raise ToEError(f"{out} holds {describe(kind)} ({shown}), not a `toe {command}` run: pass a new --out "
                       f"(--overwrite replaces only a `toe {command}` run's files{resumes})")
    own = set(run_files(out, command))
    foreign = [n for n in found if n not in own]
    if foreign and not reentered:  # no command of this kind wrote them: --overwrite would not remove them either
        raise ToEError(f"{out} holds files that a `toe {command}` run does not write ({', '.join(foreign[:4])}): "
                       f"--overwrite removes only a `toe {command}` run's files: move them, or pass a new --out")
    if overwrite:
        doomed = [n for n in found if n not in keep] + [n for n in extra if n not in keep and n not in found
                                                        and os.path.lexists(os.path.join(out, n))]
        log.info("--overwrite: removing %s from %s", ", ".join(doomed), out)
        for name in doomed:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        return
    markers = RESUME_MARKER.get(command, ())
    has_run = any(os.path.isfile(os.path.join(out, m)) for m in markers)
    if not foreign and has_run and (resume or command in RESUMES_BY_RERUN):
        return
    if not foreign and command in REPLACES_ITSELF:
        return
    shown = ", ".join((foreign or found)[:4]) + (", ..." if len(foreign or found) > 4 else "")
    if command in ("train", "baseline", "eval"):
        finished = FINISHED.get(command)
        if resume and not foreign and not has_run:
            what = (f"a finished {command} run ({finished}): nothing to resume" if finished and
                    os.path.isfile(os.path.join(out, finished)) else f"{shown} but no {command} run to continue")
            raise ToEError(f"--resume: {out} holds {what}; pass --overwrite true to redo it, or a new --out")
        if foreign:
            how = f", --resume only continues a run of the same command ({', '.join(foreign[:3])} are not)"
        else:
            how = ", --resume true to continue it (same arguments)" if has_run else ""
        raise ToEError(f"{out} holds another run's files ({shown}): pass --overwrite true to replace them{how}, or a "
                       "new --out")
    if command in RESUMES_BY_RERUN:
        raise ToEError(f"{out} holds files of a run that is not a `toe {command}` ({shown}): pass --overwrite true to "
                       "replace them, or a new --out (an extraction resumes when rerun with the same settings)")
    raise ToEError(f"{out} holds another run's files ({shown}): pass --overwrite true to replace them, or a new --out")


def check_file_out(path: str | os.PathLike, option: str = "out") -> None:
    """Refuses, before any work, an output file whose folder cannot be made or written (the first existing folder
    above it is a file, or not writable); missing folders are created when the first bytes are written."""
    path = os.fspath(path)
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ToEError(f"--{option} {path}: {existing} is a file, not a folder: pass a path inside a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ToEError(f"--{option} {path}: {existing} is not writable: pass a path in a folder you can write to")


SUMMARIES = ("train_summary.json", "baseline_summary.json")  # a finished training (`toe train`, `toe baseline`)
TRAINED = ("train_args.json", *SUMMARIES)


def run_summary(folder: str | os.PathLike) -> str | None:
    """The summary a finished training wrote in ``folder`` (None: not finished, or no run there)."""
    return next((p for p in (os.path.join(os.fspath(folder), n) for n in SUMMARIES) if os.path.isfile(p)), None)


BANK_KEY = "experts_bank_sha256"  # in train_args.json: the build of the extraction a plug-in was trained from
BUILD_KEY = "experts_build"  # and the settings it was captured and built with (run.json and build.json)
DAMAGED = "the extraction is damaged: extract again into a new --out"
MACHINE_FIELDS = ("teacher", "base")  # where the models were read from: another machine has other paths (their
# architecture fingerprints stay in the record)


def bank_fingerprint(experts: str | os.PathLike) -> str | None:
    """sha256 of an extraction's initial plug-in (its bank, gate and scales): the same for a rebuild that makes the
    same bank, another when a rebuild (a new rule, other options in place) changed it; None before it is built."""
    from safetensors import safe_open

    path = os.path.join(os.fspath(experts), "toe_model.safetensors")
    if not os.path.isfile(path):
        return None
    h, block = hashlib.sha256(), 1 << 18
    with safe_open(path, "pt") as f:  # the tensors, not the file's bytes (its metadata may differ)
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous().view(-1)  # memory-mapped: a GB-scale bank is not read whole
            raw = t.view(torch.uint8) if t.numel() else t
            h.update(f"{name}:{t.dtype}:{tuple(f.get_slice(name).get_shape())}".encode())
            n = raw.numel()
            size = n if n <= 64 * block else block  # a large tensor: 64 spread slices stand for it
            for start in ([0] if size == n else [i * (n - block) // 63 for i in range(64)]):
                h.update(raw[start:start + size].numpy().tobytes())
    return h.hexdigest()


def build_settings(experts: str | os.PathLike) -> dict | None:
    """What an extraction was captured and built with: its run.json (the models' paths aside) and build.json, a long
    list (a state sample's examples) by its sha256; None before it is built."""
    ex = os.fspath(experts)
    run, build = os.path.join(ex, "run.json"), os.path.join(ex, "build.json")
    if not (os.path.isfile(run) and os.path.isfile(build)):
        return None

    def short(v: Any) -> Any:
        return "sha256:" + hashlib.sha256(json.dumps(v).encode()).hexdigest() if isinstance(v, list) and \
            len(v) > 64 else v

    return {"capture": {k: short(v) for k, v in read_json(run, DAMAGED).items() if k not in MACHINE_FIELDS},
            "build": {k: short(v) for k, v in read_json(build, DAMAGED).items()}}


def check_same_build(run: str | os.PathLike, experts: str | os.PathLike, what: str, finished_ok: bool = False) -> None:
    """Refuses, in one line, a run trained from an earlier build of ``experts`` than the folder now holds: another
    bank (sha256) made with other settings (a finished run is not reused; an interrupted one does not resume). A bank
    that differs while every setting is the same is the extraction captured again (another machine: float order
    moves the states and the 2-means splits built on them) and the run stands; a change of the build's code under
    the same settings is not seen. Runs that predate the record pass; so does, with a warning, a finished run that
    records the sha256 alone when ``finished_ok`` (a study's kept row it does not rerun)."""
    path = os.path.join(os.fspath(run), "train_args.json")
    if not os.path.isfile(path):
        return
    args = read_json(path, "delete the run to train it again")
    saved, now = args.get(BANK_KEY), bank_fingerprint(experts)
    if not saved or not now or saved == now:
        return
    before, settings = args.get(BUILD_KEY), build_settings(experts)
    if before is not None and settings is not None:
        before, settings = _flat(before), _flat(settings)
        changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
        if not changed:
            log.info("%s: %s was captured or built again with the same settings (its bank differs in float order): "
                     "the run stands", os.fspath(run), os.fspath(experts))
            return
        raise ToEError(f"{os.fspath(run)} was trained from an earlier build of {os.fspath(experts)} (other settings: "
                       f"{', '.join(changed[:4])}): {what}")
    if finished_ok and run_summary(run):
        log.warning("%s was trained from a build of %s with another sha256 and records none of its settings (an "
                    "older run): kept as it is; if the extraction was rebuilt with other settings, %s",
                    os.fspath(run), os.fspath(experts), what)
        return
    raise ToEError(f"{os.fspath(run)} was trained from an earlier build of {os.fspath(experts)} (its bank has "
                   f"changed since): {what}")


def _flat(settings: dict) -> dict:
    """:func:`build_settings` as {"capture.layers": ..., "build.seed": ...}."""
    return {f"{part}.{k}": v for part, fields in settings.items() for k, v in fields.items()}


def check_extraction(experts: str | os.PathLike, option: str = "experts") -> None:
    """Refuses an ``--experts`` folder that is not a `toe extract` (or `toe rebuild`) output, naming what it is: a
    trained plug-in in its place would silently run without route labels or the teacher's cache."""
    experts = os.fspath(experts)
    if not os.path.isdir(experts):
        raise ToEError(f"--{option} {experts} is not a folder: pass a `toe extract` output folder")
    names = set(os.listdir(experts))
    trained = sorted(names & set(TRAINED))
    if trained:
        what = "holds a trained plug-in" if "run.json" not in names else "had a training run written into it"
        raise ToEError(f"--{option} {experts} {what} ({trained[0]}), not an extraction's untrained one: pass the "
                       "`toe extract` folder it was trained from (train_args.json names it)")
    if "run.json" not in names:
        raise ToEError(f"--{option} {experts} is not a `toe extract` output (no run.json): run `toe extract` first "
                       "and pass its --out")
    read_json(os.path.join(experts, "run.json"), DAMAGED)
    route, config = os.path.join(experts, "route_data.safetensors"), os.path.join(experts, "toe_config.json")
    if os.path.isfile(route) and os.path.isfile(config):  # its plug-in must be the one its route data was built for
        from safetensors import safe_open

        layers = read_json(config, "the extraction's plug-in is damaged: extract again into a new --out").get("layers")
        try:
            with safe_open(route, "pt") as f:
                routed = sorted(int(k.split(".")[1]) for k in f.keys() if k.startswith("leaf."))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a damaged file)
            raise ToEError(f"{route} is unreadable ({e}): extract again into a new --out") from None
        if sorted(layers or []) != routed:
            raise ToEError(f"--{option} {experts}: its plug-in (toe_config.json) injects at layers {layers} but its "
                           f"route data was built for {routed}: another plug-in was saved into this folder: extract "
                           "again into a new --out")


# What a resumed run may change: where and how often it reports and saves, the flags that say how to treat the
# folder, the folder's own path (a run moved elsewhere is the same run) and how it spends memory where the gradients
# stay the same (recomputed activations; not micro-batches, whose plug-in usage term is each one's own).
RESUMABLE_CHANGES = ("resume", "overwrite", "log_every", "save_every", "snapshot_every", "out", "report_to",
                     "gradient_checkpointing", "teacher_device_map")


def check_resume_args(path: str | os.PathLike, args: Mapping[str, Any], defaults: Mapping[str, Any],
                      ignore: Iterable[str] = RESUMABLE_CHANGES) -> None:
    """Refuses to continue the run whose arguments are saved in ``path`` with other ``args``, naming the ones that
    differ. ``defaults`` ({name: default}) stands in for an argument the saved file predates; arguments that are
    not plain JSON values (a loaded model passed from Python) are not compared."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return
    saved = read_json(path, "the run's arguments are lost: start it again without --resume (and with --overwrite)")
    skip = set(ignore)
    differ = []
    for name, value in args.items():
        if name in skip or name not in defaults or not _plain(value):
            continue
        before = saved.get(name, defaults[name])
        if not _equal(before, value):
            differ.append(f"--{name} {_show(before)} -> {_show(value)}")
    if differ:
        raise ToEError(f"--resume with other arguments than {os.path.dirname(path) or '.'} was started with "
                       f"({'; '.join(differ)}): rerun with the original arguments, or drop --resume and pass "
                       "--overwrite true to start again")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    return False


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, tuple):
        b = list(b)
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(b):  # the same file by another spelling
        return os.path.exists(a) and same_file(a, b)
    return False


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
