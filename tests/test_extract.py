from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.commands.extract import extract, rebuild
from tree_of_experts.data import DataSpec, align_offsets, read_jsonl
from tree_of_experts.extraction.build import balanced_tree, mass_ordered_clusters
from tree_of_experts.extraction.gate_init import init_gate_from_geometry
from tree_of_experts.extraction.fusion import GramAccumulator, fit_ridge
from tree_of_experts.extraction.store import Extraction
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer
from tree_of_experts.tree import TreeGate, path_labels

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def run(pair, out, **kw):
    args = dict(teacher=str(pair / "teacher"), base=str(pair / "base"), data=FIXTURE, out=str(out), num_leaves=8,
                shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)
    return extract(**{**args, **kw})


def test_extract_writes_shards_manifest_and_a_loadable_identity_plugin(pair, tmp_path):
    summary = run(pair, tmp_path / "ex")
    out = tmp_path / "ex"
    for name in ("manifest.json", "summary.json", "summary.md", "projector.safetensors", "route_data.safetensors",
                 "toe_config.json", "toe_model.safetensors", "README.md"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["layers"] == [0] and manifest["teacher_layers"] == [1]
    shard = load_file(Extraction(str(out)).shard_paths()[0])
    assert shard["teacher.0"].dtype == torch.float16 and shard["teacher.0"].shape[1] == 48
    assert shard["base.0"].shape[1] == 32 and shard["topk_ids"].shape[1] == 32
    assert not shard["valid"][shard["offsets"][:-1]].any()  # position 0 of every example is skipped
    rows = sum(len(e["input_ids"]) for e in Extraction(str(out)).iter_examples())
    assert rows == summary["tokens"]
    # The plug-in loads onto the base and is an exact no-op until trained.
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    batch = tiny_tokenizer()(["what is 3 plus 4?"], return_tensors="pt")
    with torch.no_grad():
        ref = base(**batch).logits
        model = ToEModel.from_pretrained(str(pair / "base"), out)
        assert torch.equal(model(**batch).logits, ref)
    assert summary["clusters"]["0"]["sizes"] == [summary["clusters"]["0"]["sizes"][0]] * 8 or \
        max(summary["clusters"]["0"]["sizes"]) - min(summary["clusters"]["0"]["sizes"]) <= 1
    assert set(summary["o1_heldout_ce"]) >= {"base", "teacher", "trained_map", "ridge_lambda_0.5"}


def test_resume_after_interruption_equals_one_run(pair, tmp_path):
    run(pair, tmp_path / "one")
    run(pair, tmp_path / "two")
    # Interrupt: drop the last shard and everything after capture, then rerun.
    os.remove(Extraction(str(tmp_path / "two")).shard_paths()[-1])
    for name in ("toe_model.safetensors", "summary.json"):
        os.remove(tmp_path / "two" / name)
    run(pair, tmp_path / "two")
    a, b = load_file(tmp_path / "one" / "toe_model.safetensors"), load_file(tmp_path / "two" / "toe_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for pa, pb in zip(Extraction(str(tmp_path / "one")).shard_paths(), Extraction(str(tmp_path / "two")).shard_paths()):
        sa, sb = load_file(pa), load_file(pb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_rebuild_reuses_the_capture_and_fusion_map(pair, tmp_path):
    run(pair, tmp_path / "ex")
    rebuild(str(tmp_path / "ex"), str(tmp_path / "same"), num_leaves=8, gate_rank=8)
    a, b = load_file(tmp_path / "ex" / "toe_model.safetensors"), load_file(tmp_path / "same" / "toe_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same settings: the same plug-in
    deep = rebuild(str(tmp_path / "ex"), str(tmp_path / "deep"), num_leaves=4, shape="deep", gate_rank=8)
    assert deep["shape"] == "deep" and len(deep["clusters"]["0"]["sizes"]) == 4
    assert deep["o1_heldout_ce"] == json.loads((tmp_path / "ex" / "summary.json").read_text())["o1_heldout_ce"]
    deep_rows, rows = (list(Extraction(str(tmp_path / d)).iter_examples()) for d in ("deep", "ex"))
    assert len(deep_rows) == len(rows)
    assert ToEModel.from_pretrained(str(pair / "base"), str(tmp_path / "deep")).toe_config.shape == "deep"
    with pytest.raises(ToEError, match="not a finished"):
        rebuild(str(tmp_path / "nothing"), str(tmp_path / "x"))


def test_a_layer_subset_reuses_the_capture_without_loading_the_teacher(pair, tmp_path, monkeypatch):
    import tree_of_experts.commands.extract as extract_mod

    run(pair, tmp_path / "both", layers=[0, 1])
    run(pair, tmp_path / "fresh", layers=[1])
    real, loaded = extract_mod.load_causal_lm, []
    monkeypatch.setattr(extract_mod, "load_causal_lm", lambda path, **kw: loaded.append(path) or real(path, **kw))
    summary = run(pair, tmp_path / "reused", layers=[1], reuse_capture=str(tmp_path / "both"))
    assert loaded == [str(pair / "base")]  # the teacher is never loaded
    assert summary["capture"]["reused_from"] == str(tmp_path / "both")
    # the extraction a fresh capture of that layer gives: shards, fusion map, plug-in, run settings
    fresh, reused = Extraction(str(tmp_path / "fresh")), Extraction(str(tmp_path / "reused"))
    for pa, pb in zip(fresh.shard_paths(), reused.shard_paths(), strict=True):
        sa, sb = load_file(pa), load_file(pb)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in ("projector.safetensors", "toe_model.safetensors"):
        a, b = load_file(tmp_path / "fresh" / name), load_file(tmp_path / "reused" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert fresh.run() == reused.run()
    # a pair the source never captured, or other capture settings: refused before anything is written
    with pytest.raises(ToEError, match="holds the .layer, teacher layer. pairs"):
        run(pair, tmp_path / "bad", layers=[1], teacher_layers=[0], reuse_capture=str(tmp_path / "both"))
    with pytest.raises(ToEError, match="other settings .max_length"):
        run(pair, tmp_path / "bad2", layers=[1], max_length=64, reuse_capture=str(tmp_path / "both"))
    with pytest.raises(ToEError, match="not a `toe extract` folder"):
        run(pair, tmp_path / "bad3", layers=[1], reuse_capture=str(tmp_path / "nothing"))
    with pytest.raises(ToEError, match="is the --reuse_capture folder"):  # it would delete what it reads
        run(pair, tmp_path / "both", layers=[1], reuse_capture=str(tmp_path / "both"), overwrite=True)
    assert Extraction(str(tmp_path / "both")).shard_paths()
    # finished, the extraction no longer needs its source: a rerun returns it with the source gone
    shutil.move(tmp_path / "both", tmp_path / "moved")
    assert run(pair, tmp_path / "reused", layers=[1], reuse_capture=str(tmp_path / "both")) == \
        json.loads((tmp_path / "reused" / "summary.json").read_text())


def test_a_bank_from_the_ridge_step(pair, tmp_path):
    """--signal ridge clusters λ (P(u) - h) instead of the trained map's δ: the tree is the same at every λ (k-means
    is scale-free) and the bank scales with λ; the summary and the oracle's O2 say which signal it was."""
    from tree_of_experts.commands.oracle import oracle
    from tree_of_experts.extraction.fusion import expert_signal, ridge_delta

    run(pair, tmp_path / "ex")
    a = rebuild(str(tmp_path / "ex"), str(tmp_path / "r1"), num_leaves=8, gate_rank=8, signal="ridge",
                signal_lambda=0.25)
    rebuild(str(tmp_path / "ex"), str(tmp_path / "r2"), num_leaves=8, gate_rank=8, signal="ridge", signal_lambda=0.5)
    assert a["signal"] == {"kind": "ridge", "lambda": 0.25}
    assert "ridge step" in (tmp_path / "r1" / "summary.md").read_text()
    assert json.loads((tmp_path / "ex" / "summary.json").read_text())["signal"] == {"kind": "fusion_map"}
    banks = [ToEModel.from_pretrained(str(pair / "base"), str(tmp_path / d)).plugin.blocks["0"].bank.vectors()
             for d in ("ex", "r1", "r2")]
    assert torch.allclose(banks[2], 2 * banks[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(banks[0], banks[1])
    # each leaf is the mean ridge step of the training tokens clustered into it
    ex = Extraction(str(tmp_path / "r1"))
    heldout, w = set(ex.manifest()["counts"]["heldout"]), ex.projector()["ridge.0"]
    delta = torch.cat([ridge_delta(w, e["teacher.0"][e["valid"].bool()].float(), e["base.0"][e["valid"].bool()].float(),
                                   0.25) for e in ex.iter_examples() if int(e["example"][0]) not in heldout])
    leaf = ex.route_data()["leaf.0"]
    assert len(leaf) == len(delta)
    means = torch.stack([delta[leaf == j].mean(0) for j in range(8)])
    torch.testing.assert_close(banks[1], means, rtol=1e-4, atol=1e-5)
    w, u, h = torch.randn(5, 3), torch.randn(2, 4), torch.randn(2, 3)
    assert torch.equal(expert_signal("ridge", None, [w], 0.5)(0, u, h), ridge_delta(w, u, h, 0.5))
    r = oracle(teacher=str(pair / "teacher"), base=str(pair / "base"), experts=str(tmp_path / "r1"), data=FIXTURE,
               out=str(tmp_path / "or"), limit=3, lambdas=(0.25,))
    assert r["o2_signal"] == {"kind": "ridge", "lambda": 0.25} and "O2 oracle routing" in r["systems"]
    with pytest.raises(ToEError, match="signal_lambda=0 gives an all-zero bank"):
        rebuild(str(tmp_path / "ex"), str(tmp_path / "r0"), num_leaves=8, signal="ridge", signal_lambda=0)
    with pytest.raises(ToEError, match="signal='pca' is unknown"):
        rebuild(str(tmp_path / "ex"), str(tmp_path / "r0"), num_leaves=8, signal="pca")


def test_rerun_of_a_finished_extraction_returns_it_without_loading_a_model(pair, tmp_path, monkeypatch):
    import tree_of_experts.commands.extract as extract_mod

    summary = run(pair, tmp_path / "ex")
    run(pair, tmp_path / "l1", layers=[1], teacher_layers=[1])  # the default is layer 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ex").iterdir()}

    def no_load(*a, **k):
        raise AssertionError("a finished extraction was built again")

    monkeypatch.setattr(extract_mod, "load_causal_lm", no_load)
    assert run(pair, tmp_path / "ex") == json.loads(json.dumps(summary))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ex").iterdir()} == before  # nothing rewritten
    # other tree settings on the finished folder: refused with the command that builds them, nothing touched
    with pytest.raises(ToEError, match=r"built with other settings \(num_leaves\).*toe rebuild"):
        run(pair, tmp_path / "ex", num_leaves=4)
    with pytest.raises(ToEError, match=r"built with other settings \(projector_epochs\).*--reuse_capture"):
        run(pair, tmp_path / "ex", projector_epochs=2)  # the fusion maps: `toe rebuild` reuses them, cannot redo them
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ex").iterdir()} == before
    # the default layer is resolved from the config before the finished folder is returned: another layer refuses
    with pytest.raises(ToEError, match="other settings.*layers"):
        run(pair, tmp_path / "l1")


def test_rerun_with_other_settings_is_refused(pair, tmp_path):
    run(pair, tmp_path / "ex")
    with pytest.raises(ToEError, match="other settings.*layers"):
        run(pair, tmp_path / "ex", layers=[1])


@pytest.mark.parametrize("kw, message", [
    ({"layers": [1, 1]}, "each injection layer once"),
    ({"layers": [1, 9]}, r"out of range: that model has \d+ decoder layers"),
    ({"layers": [-1]}, "count from 0"),
    ({"layers": [1, 2], "teacher_layers": [1]}, "one entry per injection layer"),
    ({"layers": [1], "teacher_layers": [99]}, r"teacher_layers=\[99\] out of range"),
])
def test_bad_layer_lists_are_refused_before_any_model_loads(pair, tmp_path, monkeypatch, kw, message):
    import tree_of_experts.commands.extract as extract_mod

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the layer lists were checked")

    monkeypatch.setattr(extract_mod, "load_causal_lm", no_load)
    with pytest.raises(ToEError, match=message):
        run(pair, tmp_path / "ex", **kw)
    assert not (tmp_path / "ex").exists()  # nothing written


def test_bad_dataset_fields_give_a_clear_error(pair, tmp_path):
    with pytest.raises(ToEError, match="no field 'problem'.*--prompt_field"):
        run(pair, tmp_path / "ex", prompt_field="problem")


def test_ridge_recovers_a_planted_linear_map():
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    b = torch.randn(4)
    tr, ho = GramAccumulator(6, 4), GramAccumulator(6, 4)
    for acc in (tr, tr, ho):
        x = torch.randn(500, 6)
        acc.add(x, x @ w + b + 0.001 * torch.randn(500, 4))
    sol, report = fit_ridge(tr, ho)
    torch.testing.assert_close(sol[:-1], w, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(sol[-1], b, atol=1e-2, rtol=1e-2)
    assert report["heldout_r2"] > 0.999


def test_balanced_tree_has_equal_mass_leaves():
    x = torch.randn(1000, 5)
    leaf = balanced_tree(x, depth=3)
    sizes = torch.bincount(leaf, minlength=8)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 1000


def test_deep_tree_orders_leaves_by_mass():
    torch.manual_seed(0)
    centers = torch.randn(5, 3) * 20
    counts = [50, 400, 10, 200, 100]
    x = torch.cat([c + torch.randn(n, 3) for c, n in zip(centers, counts)])
    sizes = torch.bincount(mass_ordered_clusters(x, 5), minlength=5).tolist()
    assert sizes == sorted(counts, reverse=True)


@pytest.mark.parametrize("shape,n", [("balanced", 8), ("deep", 6)])
def test_geometry_initialised_gate_routes_clustered_data_to_its_own_leaf(shape, n):
    torch.manual_seed(0)
    centers = torch.randn(n, 16) * 4
    x = torch.cat([c + 0.3 * torch.randn(200, 16) for c in centers])
    leaf = balanced_tree(x, 3) if shape == "balanced" else mass_ordered_clusters(x, n)
    gate = TreeGate(16, n, shape, rank=16)
    init_gate_from_geometry(gate, x, leaf)
    with torch.no_grad():
        routed = gate(x, "dense").leaf_logp.argmax(-1)
    assert (routed == leaf).float().mean() > 0.9
    # Labels are consistent with the tree: following them from the root reaches the leaf.
    labels = path_labels(shape, n, leaf)
    follow = torch.where(labels == 1, 30.0, torch.where(labels == 0, -30.0, 0.0))
    from tree_of_experts.tree import leaf_log_probs
    assert torch.equal(leaf_log_probs(shape, follow).argmax(-1), leaf)


def reference_node_init(gate, states, leaf, sharpness=4.0):
    """The per-node loop over a dense (R, M) label table that init_gate_from_geometry replaced (the same numbers)."""
    z = gate.features(states)
    labels = path_labels(gate.shape, gate.num_leaves, leaf)
    w, b = torch.zeros_like(gate.nodes.weight), torch.zeros_like(gate.nodes.bias)
    for m in range(gate.num_nodes):
        ones, zeros = labels[:, m] == 1, labels[:, m] == 0
        if not ones.any() or not zeros.any():
            b[m] = 4.0 if ones.any() else -4.0
            continue
        mu1, mu0 = z[ones].mean(0), z[zeros].mean(0)
        direction = mu1 - mu0
        scale = sharpness / ((z[ones | zeros] - (mu1 + mu0) / 2) @ direction).std().clamp_min(1e-6)
        w[m], b[m] = direction * scale, -((mu1 + mu0) / 2 @ direction) * scale
    return w, b


@pytest.mark.parametrize("shape,n", [("balanced", 16), ("deep", 6), ("flat", 5)])
def test_the_gate_init_reads_paths_not_an_rows_by_nodes_table(shape, n):
    """The node statistics accumulate a step of every path at a time (R rows, never R × M): the same hyperplanes as
    the dense label table gave, empty and one-sided nodes included; the routing check chunks its rows."""
    from tree_of_experts.extraction.gate_init import dense_argmax

    torch.manual_seed(1)
    x = torch.randn(300, 12)
    leaf = torch.randint(0, n - 1, (300,))  # the last leaf empty: its nodes see one side only
    gate = TreeGate(12, n, shape, rank=8)
    with torch.no_grad():
        init_gate_from_geometry(gate, x, leaf)
        w, b = reference_node_init(gate, x, leaf)
        assert torch.allclose(gate.nodes.weight, w, atol=1e-4) and torch.allclose(gate.nodes.bias, b, atol=1e-4)
        whole = gate(x, "dense").leaf_logp.argmax(-1)
    assert torch.equal(dense_argmax(gate, x, budget=n * 8), whole)  # a few rows per chunk


def test_character_offset_alignment_never_looks_ahead():
    # base tokens "ab|cd|e", teacher tokens "abc|de"
    base = torch.tensor([[0, 2], [2, 4], [4, 5]])
    teacher = torch.tensor([[0, 3], [3, 5]])
    assert align_offsets(base, teacher).tolist() == [-1, 0, 1]


def test_alignment_across_tokenizers_picks_the_teacher_rows_that_saw_no_more_text():
    from tree_of_experts.data import DataSpec
    from tree_of_experts.extraction.capture import prepare

    base_tok, teacher_tok = tiny_tokenizer(), tiny_tokenizer(extra_words=["plus", "what is"])  # "what is": 1 token
    ex = prepare([{"question": "what is 2 plus 3", "answer": "5"}], DataSpec("question", "answer", "Q: {prompt}\nA: "),
                 base_tok, teacher_tok, 64)[0]
    assert [base_tok.decode([i]) for i in ex.ids][3:6] == ["what", " ", "is"]
    assert [teacher_tok.decode([i]) for i in ex.teacher_ids][2:5] == [" ", "what is", " "]
    # base:    Q : ␣ what ␣ is ␣ 2 ␣ plus ␣ 3 \n A : ␣ 5 EOS
    # teacher: Q : ␣ [what is] ␣ 2 ␣ plus ␣ 3 \n A : ␣ 5 EOS
    # "what" and the space after it read the teacher's state before "what is"; "is" reads "what is"; the last text
    # token reads the teacher's "5", not its EOS (which has seen that the text ends).
    assert ex.align.tolist() == [0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_mismatched_tokenizers_are_aligned(pair, tmp_path):
    other = tmp_path / "teacher2"
    shutil.copytree(pair / "teacher", other)
    tok = tiny_tokenizer(extra_words=["plus", "what is"])  # different vocabulary -> alignment by offsets
    tok.save_pretrained(other)
    model = tiny_qwen2(hidden_size=48, num_layers=3, seed=1, vocab_size=len(tok))
    model.save_pretrained(other)
    summary = run(pair, tmp_path / "ex", teacher=str(other))
    assert summary["kd_cached"] is False and summary["projector"][0]["train_rows"] > 0


def test_two_processes_give_the_same_bank_as_one(pair, tmp_path):
    import subprocess
    import sys

    args = ["extract", "--teacher", str(pair / "teacher"), "--base", str(pair / "base"), "--data", FIXTURE,
            "--num_leaves", "8", "--shard_size", "8", "--heldout_frac", "0.25", "--batch_size", "4", "--gate_rank", "8"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tree_of_experts.cli", *args, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    # torchrun starts two CPU processes (gloo); `accelerate launch --cpu` would start only one.
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    "-m", "tree_of_experts.cli", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True)
    assert len(list((tmp_path / "two").glob("timings-*.json"))) == 2  # both processes captured shards
    # two processes taking their shards from a capture (--reuse_capture) instead of the models
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    "-m", "tree_of_experts.cli", *args, "--reuse_capture", str(tmp_path / "one"), "--out",
                    str(tmp_path / "three")], check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "one" / "toe_model.safetensors")
    for other in ("two", "three"):
        b = load_file(tmp_path / other / "toe_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_fusion_map_training_leaves_the_base_without_gradients(pair, tmp_path, caplog, monkeypatch):
    """Only the maps learn: no base weight gradient is built, and the base's requires_grad flags come back. Without a
    terminal (the bar off) its progress goes to the log, ending on the last step."""
    import logging

    import tree_of_experts.extraction.fusion as fusion
    from tree_of_experts.extraction.fusion import FusionMap, train_fusion_maps
    from tree_of_experts.hf.loading import load_causal_lm

    bar = fusion.tqdm  # off, as under nohup, even when pytest -s runs in a terminal
    monkeypatch.setattr(fusion, "tqdm", lambda *a, **k: bar(*a, **{**k, "disable": True}))
    run(pair, tmp_path / "ex")
    data = list(Extraction(str(tmp_path / "ex")).iter_examples(set(range(8))))
    base = load_causal_lm(str(pair / "base"))
    maps = torch.nn.ModuleList([FusionMap(torch.randn(49, 32) * 0.01)])
    with caplog.at_level(logging.INFO, logger="tree_of_experts.training.checkpoint"):  # log_progress's logger
        losses, pick = train_fusion_maps(base, [1], maps, data, 0, 2, 1e-3, 4, 0)  # 2 steps: 8 examples, 4 a step
    assert len(losses) == 2 and pick is None and all(p.grad is None for p in base.parameters())  # one pass
    assert "train fusion map: step 2/2" in caplog.messages[-1]
    assert all(p.requires_grad for p in base.parameters()) and maps[0].proj.weight.grad is not None


def test_the_base_read_as_its_own_teacher_runs_once_with_the_same_shards(pair, tmp_path):
    """The no-teacher control extracts the base against itself: one model load and one forward per batch give the
    shards two separate copies of the base give."""
    import copy

    from tree_of_experts.extraction.capture import capture_shard, prepare
    from tree_of_experts.hf.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(pair / "base"))
    examples = prepare(read_jsonl(FIXTURE, DataSpec(), limit=6), DataSpec(), tok, tok, 64)
    base = load_causal_lm(str(pair / "base"))
    args = ([0, 1], [1, 0], 2, 0, tok.pad_token_id, False)
    once, twice = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}, {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}
    a = capture_shard(examples, base, base, *args, once)
    b = capture_shard(examples, copy.deepcopy(base), base, *args, twice)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert once["base_s"] < twice["base_s"] / 10  # the base pass is the teacher pass
    run(pair, tmp_path / "ctl", teacher=str(pair / "base"), topk_logprobs=0)
    assert json.load(open(tmp_path / "ctl" / "run.json"))["topk_logprobs"] == 0


def test_a_teacher_spread_by_a_device_map_gives_the_same_extraction(pair, tmp_path, monkeypatch):
    """--teacher_device_map loads the teacher through accelerate's dispatch (here half of it offloaded to the disk,
    the CPU-only stand-in for a teacher spread over GPUs): the shards and the bank equal an in-memory teacher's."""
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    import tree_of_experts.commands.extract as ex

    maps = []
    real = ex.load_causal_lm
    monkeypatch.setattr(ex, "load_causal_lm", lambda *a, **k: maps.append(k.get("device_map")) or real(*a, **k))
    run(pair, tmp_path / "one")
    run(pair, tmp_path / "spread", teacher_device_map=str(tmp_path / "map.json"))
    assert maps == [None, None, None, mapping]  # base, teacher; base, the teacher spread by the map
    one, spread = Extraction(str(tmp_path / "one")).shard_paths(), Extraction(str(tmp_path / "spread")).shard_paths()
    assert len(one) == len(spread) == 3
    for pa, pb in zip(one, spread):
        sa, sb = load_file(pa), load_file(pb)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a = load_file(tmp_path / "one" / "toe_model.safetensors")
    b = load_file(tmp_path / "spread" / "toe_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value, message", [
    ("everywhere", "give one of auto, balanced, balanced_low_0, sequential or a JSON file"),
    ("BAD_JSON", "not a JSON file"),
    ("LIST_JSON", "write a JSON object {module name: device}"),
])
def test_a_bad_teacher_device_map_is_refused_before_any_model_loads(pair, tmp_path, monkeypatch, value, message):
    import tree_of_experts.commands.extract as ex

    monkeypatch.setattr(ex, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    value = {"BAD_JSON": str(tmp_path / "bad.json"), "LIST_JSON": str(tmp_path / "list.json")}.get(value, value)
    with pytest.raises(ToEError, match=message.replace("{", r"\{").replace("}", r"\}")):
        run(pair, tmp_path / "ex", teacher_device_map=value)


def test_a_build_to_redo_over_captured_shards_loads_no_teacher(pair, tmp_path, monkeypatch):
    """A rerun whose shards are all captured (the build interrupted, or its records removed to build again) loads
    the base alone, builds the same bank, and keeps the capture's own timings."""
    import tree_of_experts.commands.extract as ex

    run(pair, tmp_path / "ex")
    out = tmp_path / "ex"
    bank = load_file(out / "toe_model.safetensors")
    timings = (out / "timings-0.json").read_text()
    for name in ("build.json", "summary.json", "toe_model.safetensors"):
        os.remove(out / name)
    loads = []
    real = ex.load_causal_lm
    monkeypatch.setattr(ex, "load_causal_lm", lambda name, *a, **k: loads.append(os.path.basename(name)) or
                        real(name, *a, **k))
    summary = run(pair, out)
    assert loads == ["base"]
    again = load_file(out / "toe_model.safetensors")
    assert bank.keys() == again.keys() and all(torch.equal(bank[k], again[k]) for k in bank)
    assert (out / "timings-0.json").read_text() == timings and summary["capture"]["tokens"] > 0
    # a shard grown since (a byte appended) in such a rerun: the teacher loads and captures it again
    os.remove(out / "build.json")
    shard = sorted((out / "shards").iterdir())[0]
    with open(shard, "ab") as f:
        f.write(b"\0")
    loads.clear()
    run(pair, out)
    assert sorted(loads) == ["base", "teacher"]
    again = load_file(out / "toe_model.safetensors")
    assert all(torch.equal(bank[k], again[k]) for k in bank)


def test_response_nll_projects_only_the_tail_and_matches_the_full_logits():
    """The fusion maps' loss and the held-out CE take logits over the batch's tail alone (prompt and padding
    positions cost no vocabulary projection): the same per-example NLL as the full logits."""
    from tree_of_experts.extraction.fusion import collate, response_nll
    from tree_of_experts.hf.layers import padded_inputs
    from tree_of_experts.losses import token_nll
    from tree_of_experts.toy import tiny_qwen2

    m = tiny_qwen2(hidden_size=32, num_layers=2, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    chunk = []
    for n, first in ((12, 5), (9, 3), (15, 8)):
        mask = torch.arange(n) >= first
        chunk.append({"input_ids": torch.randint(0, 100, (n,), generator=g), "loss_mask": mask, "valid": mask,
                      "teacher.0": torch.zeros(n, 4)})
    b = collate(chunk, 1, 0)
    with torch.no_grad():
        full = token_nll(m(**padded_inputs(b["input_ids"], b["attention_mask"], "cpu")).logits, b["input_ids"],
                         b["loss_mask"])
        tail = response_nll(m, b, "cpu")
    assert tail.shape == (3, 8)  # left-padded to 15: the earliest target is at 8 (rows 1 and 3), the tail from 7
    assert torch.allclose(tail.sum(1), full.sum(1), atol=1e-4)


def test_a_resumed_capture_adds_its_shards_times_to_the_record(pair, tmp_path, monkeypatch):
    """timings-0.json is written after every shard and a resumed capture adds to it: a kill loses the time of the
    shard it cut, and the record of the whole capture counts every token once."""
    import tree_of_experts.commands.extract as ex

    run(pair, tmp_path / "one")
    whole = json.loads((tmp_path / "one" / "timings-0.json").read_text())
    real, saved = ex.atomic_save_tensors, []

    def killed_at_the_last_shard(path, tensors):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)
        real(path, tensors)

    monkeypatch.setattr(ex, "atomic_save_tensors", killed_at_the_last_shard)
    out = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):
        run(pair, out)
    first = json.loads((out / "timings-0.json").read_text())
    assert first["shards"] == 2 and 0 < first["tokens"] < whole["tokens"] and first["wall_s"] > 0
    monkeypatch.setattr(ex, "atomic_save_tensors", real)
    summary = run(pair, out)
    again = json.loads((out / "timings-0.json").read_text())
    assert again["shards"] == whole["shards"] == 3 and again["tokens"] == whole["tokens"] == summary["capture"]["tokens"]
    assert again["wall_s"] > first["wall_s"] and again["teacher_s"] > first["teacher_s"]
    os.remove(Extraction(str(out)).shard_paths()[0])  # a shard lost (or damaged) and captured again: counted once
    for name in ("toe_model.safetensors", "summary.json", "build.json"):
        os.remove(out / name)
    run(pair, out)
    last = json.loads((out / "timings-0.json").read_text())
    assert last["shards"] == 3 and last["tokens"] == whole["tokens"] and sorted(last["per_shard"]) == ["0", "1", "2"]
