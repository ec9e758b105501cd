"""Files written whole or not at all (a temp file, fsync, rename; the umask followed), and read with one-line errors."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ToEError
from .tensorfile import write_tensors


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


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object from ``path``, or None where there is none to read (absent, half written by a run being killed,
    not JSON, or not an object): for records that are only consulted, never required."""
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def load_tensors(path: str | os.PathLike, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file another run wrote; a truncated or corrupt one is a one-line ToEError naming it and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e, fix) from None


def unreadable(path: str | os.PathLike, error: BaseException, fix: str) -> ToEError:
    """The one-line error for a file another run wrote that does not read: its path, the first line of why, the fix."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ToEError(f"{os.fspath(path)} is unreadable ({reason}): {fix}")


def load_torch(path: str | os.PathLike, fix: str) -> Any:
    """A ``torch.save`` file another run wrote; a truncated or corrupt one is a one-line ToEError naming it."""
    import pickle

    path = os.fspath(path)
    try:
        return torch.load(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
        raise unreadable(path, e, fix) from None
