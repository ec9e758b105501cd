"""The Hugging Face Hub: ids, offline mode, resolving a folder or id to local files, pushing a folder."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import ToEError


def model_id(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


# -- the Hub -------------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import time."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def is_hub_id(name: str) -> bool:
    """``name`` reads as a hub repo id ("org/name" or "name") and is not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_full_hub_id(name: str) -> bool:
    """``name`` is a hub repo id with its owner ("org/name"): what an upload and a card's ``base_model`` take."""
    return is_hub_id(name) and "/" in name


def hub_id_of(path: str) -> tuple[str | None, str | None]:
    """(repo id, commit) of a folder inside the Hugging Face cache (``.../models--org--name/snapshots/<sha>``), else
    (None, None): a base loaded from the cache by path still records where it came from."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/"), parts[i + 2]
    return None, None


def base_hub_id(model: nn.Module) -> str:
    """The base's hub id when it is known (loaded by id, or by a path inside the hub cache), else its path or name."""
    name = model_id(model)
    if os.path.isdir(name):
        return hub_id_of(name)[0] or name
    return name


def hub_local_only(name: str, what: str, revision: str | None = None, token: str | bool | None = None,
                   gguf_file: str | None = None, local_files_only: bool = False, **_: Any) -> bool:
    """Whether transformers should load hub repo ``name`` from the local cache only: when offline, or when the Hub
    cannot be reached but the repo is cached. Raises a one-line ToEError when it is neither reachable nor cached (and
    for an unknown or gated repo) instead of letting transformers retry every file for a minute."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if local_files_only or not is_hub_id(name):
        return local_files_only  # not a hub id: transformers says what is wrong with the path
    cached = isinstance(try_to_load_from_cache(name, gguf_file or "config.json", revision=revision), str)
    if hub_offline():
        if cached:
            return True
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and "
                       f"HF_HUB_OFFLINE is set: download it once online (hf download {name}) or pass a local folder")
    try:
        HfApi(token=token).model_info(name, revision=revision)  # one request, no retries
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        first = str(e).strip().splitlines()[0]
        raise ToEError(f"{what} {name!r} cannot be read from the Hub ({first}): check the id, revision and token") from None
    except HfHubHTTPError:
        return False  # the Hub answered (a server error): transformers' own retries are worth it
    except Exception:  # noqa: BLE001 (no connection: DNS, refused, timeout, as the HTTP client's own types)
        if cached:
            return True
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and the Hub "
                       f"cannot be reached: download it once online (hf download {name}) or pass a local folder") from None
    return False


def resolve_folder(name_or_path: str | os.PathLike, what: str = "plug-in", revision: str | None = None,
                   token: str | bool | None = None, allow_patterns: list[str] | None = None) -> str:
    """A local folder for ``name_or_path``: the folder itself, or a hub repo's snapshot (downloaded, or read from the
    cache when offline). Fails with one line instead of retrying when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise ToEError(f"{what} {name!r} not found: it is neither a local folder nor a hub repo id (org/name)")
    offline = hub_offline()
    try:
        return snapshot_download(name, revision=revision, token=token, allow_patterns=allow_patterns,
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ToEError(f"{what} {name!r} is no local folder, and as a hub id it is not in the local cache and {why}: "
                       f"download it once online (hf download {name}) or pass a local folder") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise ToEError(f"{what} {name!r} cannot be read from the Hub ({first}): check the id, revision and token") from None


def push_folder(folder: str, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None) -> str:
    """Uploads ``folder`` to the model repo ``repo_id`` (created if missing) in one commit; returns the commit URL.
    No token, no connection and a refused token or repo end in one line that names the fix, not the HTTP client's
    traceback."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not is_full_hub_id(repo_id):
        raise ToEError(f"repo_id={repo_id!r}: give a hub repo id of the form user/name")
    if hub_offline():
        raise ToEError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it to upload")
    if token in (None, True) and not get_token():
        raise ToEError(f"cannot push to {repo_id!r}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN "
                       "to a write token")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or "Upload ToE plug-in")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = {401: "the token was refused: log in again with `hf auth login` or set HF_TOKEN to a valid write token",
               403: "the token may not write there: use a write token of the repo's owner, or a repo_id under your "
                    "own name or organisation",
               404: "no such repo or branch for this token: check repo_id, --revision and the token's owner"}
        raise ToEError(f"cannot push to {repo_id!r} ({first}): "
                       f"{fix.get(status, f'the Hub at {api.endpoint} refused the upload; try again later')}") from None
    except Exception as e:  # noqa: BLE001 (no connection: DNS, refused, timeout, as the HTTP client's own types)
        if not _is_connection_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot push to {repo_id!r}: the Hub at {api.endpoint} cannot be reached ({first}): check the "
                       "network connection, or HF_ENDPOINT if it is set") from None
    return str(getattr(info, "commit_url", info))


def _is_connection_error(e: BaseException) -> bool:
    """Whether ``e`` is the HTTP client failing to talk to a server (requests' errors are OSErrors; httpx's are not,
    and huggingface_hub has used both)."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError) or module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
