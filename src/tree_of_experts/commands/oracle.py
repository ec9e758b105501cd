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
systems under the short names of ``SLUGS``), so `toe report` pools O1 and O2 into one table with the evaluated
systems: ``toe report EVAL_DIRS... ORACLE_DIR``.

With ``--generate true`` the same items are also answered greedily and graded: base, teacher, ToE and O1 with the
trained map, where the teacher runs alongside the base and is fed every generated token (its own KV cache, run only
up to the layer it is read at), so the injected update at each new token comes from the live teacher state.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..config import ToEConfig, ToEError, _at_least, _optional_at_least
from ..data import DataSpec, read_jsonl
from ..evaluation.results import write_metrics, write_rows
from ..evaluation.tasks import TASK_FIELDS, ce_target_spec, check_ce_rows, gold_answer
from ..extraction.capture import capture_shard, prepare, same_vocab
from ..extraction.fusion import example_ce, extraction_signal, ridge_delta, signal_record
from ..extraction.store import Extraction, route_key
from ..grading import grade
from ..hf.layers import add_to_layers, cache_kwargs, states_until
from ..hf.loading import load_causal_lm, load_tokenizer, pick_device
from ..files import atomic_write_json, atomic_write_text
from ..folders import check_extraction, claim_out
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
from ..plugin import ToEPlugin
from ..stats import MIN_INTERVAL_N, bootstrap_mean, gap_closed_ci, wilson

STOP = ("Question:",)
SLUGS = {"base": "base", "teacher": "teacher", "O1 trained map": "O1-map", "O2 oracle routing": "O2-routing",
         "static vector": "static-mean", "ToE (learned)": "toe", "predicted δ̂(h): ridge": "predicted-ridge",
         "predicted δ̂(h): MLP": "predicted-mlp"}  # file names of the eval-format rows


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _nats(x: float) -> str:
    return f"{x:.4f}"


def _interval(point: float | None, ci: list | None, fmt) -> str:
    """``point [lo, hi]``; non-finite or interval-less values are said so, never printed as "nan [nan, nan]"."""
    if point is None or not math.isfinite(point):
        return "non-finite"
    lo, hi = ci or (None, None)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{fmt(point)} (no interval below {MIN_INTERVAL_N} items)"
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def _slug(name: str) -> str:
    return SLUGS.get(name) or name.replace("O1 ridge λ=", "O1-ridge-")


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


def _write_eval_folder(out: str, per_item: dict, systems: dict, prompts: list[str], golds: list[str],
                       args: dict) -> None:
    """The CE rows in `toe eval`'s layout (one JSONL per system, metrics.json), for `toe report` to pool."""
    per_system = {}
    for name, values in per_item.items():
        per_system[_slug(name)] = [{"system": _slug(name), "prompt": p, "gold": g, "ce": ce, "ce_tokens": n}
                                   for p, g, ce, (_, n) in zip(prompts, golds, values, systems[name])]
        write_rows(out, _slug(name), per_system[_slug(name)])
    write_metrics(out, {**args, "source": "toe oracle"}, per_system)


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
    refuse_unused("toe oracle", systems, ("plugin",) + ORACLE_ROWS,
                  "the oracle scores the base, the teacher and a plug-in as configured")
    refuse_unused("toe oracle", scoring, ("task", "skip", "ce_target", "max_new_tokens"), {
        **{name: "the oracle's answers are greedy" for name in SAMPLING},
        "ce": "the oracle scores CE", "accuracy": "pass --generate true to grade answers",
        "": "the oracle reads the items as they are"})
    refuse_unused("toe oracle", runtime, ("dtype", "device", "overwrite"),
                  {**TRAINING_ONLY, "resume": "an oracle run starts again"})
    _at_least("max_length", max_length, 2, " (tokens per item)")
    _at_least("batch_size", batch_size, 1)
    _optional_at_least("limit", limit, 1, " (items)")
    plugin, lambdas, predict = systems.plugin, systems.lambdas, systems.predict
    ceiling_only, generate = systems.ceiling_only, systems.generate
    task, skip, ce_target, max_new_tokens = scoring.task, scoring.skip, scoring.ce_target, scoring.max_new_tokens
    dtype, overwrite = runtime.dtype, runtime.overwrite
    check_extraction(experts)
    claim_out(out, "oracle", overwrite=overwrite, inputs={"experts": experts, "plugin": plugin, "base": base,
                                                           "teacher": teacher, "data": data})
    qf, rf = TASK_FIELDS[task]
    spec = ce_target_spec(task, template, ce_target)
    rows = read_jsonl(data, DataSpec(qf, rf, template))[skip:]
    rows = rows[:limit] if limit is not None else rows
    check_ce_rows(rows, ce_target, data)
    golds = [gold_answer(task, r, rf) for r in rows]  # always from the gold solution
    cfg = ToEConfig.load(experts)
    base_tok, teacher_tok = load_tokenizer(base), load_tokenizer(teacher)
    spec = spec.for_tokenizer(base_tok)
    if not same_vocab(base_tok, teacher_tok):
        raise ToEError("toe oracle compares CE token by token and needs teacher and base to share a tokenizer")
    device = pick_device(runtime.device)
    base_model = load_causal_lm(base, dtype=dtype, device=device)
    teacher_model = load_causal_lm(teacher, dtype=dtype, device=device)
    examples = prepare(rows, spec, base_tok, teacher_tok, max_length)
    timings = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}
    shard = capture_shard(examples, teacher_model, base_model, cfg.layers, cfg.teacher_layers, batch_size, 1,
                          base_tok.pad_token_id, True, timings)
    if not generate:
        del teacher_model
    offsets = shard["offsets"]
    items = [{k: v[int(offsets[i]) : int(offsets[i + 1])] for k, v in shard.items() if k != "offsets"}
             for i in range(len(examples))]
    extraction = Extraction(experts)
    signal, maps, ridge, (kind, lam) = extraction_signal(extraction, cfg.layers, device)  # what the bank was built from
    extracted = ToEPlugin.load(experts)
    banks = [extracted.blocks[str(layer)].bank.vectors().detach().to(device) for layer in cfg.layers]
    route = extraction.route_data()
    static = []
    for layer, bank in zip(cfg.layers, banks):
        sizes = torch.bincount(route[route_key("leaf", layer)], minlength=len(bank)).float().to(device)
        static.append((bank * sizes[:, None]).sum(0) / sizes.sum())


    def o2(j, u, h):
        delta = signal(j, u, h)  # (B, T, D) the live expert signal
        leaf = torch.cdist(delta.flatten(0, 1), banks[j]).argmin(-1).view(delta.shape[:2])
        return banks[j][leaf]

    pad = base_tok.pad_token_id
    systems = {"base": example_ce(base_model, cfg.layers, items, pad, None, batch_size)}
    systems["teacher"] = [(float(it["teacher_nll"][it["loss_mask"].bool()].sum()), int(it["loss_mask"].sum()))
                          for it in items]
    for lam in () if ceiling_only else lambdas:
        systems[f"O1 ridge λ={lam}"] = example_ce(base_model, cfg.layers, items, pad,
                                                  lambda j, u, h, lam=lam: ridge_delta(ridge[j], u, h, lam), batch_size)
    with torch.no_grad():
        systems["O1 trained map"] = example_ce(base_model, cfg.layers, items, pad, lambda j, u, h: maps[j](u, h),
                                               batch_size)
        if not ceiling_only:
            systems["O2 oracle routing"] = example_ce(base_model, cfg.layers, items, pad, o2, batch_size)
        systems["static vector"] = example_ce(base_model, cfg.layers, items, pad,
                                              lambda j, u, h: static[j].expand_as(h), batch_size)
        if predict:
            from ..extraction.predictability import predictability

            held = set(extraction.manifest().get("counts", {}).get("heldout", []))
            on_cpu = lambda j, u, h: signal(j, u.to(device), h.to(device)).cpu()  # noqa: E731
            fit, predictors = predictability(extraction, cfg.layers, on_cpu, held)
            for fit_kind, name in (("ridge", "predicted δ̂(h): ridge"), ("mlp", "predicted δ̂(h): MLP")):
                fns = [p.to(device) for p in predictors[fit_kind]]
                systems[name] = example_ce(base_model, cfg.layers, items, pad,
                                           lambda j, u, h, fns=fns: fns[j](h).to(h.dtype), batch_size)
        if len(cfg.layers) > 1 and not ceiling_only:  # each layer of the set alone: where the set's ceiling comes from
            for k, layer in enumerate(cfg.layers):
                for name, fn in (("O1 trained map", lambda j, u, h: maps[j](u, h)), ("O2 oracle routing", o2)):
                    only = lambda j, u, h, k=k, fn=fn: fn(j, u, h) if j == k else torch.zeros_like(h)  # noqa: E731
                    systems[f"{name} @ layer {layer} alone"] = example_ce(base_model, cfg.layers, items, pad, only,
                                                                          batch_size)
    completions: dict[str, list[str]] = {}
    if plugin:
        with ToEModel.from_pretrained(base_model, plugin):  # its hooks on base_model inside the block only
            systems["ToE (learned)"] = example_ce(base_model, cfg.layers, items, pad, None, batch_size)
            if generate:
                completions["ToE (learned)"] = [live_generate(base_model, base_tok, spec.prompt(r), max_new_tokens)
                                                for r in rows]
    if generate:
        prompts = [spec.prompt(r) for r in rows]
        completions["base"] = [live_generate(base_model, base_tok, p, max_new_tokens) for p in prompts]
        completions["teacher"] = [live_generate(teacher_model, teacher_tok, p, max_new_tokens) for p in prompts]
        completions["O1 trained map"] = [
            live_generate(base_model, base_tok, p, max_new_tokens, teacher_model, cfg.layers, cfg.teacher_layers,
                          lambda j, u, h: maps[j](u, h)) for p in prompts]
        del teacher_model
    per_item = {k: [s / max(n, 1) for s, n in v] for k, v in systems.items()}
    result = {"items": len(items), "data": data, "skip": skip, "limit": limit, "ce_target": ce_target,
              "o2_signal": signal_record(kind, lam), "systems": {}}
    if predict:
        result["predictability"] = fit
    for name, values in per_item.items():
        mean, lo, hi = bootstrap_mean(values)
        entry = {"ce": mean, "ce_ci95": [lo, hi]}
        if name not in ("base", "teacher"):
            entry["gap_closed"] = gap_closed_ci(values, per_item["base"], per_item["teacher"])
        result["systems"][name] = entry
    os.makedirs(out, exist_ok=True)
    if completions:
        graded = {name: [grade(task, c, g) for c, g in zip(texts, golds)] for name, texts in completions.items()}
        correct = {name: [float(ok) for _, ok in g] for name, g in graded.items()}
        result["generation"] = {}
        for name in ("base", "teacher", "ToE (learned)", "O1 trained map"):
            if name not in correct:
                continue
            k = int(sum(correct[name]))
            entry = {"accuracy": k / len(rows), "accuracy_ci95": list(wilson(k, len(rows)))}
            if name not in ("base", "teacher"):
                entry["gap_closed"] = gap_closed_ci(correct[name], correct["base"], correct["teacher"])
            result["generation"][name] = entry
        atomic_write_text(os.path.join(out, "generation.jsonl"), "".join(
            json.dumps({"system": name, "item": i, "completion": c, "extracted": graded[name][i][0],
                        "gold": golds[i], "correct": graded[name][i][1]}) + "\n"
            for name, texts in completions.items() for i, c in enumerate(texts)))
    atomic_write_json(os.path.join(out, "oracle.json"), result)
    _write_eval_folder(out, per_item, systems, [spec.prompt(r) for r in rows], golds,
                       dict(base=base, teacher=teacher, task=task, data=data, plugin=plugin, limit=limit, skip=skip,
                            few_shot=0, template=template, ce_target=ce_target, experts=experts))
    lines = ["| system | CE nats [95 % CI] | gap closed [95 % CI] |", "|---|---|---|"]
    for name, e in result["systems"].items():
        g = e.get("gap_closed")
        gap = "–" if not g or g["gap_closed"] is None else _interval(g["gap_closed"], g["ci95"], _pct)
        lines.append(f"| {name} | {_interval(e['ce'], e['ce_ci95'], _nats)} | {gap} |")
    if predict:
        lines += ["", "| layer | held-out R² of δ from h: ridge | MLP | the mean's share of δ's energy | tokens "
                      "(train / held out) |", "|---|---|---|---|---|"]
        lines += [f"| {layer} | {e['r2_ridge']:.3f} | {e.get('r2_mlp', float('nan')):.3f} | {e['mean_share']:.3f} | "
                  f"{e['train_tokens']} / {e['heldout_tokens']} |" for layer, e in fit.items()]
    if "generation" in result:
        lines += ["", "| greedy generation | accuracy [95 % CI] | gap closed [95 % CI] |", "|---|---|---|"]
        for name, e in result["generation"].items():
            g = e.get("gap_closed")
            gap = "–" if not g or g["gap_closed"] is None else _interval(g["gap_closed"], g["ci95"], _pct)
            lines.append(f"| {name} | {_interval(e['accuracy'], e['accuracy_ci95'], _pct)} | {gap} |")
    atomic_write_text(os.path.join(out, "oracle.md"), "\n".join(lines) + "\n")
    return result
