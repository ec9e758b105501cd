"""tree_of_experts.files: writes that are whole or absent, follow the umask, fsync, and write strict JSON."""

import json
import os
import stat

from tree_of_experts import files


def test_atomic_writes_follow_the_umask_fsync_and_write_strict_json(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old = os.umask(0o022)
    try:
        files.atomic_write_json(tmp_path / "m.json", {"ce": float("nan"), "x": [1.0, float("inf")]})
        assert stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode) == 0o644
        os.umask(0o077)
        files.atomic_write_text(tmp_path / "r.md", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "r.md").st_mode) == 0o600
    finally:
        os.umask(old)
    assert len(synced) >= 4  # each file and its folder
    assert json.loads((tmp_path / "m.json").read_text()) == {"ce": None, "x": [1.0, None]}
    files.append_jsonl(tmp_path / "metrics.jsonl", {"loss": float("nan"), "step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"loss": null, "step": 1}\n'
