"""`toe extract --max_disk / --state_tokens / --dry_run`: the folder stays within its budget as the corpus grows,
a budget that holds every token gives today's extraction exactly, a sample gives a close one, and the plan is made
(or a budget refused) before any model loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tree_of_experts.commands.extract import extract, rebuild
from tree_of_experts.config import ToEError
from tree_of_experts.extraction.budget import parse_size
from tree_of_experts.extraction.store import Extraction, has_states

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
BUDGET = "2MB"  # holds the fixture's every state (~0.6 MB), not the 4x corpus's (~2.3 MB): that one gets a sample
ARGS = dict(num_leaves=8, shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)  # the `experts` fixture's


def run(pair, out, data=FIXTURE, **kw):
    return extract(teacher=str(pair / "teacher"), base=str(pair / "base"), data=data, out=str(out), **{**ARGS, **kw})


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def four_times(path) -> str:
    """The fixture's rows four times over, the numbers varied (a + 13 c, b + 7 c in copy c)."""
    rows = [json.loads(line) for line in open(FIXTURE)]
    with open(path, "w") as f:
        for c in range(4):
            for r in rows:
                a, b = (int(x) for x in re.findall(r"\d+", r["question"]))
                a, b = a + 13 * c, b + 7 * c
                f.write(json.dumps({"question": f"what is {a} plus {b}?",
                                    "answer": f"{a} plus {b} is <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def big(tmp_path_factory, experts):
    """The 4x corpus extracted under the budget (beside the `experts` fixture's pair)."""
    d = tmp_path_factory.mktemp("big")
    data = four_times(d / "big.jsonl")
    summary = run(experts, d / "ex", data=data, max_disk=BUDGET)
    return d, data, summary


def tensors(folder, name):
    return load_file(os.path.join(folder, name))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("750KB") == 750_000
    assert parse_size("1GiB") == 2**30 and parse_size("1.5 mb") == 1_500_000 and parse_size(1234) == 1234
    for bad in ("2 parsecs", "-1MB", "0", "MB"):
        with pytest.raises(ToEError, match="--max_disk"):
            parse_size(bad)


def test_a_budget_holding_every_state_gives_todays_extraction(experts, tmp_path):
    summary = run(experts, tmp_path / "b", max_disk=BUDGET)
    assert "state_sample" not in summary and Extraction(str(tmp_path / "b")).state_examples() is None
    assert folder_bytes(tmp_path / "b") <= parse_size(BUDGET)
    for name in ("projector.safetensors", "toe_model.safetensors"):
        assert_same(tensors(experts / "ex", name), tensors(tmp_path / "b", name))
    # the route data: the same states and labels, which under a budget it reads from the shards (it keeps where)
    assert_same(Extraction(str(experts / "ex")).route_data(), Extraction(str(tmp_path / "b")).route_data())
    assert not any(k.startswith("states.") for k in tensors(tmp_path / "b", "route_data.safetensors"))
    for pa, pb in zip(Extraction(str(experts / "ex")).shard_paths(), Extraction(str(tmp_path / "b")).shard_paths(),
                      strict=True):
        assert_same(load_file(pa), load_file(pb))
    ref = json.loads((experts / "ex" / "summary.json").read_text())
    assert summary["o1_heldout_ce"] == ref["o1_heldout_ce"] and summary["clusters"] == ref["clusters"]


def test_the_folder_stays_within_the_budget_as_the_corpus_grows(experts, big):
    d, data, summary = big
    ex = Extraction(str(d / "ex"))
    size, budget = folder_bytes(d / "ex"), parse_size(BUDGET)
    plan = summary["disk_plan"]
    assert size <= plan["disk_total"] <= budget  # the plan is an upper bound of what is written
    assert size >= 0.85 * plan["disk_total"]  # and a close one
    assert folder_bytes(experts / "ex") <= budget
    # the run records its processes' peak resident memory beside the plan's estimate
    timings = json.loads((d / "ex" / "timings-0.json").read_text())
    assert summary["capture"]["peak_rss_gib"] == timings["peak_rss_gib"] > 0
    assert summary["memory"]["peak_rss_gib"] >= timings["peak_rss_gib"]  # one process captured and built
    assert "Peak resident memory: capture" in (d / "ex" / "summary.md").read_text()
    # a sample: every held-out example in it, states for it alone, light fields (top-k, low state) for everyone
    sample = ex.state_examples()
    heldout = set(ex.manifest()["counts"]["heldout"])
    assert sample is not None and heldout <= set(sample) and len(heldout) < len(sample) < 96
    assert summary["state_sample"]["examples"] == len(sample) < summary["examples"] == 96
    with_states = [int(e["example"][0]) for e in ex.iter_examples(with_states=True)]
    assert sorted(with_states) == sample
    every = list(ex.iter_examples())
    assert sorted(int(e["example"][0]) for e in every) == list(range(96))
    assert all("topk_ids" in e and "base.0" in e for e in every)
    light = [p for p in ex.shard_paths() if not has_states(p)]
    assert light and all(not any(k.startswith("teacher.") for k in load_file(p)) for p in light)
    # the route data holds the sample's training tokens only
    rows = sum(int(e["valid"].sum()) for e in ex.iter_examples(with_states=True) if int(e["example"][0]) not in heldout)
    assert len(ex.route_data()["leaf.0"]) == rows
    # the shards' bytes are the formula's: T light + S (full - light), plus one header per shard
    shards = sum(os.path.getsize(p) for p in ex.shard_paths())
    formula = plan["disk"]["shards"]
    assert formula <= shards <= formula + 4096 * len(ex.shard_paths())


def test_a_sample_of_the_states_gives_a_close_extraction(experts, tmp_path):
    """Half the tokens with states (the held-out quarter and a third of the training tokens): the held-out examples,
    always sampled, score the same base and teacher; the maps fit on fewer rows land close: the ridge map's
    held-out R² within 0.1 (0.93 vs 0.996 measured: 49 inputs on ~300 rows), the trained map's held-out CE within
    0.005 nats."""
    ref = json.loads((experts / "ex" / "summary.json").read_text())
    summary = run(experts, tmp_path / "half", state_tokens=ref["tokens"] // 2)
    assert summary["state_sample"]["tokens"] <= ref["tokens"] // 2
    o1, o1_ref = summary["o1_heldout_ce"], ref["o1_heldout_ce"]
    assert o1["base"] == o1_ref["base"] and o1["teacher"] == o1_ref["teacher"]
    assert abs(summary["projector"][0]["heldout_r2"] - ref["projector"][0]["heldout_r2"]) <= 0.1
    assert o1["trained_map"] == pytest.approx(o1_ref["trained_map"], abs=0.005)
    assert summary["projector"][0]["train_rows"] < ref["projector"][0]["train_rows"]
    # the map trains as many steps on the sample as on the whole corpus (a budget bounds disk, not training), and
    # the held-out CE after each pass over the sample picks the maps kept (a small sample overfits in a few passes)
    assert summary["fusion_map_steps"] == ref["fusion_map_steps"] == 5  # 18 training examples, 4 a step
    pick = summary["fusion_map_pick"]
    assert "fusion_map_pick" not in ref and len(pick["heldout_ce_by_pass"]) >= 2
    assert pick["heldout_ce_by_pass"][pick["kept_pass"] - 1] == min(pick["heldout_ce_by_pass"])
    assert o1["trained_map"] == pytest.approx(min(pick["heldout_ce_by_pass"]), abs=1e-6)  # the kept maps' CE


def test_a_budget_too_small_is_refused_before_a_model_loads(experts, tmp_path, monkeypatch):
    import tree_of_experts.commands.extract as ex_mod
    from tree_of_experts.hf import loading as hf

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hf, "load_causal_lm", fail)
    monkeypatch.setattr(ex_mod, "load_causal_lm", fail)
    with pytest.raises(ToEError) as e:
        run(experts, tmp_path / "small", max_disk="300KB")
    msg = str(e.value)
    assert "\n" not in msg and "--max_disk 300 KB" in msg
    assert "--limit" in msg and "--topk_logprobs 0" in msg and "--cache_low_states false" in msg
    # the hinted --limit fits the budget it was hinted for (one more row would not): the plan passes
    hinted = re.search(r"--limit (\d+)", msg)
    assert hinted, msg
    run(experts, tmp_path / "hinted", max_disk="300KB", limit=int(hinted.group(1)), dry_run=True)
    with pytest.raises(ToEError, match="held-out"):
        run(experts, tmp_path / "few", state_tokens=10)


def test_dry_run_prints_the_plan_and_loads_no_model(experts, tmp_path, monkeypatch, capsys):
    import tree_of_experts.commands.extract as ex_mod
    from tree_of_experts.cli import main
    from tree_of_experts.hf import loading as hf

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hf, "load_causal_lm", fail)
    monkeypatch.setattr(ex_mod, "load_causal_lm", fail)
    plan = run(experts, tmp_path / "dry", dry_run=True, max_disk=BUDGET)["plan"]
    assert not (tmp_path / "dry").exists()  # nothing written
    assert plan["light_bytes_per_token"] == 18 + 4 + 6 * 32 + 2 * 32  # ids/masks, NLL + top-32, the low state
    assert plan["full_bytes_per_token"] == 18 + 4 + 6 * 32 + 2 * (32 + 48)
    assert plan["sampled_examples"] == 24 and plan["disk_total"] <= parse_size(BUDGET)
    assert plan["peak_ram"] == max(plan["ram"]["capture"], plan["ram"]["build"]) > 0
    main(["extract", "--teacher", str(experts / "teacher"), "--base", str(experts / "base"), "--data", FIXTURE,
          "--out", str(tmp_path / "dry"), "--num_leaves", "8", "--heldout_frac", "0.25", "--max_disk", "1MB",
          "--dry_run", "true"])
    text = capsys.readouterr().out
    assert "bytes/token: light 278" in text and "state sample S =" in text and "peak RAM" in text
    assert "of --max_disk 1 MB" in text and not (tmp_path / "dry").exists()


def test_consumers_read_the_sample(experts, big, tmp_path):
    """Training rows: top-k and the cached low state for every row, state targets for the sampled ones only; the
    predictability fit reads the sample's tokens; --cached_states without low states is refused in one line."""
    from tree_of_experts.data import DataSpec
    from tree_of_experts.extraction.fusion import extraction_signal
    from tree_of_experts.extraction.predictability import layer_rows
    from tree_of_experts.hf.loading import load_tokenizer
    from tree_of_experts.training.examples import collate, load_examples, state_targets

    d, data, _ = big
    ex = Extraction(str(d / "ex"))
    tok = load_tokenizer(str(experts / "base"))
    rows, has_kd, _ = load_examples(data, DataSpec().for_tokenizer(tok), tok, 512, None, str(d / "ex"), True, 0,
                                    with_targets=True)
    sample = set(ex.state_examples())
    assert has_kd and all(r.has("topk_ids") and r.has("state") for r in rows)
    assert {i for i, r in enumerate(rows) if r.has("target")} == sample
    assert all(r.topk_ids is r.state is r.target is None for r in rows)  # held in their shards until a batch reads
    signal = extraction_signal(ex, ex.run()["layers"])[0]
    for e in ex.iter_examples():  # a batch reads what the shards hold (and the targets computed from them)
        got = rows[int(e["example"][0])].loaded()
        assert torch.equal(got.topk_ids, e["topk_ids"]) and torch.equal(got.topk_logp, e["topk_logp"])
        assert torch.equal(got.state, e["base.0"]) and got.ref is None
        if "teacher.0" in e:
            want = state_targets(e, 1, signal)
            assert torch.equal(got.target, want[0]) and torch.equal(got.target_norm2, want[1])
        else:
            assert got.target is None
    mix = [i for i, r in enumerate(rows) if r.has("target")][:4] + \
        [i for i, r in enumerate(rows) if not r.has("target")][:4]
    b = collate([rows[i] for i in mix], tok.pad_token_id)  # sampled and unsampled rows: no target for the latter
    assert len(mix) == 8 and b["state_norm2"][:4].any() and not b["state_norm2"][4:].any()
    heldout = set(ex.manifest()["counts"]["heldout"])
    signal = extraction_signal(ex, [0])[0]
    h, _, hh, _ = layer_rows(ex, 0, signal, heldout)
    valid = {int(e["example"][0]): int(e["valid"].sum()) for e in ex.iter_examples()}
    assert len(h) == sum(valid[i] for i in sample - heldout) and len(hh) == sum(valid[i] for i in heldout)
    capped, _, held, _ = layer_rows(ex, 0, signal, heldout, max_rows=50)  # a predictor's fit: at most max_rows
    assert len(capped) == 50 and torch.equal(held, hh) and all((h == r).all(1).any() for r in capped)
    # a rebuild reads the sample too
    rebuilt = rebuild(str(d / "ex"), str(tmp_path / "re"), num_leaves=4, gate_rank=8)
    assert rebuilt["state_sample"] == big[2]["state_sample"]
    assert len(Extraction(str(tmp_path / "re")).route_data()["leaf.0"]) == len(h)
    # the source written anew (its manifest's hashes change with its shards): the rebuilt bank's row references
    # would point into other states of the same shapes, so its route data is refused, naming the rebuild
    original = (d / "ex" / "manifest.json").read_text()  # (the fixture is shared: put back after)
    manifest = json.loads(original)
    manifest["shard_files"][sorted(manifest["shard_files"])[0]]["sha256"] = "0" * 64
    (d / "ex" / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises(ToEError, match=r"was written anew since this bank was built from it: rebuild it"):
            Extraction(str(tmp_path / "re")).route_data()
    finally:
        (d / "ex" / "manifest.json").write_text(original)


def test_a_sampled_extraction_resumes_and_serves_a_layer_subset(experts, tmp_path):
    """A sampled extraction interrupted and rerun equals one run; --reuse_capture takes its sample; --cached_states
    on an extraction without low states is refused in one line."""
    from tree_of_experts.commands.train import train

    one = run(experts, tmp_path / "one", state_tokens=600, layers=[0, 1], cache_low_states=False)
    run(experts, tmp_path / "two", state_tokens=600, layers=[0, 1], cache_low_states=False)
    os.remove(Extraction(str(tmp_path / "two")).shard_paths()[-1])  # a light shard
    for name in ("toe_model.safetensors", "summary.json"):
        os.remove(tmp_path / "two" / name)
    run(experts, tmp_path / "two", state_tokens=600, layers=[0, 1], cache_low_states=False)
    assert_same(tensors(tmp_path / "one", "toe_model.safetensors"), tensors(tmp_path / "two", "toe_model.safetensors"))
    with pytest.raises(ToEError, match="state_budget"):  # another sample for the same folder: refused, naming it
        run(experts, tmp_path / "two", state_tokens=700, layers=[0, 1], cache_low_states=False)
    sub = run(experts, tmp_path / "sub", layers=[1], reuse_capture=str(tmp_path / "one"))
    assert sub["state_sample"] == one["state_sample"]
    src, dst = Extraction(str(tmp_path / "one")), Extraction(str(tmp_path / "sub"))
    for a, b in zip(src.iter_examples(with_states=True), dst.iter_examples(with_states=True), strict=True):
        assert torch.equal(a["teacher.1"], b["teacher.0"]) and torch.equal(a["base.1"], b["base.0"])
    assert dst.light_keys() == src.light_keys() and "base.0" not in dst.light_keys()
    with pytest.raises(ToEError, match="--cache_low_states true") as e:
        train(base=str(experts / "base"), experts=str(tmp_path / "one"), data=FIXTURE, out=str(tmp_path / "t"),
              cached_states=True, max_steps=1)
    assert "\n" not in str(e.value)


def test_a_budgeted_capture_resumed_with_other_tree_settings_keeps_its_sample(experts, tmp_path):
    """Under --max_disk the sample depends on the tree's settings too (the route rows and the plug-in take room): a
    resumed capture keeps the sample its run.json records rather than refusing its own shards."""
    full = run(experts, tmp_path / "plan", dry_run=True)["plan"]
    budget = int(0.75 * full["disk_total"])
    first = run(experts, tmp_path / "ex", max_disk=budget)
    assert first["state_sample"] is not None
    os.remove(Extraction(str(tmp_path / "ex")).shard_paths()[-1])
    for name in ("toe_model.safetensors", "summary.json", "build.json"):
        os.remove(tmp_path / "ex" / name)
    again = run(experts, tmp_path / "ex", max_disk=budget, num_leaves=32)  # 32 leaves alone sample 6 examples
    assert again["state_sample"] == first["state_sample"]


def test_peak_memory_stays_within_the_plan(experts, big, tmp_path):
    """Peak RSS of the 4x corpus's budgeted extraction, in a fresh process after a warm-up extraction (imports,
    kernels, allocator pools), grows by at most the plan's peak RAM estimate plus 150 MB (what the estimate leaves
    out: Python objects, allocator slack; the tiny models make the estimate itself small)."""
    d, data, _ = big
    script = f"""
import json, resource, sys
from tree_of_experts.commands.extract import extract, rebuild
kw = dict(teacher={str(experts / 'teacher')!r}, base={str(experts / 'base')!r}, **{ARGS!r})
extract(data={FIXTURE!r}, out={str(tmp_path / 'warm')!r}, limit=8, **kw)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
s = extract(data={data!r}, out={str(tmp_path / 'big')!r}, max_disk={BUDGET!r}, **kw)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"before": before, "after": after, "plan": s["disk_plan"]["peak_ram"]}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["after"] - m["before"] <= m["plan"] + 150 * 2**20, m


def test_leaf_count_beyond_memory_is_refused_with_the_numbers():
    from tree_of_experts.extraction.budget import check_leaves_fit

    check_leaves_fit(64, "balanced", 200_000, memory=2**30)
    check_leaves_fit(2**16, "balanced", 200_000, memory=4 * 2**30)  # no (rows, M) table: 2^16 leaves fit in 4 GiB
    with pytest.raises(ToEError, match=r"num_leaves=4096 on 200000 tokens needs about 0\.4 GiB.*'s 0\.5 GiB"):
        check_leaves_fit(4096, "balanced", 200_000, memory=2**29)


def test_a_budget_over_a_full_capture_samples_its_shards(experts, tmp_path):
    """--reuse_capture of an extraction that kept every example's states, under a budget: the same sample, shards
    and build as a budgeted capture of its own (at a subset of the source's layers), the teacher not run — one
    capture serves a sweep over budgets; a budget over a source that kept a sample only is refused in one line."""
    ref = json.loads((experts / "ex" / "summary.json").read_text())
    kw = dict(layers=[1], state_tokens=ref["tokens"] // 2)
    run(experts, tmp_path / "both", layers=[0, 1])
    fresh = run(experts, tmp_path / "fresh", **kw)
    reused = run(experts, tmp_path / "reused", reuse_capture=str(tmp_path / "both"), **kw)
    a, b = Extraction(str(tmp_path / "fresh")), Extraction(str(tmp_path / "reused"))
    assert reused["state_sample"] == fresh["state_sample"] and b.state_examples() == a.state_examples() is not None
    assert reused["capture"]["reused_from"] == os.path.abspath(tmp_path / "both")
    ram, ram_fresh = reused["disk_plan"]["ram"], fresh["disk_plan"]["ram"]  # no teacher and no forward to plan for
    assert ram["capture_batch"] == 0 < ram_fresh["capture_batch"] and ram["weights"] < ram_fresh["weights"]
    for pa, pb in zip(a.shard_paths(), b.shard_paths(), strict=True):  # full shards, then light ones, as captured
        ta, tb = load_file(pa), load_file(pb)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]) if not ta[k].is_floating_point() else \
                torch.allclose(ta[k].float(), tb[k].float(), atol=2e-3), k
    assert b.light_keys() == a.light_keys() and "base.0" in b.light_keys()
    ce_a, ce_b = fresh["o1_heldout_ce"], reused["o1_heldout_ce"]
    assert ce_a.keys() == ce_b.keys() and all(ce_b[k] == pytest.approx(ce_a[k], abs=1e-3) for k in ce_a
                                               if not isinstance(ce_a[k], dict))
    assert reused["clusters"] == fresh["clusters"]
    bare = run(experts, tmp_path / "bare", reuse_capture=str(tmp_path / "both"), cache_low_states=False,
               **{**kw, "layers": [0, 1], "max_disk": "1MB"})  # every pair, and light shards without a low state
    c = Extraction(str(tmp_path / "bare"))
    assert bare["state_sample"]["examples"] < bare["examples"] and c.light_keys() == a.light_keys() - {"base.0"}
    for ea, eb in zip(Extraction(str(tmp_path / "both")).iter_examples(set(c.state_examples())),
                      c.iter_examples(with_states=True), strict=True):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)  # gathered as captured
    with pytest.raises(ToEError, match="kept the states of a sample of its examples only") as e:
        run(experts, tmp_path / "again", reuse_capture=str(tmp_path / "fresh"), **kw)
    assert "\n" not in str(e.value)


def one_pass_rows(ex, heldout: set[int], layers: int, signal, sample_rate: float, max_rows: int, seed: int):
    """The clustered rows as the build gathered them before rows.py: every sampled training token, then max_rows."""
    g = torch.Generator().manual_seed(seed)
    d, x, at = [[] for _ in range(layers)], [[] for _ in range(layers)], [[] for _ in range(layers)]
    for e in ex.iter_examples(with_states=True):
        if int(e["example"][0]) in heldout:
            continue
        keep = e["valid"].bool() & (torch.rand(len(e["valid"]), generator=g) < sample_rate)
        for j in range(layers):
            d[j].append(signal(j, e[f"teacher.{j}"][keep].float(), e[f"base.{j}"][keep].float()))
            x[j].append(e[f"base.{j}"][keep])
            at[j].append(torch.stack([e["example"][keep], keep.nonzero()[:, 0]], 1))
    out = []
    for j in range(layers):
        dj, xj, aj = torch.cat(d[j]), torch.cat(x[j]), torch.cat(at[j])
        if len(dj) > max_rows:
            pick = torch.randperm(len(dj), generator=g)[:max_rows]
            dj, xj, aj = dj[pick], xj[pick], aj[pick]
        out.append((dj, xj, aj))
    return out


class TwoLayers:
    """The 4x extraction seen with a second injection layer (its states transformed), for two layers' draws."""

    def __init__(self, ex: Extraction):
        self.ex, self.folder = ex, ex.folder

    def example_refs(self, with_states=False, columns=()):
        return self.ex.example_refs(with_states, columns)

    def iter_examples(self, which=None, with_states=False):
        for e in self.ex.iter_examples(which, with_states):
            yield {**e, "base.1": (e["base.0"] * 2).flip(-1), "teacher.1": e["teacher.0"] + 1}


@pytest.mark.parametrize("sample_rate, max_rows", [(1.0, 10**6), (0.5, 10**6), (0.7, 300), (1.0, 40)])
def test_the_clustered_rows_are_a_single_pass_s_bit_for_bit_in_bounded_memory(big, sample_rate, max_rows):
    """Two passes (draws, then only the picked rows' δ and h) give the rows one pass over every sampled token gave:
    the same δ, h and (example, row) at each of two layers, in the same order, with and without the max_rows cap."""
    from tree_of_experts.extraction.fusion import extraction_signal
    from tree_of_experts.extraction.rows import sampled_rows

    ex = TwoLayers(Extraction(str(big[0] / "ex")))
    heldout = set(ex.ex.manifest()["counts"]["heldout"])
    one = extraction_signal(ex.ex, [0])[0]
    signal = lambda j, u, h: one(0, u, h) * (j + 1)  # noqa: E731
    want = one_pass_rows(ex, heldout, 2, signal, sample_rate, max_rows, seed=3)
    got = sampled_rows(ex, heldout, [0, 1], signal, sample_rate, max_rows, seed=3)
    for j in range(2):
        assert len(want[j][0]) == min(max_rows, len(want[0][0])) and len(want[j][0]) > 8
        for w, g in zip(want[j], (got.deltas[j], got.states[j], got.where[j])):
            assert w.dtype == g.dtype and torch.equal(w, g)
    if max_rows < 10**6:  # the two layers draw their own rows
        assert not torch.equal(got.where[0], got.where[1])
    empty = sampled_rows(ex, heldout | set(ex.ex.state_examples()), [0], signal, 1.0, 10, seed=3)
    assert len(empty.deltas[0]) == len(empty.where[0]) == 0  # no training example: no rows (the build refuses)


def test_the_fusion_map_s_examples_are_read_from_the_shards_as_stored(big, tmp_path):
    """The fusion maps' training reads its examples one at a time from their shards: in the order and with the
    values that loading the shards whole gives, only the keys asked for."""
    ex = Extraction(str(big[0] / "ex"))
    which = set(ex.state_examples()[::2])
    keys = ("input_ids", "loss_mask", "valid", "teacher.0")
    lazy = ex.example_slices(which, keys)
    whole = list(ex.iter_examples(which, with_states=True))
    assert len(lazy) == len(whole) == len(which) and lazy.example_ids == [int(e["example"][0]) for e in whole]
    for e, w in zip(lazy[1:] + [lazy[0]], whole[1:] + whole[:1]):  # a slice and an index read the same examples
        assert set(e) == set(keys) and all(torch.equal(e[k], w[k]) for k in keys)
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in e.values())  # owned rows
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(lazy.index[0][0], "rb").read()[:1000])  # a shard cut short: one line naming the fix
    with pytest.raises(ToEError, match="cut.safetensors is unreadable .*rerun `toe extract`") as err:
        type(lazy)([(str(bad), 0, 3)], keys, [0])[0]
    assert "\n" not in str(err.value)


def test_a_shard_rewritten_during_training_is_refused_not_mixed_in(experts, big, tmp_path):
    """Training reads a batch's cached fields from the shards: a shard rewritten after the run loaded the extraction
    (`toe extract --overwrite` beside it) is refused in one line at the batch that reads it, never mixed in."""
    import shutil

    from safetensors.torch import save_file

    from tree_of_experts.data import DataSpec
    from tree_of_experts.hf.loading import load_tokenizer
    from tree_of_experts.training.examples import collate, load_examples

    d, data, _ = big
    shutil.copytree(d / "ex", tmp_path / "ex")
    tok = load_tokenizer(str(experts / "base"))
    rows, _, _ = load_examples(data, DataSpec().for_tokenizer(tok), tok, 512, None, str(tmp_path / "ex"), True, 0)
    collate(rows[:2], tok.pad_token_id)  # reads
    path = rows[0].ref.path
    save_file(load_file(path), path)  # the same tensors written again: another file as far as the run can tell
    with pytest.raises(ToEError, match="changed since this run loaded its extraction") as err:
        collate(rows[:2], tok.pad_token_id)
    assert "\n" not in str(err.value)
