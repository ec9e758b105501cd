"""`toe oracle`: the ceilings that say where ToE's effect comes from (teacher running alongside the base).

On the same held-out items, response CE of:
    base, teacher                   the two ends of the gap
    O1 ridge λ                      λ (P(u_t) - h_t) from the live teacher, untrained ridge map, λ swept
    O1 trained map                  A(u_t, h_t) from the live teacher: the best one-layer latent fusion found
    O2 oracle routing               the extracted bank's leaf nearest to the live δ_t = A(u_t, h_t) (or to the ridge
                                    step, for a bank built from it: `toe extract --signal ridge`)
    static vector                   the mean δ added to every token
    predicted δ̂(h): ridge / MLP     δ predicted from the base's own state h (no teacher): the ceiling of any
                                    teacher-free gate with that predictor (:mod:`..extraction.predictability`; the
                                    held-out R² of δ from h per layer is in oracle.json's ``predictability``)
    ToE (learned)                   the trained plug-in, no teacher (when --plugin is given)
O1 - O2 is what clustering into N leaves loses; O2 - ToE is what learned routing (and training) loses or adds.

Besides oracle.json/oracle.md the output folder is a `toe eval` folder (metrics.json + one JSONL per system, the
systems under the short names of :mod:`..evaluation.oracle_results`'s ``SLUGS``), so `toe report` pools O1 and O2
into one table with the evaluated systems: ``toe report EVAL_DIRS... ORACLE_DIR``.

With ``--generate true`` the same items are also answered greedily and graded: base, teacher, ToE and O1 with the
trained map, where the teacher runs alongside the base and is fed every generated token (its own KV cache, run only
up to the layer it is read at), so the injected update at each new token comes from the live teacher state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ToEConfig, ToEError
from ..data import DataSpec, read_jsonl
from ..evaluation.oracle_results import ce_result, graded_answers, markdown, write_eval_folder
from ..evaluation.tasks import TASK_FIELDS, ce_target_spec, check_ce_rows, gold_answer
from ..extraction.capture import capture_shard, prepare, same_vocab
from ..extraction.fusion import example_ce, extraction_signal, ridge_delta, signal_record
from ..extraction.store import Extraction, route_key
from ..files import atomic_write_json, atomic_write_text
from ..folders import check_extraction, claim_out
from ..hf.layers import add_to_layers, cache_kwargs, states_until
from ..hf.loading import load_causal_lm, load_tokenizer, pick_device
from ..locks import releases_out_locks
from ..model import ToEModel
from ..options import (
    DEFAULT_TEMPLATE,
    ORACLE_ROWS,
    SAMPLING,
    TRAINING_ONLY,
    Runtime,
    Scoring,
    Systems,
    grouped,
    refuse_unused,
)
from ..options.base import at_least, optional_at_least
from ..plugin import ToEPlugin

STOP = ("Question:",)


def live_generate(model, tok, prompt: str, max_new_tokens: int, teacher=None, layers: list[int] = (),
                  teacher_layers: list[int] = (), delta_fn=None) -> str:
    """Greedy completion of ``prompt`` (batch 1, KV cache), cut at the stop string. With a teacher,
    ``delta_fn(j, u, h)`` is added at ``layers[j]`` for every token, u being the teacher's state at
    ``teacher_layers[j]`` for the same token; the teacher is fed each generated token. No injection at position 0
    (the attention sink), as in training."""
    text = tok.decode(live_greedy(model, tok, prompt, max_new_tokens, teacher, layers, teacher_layers, delta_fn),
                      skip_special_tokens=True)
    for s in STOP:
        text = text.split(s)[0]
    return text


@torch.no_grad()
def live_greedy(model, tok, prompt: str, max_new_tokens: int, teacher=None, layers: list[int] = (),
                teacher_layers: list[int] = (), delta_fn=None) -> list[int]:
    """The generated token ids of :func:`live_generate`."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cur = tok(prompt, return_tensors="pt")["input_ids"].to(dev)
    seen = cur.shape[1]
    cache, t_cache = DynamicCache(), DynamicCache()
    eos = {tok.eos_token_id, tok.pad_token_id} - {None}
    new: list[int] = []
    for step in range(max_new_tokens):
        am = torch.ones(1, seen, dtype=torch.long, device=dev)
        fns = {}
        if teacher is not None:
            u = states_until(teacher, list(teacher_layers), {"input_ids": cur, "attention_mask": am,
                                                             **cache_kwargs(teacher, t_cache), "use_cache": True})
            keep = torch.ones(1, cur.shape[1], 1, device=dev)
            if step == 0:
                keep[:, 0] = 0
            fns = {layer: (lambda h, j=j, lt=lt: delta_fn(j, u[lt], h) * keep)
                   for j, (layer, lt) in enumerate(zip(layers, teacher_layers))}
        with add_to_layers(model, fns):
            logits = model(input_ids=cur, attention_mask=am, **cache_kwargs(model, cache), use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        new.append(nxt)
        text = tok.decode(new, skip_special_tokens=True)
        if any(s in text for s in STOP):
            break
        cur = torch.tensor([[nxt]], device=dev)
        seen += 1
    return new


@grouped
@releases_out_locks
def oracle(
    teacher: str,
    base: str,
    experts: str,
    data: str,
    out: str,
    systems: Systems = Systems(),
    scoring: Scoring = Scoring(),
    runtime: Runtime = Runtime(),
    limit: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 4,
    max_length: int = 1024,
) -> dict:
    """Compares base, teacher, O1/O2 oracles, static vector and ToE by teacher-forced CE.

    Every system is scored on the same items; with ``generate``, their greedy answers are graded too. Every option
    of a group can also be given flat (``--plugin P`` or ``--systems.plugin P``).

    Args:
        teacher: the teacher the extraction used (hub id or folder).
        base: the base the extraction used (hub id or folder).
        experts: the `toe extract` folder (projector, extracted bank).
        data: the items (task fields), in any format `toe eval --data` reads.
        out: output folder (oracle.json, oracle.md).
        systems: the rows scored: ``plugin`` (a trained plug-in, the "ToE (learned)" row), ``lambdas`` (the ridge
            O1 rows), ``predict``, ``ceiling_only`` and ``generate``; the base and teacher are always scored, so
            ``with_base``, the adapters and the plug-in's routing overrides are refused.
        scoring: the task (gsm8k or math: which fields hold question and solution), the rows (``skip``), what CE is
            scored on (``ce_target``, as in `toe eval`) and the generation budget ``max_new_tokens`` of
            ``generate`` (greedy); the few-shot, sampling and bad-row options are refused.
        runtime: dtype and device of both models, overwrite (replace what another run left in ``out``); the
            training-only fields and ``resume`` are refused.
        limit: score at most this many rows, from row ``scoring.skip`` on (default: all).
        template: prompt template with {prompt}, or "chat" (the base tokenizer's chat template).
        batch_size: items per forward.
        max_length: prompt + target tokens kept per item; the default is `toe eval`'s, so that their rows pool in
            `toe report` (a shorter cut scores fewer target tokens on long traces, and the report refuses to pool).
    """
    _refuse_options(systems, scoring, runtime, max_length, batch_size, limit)
    plugin, generate = systems.plugin, systems.generate
    task, skip, ce_target, max_new_tokens = scoring.task, scoring.skip, scoring.ce_target, scoring.max_new_tokens
    check_extraction(experts)
    claim_out(out, "oracle", overwrite=runtime.overwrite, inputs={"experts": experts, "plugin": plugin, "base": base,
                                                                   "teacher": teacher, "data": data})
    rows, golds, spec = _read_items(data, task, template, ce_target, skip, limit)
    cfg = ToEConfig.load(experts)
    base_tok, teacher_tok = load_tokenizer(base), load_tokenizer(teacher)
    spec = spec.for_tokenizer(base_tok)
    if not same_vocab(base_tok, teacher_tok):
        raise ToEError("toe oracle compares CE token by token and needs teacher and base to share a tokenizer")

    # Setup: both models, the items' states (the teacher's read where the extraction read it), the oracles' updates.
    device = pick_device(runtime.device)
    base_model = load_causal_lm(base, dtype=runtime.dtype, device=device)
    teacher_model = load_causal_lm(teacher, dtype=runtime.dtype, device=device)
    items = _captured_items(prepare(rows, spec, base_tok, teacher_tok, max_length), teacher_model, base_model, cfg,
                            batch_size, base_tok.pad_token_id)
    if not generate:
        del teacher_model
    deltas = _Deltas.of(experts, cfg, device)

    # Every system's CE on the same items; with ``generate``, greedy answers.
    pad = base_tok.pad_token_id
    scores, fit = _score_ce(base_model, cfg.layers, items, pad, batch_size, deltas, systems, device)
    completions: dict[str, list[str]] = {}
    if plugin:
        with ToEModel.from_pretrained(base_model, plugin):  # its hooks on base_model inside the block only
            scores["ToE (learned)"] = example_ce(base_model, cfg.layers, items, pad, None, batch_size)
            if generate:
                completions["ToE (learned)"] = [live_generate(base_model, base_tok, spec.prompt(r), max_new_tokens)
                                                for r in rows]
    if generate:
        completions.update(_live_answers(base_model, teacher_model, base_tok, teacher_tok,
                                         [spec.prompt(r) for r in rows], max_new_tokens, cfg, deltas))
        del teacher_model

    # The results: oracle.json (+ generation.jsonl), the eval folder's rows, oracle.md.
    per_item = {k: [s / max(n, 1) for s, n in v] for k, v in scores.items()}
    result = ce_result(per_item, len(items), data, skip, limit, ce_target, signal_record(deltas.kind, deltas.lam), fit)
    os.makedirs(out, exist_ok=True)
    if completions:
        result["generation"] = graded_answers(out, task, completions, golds)
    atomic_write_json(os.path.join(out, "oracle.json"), result)
    write_eval_folder(out, per_item, scores, [spec.prompt(r) for r in rows], golds,
                      dict(base=base, teacher=teacher, task=task, data=data, plugin=plugin, limit=limit, skip=skip,
                           few_shot=0, template=template, ce_target=ce_target, experts=experts))
    atomic_write_text(os.path.join(out, "oracle.md"), markdown(result))
    return result


def _refuse_options(systems: Systems, scoring: Scoring, runtime: Runtime, max_length: int, batch_size: int,
                    limit: int | None) -> None:
    """Refuses the options `toe oracle` does not read, and sizes out of range."""
    refuse_unused("toe oracle", systems, ("plugin",) + ORACLE_ROWS,
                  "the oracle scores the base, the teacher and a plug-in as configured")
    refuse_unused("toe oracle", scoring, ("task", "skip", "ce_target", "max_new_tokens"), {
        **{name: "the oracle's answers are greedy" for name in SAMPLING},
        "ce": "the oracle scores CE", "accuracy": "pass --generate true to grade answers",
        "": "the oracle reads the items as they are"})
    refuse_unused("toe oracle", runtime, ("dtype", "device", "overwrite"),
                  {**TRAINING_ONLY, "resume": "an oracle run starts again"})
    at_least("max_length", max_length, 2, " (tokens per item)")
    at_least("batch_size", batch_size, 1)
    optional_at_least("limit", limit, 1, " (items)")


def _read_items(data: str, task: str, template: str, ce_target: str, skip: int,
                limit: int | None) -> tuple[list[dict], list[str], DataSpec]:
    """The rows scored (checked to hold a CE target), their gold answers (always from the gold solution) and the
    spec of the text CE is scored on (not yet in the base's format)."""
    qf, rf = TASK_FIELDS[task]
    spec = ce_target_spec(task, template, ce_target)
    rows = read_jsonl(data, DataSpec(qf, rf, template))[skip:]
    rows = rows[:limit] if limit is not None else rows
    check_ce_rows(rows, ce_target, data)
    return rows, [gold_answer(task, r, rf) for r in rows], spec


def _captured_items(examples: list, teacher_model, base_model, cfg: ToEConfig, batch_size: int,
                    pad: int) -> list[dict]:
    """Each item's teacher and base states at the plug-in's layers, ids, masks and the teacher's NLL (one shard's
    capture, cut per item)."""
    timings = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}
    shard = capture_shard(examples, teacher_model, base_model, cfg.layers, cfg.teacher_layers, batch_size, 1, pad,
                          True, timings)
    offsets = shard["offsets"]
    return [{k: v[int(offsets[i]) : int(offsets[i + 1])] for k, v in shard.items() if k != "offsets"}
            for i in range(len(examples))]


@dataclass
class _Deltas:
    """The updates δ(j, u, h) the oracle rows inject at the j-th layer (u the live teacher's state, h the base's):
    the extraction's expert signal (what its bank was built from: ``kind``, ``lam``), its trained fusion maps and
    ridge weights, the extracted bank's vectors and their mean weighted by cluster size (the static vector)."""

    extraction: Extraction
    signal: Callable
    maps: torch.nn.ModuleList
    ridge: list[torch.Tensor]
    kind: str
    lam: float
    banks: list[torch.Tensor]
    static: list[torch.Tensor]

    @classmethod
    def of(cls, experts: str, cfg: ToEConfig, device) -> _Deltas:
        """The updates of the extraction in ``experts`` at the plug-in's layers, on ``device``."""
        extraction = Extraction(experts)
        signal, maps, ridge, (kind, lam) = extraction_signal(extraction, cfg.layers, device)
        extracted = ToEPlugin.load(experts)
        banks = [extracted.blocks[str(layer)].bank.vectors().detach().to(device) for layer in cfg.layers]
        route = extraction.route_data()
        static = []
        for layer, bank in zip(cfg.layers, banks):
            sizes = torch.bincount(route[route_key("leaf", layer)], minlength=len(bank)).float().to(device)
            static.append((bank * sizes[:, None]).sum(0) / sizes.sum())
        return cls(extraction, signal, maps, ridge, kind, lam, banks, static)

    def trained_map(self, j, u, h):
        return self.maps[j](u, h)

    def o2(self, j, u, h):
        """The bank's leaf nearest to the live expert signal."""
        delta = self.signal(j, u, h)  # (B, T, D) the live expert signal
        leaf = torch.cdist(delta.flatten(0, 1), self.banks[j]).argmin(-1).view(delta.shape[:2])
        return self.banks[j][leaf]


def _score_ce(base_model, layers: list[int], items: list[dict], pad: int, batch_size: int, deltas: _Deltas,
              systems: Systems, device) -> tuple[dict[str, list[tuple[float, int]]], dict | None]:
    """Each row's (summed CE, tokens) per item (the plug-in's row aside), and the predictability fit (None without
    ``systems.predict``)."""
    ce = lambda fn: example_ce(base_model, layers, items, pad, fn, batch_size)  # noqa: E731
    scores = {"base": ce(None)}
    scores["teacher"] = [(float(it["teacher_nll"][it["loss_mask"].bool()].sum()), int(it["loss_mask"].sum()))
                         for it in items]
    for lam in () if systems.ceiling_only else systems.lambdas:
        scores[f"O1 ridge λ={lam}"] = ce(lambda j, u, h, lam=lam: ridge_delta(deltas.ridge[j], u, h, lam))
    fit = None
    with torch.no_grad():
        scores["O1 trained map"] = ce(deltas.trained_map)
        if not systems.ceiling_only:
            scores["O2 oracle routing"] = ce(deltas.o2)
        scores["static vector"] = ce(lambda j, u, h: deltas.static[j].expand_as(h))
        if systems.predict:
            from ..extraction.predictability import predictability

            held = set(deltas.extraction.manifest().get("counts", {}).get("heldout", []))
            on_cpu = lambda j, u, h: deltas.signal(j, u.to(device), h.to(device)).cpu()  # noqa: E731
            fit, predictors = predictability(deltas.extraction, layers, on_cpu, held)
            for fit_kind, name in (("ridge", "predicted δ̂(h): ridge"), ("mlp", "predicted δ̂(h): MLP")):
                fns = [p.to(device) for p in predictors[fit_kind]]
                scores[name] = ce(lambda j, u, h, fns=fns: fns[j](h).to(h.dtype))
        if len(layers) > 1 and not systems.ceiling_only:  # each layer of the set alone: where its ceiling comes from
            for k, layer in enumerate(layers):
                for name, fn in (("O1 trained map", deltas.trained_map), ("O2 oracle routing", deltas.o2)):
                    only = lambda j, u, h, k=k, fn=fn: fn(j, u, h) if j == k else torch.zeros_like(h)  # noqa: E731
                    scores[f"{name} @ layer {layer} alone"] = ce(only)
    return scores, fit


def _live_answers(base_model, teacher_model, base_tok, teacher_tok, prompts: list[str], max_new_tokens: int,
                  cfg: ToEConfig, deltas: _Deltas) -> dict[str, list[str]]:
    """Greedy answers of the base, the teacher and O1 with the trained map (the live teacher alongside the base)."""
    return {
        "base": [live_generate(base_model, base_tok, p, max_new_tokens) for p in prompts],
        "teacher": [live_generate(teacher_model, teacher_tok, p, max_new_tokens) for p in prompts],
        "O1 trained map": [live_generate(base_model, base_tok, p, max_new_tokens, teacher_model, cfg.layers,
                                         cfg.teacher_layers, deltas.trained_map) for p in prompts],
    }
