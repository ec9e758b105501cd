"""Files on disk: atomic writes (nothing is left half-written if a run dies mid-way, modes follow the umask, data is
fsynced before the rename) and the output-folder guard every command calls before it loads a model, which also
locks the folder for the command's run (one run per folder)."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import fnmatch
import functools
import json
import logging
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from .errors import ToEError
from .tensorfile import write_tensors

log = logging.getLogger(__name__)


# -- atomic writes -------------------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Gives ``path`` (a file, or a folder and everything under it) the modes a plain ``open()``/``mkdir()`` would
    have given it under the process umask: for what is made through temp files (``tempfile.mkdtemp`` folders are
    0700) or by libraries that write that way (safetensors >= 0.8 writes every file 0600, safetensors#782)."""
    mask = _umask()
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some platforms) refuse fsync: best effort
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a plain open() would follow the umask
        _fsync(tmp)  # the data is on disk before the rename makes it visible: a crash leaves old or new, not empty
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(directory)  # the rename itself


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and ±inf floats (Python or 0-d tensors) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that writes non-finite numbers as null (strict JSON) and anything else unknown with str()."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                        dtypes: dict[str, torch.dtype] | None = None) -> None:
    """A safetensors file written in bounded memory (:func:`tree_of_experts.tensorfile.write_tensors`): ``dtypes``
    gives the dtype to write a tensor in, by name."""
    _atomic(path, lambda tmp: write_tensors(tmp, tensors, metadata=metadata, dtypes=dtypes))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps(row) + "\n")


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """A JSON file another run wrote; a truncated or corrupt one is a one-line ToEError naming it and ``fix``."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ToEError(f"{path} is corrupt ({reason}): {fix}") from None


def load_tensors(path: str | os.PathLike, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file another run wrote; a truncated or corrupt one is a one-line ToEError naming it and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"{path} is unreadable ({reason}): {fix}") from None


def load_torch(path: str | os.PathLike, fix: str) -> Any:
    """A ``torch.save`` file another run wrote; a truncated or corrupt one is a one-line ToEError naming it."""
    import pickle

    path = os.fspath(path)
    try:
        return torch.load(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"{path} is unreadable ({reason}): {fix}") from None


# -- one run per output folder -------------------------------------------------------------------------------------
LOCK_NAME = ".toe.lock"  # in the output folder; starts with a dot, so run_files and --overwrite never see it
_HELD: dict[tuple[int, int], OutLock] = {}  # this process's locks by folder (st_dev, st_ino): re-entered, not re-taken
_SCOPE: contextvars.ContextVar[list[OutLock] | None] = contextvars.ContextVar("toe_out_locks", default=None)


class OutLock:
    """An advisory lock (``fcntl.flock``) on ``out/.toe.lock``, held while one command writes into ``out``.

    A second ToE process that claims the folder is refused, with the pid, host and command line the lock file
    records. The kernel drops a flock when its process dies (kill -9 included), so a killed run's folder is free at
    once and ``--resume`` continues it; the file it leaves behind is only the dead run's record. Released (``release()``, or the
    end of a ``with`` block or of a command decorated with :func:`releases_out_locks`), the file is removed, and so
    is ``out`` when this lock created it and nothing else was written there. Within one process the same folder is
    re-entered (a recipe's command calling another into its own folder), not refused.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = os.fspath(out)
        self.path = os.path.join(self.out, LOCK_NAME)
        self._created = _missing_folders(self.out)
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise ToEError(f"--out {self.out} cannot be created ({e.strerror}): pass a writable folder") from None
        self._key = _folder_key(self.out)
        self._depth = 1
        self._fd = self._acquire()
        self._record()
        self.command: str | None = None  # set by claim_out: the kind of run recorded in RECORD_NAME at release
        self._before: dict[str, tuple[int, int]] = {}

    def _acquire(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
            except PermissionError:
                self._remove_created()
                raise ToEError(f"--out {self.out} is not writable: pass a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created()
                raise ToEError(f"{self.out} is being written by another run ({holder}): wait for it to finish, or "
                               "pass another --out") from None
            # the holder may have released (and removed) the file between our open and our lock: lock anew
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _record(self) -> None:
        """Writes who holds the lock into the file, for the message a second run gets."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "argv": shlex.join(sys.argv),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Gives the lock up (once per claim: a re-entered lock is held until its first claim lets go)."""
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        _HELD.pop(self._key, None)
        if self.command is not None:
            with contextlib.suppress(OSError):  # a record that cannot be written only loses the kind's name
                self._record_run()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still locked: whoever opens the name next gets a new file
        fd, self._fd = self._fd, None
        os.close(fd)
        self._remove_created()

    def _record_run(self) -> None:
        """Writes which command's run the folder holds (RECORD_NAME) when the run changed any of its files: a
        refused or empty run leaves the folder byte-identical."""
        if _top_stats(self.out) == self._before:
            return
        files = run_files(self.out, self.command)
        if files:
            atomic_write_json(os.path.join(self.out, RECORD_NAME), {"command": kind_of(self.command), "files": files})

    def _remove_created(self) -> None:
        for folder in reversed(self._created):  # deepest first; a folder holding anything stays
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _take(out: str | os.PathLike) -> OutLock:
    """This process's lock on the folder ``out`` (created if missing): taken, or re-entered where it holds it."""
    key = _folder_key(out) if os.path.isdir(out) else None
    lock = _HELD.get(key) if key else None
    if lock is not None and lock.held:
        lock._depth += 1
        return lock
    lock = OutLock(out)
    _HELD[lock._key] = lock
    return lock


F = TypeVar("F", bound=Callable[..., Any])


def releases_out_locks(fn: F) -> F:
    """Decorates a command: the output folders it claims (:func:`claim_out`) stay locked while it runs and are
    released when it returns or raises, so a library caller running many commands in one process leaks none."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        held: list[OutLock] = []
        token = _SCOPE.set(held)
        try:
            return fn(*args, **kwargs)
        finally:
            _SCOPE.reset(token)
            for lock in reversed(held):
                lock.release()

    return command  # type: ignore[return-value]


def _folder_key(folder: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, outermost first."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing[::-1]


def _read_holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may not have written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process"
    argv = str(holder.get("argv", ""))
    argv = argv if len(argv) <= 100 else argv[:97] + "..."
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')}: {argv}"


# -- output folders ------------------------------------------------------------------------------------------------
# What ToE commands write at the top of an output folder. A folder holding any of these holds a run; a command
# replaces it only when told (--overwrite), continues it only when it is its own run (--resume, or an extraction
# rerun with the same settings). Other files (a README, the user's notes, a data file) neither block nor get removed.
RUN_FILES = {
    "extract": ("run.json", "manifest.json", "shards", "projector.safetensors", "route_data.safetensors",
                "summary.json", "summary.md", "toe_config.json", "toe_model.safetensors", "timings-*.json",
                "build.json"),
    "train": ("train_args.json", "metrics.jsonl", "checkpoint", "checkpoint.tmp", "checkpoint.old", "snapshots",
              "train_summary.json", "curves.png", "toe_config.json", "toe_model.safetensors"),
    "baseline": ("baseline_summary.json", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                 "model-*-of-*.safetensors", "model.safetensors.index.json", "train_args.json", "metrics.jsonl",
                 "snapshots",
                 "checkpoint", "checkpoint.tmp", "checkpoint.old", "train_summary.json", "curves.png",
                 "toe_config.json", "toe_model.safetensors"),
    "eval": ("metrics.json", "base.jsonl", "toe.jsonl", "teacher.jsonl", "lora.jsonl", "sft.jsonl",
             "generations.partial.jsonl"),
    "oracle": ("oracle.json", "oracle.md", "generation.jsonl", "metrics.json", "base.jsonl", "teacher.jsonl",
               "toe.jsonl", "O1-map.jsonl", "O2-routing.jsonl", "static-mean.jsonl", "O1-ridge-*.jsonl"),
    "report": ("report.json", "report.md", "report.png", "leaf_usage.json", "usage.png", "sweep.png", "pairs.json"),
    "bench": ("bench.json", "bench.md", "bench.png"),
}
RUN_FILES["rebuild"] = RUN_FILES["extract"]
# The file that says a folder holds a run of that command which --resume (or a rerun) may continue.
RESUME_MARKER = {"train": ("train_args.json",), "baseline": ("baseline_args.json", "train_args.json"),
                 "extract": ("run.json",), "eval": ("generations.partial.jsonl",)}
FINISHED = {"train": "train_summary.json", "baseline": "baseline_summary.json", "eval": "metrics.json"}
RESUMES_BY_RERUN = ("extract",)  # an extraction continues whenever it is rerun with the same settings
REPLACES_ITSELF = ("report",)  # a report is a view of eval folders: regenerating it loses nothing


RECORD_NAME = ".toe-files.json"  # which command's run a folder holds and its files (hidden, like the lock)
SAME_KIND = {"rebuild": "extract"}  # commands whose folders are one kind of run
# The files that say which kind of run a folder holds when it has no record (folders written before the record
# existed, a run killed before it wrote one), most specific first: a baseline's folder holds a train run's files
# too, every trained folder a plug-in's.
KIND_MARKERS = (
    ("baseline", ("baseline_args.json", "baseline_summary.json")),
    ("train", ("train_args.json", "train_summary.json")),
    ("extract", ("run.json", "build.json", "manifest.json", "route_data.safetensors", "projector.safetensors")),
    ("oracle", ("oracle.json", "oracle.md", "O2-routing.jsonl")),
    ("report", ("report.json", "report.md")),
    ("bench", ("bench.json", "bench.md")),
    ("eval", ("metrics.json", "generations.partial.jsonl")),
    ("export", ("modeling_toe.py", "configuration_toe.py")),
    ("checkpoint", ("state.json", "plugin.safetensors", "trainable.safetensors")),  # `toe train`'s, not Trainer's
    ("plugin", ("toe_config.json", "toe_model.safetensors")),
)
KINDS = {"extract": "an extraction (`toe extract`)", "plugin": "a plug-in folder (save_pretrained)",
         "checkpoint": "a training checkpoint", "export": "an exported model (`toe export`)"}


def kind_of(command: str) -> str:
    """The kind of run a command's output folder holds (`toe rebuild` writes an extraction)."""
    return SAME_KIND.get(command, command)


def describe(kind: str) -> str:
    return KINDS.get(kind, f"a `toe {kind}` run")


def folder_kind(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(the kind of run ``folder`` holds, the files that say so): its record (RECORD_NAME) where a command left
    one, else the first of KIND_MARKERS it holds; (None, []) for a folder holding no ToE run."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None, []
    names = set(os.listdir(folder))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(folder, RECORD_NAME)) as f:
            kind = json.load(f).get("command")
        if isinstance(kind, str) and kind in {k for k, _ in KIND_MARKERS}:
            markers = dict(KIND_MARKERS)[kind]
            own = [m for m in markers if m in names] + [n for n in run_files(folder, kind) if n not in markers]
            return kind, own or [RECORD_NAME]
    for kind, markers in KIND_MARKERS:
        hits = [m for m in markers if m in names]
        if hits:
            return kind, hits
    return None, []


def _top_stats(folder: str) -> dict[str, tuple[int, int]]:
    """{name: (mtime_ns, size)} of the visible entries at the top of ``folder``: whether a run changed it."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    out[entry.name] = (st.st_mtime_ns, st.st_size)
    return out


def _claimed_here(folder: str) -> bool:
    """Whether this process holds the lock of ``folder`` or of a folder above it (a command writing its run)."""
    return any(lock.held and inside(folder, lock.out) is not None for lock in list(_HELD.values()))


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


def run_files(out: str | os.PathLike, command: str | None = None) -> list[str]:
    """Names at the top of ``out`` that a ToE command writes (``command``'s only, or any command's)."""
    out = os.fspath(out)
    if not os.path.isdir(out):
        return []
    patterns = set(RUN_FILES.get(kind_of(command), RUN_FILES.get(command, ()))) if command else {p for ps in RUN_FILES.values() for p in ps}
    return sorted(name for name in os.listdir(out) if any(fnmatch.fnmatchcase(name, p) for p in patterns))


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


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
    held = _take(out) if lock else None
    reentered = held is not None and held._depth > 1  # a recipe's command writing into its own claimed folder
    try:  # checked under the lock: no other run changes the folder between the check and the writes
        _check_out(out, command, overwrite, resume, extra, keep, reentered)
    except BaseException:
        if held is not None:
            held.release()
        raise
    if held is not None and not reentered:
        held.command, held._before = command, _top_stats(out)
    scope = _SCOPE.get()
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


TRAINED = ("train_args.json", "train_summary.json", "baseline_summary.json")


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
    read_json(os.path.join(experts, "run.json"), "the extraction is damaged: extract again into a new --out")
    route, config = os.path.join(experts, "route_data.safetensors"), os.path.join(experts, "toe_config.json")
    if os.path.isfile(route) and os.path.isfile(config):  # its plug-in must be the one its route data was built for
        from safetensors import safe_open

        layers = read_json(config, "the extraction's plug-in is damaged: extract again into a new --out").get("layers")
        try:
            with safe_open(route, "pt") as f:
                routed = sorted(int(k.split(".")[1]) for k in f.keys() if k.startswith("states."))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a damaged file)
            raise ToEError(f"{route} is unreadable ({e}): extract again into a new --out") from None
        if sorted(layers or []) != routed:
            raise ToEError(f"--{option} {experts}: its plug-in (toe_config.json) injects at layers {layers} but its "
                           f"route data was built for {routed}: another plug-in was saved into this folder: extract "
                           "again into a new --out")


# Arguments that may change when a run is continued: how often it logs and saves, the flags that say how to treat
# the folder, and the folder's own path (a run moved elsewhere is the same run).
# What a resumed run may change: where and how often it reports and saves, and how it spends memory (recomputing
# activations gives the same gradients).
RESUMABLE_CHANGES = ("resume", "overwrite", "log_every", "save_every", "snapshot_every", "out", "report_to",
                     "gradient_checkpointing")


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
        return os.path.exists(a) and _same(a, b)
    return False


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
