"""safetensors files written in bounded memory and read back as maps of the file (pages read when touched).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with spaces to a
multiple of 8, then the tensors' bytes back to back. Files written here are read by ``safetensors`` as any other.

Why not ``safetensors.torch.save_file`` / ``load_file``: ``save_file`` of safetensors 0.4 (which this package
accepts) copies every tensor to ``bytes`` before it writes, and any version needs a whole converted copy to write a
float32 bank in float16 (1.9 GB for one 2^20-leaf bank at D = 896); ``load_file`` gives no say in how its map is
read. A bank is read K rows at a time in random order, so its map is advised ``MADV_RANDOM``: measured on a
cold 400 MB file (Linux 6.18), 1000 random 400-byte rows made 8.5 MB resident with it and 68 MB without it (the
kernel's read-ahead pulls in each row's neighbours). Pages already in the page cache (a file just written) are
mapped a folio at a time whatever the advice, so resident file pages then grow faster than the rows read; they are
clean and shared with the page cache, which the kernel drops under pressure, and anonymous memory does not grow.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Mapping

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
CHUNK_BYTES = 64 << 20  # what one write converts and copies at a time: the save's memory beyond the tensors


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file; the message says what is wrong with it."""


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None,
                  dtypes: Mapping[str, torch.dtype] | None = None) -> None:
    """Writes ``tensors`` to ``path`` in the safetensors format, ``CHUNK_BYTES`` at a time.

    Args:
        tensors: any device, dtype in :data:`DTYPES`; a tensor is read chunk by chunk (a mapped one is never
            wholly resident, a GPU one never wholly on the host).
        dtypes: the dtype to write a tensor in, by name (converted chunk by chunk); others keep their own.
    """
    assert sys.byteorder == "little", "safetensors is little-endian"
    dtypes = dict(dtypes or {})
    out = {name: dtypes.get(name, t.dtype) for name, t in tensors.items()}
    unknown = {name: dtype for name, dtype in out.items() if dtype not in CODES}
    if unknown:
        name = next(iter(unknown))
        raise TensorFileError(f"{name} is {unknown[name]}, which safetensors files here do not hold: use one of "
                              f"{sorted(str(d) for d in CODES)}")
    # wider dtypes first, so that every tensor starts at a multiple of its own element size (as safetensors does)
    names = sorted(tensors, key=lambda n: (-out[n].itemsize, n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        size = tensors[name].numel() * out[name].itemsize
        header[name] = {"dtype": CODES[out[name]], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            flat = tensors[name].detach().reshape(-1)  # a view when contiguous
            step = max(1, CHUNK_BYTES // max(flat.element_size(), out[name].itemsize))
            for start in range(0, flat.numel(), step):
                chunk = flat[start:start + step].to("cpu", out[name]).contiguous()
                f.write(memoryview(chunk.view(torch.uint8).numpy()))


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict], dict[str, str]]:
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, checked
    against the file's size; raises TensorFileError naming what is wrong."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise TensorFileError(f"header of {length} bytes runs past the end of the {size}-byte file (truncated?)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, end = 8 + length, 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            if not all(isinstance(x, int) for x in (begin, stop, *shape)):  # JSON may hold "3", 3.0, null there
                raise TypeError
            count = 1
            for n in shape:
                count *= n
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{name}: malformed header entry {entry!r}") from None
        if stop - begin != count * dtype.itemsize or begin < 0:
            raise TensorFileError(f"{name}: data_offsets {[begin, stop]} do not fit shape {shape} of {entry['dtype']}")
        end = max(end, stop)
    if start + end != size:
        raise TensorFileError(f"the header describes {start + end} bytes but the file has {size} (truncated?)")
    return start, header, metadata


def map_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one private map of the file: no page is read until a
    computation touches it, and writing to a tensor changes the process's copy, never the file (copy on write).
    The map lives as long as any of the tensors."""
    start, header, _ = read_header(path)
    with open(path, "rb") as f:
        if os.path.getsize(path) == start:  # nothing but a header: mmap refuses an empty range
            return {name: torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]]) for name, entry in header.items()}
        view = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(view, "madvise"):
        view.madvise(mmap.MADV_RANDOM)  # a bank is read a few rows at a time: no read-ahead (module docstring)
    tensors = {}
    for name, entry in header.items():
        dtype, (begin, stop) = DTYPES[entry["dtype"]], entry["data_offsets"]
        if stop == begin:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(view, dtype=torch.uint8, count=stop - begin, offset=start + begin)
        if (start + begin) % dtype.itemsize:  # not aligned to its element size (another writer): a copy
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def evict(path: str | os.PathLike) -> None:
    """Drops a file's pages from the page cache (after writing back any dirty ones), so that the next read or map of
    it starts cold, as after a reboot or a download: what a load's time and resident pages are measured from."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
