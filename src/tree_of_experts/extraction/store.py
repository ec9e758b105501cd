"""The extraction folder's one owner: its file names, tensor keys and readers.

`toe extract` writes the folder; `toe train`, `toe oracle`, `toe baseline`, `toe rebuild` and on-policy training read
it, all through :class:`Extraction`, so a file name or tensor key is spelled in one place. Layout:

    run.json                 settings of the extraction (a rerun with other settings is refused)
    manifest.json            models, layers, data hash, counts, timings, shard list with each shard's bytes and sha256
    summary.json / .md       projector fit, O1 table, cluster sizes, throughput
    shards/shard-*.safetensors   per-example slices (``offsets``): ids, masks, teacher top-k, and base/teacher
                             states at every injection layer (*full* shards). Under a disk budget (`toe extract
                             --max_disk/--state_tokens`) only a sample of the examples keeps its states: those come
                             first, the rest follow in *light* shards (no ``teacher.*``; ``base.{j}`` of the lowest
                             injection layer alone with --cache_low_states); run.json's ``state_examples`` lists
                             the sample (null: every example)
    projector.safetensors    ``ridge.{layer}`` and ``trained.{layer}.*`` (the fusion maps)
    route_data.safetensors   ``states.{layer}``, ``leaf.{layer}``, ``branches.{layer}`` (route labels, Stage A);
                             under a disk budget ``rows.{layer}`` (example, row) in place of the states, which
                             the full shards hold already (:meth:`Extraction.route_data` gathers them)
    toe_config.json + toe_model.safetensors   the untrained plug-in (loadable as is)
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import ToEError
from ..files import load_tensors, read_json, unreadable

RUN, MANIFEST, SUMMARY, PROJECTOR, ROUTE = "run.json", "manifest.json", "summary.json", "projector.safetensors", \
    "route_data.safetensors"
# What a finished extraction holds besides its shards (build.json, written last, marks it finished).
PIECES = (RUN, MANIFEST, SUMMARY, PROJECTOR, ROUTE, "toe_config.json", "toe_model.safetensors")
REBUILT_BY = "rerun the `toe extract` command that wrote it (it recaptures and rebuilds what is missing or damaged)"
CORRUPT = "the extraction is damaged: extract again into a new --out (or with --overwrite)"
CORRUPT_SHARD = ("delete that shard and rerun `toe extract` with the same settings (it captures the missing shards "
                 "again)")


class Extraction:
    """A `toe extract` output folder, read lazily; damaged files are one-line ToEErrors naming the file and the fix.

    Args:
        folder: the extraction folder (`toe extract --out`).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    # -- JSON records ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        return read_json(self.path(RUN), CORRUPT)

    def manifest(self) -> dict[str, Any]:
        return read_json(self.path(MANIFEST), CORRUPT)

    def summary(self) -> dict[str, Any]:
        return read_json(self.path(SUMMARY), CORRUPT)

    def teacher(self) -> str | None:
        """The teacher the extraction read (None when the manifest is missing or names none)."""
        return self.manifest().get("teacher") if self.has(MANIFEST) else None

    # -- tensors --------------------------------------------------------------------------------------------------
    def projector(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path(PROJECTOR), CORRUPT)

    def route_data(self) -> dict[str, torch.Tensor]:
        """Cached base states and their leaf/path labels per layer ({} when the folder has none); where the file
        says only where each state sits in the shards (a disk budget's ``rows.{layer}``), the states are gathered
        from them."""
        data = load_tensors(self.path(ROUTE), CORRUPT) if self.has(ROUTE) else {}
        refs = {int(k.split(".")[1]): data.pop(k) for k in [k for k in data if k.startswith("rows.")]}
        if refs:
            self.check_linked_shards()
            data.update(self._gathered_states(refs))
        return data

    def check_linked_shards(self) -> None:
        """Refuses shards reached through a link (`toe rebuild` links the source's) that the source has written anew
        since this folder was built: its manifest and the source's disagree on a shard's sha256. The route data's
        row references would then point into other states of the same shapes, which no size check sees."""
        link = self.path("shards")
        source = os.path.dirname(os.path.realpath(link))
        if not os.path.islink(link) or not os.path.isfile(os.path.join(source, MANIFEST)):
            return
        theirs = dict(read_json(os.path.join(source, MANIFEST), CORRUPT).get("shard_files") or {})
        changed = [rel for rel, rec in self.shard_records().items()
                   if rel in theirs and rec.get("sha256") and theirs[rel].get("sha256") != rec["sha256"]]
        if changed:
            raise ToEError(f"{self.folder}: {changed[0]} (linked from {source}) was written anew since this bank was "
                           f"built from it: rebuild it (toe rebuild --source {source} --out {self.folder} "
                           "--overwrite true)")

    def _gathered_states(self, refs: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``states.{layer}`` of each layer's (example, row) pairs ``refs``, read from the full shards (the base's
        state at that layer, in the order given)."""
        order = self.run()["layers"]
        slots: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # example -> (layer, out rows, rows)
        out = {}
        for layer, at in refs.items():
            if layer not in order:
                raise ToEError(f"{self.path(ROUTE)} names layer {layer}, which the extraction did not capture: "
                               f"{CORRUPT}")
            for e in at[:, 0].unique().tolist():
                idx = (at[:, 0] == e).nonzero()[:, 0]
                slots.setdefault(e, []).append((layer, idx, at[idx, 1]))
        # each example's rows of the base's states alone (not its shard whole: the teacher's states, top-k...)
        examples = self.example_slices(set(slots), [f"base.{order.index(layer)}" for layer in refs])
        seen = set(examples.example_ids)
        for e, ex in zip(examples.example_ids, examples):
            for layer, idx, rows in slots[e]:
                h = ex[f"base.{order.index(layer)}"]
                dst = out.setdefault(layer, torch.empty(len(refs[layer]), h.shape[1], dtype=h.dtype))
                dst[idx] = h[rows]
        if seen != set(slots):
            raise ToEError(f"{self.folder}'s shards lack the states of example {min(set(slots) - seen)} that its "
                           f"route data points to: {CORRUPT}")
        return {route_key("states", layer): v for layer, v in out.items()}

    def shard_paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folder, "shards", "shard-*.safetensors")))

    def shard_records(self) -> dict[str, dict[str, Any]]:
        """{shard path relative to the folder: {"bytes", "sha256"}} as the manifest recorded them when the shards
        were written ({} for a folder without a manifest, or one that predates the record)."""
        if not self.has(MANIFEST):
            return {}
        manifest = self.manifest()
        return dict(manifest.get("shard_files") or {}) or {rel: {} for rel in manifest.get("shards", [])}

    def damaged_shards(self, full: bool = False) -> list[str]:
        """The shards (relative paths) that are missing, or whose size (and with ``full`` sha256: every byte is
        read) differs from the manifest's record; a shard the manifest does not list yet (an unfinished
        extraction) must have a readable header and the size it promises."""
        records = self.shard_records()
        bad = [rel for rel, rec in records.items() if not _matches(self.path(rel), rec, full)]
        for path in self.shard_paths():
            rel = os.path.relpath(path, self.folder)
            if rel not in records and not _readable(path):
                bad.append(rel)
        return sorted(bad)

    def missing_pieces(self) -> list[str]:
        """The files of a finished extraction (PIECES) that the folder lacks."""
        return [name for name in PIECES if not self.has(name)]

    def state_examples(self) -> list[int] | None:
        """The examples whose full states were kept (None: every example, as without a disk budget)."""
        return self.run().get("state_examples") if self.has(RUN) else None

    def iter_shard_paths(self, with_states: bool = False) -> Iterator[str]:
        """The shard files (only full shards, with every state, when ``with_states``)."""
        return (p for p in self.shard_paths() if not with_states or has_states(p))

    def iter_shards(self, with_states: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The shards' tensors, one shard at a time (only full shards, with every state, when ``with_states``).
        A missing or cut shard the manifest lists is refused first (every reader would otherwise see less data
        without a word: `toe rebuild`, `toe oracle`, `--reuse_capture`, training targets)."""
        for path in self._checked_paths(with_states):
            yield load_tensors(path, CORRUPT_SHARD)

    def _checked_paths(self, with_states: bool) -> list[str]:
        damaged = self.damaged_shards()
        if damaged:
            shown = ", ".join(damaged[:3]) + (", ..." if len(damaged) > 3 else "")
            raise ToEError(f"{self.folder} lacks or holds damaged {shown}: {REBUILT_BY}")
        return list(self.iter_shard_paths(with_states))

    def light_keys(self) -> set[str] | None:
        """The tensor keys of the light shards (None when every shard is full)."""
        for path in self.shard_paths():
            if not has_states(path):
                return shard_keys(path)
        return None

    def example_refs(self, with_states: bool = False, columns: Iterable[str] = ()) -> Iterator[ExampleRef]:
        """Where every example sits (:class:`ExampleRef`; only full shards' examples when ``with_states``), in the
        shards' order as :meth:`iter_examples` gives them, read from each shard's ``offsets`` and ``example`` columns
        and the per-token ``columns`` asked for, one read per shard: what a reader needs to find an example's fields
        without loading them. A missing or cut shard is refused first."""
        columns = tuple(columns)
        for path in self._checked_paths(with_states):
            offsets, example, cols, keys = _read(path, lambda f: (
                f.get_tensor("offsets").tolist(), f.get_tensor("example"), {c: f.get_tensor(c) for c in columns},
                frozenset(f.keys())))
            for a, b in itertools.pairwise(offsets):
                yield ExampleRef(int(example[a]), path, (a, b), keys, {c: v[a:b] for c, v in cols.items()})

    def example_slices(self, which: set[int] | None, fields: Iterable[str]) -> ExampleSlices:
        """The examples that hold full states (those in ``which`` when given), in the shards' order, each read from
        its shard only when indexed and only its ``fields`` (:class:`ExampleSlices`)."""
        refs = [r for r in self.example_refs(with_states=True) if which is None or r.example in which]
        return ExampleSlices([(r.path, *r.rows) for r in refs], tuple(fields), [r.example for r in refs])

    def iter_examples(self, which: set[int] | None = None,
                      with_states: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Per-example slices of the shards (only examples in ``which`` when given; only examples with their base
        and teacher states at every injection layer, the sample, when ``with_states``)."""
        for shard in self.iter_shards(with_states):
            offsets = shard["offsets"]
            for k in range(len(offsets) - 1):
                a, b = int(offsets[k]), int(offsets[k + 1])
                if which is not None and int(shard["example"][a]) not in which:
                    continue
                yield {key: v[a:b] for key, v in shard.items() if key != "offsets"}


class ExampleRef(NamedTuple):
    """Where one example sits: its number, its shard, its rows [a, b) there, the shard's fields, and the per-token
    columns a reader asked for, sliced to its rows."""

    example: int
    path: str
    rows: tuple[int, int]
    keys: frozenset[str]
    columns: dict[str, torch.Tensor]


class ExampleSlices(Sequence):
    """An extraction's examples read one at a time from their shards, only the tensors named in ``fields``
    (``index``: (shard path, first row, end row) of each; ``example_ids``: their example numbers): whatever the
    sample's size, a reader holds the examples it indexed, not the sample. An index gives one example's {field:
    tensor} (tensors of their own, copied out of the shard's map), a slice a list of them. The fusion maps' training
    reads its examples this way, a batch at a time in a fresh order each pass (the bytes a step reads are small beside
    its forward)."""

    def __init__(self, index: list[tuple[str, int, int]], fields: tuple[str, ...], example_ids: list[int]):
        self.index, self.fields, self.example_ids = index, fields, example_ids

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        path, a, b = self.index[i]
        return read_rows(path, (a, b), self.fields)


def read_rows(path: str, rows: tuple[int, int], fields: Iterable[str]) -> dict[str, torch.Tensor]:
    """Rows [a, b) of ``fields`` of the shard at PATH, each a tensor of its own (a slice of the map can be a view of
    the whole tensor's mapped storage on some safetensors versions: cloned); an unreadable shard is one line."""
    a, b = rows
    return {k: v.clone() for k, v in _read(path, lambda f: {k: f.get_slice(k)[a:b] for k in fields}).items()}


def _read(path: str, fn):
    """``fn(f)`` on the shard at PATH opened with safetensors; an unreadable shard is one line naming the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return fn(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e, CORRUPT_SHARD) from None


def shard_record(path: str) -> dict[str, Any]:
    """{"bytes", "sha256"} of a shard file, for the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _matches(path: str, record: dict[str, Any], full: bool) -> bool:
    if not os.path.isfile(path):
        return False
    if "bytes" in record and os.path.getsize(path) != record["bytes"]:
        return False
    if not record:
        return _readable(path)
    return not full or shard_record(path)["sha256"] == record.get("sha256")


def _readable(path: str) -> bool:
    """Whether a safetensors file's header reads and its data is as long as the header says (a truncated file is
    not)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def shard_keys(path: str) -> set[str]:
    """The tensor keys of a shard, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a damaged file)
        raise ToEError(f"{path} is unreadable ({e}): {CORRUPT_SHARD}") from None


def has_states(path: str) -> bool:
    """Whether a shard is full (base and teacher states at every injection layer), not light."""
    return "teacher.0" in shard_keys(path)


def route_key(kind: str, layer: int | str) -> str:
    """``states``, ``leaf`` or ``branches`` of injection layer ``layer`` in ``route_data.safetensors``."""
    return f"{kind}.{layer}"
