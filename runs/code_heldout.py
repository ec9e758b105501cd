"""Held-out code for the "what does it cost elsewhere" column: chunks of a fixed list of Python source files that
ship with the interpreter (the base is a code model), written as `toe eval --task code` rows.

Each row is ``{"prompt": "# <file>\\n", "text": <chunk>}``: the first CHUNKS chunks of CHARS characters of each
file, cut at line ends. The manifest records the interpreter version and each file's sha256, so a run on another
Python says so instead of silently scoring other text.

Usage: python runs/code_heldout.py OUT.jsonl [MANIFEST.json]
Then: toe eval --base B [--plugin P | --lora L] --task code --data OUT.jsonl --accuracy false --ce_target gold
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

FILES = ["textwrap.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py", "colorsys.py", "statistics.py",
         "string.py", "calendar.py", "difflib.py", "json/decoder.py", "json/encoder.py", "csv.py", "queue.py",
         "graphlib.py", "dataclasses.py", "functools.py", "ipaddress.py", "pprint.py", "sched.py"]
CHARS, CHUNKS = 1600, 3


def chunks(text: str) -> list[str]:
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if len(cur) + len(line) > CHARS and cur:
            out.append(cur)
            cur = ""
            if len(out) == CHUNKS:
                break
        cur += line
    if cur and len(out) < CHUNKS:
        out.append(cur)
    return out


def main(out: str, manifest: str | None = None) -> None:
    lib = sysconfig.get_paths()["stdlib"]
    rows, files = [], {}
    for name in FILES:
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            text = f.read()
        files[name] = hashlib.sha256(text.encode()).hexdigest()
        rows += [{"prompt": f"# {name}\n", "text": c} for c in chunks(text)]
    with open(out + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(out + ".tmp", out)
    info = {"python": sys.version.split()[0], "rows": len(rows), "chars_per_chunk": CHARS, "chunks_per_file": CHUNKS,
            "files_sha256": files}
    if manifest:
        os.makedirs(os.path.dirname(manifest) or ".", exist_ok=True)
        with open(manifest, "w") as f:
            json.dump(info, f, indent=1)
    print(f"{len(rows)} rows from {len(files)} files (Python {info['python']}) -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
