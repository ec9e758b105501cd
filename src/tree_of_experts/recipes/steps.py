"""A study's work as a graph of resumable steps: each says whether its output exists and how to make it; the runner
takes them in order (the config's rows are the priority order), each under a file lock, so two processes share one
study and a held step is waited for; a step that fails leaves the others running and is reported at the end."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ToEError

log = logging.getLogger(__name__)

TIMES = "step-times.jsonl"  # in the study folder: every step run's wall time, what calibrates the plan


@dataclass
class Step:
    """One unit of work: ``done`` says whether its output exists, ``run`` makes it (resuming what it finds)."""

    id: str
    deps: list[str]
    done: Callable[[], bool]
    run: Callable[[], None]
    work: dict = field(default_factory=dict)  # what the estimate needs: tokens, model, kind


@contextlib.contextmanager
def step_lock(step: Step, folder: str):
    """The step's advisory lock in ``folder``/locks (released by the kernel if the process dies): yields False when
    another process holds it."""
    os.makedirs(os.path.join(folder, "locks"), exist_ok=True)
    path = os.path.join(folder, "locks", step.id.replace("/", "__") + ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0), f.truncate(), f.write(f"pid {os.getpid()}\n"), f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record_time(path: str, step: Step, seconds: float, finished: bool) -> None:
    """Appends one run of ``step`` to the study's time record (one JSON line, a single append: processes sharing
    the study do not interleave); a run ended by a failure or Ctrl-C counts too, as part of the step's total (a
    killed process records nothing)."""
    line = {"step": step.id, "seconds": round(seconds, 1), "finished": finished, "host": platform.node(),
            "threads": torch.get_num_threads(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def recorded_times(path: str) -> dict[str, dict]:
    """The study's time record: per step, its runs since the last finished one before them (a step redone after
    its output was removed starts again): their total seconds, whether the last finished, and the host and thread
    count when every one of those runs had the same (else None)."""
    out: dict[str, dict] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                r = json.loads(line)
                run = {"seconds": float(r["seconds"]), "finished": bool(r["finished"]), "host": r.get("host"),
                       "threads": r.get("threads")}
                prev = out.get(r["step"])
                if prev is not None and not prev["finished"]:  # a resumed step: its runs add up
                    same = (prev["host"], prev["threads"]) == (run["host"], run["threads"])
                    run = {**run, "seconds": prev["seconds"] + run["seconds"],
                           **({} if same else {"host": None, "threads": None})}
                out[r["step"]] = run
    return out


def run_steps(steps: list[Step], lock_folder: Callable[[Step], str], render: Callable[[], None],
              poll_s: float = 10.0, times: str | None = None) -> dict:
    """Runs every step of ``steps`` not done yet once its inputs are (``lock_folder(step)`` holds its lock),
    calling ``render`` after each scoring and at the end, and appending each run's wall time to ``times`` (a
    JSON-lines file; what calibrates the next plan's estimates); returns what ran and whether it waited for another
    process. Raises one ToEError naming the failed steps after the others ran."""
    by_id = {s.id: s for s in steps}
    ran, waited, failed = [], False, {}

    def blocked(s: Step) -> bool:  # a step whose input failed waits for a later run, not forever
        return any(d in failed or blocked(by_id[d]) for d in s.deps if d in by_id)

    while True:
        pending = [s for s in steps if not s.done() and s.id not in failed and not blocked(s)]
        if not pending:
            break
        progressed = held = False
        for s in pending:
            if s.done() or not all(by_id[d].done() for d in s.deps if d in by_id):
                held = held or any(not by_id[d].done() for d in s.deps if d in by_id)
                continue
            with step_lock(s, lock_folder(s)) as mine:
                if not mine:
                    held = True
                    log.info("study: %s is running in another process; next step", s.id)
                    continue
                if s.done():
                    continue
                log.info("study: %s", s.id)
                start = time.perf_counter()
                try:
                    try:
                        s.run()
                    finally:  # a failed or interrupted run's time is part of the step's total as well
                        if times:
                            with contextlib.suppress(OSError):  # a record that cannot be written costs no step
                                record_time(times, s, time.perf_counter() - start, s.done())
                except ToEError as e:  # one row's trouble does not stop the others: said at the end
                    failed[s.id] = str(e)
                    log.error("study: %s failed: %s (the steps that need it wait; the others go on)", s.id, e)
                else:
                    ran.append(s.id)
                    if s.id.startswith("score/"):
                        render()
                progressed = True
                break  # back to the first pending step: the rows' order is the priority order
        if not progressed:
            if not held:
                raise ToEError("study: steps left that cannot start: " + ", ".join(s.id for s in pending[:5]))
            waited = True
            time.sleep(poll_s)  # another process holds a step this one needs
    render()
    if failed:
        first, why = next(iter(failed.items()))
        raise ToEError(f"study: {len(failed)} step(s) failed, the rest ran and the table is rendered: {first}: "
                       f"{why}" + (f" (and {', '.join(list(failed)[1:4])})" if len(failed) > 1 else ""))
    return {"ran": ran, "waited": waited}
