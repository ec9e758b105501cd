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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ToEError

log = logging.getLogger(__name__)

TIMES = "step-times.jsonl"  # in the study folder: every step run's wall time, what calibrates the plan
TRAIN_TRACES = "train-traces"  # the step that makes the training data (data.train_traces), which trainings wait for
BEAT_S = 300.0  # a running step adds its time so far to the record this often: a killed run loses less than this


@dataclass
class Step:
    """One unit of work: ``done`` says whether its output exists, ``run`` makes it (resuming what it finds).

    ``id`` names it in locks, the time record and other steps' ``deps``; what selects and orders steps reads the
    structured fields: ``stage`` (answers, extract, train, score or curve), ``label`` (the row seed it belongs to,
    ROW or ROW-seedK, or ``anchors``/``teacher``) and ``target`` (the target it scores, or an answer set it makes)."""

    id: str
    deps: list[str]
    done: Callable[[], bool]
    run: Callable[[], None]
    work: dict = field(default_factory=dict)  # what the estimate needs: tokens, model, kind
    stage: str = "other"
    label: str | None = None
    target: str | None = None


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


def record_time(path: str, step: Step, seconds: float, finished: bool, threads: int | None = None) -> None:
    """Appends one run (or one stretch of a running one) of ``step`` to the study's time record: one JSON line, a
    single append, so processes sharing the study do not interleave. Unfinished records add up to the step's total
    (:func:`recorded_times`). ``threads``: the run's torch thread count, read where it runs (OpenMP's count is per
    thread: a timer thread would read its own)."""
    line = {"step": step.id, "seconds": round(seconds, 1), "finished": finished, "host": platform.node(),
            "threads": threads or torch.get_num_threads(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def timed(path: str | None, step: Step, beat_s: float = BEAT_S):
    """Records the wall time of running ``step`` in ``path``: every ``beat_s`` seconds the stretch so far as an
    unfinished record (a run killed by the machine, which runs no ``finally``, loses less than ``beat_s``), then
    the rest when the run ends, finished or not (a failed or interrupted run's time is part of the step's total).
    A record that cannot be written costs no step."""
    if not path:
        yield
        return
    stop, last, threads = threading.Event(), [time.perf_counter()], torch.get_num_threads()

    def write(finished: bool) -> None:  # the timer's writes end (join) before the last one
        now = time.perf_counter()
        with contextlib.suppress(OSError):
            record_time(path, step, now - last[0], finished, threads)
        last[0] = now

    def beat() -> None:
        while not stop.wait(beat_s):
            write(False)

    beater = threading.Thread(target=beat, name=f"time {step.id}", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        write(step.done())


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
                try:
                    with timed(times, s):
                        s.run()
                    if not s.done():  # (taken as done, the loop would run it again at once, and again)
                        raise ToEError(f"{s.id} finished without writing its output, so it is not taken as done "
                                       "(a step that cannot make its output should say why: report it)")
                except Exception as e:  # one row's trouble (an error, out of memory) does not stop the others
                    failed[s.id] = str(e) if isinstance(e, ToEError) else f"{type(e).__name__}: {e}"
                    log.error("study: %s failed: %s (the steps that need it wait; the others go on)", s.id,
                              failed[s.id], exc_info=not isinstance(e, ToEError))
                else:
                    ran.append(s.id)
                    if s.stage == "score":
                        try:
                            render()
                        except Exception:  # a table that cannot be drawn now costs no step; the last render raises
                            log.exception("study: the table could not be rendered after %s", s.id)
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
