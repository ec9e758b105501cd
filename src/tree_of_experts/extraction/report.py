"""An extraction's summary.md: what was built from what, the fits' quality, the capture's speed and the memory
used against the plan's estimate."""

from __future__ import annotations

from .budget import human

GIB = 2**30


def signal_words(signal: dict | None) -> str:
    if signal and signal.get("kind") == "ridge":
        return f"the ridge step λ (P(u) - h), λ = {signal['lambda']}"
    return "the trained fusion map A(u, h)"


def summary_markdown(s: dict) -> str:
    lines = [f"# Extraction: {s['teacher']} -> {s['base']}", "",
             f"{s['examples']} examples ({s['heldout_examples']} held out), {s['tokens']} tokens; "
             f"layers {s['layers']} <- teacher {s['teacher_layers']}; {s['shape']} tree, N = {s['num_leaves']}; "
             f"bank from {signal_words(s.get('signal'))}.", ""]
    if s.get("state_sample"):
        lines += [f"States (base and teacher at every layer) kept for a sample: {s['state_sample']['tokens']} of "
                  f"{s['tokens']} tokens in {s['state_sample']['examples']} examples, every held-out one "
                  "(`--max_disk`/`--state_tokens`); the maps, the tree and the route data are built from it.", ""]
    pick = s.get("fusion_map_pick")
    if pick:
        by_pass = ", ".join(f"{x:.4f}" for x in pick["heldout_ce_by_pass"])
        lines += [f"Trained fusion maps: {s['fusion_map_steps']} steps over the state sample; held-out CE after each "
                  f"pass {by_pass} nats; kept pass {pick['kept_pass']} ({pick['kept_steps']} steps), so the held-out "
                  "CE below also picked them.", ""]
    for p, layer in zip(s["projector"], s["layers"]):
        lines.append(f"Ridge projector (layer {layer}): held-out R² {p['heldout_r2']:.3f}, λ = {p['lambda']:.3g}.")
    if s["o1_heldout_ce"]:
        lines += ["", "| held-out CE (response tokens) | nats |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in s["o1_heldout_ce"].items() if isinstance(v, float)]
    for layer, c in s["clusters"].items():
        lines += ["", f"Layer {layer}: effective leaves {c['effective_leaves']:.1f} of {len(c['sizes'])}; "
                      f"cluster sizes min {min(c['sizes'])} / max {max(c['sizes'])}; "
                      f"geometry-initialised gate routes {100 * c['gate_init_routing_accuracy']:.1f} % of tokens "
                      f"to their own leaf; mean ‖δ‖ {c['mean_delta_norm']:.3g} vs ‖h‖ {c['mean_state_norm']:.3g}."]
    cap = s["capture"]
    if cap.get("reused_from"):
        lines += ["", f"States taken from the capture in {cap['reused_from']} (`--reuse_capture`): the teacher did not "
                      "run for the shards this run wrote."]
    if cap.get("tokens"):
        lines += ["", f"Capture: {cap['tokens_per_s']:.1f} tokens/s vs {cap['teacher_forward_tokens_per_s']:.1f} "
                      f"for the teacher forward alone (ratio {cap['ratio_vs_teacher_forward']:.2f})."]
    lines += memory_lines(s)
    return "\n".join(lines) + "\n"


def memory_lines(s: dict) -> list[str]:
    """The processes' peak resident memory beside the plan's estimate (``--max_disk``/``--state_tokens`` runs): the
    capture's peak from its timings record, the build's from this process (it includes the capture's where one
    process did both)."""
    peak, cap = (s.get("memory") or {}).get("peak_rss_gib"), s["capture"].get("peak_rss_gib")
    if peak is None:
        return []
    ram = (s.get("disk_plan") or {}).get("ram") or {}
    plan = (lambda k: f" (plan {human(ram[k])})" if k in ram else "")
    words = f"capture {human(cap * GIB)}{plan('capture')}; " if cap is not None else ""
    cuda = (s.get("memory") or {}).get("peak_cuda_gib")
    return ["", f"Peak resident memory: {words}build process {human(peak * GIB)}{plan('build')}; the plan's "
                "estimates leave out the ~0.6 GB of Python, torch and transformers."
            + (f" Peak CUDA memory (torch's allocator): {human(cuda * GIB)}." if cuda is not None else "")]
