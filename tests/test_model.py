"""ToEModel where transformers expects a model (pipeline, Trainer) and the Hub round trip, on the tiny pair."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time

import pytest
import torch
from conftest import randomize
from huggingface_hub import ModelCard

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.cli import main
from tree_of_experts.commands.hub import push
from tree_of_experts.hf.hub import hub_id_of
from tree_of_experts.hf.loading import load_causal_lm
from tree_of_experts.toy import tiny_qwen2

PROMPTS = ["Question: 3 plus 4?", "Question: what is 12 times 7 then?"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def toe(base):
    return randomize(ToEModel.fresh(base, layers=[0, 1], num_leaves=8, selection="topk", top_k=2))


def test_reads_like_a_transformers_model(toe, base):
    from transformers import PreTrainedModel

    assert isinstance(toe, PreTrainedModel) and toe.can_generate()
    assert toe.config is base.config and toe.generation_config is base.generation_config
    assert toe.toe_config is toe.plugin.config and toe.toe_config.num_leaves == 8
    assert toe.device == torch.device("cpu") and toe.dtype == torch.float32
    assert toe.get_input_embeddings() is base.get_input_embeddings()
    toe.train()
    assert toe.plugin.training and not toe.base.training  # the base stays frozen in eval mode under a trainer


def test_pipeline_generates_what_generate_does(toe, tok):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=toe, tokenizer=tok)
    with toe.plugin.counting() as mass:
        texts = [out[0]["generated_text"] for out in pipe(PROMPTS, max_new_tokens=8, do_sample=False,
                                                              return_full_text=False)]
    assert sum(float(m.sum()) for m in mass.values()) > 0  # the pipeline ran through the plug-in's hooks
    for prompt, text in zip(PROMPTS, texts):
        enc = tok([prompt], return_tensors="pt")
        ids = toe.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@contextlib.contextmanager
def transformers_log(caplog):
    """transformers' log records in ``caplog`` (its library logger does not propagate to the root, where caplog
    listens)."""
    library = logging.getLogger("transformers")
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            yield
    finally:
        library.removeHandler(caplog.handler)


def test_a_pipeline_logs_no_list_of_supported_models(toe, tok, caplog):
    from transformers import pipeline

    with transformers_log(caplog):
        pipe = pipeline("text-generation", model=toe, tokenizer=tok)
        assert pipe(PROMPTS[:1], max_new_tokens=2, do_sample=False)[0][0]["generated_text"]
        said = [r.getMessage() for r in caplog.records]
        assert not [m for m in said if "is not supported for" in m or "Supported models are" in m], said
        # the filter drops that one message: the same check failing for another model still shows
        logging.getLogger("transformers.pipelines.base").error("The model 'Other' is not supported for text-generation.")
        assert caplog.records[-1].getMessage().startswith("The model 'Other' is not supported")


def test_cache_passing_paths_warn_of_no_deprecated_argument(toe, tok, base, batch, caplog):
    """transformers 5.25 renamed a forward's `past_key_values` to `cache` (a FutureWarning) and made the output's
    `.past_key_values` a logged alias: the package's own decode loops use what the installed version expects."""
    import warnings

    from tree_of_experts.benchmarks import bench_decode_step, make_timer
    from tree_of_experts.commands.oracle import live_greedy

    teacher = tiny_qwen2(hidden_size=48, num_layers=3, seed=1)
    logging.Logger.warning_once.cache_clear()  # a message logged once earlier in the session would not show again
    with warnings.catch_warnings(record=True) as caught, transformers_log(caplog):
        warnings.simplefilter("always")
        enc = tok(PROMPTS[:1], return_tensors="pt")
        toe.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        delta = lambda j, u, h: u[..., :32].float()  # noqa: E731 (a teacher state cut to the base's width)
        assert live_greedy(toe.base, tok, PROMPTS[0], 3, teacher, [0], [1], delta)
        bench_decode_step(toe.base, toe, batch["input_ids"], batch["attention_mask"], make_timer(torch.device("cpu")))
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "past_key_values" in m], said


def test_trainer_trains_saves_and_reloads_the_plugin_alone(toe, tok, batch, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    texts = ["Question: 3 plus 4? Answer: 7", "Question: 12 times 7? Answer: 84"] * 4
    enc = tok(texts, padding=True)
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": enc["input_ids"], "text": texts})  # "text": dropped by Trainer
    before = {k: v.clone() for k, v in toe.plugin.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0)
    Trainer(model=toe, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[k], v) for k, v in toe.plugin.state_dict().items())
    bare = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(toe.base.parameters(), bare.parameters()))  # the base never moved

    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"toe_config.json", "toe_model.safetensors", "README.md"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}  # no base weights, no base config
    plugin_bytes = sum(p.numel() for p in toe.plugin.parameters()) * 4
    assert os.path.getsize(checkpoint / "toe_model.safetensors") < plugin_bytes + 16_384
    reloaded = ToEModel.from_pretrained(bare, checkpoint)
    assert torch.equal(logits(reloaded, batch), logits(toe, batch))


def test_toe_trainer_resumes_from_a_plugin_checkpoint(tok, tmp_path):
    """Plain Trainer cannot read a plug-in-only checkpoint back; ToETrainer resumes from one to the uninterrupted
    run's plug-in, and refuses a checkpoint of another plug-in in one line."""
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    from tree_of_experts.trainer import ToETrainer

    texts = ["Question: 3 plus 4? Answer: 7", "Question: 12 times 7? Answer: 84", "Question: 9 minus 2? Answer: 7",
             "Question: 5 times 5? Answer: 25"] * 2
    enc = tok(texts, padding=True)
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": enc["input_ids"]})

    def run(out, plugin_seed=0, **kw):
        torch.manual_seed(plugin_seed)
        model = randomize(ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0, 1],
                                         num_leaves=8, selection="topk", top_k=2), seed=plugin_seed)
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0)
        ToETrainer(model=model, args=args, train_dataset=data).train(**kw)
        return model.plugin.state_dict()

    full = run(tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(resumed_dir, plugin_seed=5, resume_from_checkpoint=str(resumed_dir / "checkpoint-2"))
    assert all(torch.allclose(full[k], resumed[k], rtol=0, atol=1e-6) for k in full)  # not the seed-5 start
    # load_best_model_at_end: the best checkpoint's plug-in comes back into the model (plain Trainer refuses it)
    model = randomize(ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0, 1], num_leaves=8,
                                     selection="topk", top_k=2))
    best_args = TrainingArguments(output_dir=str(tmp_path / "best"), max_steps=4, save_steps=2, eval_steps=2,
                                  eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="loss",
                                  greater_is_better=True,  # the worse (earlier) checkpoint: not the final state
                                  per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True)
    trainer = ToETrainer(model=model, args=best_args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = ToEModel.from_pretrained(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), best).plugin.state_dict()
    assert best.endswith("checkpoint-2") and all(torch.equal(saved[k], v) for k, v in model.plugin.state_dict().items())
    other = ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[1], num_leaves=4)
    other.save_pretrained(tmp_path / "other" / "checkpoint-2")
    with pytest.raises(ToEError, match="another plug-in"):
        run(tmp_path / "other", resume_from_checkpoint=str(tmp_path / "other" / "checkpoint-2"))


def test_base_model_edits_the_positions_the_lm_edits(toe, tok, batch):
    """trl's fused LM head runs ``base_model`` (the decoder stack) and the head itself: the plug-in edits the same
    positions as in a full forward — left padding included, and after a forward of another batch of the same shape
    (whose mask must not be reused)."""
    other = tok(list(reversed(PROMPTS)), return_tensors="pt", padding=True)  # the padding on the other row
    assert other["input_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        ref = toe(**batch).logits
        toe(**other)
        hidden = toe.base_model(**batch).last_hidden_state  # (B, T, D)
        assert torch.allclose(toe.get_output_embeddings()(hidden), ref, atol=1e-5)
        bare = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)(**batch).logits
    assert not torch.allclose(ref, bare, atol=1e-3)  # the plug-in does edit


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_a_peft_wrapped_base_gets_the_plugins_mask(tok, batch, task_type):
    """The plug-in reads its mask at the module that runs the decoder layers (``get_decoder()``), which a PeftModel
    reaches whatever its wrapper: with a no-op LoRA, the same plug-in gives the plain base's logits with left padding,
    and the same greedy continuation through the KV cache."""
    from peft import LoraConfig, get_peft_model

    plain = randomize(ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0, 1], num_leaves=8))
    wrapped = get_peft_model(tiny_qwen2(hidden_size=32, num_layers=2, seed=0),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type=task_type))  # B = 0: a no-op
    toe = randomize(ToEModel.fresh(wrapped, layers=[0, 1], num_leaves=8))
    assert torch.equal(logits(toe, batch), logits(plain, batch))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(toe.generate(**batch, **kw), plain.generate(**batch, **kw))


def test_trl_sft_trainer_trains_and_resumes_the_plugin(tok, tmp_path):
    """trl's SFTTrainer with the PluginCheckpoints mixin: it tokenizes plain text, runs the base's decoder stack
    (``base_model``, where the plug-in's hooks sit) under its default activation checkpointing and applies the LM head
    itself; only the plug-in trains, the same as without checkpointing, and a resume reaches the uninterrupted run."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    from tree_of_experts.trainer import PluginCheckpoints

    class ToESFTTrainer(PluginCheckpoints, trl.SFTTrainer):
        pass

    texts = ["Question: 3 plus 4? Answer: 7", "Question: 12 times 7? Answer: 84", "Question: 9 minus 2? Answer: 7",
             "Question: 5 times 5? Answer: 25"] * 2
    data = datasets.Dataset.from_dict({"text": texts})

    def run(out, plugin_seed=0, checkpointing=True, **kw):
        model = randomize(ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0, 1],
                                         num_leaves=8, selection="topk", top_k=2), seed=plugin_seed)
        args = trl.SFTConfig(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0, max_length=32,
                             gradient_checkpointing=checkpointing, bf16=False)  # trl's default is bf16
        ToESFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train(**kw)
        return model

    model = run(tmp_path / "full")
    full = model.plugin.state_dict()
    start = randomize(ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0, 1], num_leaves=8,
                                     selection="topk", top_k=2)).plugin.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in full.items())  # the plug-in trained
    bare = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.base.parameters(), bare.parameters()))  # the base did not
    plain = run(tmp_path / "plain", checkpointing=False).plugin.state_dict()
    assert all(torch.allclose(full[k], plain[k], rtol=0, atol=1e-6) for k in full)  # same gradients, recomputed
    files = set(os.listdir(tmp_path / "full" / "checkpoint-2"))
    assert "toe_model.safetensors" in files and not files & {"model.safetensors", "config.json"}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(resumed_dir, plugin_seed=5, resume_from_checkpoint=str(resumed_dir / "checkpoint-2"))
    assert all(torch.allclose(full[k], resumed.plugin.state_dict()[k], rtol=0, atol=1e-6) for k in full)


def test_save_pretrained_takes_a_trainers_state_dict(toe, batch, tmp_path):
    state = {k: v.clone() for k, v in toe.state_dict().items()}
    randomize(toe, seed=1)  # the live tensors now differ from the state dict
    toe.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    reloaded = ToEModel.from_pretrained(tiny_qwen2(seed=0), tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    toe.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ToEError, match="plugin"):
        toe.save_pretrained(tmp_path / "bad", state_dict={"base.x": torch.zeros(1)})


@pytest.fixture
def base_dir(tmp_path, tok):
    path = tmp_path / "base"
    tiny_qwen2(hidden_size=32, num_layers=2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class FakeHub:
    """HfApi and snapshot_download over a local folder: ``root/<repo id>`` is the repo's content."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, **kwargs):
                hub.calls.append(("create_repo", repo_id, kwargs))

            def upload_folder(self, repo_id, folder_path, **kwargs):
                hub.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
                return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

        return Api()

    def snapshot_download(self, repo_id, **kwargs):
        self.calls.append(("snapshot_download", repo_id, kwargs.get("local_files_only")))
        return str(self.root / repo_id)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a logged-in user (the push refuses to start without a token)
    return fake


def test_hub_round_trip_and_loading_from_the_plugin_alone(hub, base_dir, batch, tmp_path, monkeypatch):
    import tree_of_experts.model

    model = randomize(ToEModel.fresh(load_causal_lm(base_dir), layers=[1], num_leaves=4, selection="dense"))
    assert model.toe_config.base_model == base_dir  # a local base is recorded by its path, but never uploaded so
    with pytest.raises(ToEError, match="--base_id") as e:
        model.push_to_hub("user/plugin")
    assert "\n" not in str(e.value) and not hub.calls
    url = model.push_to_hub("user/plugin", base_id="org/tiny", private=True)
    assert url == "https://hub/user/plugin/commit/1"
    assert hub.calls[0] == ("create_repo", "user/plugin", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub.calls[1][2] == ["README.md", "toe_config.json", "toe_model.safetensors"]

    ref = logits(model, batch)
    assert torch.equal(logits(ToEModel.from_pretrained(tiny_qwen2(seed=0), "user/plugin"), batch), ref)
    loaded = []  # the plug-in alone names its base by the hub id: "org/tiny" is the base saved in base_dir
    monkeypatch.setattr(tree_of_experts.model, "load_causal_lm",
                        lambda name, **kw: loaded.append(name) or load_causal_lm(base_dir, **kw))
    alone = ToEModel.from_pretrained("user/plugin")
    assert loaded == ["org/tiny"] and torch.equal(logits(alone, batch), ref)
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "local")  # a local folder keeps the local path: the plug-in alone finds it
    assert torch.equal(logits(ToEModel.from_pretrained(str(tmp_path / "local")), batch), ref)

    model.detach()
    with pytest.raises(ToEError, match="pass it explicitly"):  # a plug-in whose recorded base is gone
        shutil.rmtree(base_dir)
        ToEModel.from_pretrained(str(tmp_path / "local"))


def test_card_metadata_from_huggingface_hub(hub, base_dir, tmp_path):
    model = ToEModel.fresh(load_causal_lm(base_dir), layers=[0], num_leaves=4)
    model.save_pretrained(tmp_path / "local")
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.library_name == "tree-of-experts" and "tree-of-experts" in card.data.tags
    assert card.data.base_model is None  # a local path is not hub metadata
    assert "toe push --base_id" in card.text

    (tmp_path / "local" / "train_args.json").write_text(json.dumps({"data": "hf:openai/gsm8k:train"}))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "metrics.json").write_text(json.dumps({"args": {"task": "gsm8k", "data": "test.jsonl"}, "systems": {
        "base": {"n": 40, "accuracy": 0.25, "ce": 1.5}, "toe": {"n": 40, "accuracy": 0.3, "ce": 1.4}}}))
    push(str(tmp_path / "local"), "user/plugin", base_id="org/tiny-base", eval_dir=str(evals), license="apache-2.0")
    card = ModelCard.load(hub.root / "user/plugin" / "README.md")
    assert card.data.base_model == "org/tiny-base" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["openai/gsm8k"]
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("accuracy", 0.3),
                                                                                ("cross_entropy", 1.4)}
    assert 'ToEModel.from_pretrained("user/plugin")' in card.text and "| base | 40 | 0.2500 |" in card.text
    pushed = json.loads((hub.root / "user/plugin" / "toe_config.json").read_text())
    assert pushed["base_model"] == "org/tiny-base"
    assert json.loads((tmp_path / "local" / "toe_config.json").read_text())["base_model"] == base_dir  # untouched
    with pytest.raises(ToEError, match="base_id"):
        push(str(tmp_path / "local"), "user/plugin", base_id="/not/a/hub/id")
    assert main(["push", "--plugin", str(tmp_path / "local"), "--repo_id", "user/other", "--base_id", "org/b"]) == 0
    assert ModelCard.load(hub.root / "user/other" / "README.md").data.base_model == "org/b"


def test_a_pushed_plugin_records_no_local_path(hub, base_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    teacher, adapter = str(tmp_path / "teacher"), str(tmp_path / "lora")  # absolute paths of this machine
    get_peft_model(load_causal_lm(base_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    fresh = ToEModel.fresh(load_causal_lm(base_dir), layers=[0], num_leaves=4, teacher_model=teacher,
                           teacher_layers=[1])
    fresh.plugin.blocks["0"].bank.info = {"teacher": teacher, "teacher_layer": 1, "rows": 10}
    fresh.save_pretrained(tmp_path / "plain")
    ToEModel.from_pretrained(base_dir, str(tmp_path / "plain"), base_adapter=adapter).save_pretrained(tmp_path / "local")
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "metrics.json").write_text(json.dumps({"args": {"task": "gsm8k", "data": str(tmp_path / "dev.jsonl")},
                                                    "systems": {"toe": {"n": 4, "accuracy": 0.5}}}))
    local = str(tmp_path / "local")
    assert json.loads((tmp_path / "local" / "toe_config.json").read_text())["teacher_model"] == teacher
    capsys.readouterr()

    assert main(["push", "--plugin", local, "--repo_id", "user/p"]) == 2  # a local base: its hub id is needed
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--base_id" in err and not hub.calls

    def pushed_text(repo):
        files = [os.path.join(d, f) for d, _, names in os.walk(hub.root / repo) for f in names]
        assert {"toe_config.json", "README.md", "adapter_config.json", "toe_model.safetensors"} <= \
            {os.path.basename(f) for f in files}
        return b"".join(open(f, "rb").read() for f in files)

    assert main(["push", "--plugin", local, "--repo_id", "user/p", "--base_id", "org/tiny", "--eval_dir",
                 str(evals)]) == 0
    uploaded = pushed_text("user/p")
    for path in (str(tmp_path), os.path.realpath(tmp_path), base_dir):
        assert path.encode() not in uploaded
    config = json.loads((hub.root / "user/p" / "toe_config.json").read_text())
    assert (config["base_model"], config["base_name"], config["teacher_model"]) == ("org/tiny", "org/tiny", None)
    assert config["bank_info"]["0"] == {"teacher": None, "teacher_layer": 1, "rows": 10}
    adapter_config = json.loads((hub.root / "user/p" / "base_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "org/tiny"
    assert "data `dev.jsonl`" in (hub.root / "user/p" / "README.md").read_text()

    assert main(["push", "--plugin", local, "--repo_id", "user/q", "--base_id", "org/tiny", "--teacher_id",
                 "org/big"]) == 0
    assert str(tmp_path).encode() not in pushed_text("user/q")
    config = json.loads((hub.root / "user/q" / "toe_config.json").read_text())
    assert config["teacher_model"] == "org/big" and config["bank_info"]["0"]["teacher"] == "org/big"
    assert json.loads((tmp_path / "local" / "toe_config.json").read_text())["teacher_model"] == teacher  # untouched
    assert json.loads(open(os.path.join(local, "base_adapter", "adapter_config.json")).read())[
        "base_model_name_or_path"] == base_dir


class FailingHub:
    """A local HTTP server that answers every request with ``status``: the Hub refusing a token or a repo."""

    def __init__(self, status: int):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


@pytest.mark.parametrize("case", ["unreachable", "no-token", "401", "403"])
def test_push_failures_are_one_line_naming_the_fix(case, base, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    ToEModel.fresh(base, layers=[0], num_leaves=4).save_pretrained(tmp_path / "plug")
    server = None
    if case in ("401", "403"):
        server = FailingHub(int(case))
        endpoint = server.url
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # huggingface_hub read HF_ENDPOINT at import
    if case != "no-token":
        monkeypatch.setenv("HF_TOKEN", "hf_test")
    t0 = time.perf_counter()
    try:
        code = main(["push", "--plugin", str(tmp_path / "plug"), "--repo_id", "user/p", "--base_id", "org/tiny"])
    finally:
        if server is not None:
            server.server.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 30
    fix = {"unreachable": "HF_ENDPOINT", "no-token": "hf auth login", "401": "hf auth login", "403": "write token"}
    assert err.startswith("toe: error: cannot push to 'user/p'") and fix[case] in err, err


def test_offline_hub_id_fails_fast_with_one_line(base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ToEError, match="HF_HUB_OFFLINE") as e:
        ToEModel.from_pretrained(base, "nobody-toe-test/not-a-cached-plugin")
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value) and "pass a local folder" in str(e.value)
    with pytest.raises(ToEError, match="HF_HUB_OFFLINE"):
        ToEModel.fresh(base, layers=[0], num_leaves=4).push_to_hub("user/plugin")


def test_a_base_loaded_from_the_hub_cache_records_its_hub_id(tmp_path, tok):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    tiny_qwen2(seed=0).save_pretrained(snapshot)
    assert hub_id_of(str(snapshot)) == ("org/tiny", "abc123") and hub_id_of(str(tmp_path)) == (None, None)
    config = ToEModel.fresh(load_causal_lm(str(snapshot)), layers=[0], num_leaves=4).toe_config
    assert (config.base_model, config.base_revision) == ("org/tiny", "abc123")


def test_python_api_type_errors_say_what_is_accepted(experts):
    from tree_of_experts import ToEModel
    from tree_of_experts.toy import tiny_qwen2

    plugin = str(experts / "ex")
    for bad in (None, 123, {"a": 1}, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="from_pretrained"):
            ToEModel.from_pretrained(bad, plugin)
    with pytest.raises(TypeError, match="pass the plug-in"):
        ToEModel.from_pretrained(tiny_qwen2(), None)
    with pytest.raises(TypeError, match="folder or hub repo id"):
        ToEModel.from_pretrained(tiny_qwen2(), 123)
