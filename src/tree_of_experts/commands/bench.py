"""`toe bench`: speed of base + plug-in vs the bare base, and routing cost vs N, measured side by side (the
measurements themselves are :mod:`tree_of_experts.benchmarks`); this module picks the parts, builds the models (or
random ones of real shapes) and writes bench.json / bench.md / bench.png."""

from __future__ import annotations

import os

import torch

from .. import bank_scale
from ..benchmarks import (
    bench_extraction,
    bench_generation,
    bench_on_policy,
    bench_routing,
    bench_training,
)
from ..errors import ToEError
from ..extraction.capture import default_layer, teacher_layer_for
from ..hf.layers import decoder_layers
from ..hf.loading import load_causal_lm
from ..files import atomic_write_json, atomic_write_text
from ..folders import claim_out
from ..locks import releases_out_locks
from ..model import ToEModel
from ..options import TRAINING_ONLY, Runtime, Sweeps, Workload, grouped, refuse_unused

PARTS = ("generation", "routing", "training", "extraction", "on_policy", "bank_scale")
OPT_IN_PARTS = ("bank_scale",)  # run only when named: it builds and saves plug-ins of up to 2^20 leaves (minutes)
TEACHER_PARTS = ("extraction", "on_policy")  # the parts that need a teacher (--teacher or --shapes)


@grouped
@releases_out_locks
def bench(
    base: str | None = None,
    out: str = "bench",
    plugin: str | None = None,
    teacher: str | None = None,
    shapes: str | None = None,
    shape_layers: int | None = None,
    num_leaves: int = 64,
    top_k: int = 4,
    parts: list[str] | None = None,
    workload: Workload = Workload(),
    sweeps: Sweeps = Sweeps(),
    runtime: Runtime = Runtime(),
) -> dict:
    """Measures decode/prefill speed of base + plug-in vs the bare base and routing cost vs N.

    Every option of a group can also be given flat (``--reps 3`` or ``--workload.reps 3``).

    Args:
        base: base model id or folder (or leave it out and give ``shapes``).
        out: output folder (bench.json, bench.png).
        plugin: a plug-in folder; default: one built in-process (N = num_leaves, top-K, random bank and gate, a
            non-zero scale so every part of the plug-in computes).
        teacher: also time `toe extract`'s capture against a bare forward of this teacher, and an on-policy step.
        shapes: ``BASE:TEACHER`` shapes instead of ``base``/``teacher``: randomly initialised models of real
            configurations (shipped names such as ``qwen2.5-1.5b:deepseek-r1-distill-qwen-7b``, or config.json
            paths; see :mod:`tree_of_experts.shapes`), with a 3-layer plug-in at a quarter, half and three quarters
            of the depth.
        shape_layers: decoder layers of both shape models (same widths); default: the real depth on a GPU, 2 on
            the CPU (minutes, not hours). Every per-layer cost scales with depth; the result records both depths.
        num_leaves: N of the in-process plug-in (when ``plugin`` is not given).
        top_k: K of the in-process plug-in and of the routing timings.
        parts: which measurements to run, any of "generation", "routing", "training", "extraction", "on_policy",
            "bank_scale" (default: all but bank_scale, which runs only when named: a one-layer plug-in of each N
            in ``bank_exponents`` saved, loaded mapped and into RAM, and decoded with, see
            :mod:`tree_of_experts.bank_scale`; extraction and on_policy need a teacher and are left out
            without one).
        workload: the timed workloads (batch sizes, prompt and decode lengths, repetitions, the extraction and
            train steps, the LoRA step's rank), torch's CPU threads and a compiled plug-in hook.
        sweeps: the leaf counts N = 2^e routing and the bank are timed at.
        runtime: dtype and device of the models (default: the GPU when one is visible, else the CPU), overwrite
            (replace an earlier bench run in ``out``; refused otherwise: its numbers are not lost silently); the
            training-only fields and ``resume`` are refused.

    Returns:
        The results (also in ``out/bench.json``) with a one-line ``summary``; ``peak_memory`` holds each part's
        peak (GPU: bytes allocated; CPU: the process's resident high-water mark so far).
    """
    refuse_unused("toe bench", runtime, ("dtype", "device", "overwrite"),
                  {**TRAINING_ONLY, "resume": "a bench run starts again"})
    parts, shape_cfgs = _checked_parts(parts, base, teacher, plugin, shapes)
    claim_out(out, "bench", overwrite=runtime.overwrite, inputs={"base": base, "plugin": plugin, "teacher": teacher})
    if workload.threads:
        torch.set_num_threads(workload.threads)
    dev = torch.device(runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict = {"compiled_plugin": workload.compile, "device": str(dev), "torch_threads": torch.get_num_threads(),
                    "dtype": runtime.dtype, "parts": parts, "peak_memory": {}}
    base_model, model, load_teacher = _models(result, base, teacher, plugin, shapes, shape_cfgs, shape_layers,
                                              num_leaves, top_k, runtime.dtype, dev)
    result["plugin"] = _ready_plugin(model, plugin, workload.compile, num_leaves, top_k)

    # Each part in PARTS's order, its peak memory measured alone; the teacher loads once, for the first part that
    # runs it.
    summary: list[str] = []
    teacher_model = None
    for part in [p for p in PARTS if p in parts]:
        _reset_peak(dev)
        if part == "generation":
            summary += _generation(result, base_model, model, workload, dev)
        elif part == "routing":
            summary += _routing(result, base_model, model, top_k, sweeps, dev)
        elif part == "training":
            summary += _training(result, base_model, model, workload, dev)
        elif part == "extraction":
            model.detach()  # the capture runs the bare base
            teacher_model = teacher_model or load_teacher()
            summary += _extraction(result, base_model, teacher_model, [int(k) for k in model.plugin.blocks],
                                   workload, dev)
            model.attach()
        elif part == "on_policy":
            teacher_model = teacher_model or load_teacher()
            summary += _on_policy(result, base_model, model, teacher_model, workload, dev)
        elif part == "bank_scale":
            model.detach()  # the bank-scale plug-ins go on the bare base
            summary += _bank_scale(result, base_model, top_k, workload, sweeps, dev)
            model.attach()
        result["peak_memory"][part] = _peak(dev)
    del teacher_model
    result["summary"] = "; ".join(summary)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "bench.json"), result)
    atomic_write_text(os.path.join(out, "bench.md"), markdown(result))
    if "routing" in result:
        _plot(result, os.path.join(out, "bench.png"))
    return result


def _checked_parts(parts: list[str] | None, base: str | None, teacher: str | None, plugin: str | None,
                   shapes: str | None) -> tuple[list[str], tuple | None]:
    """The parts to run (the default ones less those that need a teacher, when none is given) and the shapes'
    configurations; refuses unknown parts, parts that need a teacher without one, and models named twice or not
    at all."""
    from .. import shapes as shp

    if parts is not None and not parts:
        raise ToEError(f"--parts is empty: name any of {list(PARTS)}, or leave it out for all")
    parts_given, parts = parts is not None, list(parts or [p for p in PARTS if p not in OPT_IN_PARTS])
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ToEError(f"--parts {unknown}: use any of {list(PARTS)}")
    if shapes and (base or teacher or plugin):
        raise ToEError("--shapes builds both models from their configurations: drop --base/--teacher/--plugin, or "
                       "drop --shapes")
    if not shapes and not base:
        raise ToEError("pass --base (a model folder or hub id), or --shapes BASE:TEACHER (real sizes, random weights)")
    shape_cfgs = shp.parse_shapes(shapes) if shapes else None
    missing = [p for p in parts if p in TEACHER_PARTS] if not (teacher or shapes) else []
    if missing and parts_given:
        raise ToEError(f"--parts {' '.join(missing)} runs the teacher: pass --teacher (or --shapes)")
    return [p for p in parts if p not in missing], shape_cfgs


def _models(result: dict, base: str | None, teacher: str | None, plugin: str | None, shapes: str | None,
            shape_cfgs: tuple | None, shape_layers: int | None, num_leaves: int, top_k: int, dtype: str,
            dev: torch.device):
    """The base, base + plug-in and a loader of the teacher: randomly initialised models of real shapes
    (``shape_cfgs``, cut to ``shape_layers``, with a 3-layer plug-in), or the models named (the plug-in given, or one
    built in-process at the default layer); what they are goes to ``result``."""
    from .. import shapes as shp

    if shape_cfgs:
        depth = shape_layers if shape_layers is not None else (None if dev.type == "cuda" else 2)
        base_cfg, teacher_cfg = (shp.cut_depth(c, depth) for c in shape_cfgs)
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        base_model = shp.random_model(base_cfg, torch_dtype, dev, seed=0)
        layers = shp.injection_layers(base_cfg.num_hidden_layers)
        model = ToEModel.fresh(base_model, layers=layers, num_leaves=num_leaves, top_k=top_k)
        result["shapes"] = {
            "spec": shapes, "base_layers": [base_cfg.num_hidden_layers, shape_cfgs[0].num_hidden_layers],
            "teacher_layers": [teacher_cfg.num_hidden_layers, shape_cfgs[1].num_hidden_layers],
            "base_hidden": base_cfg.hidden_size, "teacher_hidden": teacher_cfg.hidden_size,
            "base_parameter_bytes": shp.parameter_bytes(base_model), "injection_layers": layers}
        result["base"] = f"{shapes.partition(':')[0]} shape ({base_cfg.num_hidden_layers} of " \
                         f"{shape_cfgs[0].num_hidden_layers} layers, random weights)"
        return base_model, model, lambda: shp.random_model(teacher_cfg, torch_dtype, dev, seed=1)
    base_model = load_causal_lm(base, dtype=dtype, device=str(dev))
    if plugin:
        model = ToEModel.from_pretrained(base_model, plugin)
    else:
        layer = default_layer(len(decoder_layers(base_model)))
        model = ToEModel.fresh(base_model, layers=[max(layer, 0)], num_leaves=num_leaves, top_k=top_k)
    result["base"] = base
    return base_model, model, lambda: load_causal_lm(teacher, dtype=dtype, device=str(dev))


def _ready_plugin(model: ToEModel, plugin: str | None, compile: bool, num_leaves: int, top_k: int) -> str:
    """Gives the in-process plug-in a non-zero scale (every part of it computes) and compiles the hook when asked;
    returns what the plug-in is, for the results."""
    if not plugin:
        with torch.no_grad():
            for block in model.plugin.blocks.values():
                block.scale.fill_(0.1)  # a non-zero scale: every part of the plug-in computes
    if compile:
        model.plugin.compile()
    return plugin or f"in-process, N={num_leaves}, K={top_k}, layers {[int(k) for k in model.plugin.blocks]}"


def _generation(result: dict, base_model, model: ToEModel, workload: Workload, dev: torch.device) -> list[str]:
    """Decode and prefill speed of base + plug-in vs the bare base, per batch size."""
    result["generation"] = {f"batch_{b}": bench_generation(base_model, model, b, workload.prompt_len,
                                                           workload.new_tokens, workload.reps, dev)
                            for b in workload.batches or [1, 8]}
    gen = result["generation"].values()
    return ["decode speed ToE/base: " + ", ".join(
        f"{k} {v['decode_ratio']['median']:.3f}x" for k, v in result["generation"].items())
        + " (per step, best of loops: " + ", ".join(f"{v['step']['implied_ratio']:.3f}x" for v in gen) + ")"]


def _routing(result: dict, base_model, model: ToEModel, top_k: int, sweeps: Sweeps, dev: torch.device) -> list[str]:
    """Routing time of the tree gate vs a flat router as N grows."""
    exps = sweeps.routing_exponents or [6, 8, 10, 12, 14, 16, 18, 20]
    result["routing"] = bench_routing(base_model.config.hidden_size, model.toe_config.gate_rank, top_k, exps,
                                      sweeps.routing_tokens, sweeps.routing_reps, dev)
    if "tree_2^20_over_2^10" not in result["routing"]:
        return []
    return [f"tree routing time 2^20/2^10: {result['routing']['tree_2^20_over_2^10']:.2f}x (flat: "
            f"{result['routing']['flat_2^20_over_2^10']:.1f}x)"]


def _training(result: dict, base_model, model: ToEModel, workload: Workload, dev: torch.device) -> list[str]:
    """A train step vs the frozen base's forward and backward, vs one from cached states, and vs a LoRA step."""
    t = result["training"] = bench_training(base_model, model, workload.train_batch, workload.train_length,
                                            workload.reps, dev, workload.lora_rank)
    lines = [f"train step / frozen-base fwd+bwd: {t['ratio']['median']:.2f}x",
             f"train step from cached states at layer {t['cached_layer']} / full step: "
             f"{t['cached_over_full']['median']:.2f}x"]
    if "toe_over_lora" in t:
        lines.append(f"train step / LoRA r{workload.lora_rank} step: {t['toe_over_lora']['median']:.2f}x")
    return lines


def _extraction(result: dict, base_model, teacher_model, layers: list[int], workload: Workload,
                dev: torch.device) -> list[str]:
    """`toe extract`'s capture at ``layers`` (the teacher read at the same relative depth) vs a bare teacher
    forward, and its bytes per token, measured and by the formula."""
    from .. import shapes as shp

    n_b, n_t = len(decoder_layers(base_model)), len(decoder_layers(teacher_model))
    t_layers = [teacher_layer_for(x, n_b, n_t) for x in layers]
    e = result["extraction"] = bench_extraction(teacher_model, base_model, layers, t_layers, workload.extract_batch,
                                                workload.extract_length, workload.reps, dev)
    e["bytes_per_token_formula"] = shp.capture_bytes_per_token(
        [base_model.config.hidden_size] * len(layers), [teacher_model.config.hidden_size] * len(layers), 32)
    return [f"extraction capture / teacher forward: {e['ratio']['median']:.2f}x, "
            f"{e['bytes_per_token'] / 1024:.1f} KiB/token"]


def _on_policy(result: dict, base_model, model: ToEModel, teacher_model, workload: Workload,
               dev: torch.device) -> list[str]:
    """One on-policy step: sampling, the teacher's pass and the update."""
    result["on_policy"] = bench_on_policy(base_model, model, teacher_model, workload.train_batch, workload.prompt_len,
                                          workload.new_tokens, workload.reps, dev)
    return [f"on-policy step: {result['on_policy']['step_s']['median']:.2f} s "
            f"({workload.train_batch} x {workload.new_tokens} sampled tokens)"]


def _bank_scale(result: dict, base_model, top_k: int, workload: Workload, sweeps: Sweeps,
                dev: torch.device) -> list[str]:
    """Load and decode with one-layer plug-ins of growing N, mapped and in RAM (:mod:`tree_of_experts.bank_scale`)."""
    bs = result["bank_scale"] = bank_scale.bench_bank_scale(
        base_model, sweeps.bank_exponents or [10, 12, 14, 16, 18, 20], top_k, workload.prompt_len,
        workload.new_tokens, workload.reps, dev, bench_generation)
    if "span" not in bs:
        return []
    lo, hi = (n.bit_length() - 1 for n in bs["span"])
    rows = {r["num_leaves"]: r for r in bs["rows"]}
    return [f"bank 2^{hi}/2^{lo}: mapped load {bs['mapped_hi_over_lo']['load_s']:.2f}x "
            f"(in RAM {bs['in_ram_hi_over_lo']['load_s']:.1f}x), mapped decode tokens/s "
            f"{bs['mapped_hi_over_lo']['decode_tokens_per_s']:.2f}x; at 2^{hi} mapped/in-RAM load "
            f"{rows[bs['span'][1]]['mapped']['load_s'] / rows[bs['span'][1]]['in_ram']['load_s']:.3f}x"]


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> dict:
    """This part's peak GPU memory allocated (bytes), or on the CPU the process's resident high-water mark so far."""
    if dev.type == "cuda":
        return {"gpu_bytes": torch.cuda.max_memory_allocated(dev)}
    import resource

    return {"rss_high_water_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def markdown(result: dict) -> str:
    """The README tables of one bench run."""

    def ratio(r: dict) -> str:
        return f"{r['median']:.2f}× [{r['min']:.2f}, {r['max']:.2f}]"

    compiled = " (hook compiled with torch.compile)" if result.get("compiled_plugin") else ""
    lines = [f"`{result['base']}` on {result['device']}, {result['torch_threads']} torch thread(s), {result['dtype']}; "
             f"plug-in: {result['plugin']}{compiled}. Ratios: median [min, max] over interleaved repetitions.", ""]
    if set(result["parts"]) - {"bank_scale"}:
        lines += ["| measure | ToE / reference |", "|---|---|"]
    for name, g in result.get("generation", {}).items():
        b = name.replace("batch_", "batch ")
        lines.append(f"| decode tokens/s, {b} (reference: bare base) | {ratio(g['decode_ratio'])} |")
        lines.append(f"| decode tokens/s, {b}, fastest repetition of each side | {g['decode_ratio_best']:.2f}× |")
        st = g["step"]
        lines.append(f"| one decode step, {b}: base {st['base_step_us']:.0f} µs, plug-in adds {st['plugin_us']:.0f} µs "
                     f"(best of loops) | {st['implied_ratio']:.3f}× |")
        lines.append(f"| prefill tokens/s, {b} (reference: bare base) | {ratio(g['prefill_ratio'])} |")
    t = result.get("training")
    if t:
        lines.append(f"| train step time (reference: frozen-base forward + backward to the injection layer) | "
                     f"{ratio(t['ratio'])} |")
        if "toe_over_lora" in t:
            lines.append(f"| train step time (reference: a LoRA r{t['lora_rank']} step on the same tokens) | "
                         f"{ratio(t['toe_over_lora'])} |")
        if "cached_over_full" in t:
            lines.append(f"| train step from cached states at layer {t['cached_layer']} (`--cached_states`; "
                         f"reference: the full step) | {ratio(t['cached_over_full'])} |")
    e = result.get("extraction")
    if e:
        lines.append(f"| extraction capture tokens/s (reference: bare teacher forward) | {ratio(e['ratio'])} |")
        a = e.get("account")
        if a:
            lines.append(f"| where capture's time goes: teacher forward with hooks {100 * a['teacher_share']:.0f} %, "
                         f"base forward {100 * a['base_share']:.0f} %, top-k + host copies {100 * a['rest_share']:.0f} "
                         f"% (reference: the teacher forward's own time, bare) | "
                         f"{a['teacher_hooks_over_bare']:.2f}× |")
    o = result.get("on_policy")
    if o:
        lines.append(f"| on-policy step ({o['sampled_tokens']} sampled tokens): sample {o['sample_s']['median']:.3f} s "
                     f"+ teacher {o['teacher_s']['median']:.3f} s + update {o['update_s']['median']:.3f} s "
                     f"(reference: the whole step, {o['step_s']['median']:.3f} s) | "
                     f"{o['update_s']['median'] / o['step_s']['median']:.2f}× (update share) |")
    sh = result.get("shapes")
    if sh:
        lines += ["", f"Shapes `{sh['spec']}`: base {sh['base_layers'][0]} of {sh['base_layers'][1]} layers (hidden "
                      f"{sh['base_hidden']}), teacher {sh['teacher_layers'][0]} of {sh['teacher_layers'][1]} (hidden "
                      f"{sh['teacher_hidden']}), random weights; plug-in at layers {sh['injection_layers']}."]
    if e:
        lines.append(f"Extraction shard: {e['bytes_per_token']:.0f} bytes/token measured "
                     f"({e.get('bytes_per_token_formula', 0)} by the formula in docs/scale.md).")
    peaks = result.get("peak_memory") or {}
    if peaks:
        unit = "GPU memory allocated" if any("gpu_bytes" in v for v in peaks.values()) else "resident memory so far"
        lines.append(f"Peak {unit} per part: " + ", ".join(
            f"{k} {next(iter(v.values())) / 2**30:.2f} GiB" for k, v in peaks.items()) + ".")
    if t:
        st = t["plugin_state_bytes"]
        lines += ["", f"Training state: plug-in parameters {st['params'] / 2**20:.2f} MiB + gradients "
                      f"{st['grads'] / 2**20:.2f} MiB + Adam {st['adam'] / 2**20:.2f} MiB; base parameters holding a "
                      f"gradient after a step: {t['base_params_with_grad']}."]
        peak = t["peak_bytes"]
        if peak["reference"]:
            lines.append(f"Peak GPU memory: train step {peak['toe_step'] / 2**20:.0f} MiB vs reference "
                         f"{peak['reference'] / 2**20:.0f} MiB.")
    if "bank_scale" in result:
        lines += ["", bank_scale.markdown(result["bank_scale"]).rstrip("\n")]
    if "routing" not in result:
        return "\n".join(lines) + "\n"
    rows = result["routing"]["rows"]
    lines += ["", "| N | tree gate, beam K: µs/token, best (median) | flat softmax router: µs/token, best (median) |",
              "|---|---|---|"]
    for r in rows:
        med = [r.get(f"{x}_us_per_token_median") for x in ("tree_beam", "flat")]
        med = [f" ({m:.1f})" if m is not None else "" for m in med]
        lines.append(f"| 2^{r['num_leaves'].bit_length() - 1} | {r['tree_beam_us_per_token']:.1f}{med[0]} | "
                     f"{r['flat_us_per_token']:.1f}{med[1]} |")
    if "tree_2^20_over_2^10" in result["routing"]:
        lines += ["", f"Tree routing time 2^20 / 2^10: {result['routing']['tree_2^20_over_2^10']:.2f}×; flat router: "
                      f"{result['routing']['flat_2^20_over_2^10']:.0f}×."]
    return "\n".join(lines) + "\n"


def _plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["routing"]["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    n = [r["num_leaves"] for r in rows]
    ax.loglog(n, [r["tree_beam_us_per_token"] for r in rows], "o-", label="tree gate (beam descent)")
    ax.loglog(n, [r["flat_us_per_token"] for r in rows], "s-", label="flat softmax router")
    ax.set(xlabel="leaves N", ylabel="routing µs / token", title=f"routing cost vs N ({result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
