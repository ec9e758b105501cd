"""Speed measurements behind `toe bench`: each times ToE against its reference side by side in one process.

Every ratio comes from interleaved repetitions (base, ToE, base, ToE, ...), so drifts in machine load hit both sides
alike. Timings use ``time.perf_counter`` on CPU and CUDA events on GPU (with synchronisation). The command
(`commands/bench.py`) picks the parts, builds the models and writes the report.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .extraction.capture import Example, capture_shard
from .hf.layers import add_to_layers, cache_kwargs, capture_layers, output_cache, padded_inputs, starting_at
from .losses import token_nll
from .model import ToEModel
from .positions import injection_mask
from .tree import TreeGate


def make_timer(device: torch.device):
    if device.type == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


@torch.no_grad()
def bench_generation(base_model, model: ToEModel, batch: int, prompt_len: int, new_tokens: int, reps: int,
                     device: torch.device) -> dict:
    """Prefill and decode tokens/s of the bare base and base + plug-in, interleaved."""
    timer = make_timer(device)
    vocab = base_model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, prompt_len), generator=g).to(device)
    am = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    res = {"base": {"prefill": [], "decode": []}, "toe": {"prefill": [], "decode": []}}

    def once(name: str) -> None:
        prefill = timer(lambda: base_model(input_ids=ids, attention_mask=am))
        full = timer(lambda: base_model.generate(input_ids=ids, attention_mask=am, **kw))
        res[name]["prefill"].append(batch * prompt_len / prefill)
        # decode rate: tokens after the first, time after the prefill
        res[name]["decode"].append(batch * (new_tokens - 1) / max(full - prefill, 1e-9))

    model.detach()
    once("base")  # warm-up, discarded
    model.attach()
    once("toe")
    res = {"base": {"prefill": [], "decode": []}, "toe": {"prefill": [], "decode": []}}
    for _ in range(reps):
        model.detach()
        once("base")
        model.attach()
        once("toe")
    out = {name: {k: stats(v) for k, v in r.items()} for name, r in res.items()}
    for k in ("prefill", "decode"):
        ratios = [t / b for t, b in zip(res["toe"][k], res["base"][k])]
        out[f"{k}_ratio"] = stats(ratios)
        # timeit-style: the fastest repetition of each side (load from other work only ever slows a run down)
        out[f"{k}_ratio_best"] = max(res["toe"][k]) / max(res["base"][k])
    out["step"] = bench_decode_step(base_model, model, ids, am, timer)
    return out


def loop_times(timer, fn, reps: int = 7, min_s: float = 0.02) -> list[float]:
    """Seconds per call of ``fn`` in each of ``reps`` loops of calls lasting at least ``min_s`` (one warm-up call
    sizes the loop). The fastest loop is the timeit-style figure: load from other work only ever adds time."""
    inner = max(1, int(min_s / max(timer(fn), 1e-6)))

    def loop() -> None:
        for _ in range(inner):
            fn()

    return [timer(loop) / inner for _ in range(reps)]


@torch.no_grad()
def bench_decode_step(base_model, model: ToEModel, ids: torch.Tensor, am: torch.Tensor, timer) -> dict:
    """One decode step split into its parts, each timed as the best of loops of calls: the bare base's forward of
    one token over a KV cache of the prompt, and what the plug-in adds to it (the model pre-hook's injection mask
    and every injection layer's gate, mix and clip on one token per sequence). Best-of-loop times barely move
    with load from other processes, so ``implied_ratio`` = base / (base + plug-in) is the decode ratio a quiet
    machine would show."""
    model.detach()
    prefill = base_model(input_ids=ids, attention_mask=am, use_cache=True)
    cache, plen = output_cache(prefill), ids.shape[1]
    nxt = prefill.logits[:, -1:].argmax(-1)
    am1 = torch.cat([am, torch.ones_like(nxt)], 1)
    with_cache = cache_kwargs(base_model, cache)

    def base_step() -> None:
        base_model(input_ids=nxt, attention_mask=am1, **with_cache, use_cache=True)
        cache.crop(-1)  # drop the token just added (a negative count works on every transformers version)

    plugin = model.plugin
    hidden = base_model.config.hidden_size
    dtype = next(base_model.parameters()).dtype
    h = torch.randn(ids.shape[0], 1, hidden, device=ids.device, dtype=dtype)

    def plugin_step() -> None:
        mask = injection_mask(ids.shape[0], 1, ids.device, am1, plen)
        for block in plugin.blocks.values():
            delta, _ = block(h, mask)
            _ = h + delta.to(h.dtype)

    base_s, plugin_s = min(loop_times(timer, base_step)), min(loop_times(timer, plugin_step))
    model.attach()
    return {"base_step_us": 1e6 * base_s, "plugin_us": 1e6 * plugin_s, "implied_ratio": base_s / (base_s + plugin_s)}


@torch.no_grad()
def bench_routing(hidden: int, rank: int, k: int, exponents: list[int], tokens: int, reps: int,
                  device: torch.device) -> dict:
    """Routing time per token vs N: tree gate with beam descent vs a flat softmax router (top-K over N).

    Each repetition times a loop of calls lasting at least ~20 ms; the scaling ratios use the fastest repetition
    (as ``timeit`` does: noise from other work on the machine only ever adds time), the median is reported too.
    """
    timer = make_timer(device)
    h = torch.randn(1, tokens, hidden, device=device)
    rows = []
    for e in exponents:
        n = 2**e
        row = {"num_leaves": n}
        for name, shape, mode in (("tree_beam", "balanced", "beam"), ("flat", "flat", "topk")):
            gate = TreeGate(hidden, n, shape, rank=rank, selection=mode, top_k=k).to(device).eval()
            times = [t / tokens for t in loop_times(timer, lambda gate=gate: gate(h), reps)]
            row[f"{name}_us_per_token"] = 1e6 * min(times)
            row[f"{name}_us_per_token_median"] = 1e6 * statistics.median(times)
            del gate
        rows.append(row)
    by_n = {r["num_leaves"]: r for r in rows}
    out = {"rows": rows}
    if 2**10 in by_n and 2**20 in by_n:
        out["tree_2^20_over_2^10"] = by_n[2**20]["tree_beam_us_per_token"] / by_n[2**10]["tree_beam_us_per_token"]
        out["flat_2^20_over_2^10"] = by_n[2**20]["flat_us_per_token"] / by_n[2**10]["flat_us_per_token"]
    return out


def random_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, length), generator=g)


def bench_extraction(teacher_model, base_model, layers: list[int], teacher_layers: list[int], batch: int,
                     length: int, reps: int, device: torch.device) -> dict:
    """Tokens/s of `toe extract`'s capture (teacher forward + top-k cache + base states) vs a bare teacher forward
    on the same tokens, interleaved."""
    timer = make_timer(device)
    vocab = min(teacher_model.config.vocab_size, base_model.config.vocab_size)
    ids = random_ids(vocab, batch, length)
    examples = [Example(i, ids[i], torch.ones(length, dtype=torch.bool), ids[i], torch.arange(length))
                for i in range(batch)]
    am = torch.ones_like(ids)

    def bare() -> None:
        with torch.no_grad():
            teacher_model(**padded_inputs(ids, am, device))

    shard: dict[str, torch.Tensor] = {}
    parts = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}

    def capture() -> None:
        shard.update(capture_shard(examples, teacher_model, base_model, layers, teacher_layers, batch, 32, 0, True,
                                   parts))

    bare(), capture()  # warm-up
    parts.update(teacher_s=0.0, base_s=0.0, tokens=0)
    res: dict[str, list[float]] = {"teacher_forward": [], "capture": []}
    bare_s = capture_s = 0.0
    for _ in range(reps):
        t_bare, t_capture = timer(bare), timer(capture)
        bare_s, capture_s = bare_s + t_bare, capture_s + t_capture
        res["teacher_forward"].append(batch * length / t_bare)
        res["capture"].append(batch * length / t_capture)
    out = {f"{k}_tokens_per_s": stats(v) for k, v in res.items()}
    # Where capture's time goes beyond a bare teacher forward (summed over the repetitions): the teacher's forward
    # with the state hooks, the base's forward up to its highest injection layer (the other half of every paired
    # state: inherent to the method), and the rest (the top-k log-probs over the vocabulary, copying the states to
    # the host in fp16, slicing per example). On a GPU the first two are timed without a sync inside the capture,
    # so their split is approximate there; the total is exact.
    out["account"] = {"teacher_share": parts["teacher_s"] / capture_s, "base_share": parts["base_s"] / capture_s,
                      "rest_share": max(0.0, 1 - (parts["teacher_s"] + parts["base_s"]) / capture_s),
                      "teacher_hooks_over_bare": parts["teacher_s"] / bare_s}
    out["ratio"] = stats([c / t for c, t in zip(res["capture"], res["teacher_forward"])])
    # what a shard holds per token, measured on the captured tensors (`offsets` is per example, not per token)
    out["bytes_per_token"] = sum(t.numel() * t.element_size() for k, t in shard.items() if k != "offsets") / (
        batch * length)
    return out


def bench_on_policy(base_model, model: ToEModel, teacher_model, batch: int, prompt_len: int, new_tokens: int,
                    reps: int, device: torch.device) -> dict:
    """Seconds of one on-policy `toe train` step, split into its parts: the student samples ``new_tokens`` after
    random prompts (with the plug-in, KV cache), the teacher scores the sampled tokens, and the plug-in's forward,
    generalized JSD and backward + Adam step. Built from the training code's own functions (``sample``,
    ``teacher_logits``, ``objective_loss``)."""
    from .training.distill import OnPolicy, objective_loss, sample, scored_tail, teacher_logits

    timer = make_timer(device)
    vocab = min(base_model.config.vocab_size, teacher_model.config.vocab_size)
    prompts = list(random_ids(vocab, batch, prompt_len, seed=2))
    settings = OnPolicy(max_new_tokens=new_tokens)
    stop = [vocab - 1]  # a random model's samples run to the cap: every step samples new_tokens tokens
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    parts: dict[str, list[float]] = {"sample_s": [], "teacher_s": [], "update_s": []}
    model.attach()

    def once(record: bool) -> None:
        batch_: dict = {}
        t_sample = timer(lambda: batch_.update(sample(model, prompts, 0, stop, settings, 0, device)))
        keep, tail = scored_tail(batch_, device)
        t_out: dict = {}
        t_teacher = timer(lambda: t_out.update(logits=teacher_logits(teacher_model, batch_, keep)))
        n_tok = batch_["loss_mask"].sum().to(device).float()

        def update() -> None:
            with model.selection("dense"):
                logits = model(**padded_inputs(batch_["input_ids"], batch_["attention_mask"], device),
                               logits_to_keep=keep).logits
                loss, _ = objective_loss(logits, tail, n_tok, t_out["logits"], settings.beta, 1.0, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_update = timer(update)
        if record:
            for k, v in zip(parts, (t_sample, t_teacher, t_update)):
                parts[k].append(v)

    once(record=False)  # warm-up (Adam state, allocator)
    for _ in range(reps):
        once(record=True)
    out = {k: stats(v) for k, v in parts.items()}
    out["step_s"] = stats([sum(x) for x in zip(*parts.values())])
    out["sampled_tokens"] = batch * new_tokens
    return out


def bench_training(base_model, model: ToEModel, batch: int, length: int, reps: int, device: torch.device,
                   lora_rank: int = 8) -> dict:
    """Time and memory of one `toe train` step (dense routing, CE, backward, Adam on the plug-in) vs the least any
    residual injection at the same layers costs (a forward + backward of the frozen base down to those layers), and
    vs one step of the LoRA baseline on the same tokens (rank ``lora_rank`` on every linear layer, as
    `toe baseline lora`; 0 skips it): LoRA backpropagates through every layer, the plug-in only down to its lowest
    injection layer. ``cached_step`` is the same step started from cached base states at the lowest injection layer
    (`toe train --cached_states`): the frozen layers below it do not run."""
    timer = make_timer(device)
    ids = random_ids(base_model.config.vocab_size, batch, length, seed=1).to(device)
    am = torch.ones_like(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    layers = [int(k) for k in model.plugin.blocks]
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-4)
    hidden = base_model.config.hidden_size

    def reference() -> None:
        zero = torch.zeros(batch, length, hidden, device=device, requires_grad=True)
        model.detach()
        with add_to_layers(base_model, {i: (lambda h: zero) for i in layers}):
            logits = base_model(input_ids=ids, attention_mask=am).logits
        token_nll(logits, ids, mask).mean().backward()

    low = min(layers)
    with torch.no_grad(), model.disabled(), capture_layers(base_model, [low]) as seen:
        base_model(input_ids=ids, attention_mask=am)
    cache = seen[low].half().to(base_model.dtype)  # what an extraction stores

    def step(cached: bool = False) -> None:  # cached: from the states at the lowest layer (--cached_states)
        model.attach()
        start = starting_at(base_model, low, cache) if cached else contextlib.nullcontext()
        with start, model.selection("dense"):
            logits = model(input_ids=ids, attention_mask=am).logits
        token_nll(logits, ids, mask).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached_step() -> None:
        step(cached=True)

    def peak(fn) -> int | None:
        if device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return torch.cuda.max_memory_allocated(device)

    with model.disabled():  # the copy must not carry the plug-in's hooks
        lora_step = make_lora_step(base_model, ids, am, mask, lora_rank) if lora_rank else None
    base_model.train()
    reference(), step(), cached_step()  # warm-up (allocates Adam state)
    res: dict[str, list[float]] = {"reference_s": [], "toe_step_s": [], "cached_step_s": []}
    if lora_step is not None:
        lora_step()
        res["lora_step_s"] = []
    for _ in range(reps):
        res["reference_s"].append(timer(reference))
        res["toe_step_s"].append(timer(step))
        res["cached_step_s"].append(timer(cached_step))
        if lora_step is not None:
            res["lora_step_s"].append(timer(lora_step))
    base_model.eval()
    model.attach()
    trainable = sum(p.numel() * p.element_size() for p in params)
    out = {k: stats(v) for k, v in res.items()}
    out["ratio"] = stats([t / r for t, r in zip(res["toe_step_s"], res["reference_s"])])
    out["cached_over_full"] = stats([c / t for c, t in zip(res["cached_step_s"], res["toe_step_s"])])
    out["cached_layer"] = low
    if lora_step is not None:
        out["toe_over_lora"] = stats([t / r for t, r in zip(res["toe_step_s"], res["lora_step_s"])])
        out["lora_rank"] = lora_rank
    out["base_params_with_grad"] = sum(p.grad is not None for p in base_model.parameters())
    out["plugin_state_bytes"] = {"params": trainable, "grads": trainable, "adam": 2 * trainable}
    out["peak_bytes"] = {"reference": peak(reference), "toe_step": peak(step)}
    return out


def make_lora_step(base_model, ids: torch.Tensor, am: torch.Tensor, mask: torch.Tensor, rank: int):
    """One `toe baseline lora` step (CE, backward through every layer, AdamW on the LoRA weights) on a copy of the
    base, so the plug-in's base stays untouched."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    lora.train()

    def run() -> None:
        logits = lora(input_ids=ids, attention_mask=am).logits
        token_nll(logits, ids, mask).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run
