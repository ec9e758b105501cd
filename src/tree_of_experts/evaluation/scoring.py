"""One system scored on a list of items: teacher-forced CE of the targets and graded generations
(greedy or sampled, with majority vote), resumable batch by batch."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ..errors import ToEError
from ..data import Encoded, encode, pad_left, responses_cut_away
from ..grading import grade
from ..hf.layers import input_device, keep_index, padded_inputs
from ..inference import GREEDY, GenerationLog, Sampling, generate_texts, seeded
from ..losses import tail_positions, token_nll
from .tasks import Item

logger = logging.getLogger(__name__)
PROGRESS_S = 30.0  # seconds between plain progress lines when stderr is no terminal (a log file, a batch job)


def batch_starts(n: int, batch_size: int, what: str) -> Iterator[int]:
    """0, B, 2B, ... < ``n``, showing progress over the ``n`` items: tqdm's bar on a terminal, else (where a bar
    would be off) a plain log line at most every PROGRESS_S seconds, "generate toe: 120/400 items, 2.1 items/s",
    and a last one at the end when any was written."""
    starts = range(0, n, batch_size)
    if sys.stderr.isatty():
        yield from tqdm(starts, desc=what, leave=False)
        return
    t0 = last = time.perf_counter()
    for start in starts:
        yield start
        now, done = time.perf_counter(), min(start + batch_size, n)
        if now - last >= PROGRESS_S or (done == n and last > t0):
            logger.info("%s: %d/%d items, %.1f items/s", what, done, n, done / max(now - t0, 1e-9))
            last = now


def ce_examples(tok, items: list[Item], max_length: int) -> list[Encoded]:
    """Each item's CE prompt + target tokenized; refuses items whose prompt fills ``max_length`` (only the
    appended EOS would be scored, not the target), with the max_length that keeps them. The tokenizer is enough:
    `toe eval` calls it before any model loads."""
    encoded = [encode(tok, it.ce_prompt, it.ce_target, max_length) for it in items]
    bad, problem = responses_cut_away(encoded, max_length, noun="item", part="target")
    if bad:
        raise ToEError(problem)
    return encoded


@torch.no_grad()
def response_ce(model, tok, items: list[Item], batch_size: int, max_length: int,
                what: str = "CE") -> list[tuple[float, int, bool]]:
    """(mean NLL, token count, cut by ``max_length``) of each item's CE target after its CE prompt; ``what`` names
    it in the progress lines."""
    dev = input_device(model)
    encoded = ce_examples(tok, items, max_length)
    out = []
    for start in batch_starts(len(items), batch_size, what):
        chunk = encoded[start : start + batch_size]
        ids, am = pad_left([c.input_ids for c in chunk], tok.pad_token_id)
        mask = pad_left([c.loss_mask.long() for c in chunk], 0)[0].bool()
        keep = tail_positions(mask, dev)  # vocabulary logits only from the position before the first target on
        logits = model(**padded_inputs(ids, am, dev), logits_to_keep=keep_index(model, keep, dev)).logits.to(dev)
        nll = token_nll(logits, ids[:, -len(keep) :].to(dev), mask[:, -len(keep) :].to(dev))
        for i in range(len(chunk)):
            n = int(mask[i].sum())
            out.append((float(nll[i].sum()) / max(n, 1), n, chunk[i].cut))
    return out


def grade_completion(task: str, raw: str, gold: str, tok, max_new_tokens: int, stop: list[str]) -> dict:
    """One generated completion cut at the first stop string, graded: completion, extracted, correct, tokens,
    truncated."""
    text = raw
    for s in stop:  # cut at the first stop string (generation stops after it)
        text = text.split(s)[0]
    pred, ok = grade(task, text, gold)
    # Ran out of budget: no stop string and no EOS (decoding drops it) before max_new_tokens. The last number of a
    # cut-off completion is often an intermediate one, so such rows are counted, not hidden.
    n = len(tok(text)["input_ids"])
    return {"completion": text, "extracted": pred, "correct": ok, "tokens": n,
            "truncated": text == raw and n >= max_new_tokens}


def vote(samples: list[dict]) -> dict:
    """Majority vote over the samples' extracted answers (unanswered samples abstain; a tie goes to the answer
    that came first) and whether any sample is correct."""
    answers = [s["extracted"] for s in samples if s["extracted"] is not None]
    if not answers:
        return {"majority": None, "maj_correct": False, "pass": any(s["correct"] for s in samples)}
    majority = max(answers, key=lambda a: (answers.count(a), -answers.index(a)))
    maj_correct = next(s["correct"] for s in samples if s["extracted"] == majority)
    return {"majority": majority, "maj_correct": maj_correct, "pass": any(s["correct"] for s in samples)}


def score_system(name: str, model, tok, items: list[Item], task: str, do_generate: bool, do_ce: bool,
                 max_new_tokens: int, batch_size: int, max_length: int, stop: list[str],
                 sampling: Sampling = GREEDY, log: GenerationLog | None = None) -> list[dict]:
    """Per-item rows of one system. With ``sampling.num_samples`` = k > 1 a row's completion, extracted, correct,
    tokens and truncated are its first sample's; ``samples`` holds all k, with the majority vote and pass. ``log``
    keeps each generated batch as it finishes and hands back the batches an interrupted run already generated."""
    rows = [{"system": name, "prompt": it.prompt, "gold": it.gold} for it in items]
    if do_ce:
        for row, (ce, n, cut) in zip(rows, response_ce(model, tok, items, batch_size, max_length, f"CE {name}")):
            row.update(ce=ce, ce_tokens=n, cut_by_max_length=cut)
    if do_generate:
        k = sampling.num_samples
        t0 = time.perf_counter()
        texts = []
        log = log or GenerationLog(None, {})
        device = input_device(model)
        for start in batch_starts(len(items), batch_size, f"generate {name}"):
            chunk = [it.prompt for it in items[start : start + batch_size]]
            done = log.get(start, chunk)
            if done is None:
                with seeded(sampling.seed * 1_000_003 + start, device):  # every system draws the same streams
                    done = generate_texts(model, tok, chunk, max_new_tokens, batch_size, sampling,
                                          stop_strings=stop or None)
                log.put(start, chunk, done)
            texts += done
        elapsed = time.perf_counter() - t0
        if log.reused:
            logger.info("%s: %d of %d batches taken from the interrupted run in %s", name, log.reused,
                      -(-len(items) // batch_size), log.path)
        for i, row in enumerate(rows):
            samples = [grade_completion(task, raw, row["gold"], tok, max_new_tokens, stop)
                       for raw in texts[i * k : (i + 1) * k]]
            row.update(samples[0])
            if k > 1:
                row.update(samples=samples, **vote(samples))
        for row in rows:
            row["gen_seconds_total"] = elapsed
    return rows
