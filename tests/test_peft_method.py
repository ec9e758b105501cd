"""ToE as the registered peft method TOE, on the tiny pair: get_peft_model, PeftModel / AutoPeftModelForCausalLM
loading, the Hub, Trainer, trl, and the plug-in <-> adapter converters."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import randomize
from huggingface_hub import ModelCard, ModelCardData
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.config import CONFIG_NAME, WEIGHTS_NAME, ToEConfig
from tree_of_experts.hf.loading import load_causal_lm
from tree_of_experts.peft_method import (ADAPTER_WEIGHTS, ToEPeftConfig, adapter_to_plugin, card_config,
                                         plugin_to_adapter)

TEXTS = ["Question: 3 plus 4? Answer: 7", "Question: 12 times 7? Answer: 84", "Question: 9 minus 2? Answer: 7",
         "Question: 5 times 5? Answer: 25"] * 2


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def plugin(experts):
    """A plug-in grown from the extraction's (its bank, random gates and scales: the extraction's own plug-in has zero
    scales, a no-op that any adapter would match)."""
    model = randomize(ToEModel.from_pretrained(load_causal_lm(str(experts / "base")), str(experts / "ex")))
    model.save_pretrained(experts / "plugin")
    model.detach()
    return str(experts / "plugin")


@pytest.fixture
def base(experts):
    return load_causal_lm(str(experts / "base"))


def toe_logits(experts, folder, batch):
    return logits(ToEModel.from_pretrained(load_causal_lm(str(experts / "base")), folder), batch)


def test_get_peft_model_is_toe_model(experts, plugin, base, batch):
    """The adapter built from a folder starts from its tensors: the extraction's bank, and a trained plug-in's
    logits exactly (bit-identical to ToEModel's)."""
    ex = get_peft_model(load_causal_lm(str(experts / "base")), ToEPeftConfig.from_plugin(experts / "ex"))
    bank = load_file(experts / "ex" / WEIGHTS_NAME)["blocks.0.bank.direction"]
    assert torch.equal(ex.base_model.toe.toe_plugin["default"].blocks["0"].bank.direction, bank)
    assert torch.equal(logits(ex, batch), toe_logits(experts, str(experts / "ex"), batch))

    bare = logits(base, batch)
    model = get_peft_model(base, ToEPeftConfig.from_plugin(plugin))
    ref = toe_logits(experts, plugin, batch)
    assert torch.equal(logits(model, batch), ref) and not torch.allclose(ref, bare, atol=1e-3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)  # KV-cache decode through the hooks
    toe = ToEModel.from_pretrained(load_causal_lm(str(experts / "base")), plugin)
    assert torch.equal(model.generate(**batch, **kw), toe.generate(**batch, **kw))


def test_only_the_plugin_trains_and_disabling_gives_the_base(experts, plugin, base, batch, capsys):
    """peft counts the plug-in's parameters alone as trainable; disable_adapter() and unload() take the hooks off, so
    the base's logits come back bit-exact; merging is refused in one line."""
    bare = logits(base, batch)
    model = get_peft_model(base, ToEPeftConfig.from_plugin(plugin))
    n_plugin = sum(p.numel() for p in ToEModel.from_pretrained(load_causal_lm(str(experts / "base")), plugin)
                   .plugin.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {n_plugin:,} " in capsys.readouterr().out
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".toe.toe_plugin.default." in name for name in trained)
    ref = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), bare)  # no hook on the base: bit-exact
    assert torch.equal(logits(model, batch), ref)
    with pytest.raises(ToEError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(logits(model.unload(), batch), bare)


def test_a_second_adapter_switches_and_deletes(experts, plugin, base, batch):
    """A second plug-in (K = 1) sits beside the first: set_adapter moves the hooks and the gradients to it, and
    deleting it gives the first one back."""
    bare = logits(base, batch)
    model = get_peft_model(base, ToEPeftConfig.from_plugin(plugin))
    model.add_adapter("k1", ToEPeftConfig(toe={**ToEConfig.load(plugin).to_dict(), "top_k": 1}, init_from=plugin))
    ref = toe_logits(experts, plugin, batch)
    assert torch.equal(logits(model, batch), ref)  # the new adapter is not active
    model.set_adapter("k1")
    assert not torch.equal(logits(model, batch), ref) and not torch.equal(logits(model, batch), bare)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    model.delete_adapter("k1")
    assert model.active_adapters == ["default"] and torch.equal(logits(model, batch), ref)


def test_save_and_load_with_peft(experts, plugin, base, batch, tmp_path):
    model = get_peft_model(base, ToEPeftConfig.from_plugin(plugin))
    ref = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", ADAPTER_WEIGHTS} <= set(os.listdir(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOE" and saved["task_type"] == "CAUSAL_LM" and saved["init_from"] is None
    assert saved["base_model_name_or_path"] == str(experts / "base")
    assert saved["toe"] == json.loads((experts / "plugin" / CONFIG_NAME).read_text())  # toe_config.json, as it is
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the card: ToE's (what the adapter is, how to load it) in place of peft's blank template, peft's metadata kept
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert "[More Information Needed]" not in card.text and "AutoPeftModelForCausalLM.from_pretrained" in card.text
    assert card.data.library_name == "peft" and {"tree-of-experts", "peft"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation" and "- PEFT " in card.text  # peft's, kept
    assert card.data.base_model is None  # peft's local path is no hub metadata (the hub refuses it)
    assert f"| parameters | {sum(t.numel() for t in tensors.values()):,} |" in card.text
    blank = ModelCard.from_template(ModelCardData())
    blank.text = blank.text.replace("<!-- Provide a quick summary", "Mine, half written.\n<!-- Provide", 1)
    blank.save(tmp_path / "adapter" / "README.md")
    model.save_pretrained(tmp_path / "adapter")  # a card the user began is peft's to update, never replaced
    assert "Mine, half written." in (tmp_path / "adapter" / "README.md").read_text()
    named = get_peft_model(load_causal_lm(str(experts / "base")), ToEPeftConfig.from_plugin(plugin), adapter_name="k")
    named.save_pretrained(tmp_path / "named")  # peft saves a named adapter in its own folder: its card goes there
    sub = ModelCard.load(tmp_path / "named" / "k" / "README.md")
    assert "AutoPeftModelForCausalLM" in sub.text and sub.data.pipeline_tag == "text-generation"
    root = ModelCard.load(tmp_path / "named" / "README.md")  # the folder a user pushes: ToE's card, not peft's blank
    assert "[More Information Needed]" not in root.text and 'subfolder="k")' in root.text
    from_root = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "named", subfolder="k")
    assert torch.equal(logits(from_root, batch), ref)
    named.add_adapter("j", ToEPeftConfig.from_plugin(plugin))
    named.save_pretrained(tmp_path / "named")  # a second named adapter: the root card names both subfolders
    assert "subfolders `j`, `k`" in (tmp_path / "named" / "README.md").read_text()
    named.add_adapter("default", ToEPeftConfig.from_plugin(plugin))
    named.save_pretrained(tmp_path / "named", selected_adapters=["default"])  # the folder's own adapter: its card
    root = ModelCard.load(tmp_path / "named" / "README.md")
    assert "subfolder" not in root.text and 'AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")' in root.text
    assert "- PEFT " in root.text  # peft's lines kept through both replacements

    loaded = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), ref)
    assert not any(p.requires_grad for p in loaded.parameters())  # peft's default: inference mode
    trainable = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "adapter",
                                          is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == sum(t.numel() for t in tensors.values())
    empty_first = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "adapter",
                                            low_cpu_mem_usage=True)  # the plug-in built on meta, its tensors assigned
    assert torch.equal(logits(empty_first, batch), ref)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # the base from base_model_name_or_path
    assert torch.equal(logits(auto, batch), ref)


class FakeHub:
    """The Hub as a local folder, ``root/<repo id>``: transformers' push (create_repo, create_commit) and peft's
    downloads. peft and transformers import huggingface_hub's functions by name, so each is replaced where it is used."""

    def __init__(self, root):
        self.root = root

    def hf_api(self):
        hub = self

        class Api:
            def create_repo(self, repo_id, **kwargs):
                return type("RepoUrl", (), {"repo_id": repo_id})()

            def create_commit(self, repo_id, operations, **kwargs):
                for op in operations:
                    os.makedirs(hub.root / repo_id, exist_ok=True)
                    shutil.copy(op.path_or_fileobj, hub.root / repo_id / op.path_in_repo)
                return f"https://hub/{repo_id}/commit/1"

        return Api()

    def hf_hub_download(self, repo_id, filename, subfolder=None, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        path = self.root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def file_exists(self, repo_id, filename, **kwargs):
        return (self.root / repo_id / filename).is_file()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import peft.config
    import peft.utils.other
    import peft.utils.save_and_load
    import transformers.utils.hub
    from huggingface_hub import ModelCard, ModelCardData

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.utils.hub, "hf_api", fake.hf_api)
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda *a, **k: ModelCard("---\n---\n"))
    for module in (peft.config, peft.utils.save_and_load):
        monkeypatch.setattr(module, "hf_hub_download", fake.hf_hub_download)
    for module in (peft.utils.save_and_load, peft.utils.other):
        monkeypatch.setattr(module, "file_exists", fake.file_exists)
    return fake


def test_hub_round_trip(hub, experts, plugin, base, batch):
    """PeftModel.push_to_hub, then PeftModel / AutoPeftModelForCausalLM from the repo id (the base from the local
    folder the adapter records, as peft records it)."""
    model = get_peft_model(base, ToEPeftConfig.from_plugin(plugin))
    ref = logits(model, batch)
    model.push_to_hub("user/toe-adapter")
    assert {"adapter_config.json", ADAPTER_WEIGHTS} <= set(os.listdir(hub.root / "user/toe-adapter"))
    loaded = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), "user/toe-adapter")
    assert torch.equal(logits(loaded, batch), ref)
    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained("user/toe-adapter"), batch), ref)


def test_trainer_resumes_to_the_uninterrupted_run(experts, plugin, tok, tmp_path):
    """Plain transformers Trainer on the PeftModel: adapter-only checkpoints, and a resume from one (into an adapter
    that starts elsewhere: random gates and bank) reaches the uninterrupted run's plug-in."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    enc = tok(TEXTS, padding=True)
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": enc["input_ids"]})

    def run(out, config, **kw):
        model = get_peft_model(load_causal_lm(str(experts / "base")), config)
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0)
        Trainer(model=model, args=args, train_dataset=data).train(**kw)
        return model

    full = run(tmp_path / "full", ToEPeftConfig.from_plugin(plugin))
    start = ToEModel.from_pretrained(load_causal_lm(str(experts / "base")), plugin).plugin.state_dict()
    after = full.base_model.toe.toe_plugin["default"].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in after.items())  # the plug-in trained
    bare = load_causal_lm(str(experts / "base"))
    assert all(torch.equal(p, q) for p, q in zip(full.get_base_model().parameters(), bare.parameters()))
    files = set(os.listdir(tmp_path / "full" / "checkpoint-2"))
    assert ADAPTER_WEIGHTS in files and not files & {"model.safetensors", "config.json"}

    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    elsewhere = ToEPeftConfig(toe=ToEConfig.load(plugin).to_dict())  # no init_from: a random start
    resumed = run(tmp_path / "resumed", elsewhere, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    again = resumed.base_model.toe.toe_plugin["default"].state_dict()
    assert all(torch.allclose(after[k], again[k], rtol=0, atol=1e-6) for k in after)


def test_trl_sft_trainer_trains_a_plugin_from_a_peft_config(experts, tok, batch, tmp_path):
    """trl's SFTTrainer wraps the bare base itself (``peft_config=``), starting from the extraction's bank; under its
    default activation checkpointing the plug-in trains exactly as without; the saved folder is a peft adapter that
    PeftModel loads back to the trained model's logits."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    def trainer(out, checkpointing=True):
        args = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                             report_to=[], use_cpu=True, seed=0, max_length=32, bf16=False,  # trl's default is bf16
                             gradient_checkpointing=checkpointing)
        return trl.SFTTrainer(model=load_causal_lm(str(experts / "base")), args=args,
                              peft_config=ToEPeftConfig.from_plugin(experts / "ex"),
                              train_dataset=datasets.Dataset.from_dict({"text": TEXTS}), processing_class=tok)

    sft = trainer(tmp_path / "sft")
    plugin = sft.model.base_model.toe.toe_plugin["default"]
    start = load_file(experts / "ex" / WEIGHTS_NAME)
    assert all(torch.equal(v, start[k]) for k, v in plugin.state_dict().items())  # the extraction's tensors
    sft.train()
    assert any(not torch.equal(v, start[k]) for k, v in plugin.state_dict().items())
    plain = trainer(tmp_path / "plain", checkpointing=False)
    plain.train()
    again = plain.model.base_model.toe.toe_plugin["default"].state_dict()
    assert all(torch.allclose(v, again[k], rtol=0, atol=1e-6) for k, v in plugin.state_dict().items())
    sft.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "adapter")
    sft.model.eval()
    assert torch.equal(logits(loaded, batch), logits(sft.model, batch))


def test_trl_gkd_trainer_distils_the_teacher_into_a_plugin(experts, tok, tmp_path):
    """trl's GKDTrainer (on-policy: the student samples through the plug-in's hooks, the tiny teacher scores every
    token of the shared vocabulary) trains a plug-in from a peft config; the saved adapter gives the trained logits.
    Between steps the student samples without autograd: the bank must not serve vectors of before the last step."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = tok.__class__.from_pretrained(str(experts / "base"))  # a copy: the chat template stays in this test
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    chats = [[{"role": "user", "content": f"what is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
             for a, b in [(3, 4), (12, 7), (9, 2), (5, 5)]] * 2
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                     report_to=[], use_cpu=True, seed=0, max_length=64, bf16=False, max_new_tokens=6, lmbda=1.0,
                     temperature=0.9)
    trainer = GKDTrainer(model=load_causal_lm(str(experts / "base")), teacher_model=load_causal_lm(str(experts / "teacher")),
                         args=args, peft_config=ToEPeftConfig.from_plugin(experts / "ex"),
                         train_dataset=datasets.Dataset.from_dict({"messages": chats}), processing_class=tok)
    plugin = trainer.model.base_model.toe.toe_plugin["default"]
    start = load_file(experts / "ex" / WEIGHTS_NAME)
    trainer.train()
    assert all(not torch.equal(v, start[k]) for k, v in plugin.state_dict().items() if k.endswith("scale"))
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), tmp_path / "adapter")
    trainer.model.eval()
    batch = tok(["user: what is 3 plus 4?\n"], return_tensors="pt")
    assert torch.equal(logits(loaded, batch), logits(trainer.model, batch))


def test_converters_go_both_ways(experts, plugin, batch, tmp_path):
    ref = toe_logits(experts, plugin, batch)
    adapter = plugin_to_adapter(plugin, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_from"] is None
    assert "# ToE peft adapter for" in (tmp_path / "adapter" / "README.md").read_text()
    named = plugin_to_adapter(plugin, tmp_path / "on-hub", base_model_name_or_path="org/base-model")
    card = ModelCard.load(os.path.join(named, "README.md"))  # the card names the base the adapter loads on
    assert card.data.base_model == "org/base-model" and "# ToE peft adapter for `org/base-model`" in card.text
    recorded = {**ToEConfig.load(plugin).to_dict(), "base_model": "org/recorded"}
    assert card_config(ToEConfig(**recorded), "/some/local/base").base_model == "org/recorded"  # a path: never
    assert card_config(ToEConfig(**recorded), "org/other").base_model == "org/other"
    cached = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert card_config(ToEConfig(**recorded), str(cached)).base_model == "org/cached"  # the cache's folder: its id
    assert torch.equal(logits(PeftModel.from_pretrained(load_causal_lm(str(experts / "base")), adapter), batch), ref)
    back = adapter_to_plugin(adapter, tmp_path / "plugin")
    assert {CONFIG_NAME, WEIGHTS_NAME, "README.md"} <= set(os.listdir(back))
    assert ToEConfig.load(back) == ToEConfig.load(plugin)
    assert torch.equal(toe_logits(experts, back, batch), ref)  # the plug-in folder itself still loads as ever

    lora = get_peft_model(load_causal_lm(str(experts / "base")), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ToEError, match="LORA adapter, not a ToE one"):
        adapter_to_plugin(tmp_path / "lora", tmp_path / "x")


@pytest.mark.parametrize("toe, message", [
    ({}, "has no layers and num_leaves: use ToEPeftConfig.from_plugin"),
    ({"layers": [0], "num_leaves": 8, "top_kk": 2}, r"unknown fields \['top_kk'\]"),
    ({"layers": [0], "num_leaves": 8, "top_k": 9}, "top_k=9"),
    ({"layers": [0], "num_leaves": 8, "base_adapter": "base_adapter"}, "LoRA-adapted base"),
])
def test_config_errors_are_one_line(toe, message):
    with pytest.raises(ToEError, match=message) as e:
        ToEPeftConfig(toe=toe)
    assert "\n" not in str(e.value)


def test_importing_the_package_registers_the_method():
    code = ("import tree_of_experts; from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as M; "
            "print(M['TOE'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "ToETuner"


def readme_snippet() -> str:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    return re.search(r"<!-- peft-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)


def test_the_readme_snippet_runs(experts, tok, tmp_path, monkeypatch, capsys):
    """The README's peft snippet as it is written, on the tiny pair: its hub id and folder become the local ones."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    code = readme_snippet()
    assert len(code.strip().splitlines()) == 5
    code = code.replace('"Qwen/Qwen2.5-1.5B"', repr(str(experts / "base"))).replace('"experts/"', repr(str(experts / "ex")))
    monkeypatch.chdir(tmp_path)
    scope = {"ds": datasets.Dataset.from_dict({"text": TEXTS}), "tok": tok}
    exec("import torch, trl\nfrom peft import PeftModel, get_peft_model\nfrom transformers import AutoModelForCausalLM\n"
         "from tree_of_experts import ToEPeftConfig\n" + code, scope)
    assert isinstance(scope["model"], PeftModel) and (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert any(line.startswith("Question: 3 plus 4?") for line in capsys.readouterr().out.splitlines())


def test_from_plugin_takes_a_plug_ins_hub_id(plugin, monkeypatch, tmp_path):
    """``from_plugin("user/plug")`` and ``plugin_to_adapter`` read the repo's snapshot (resolved as ToEModel does)."""
    import tree_of_experts.peft_method as pm

    asked = []
    monkeypatch.setattr(pm, "resolve_folder", lambda name, what: asked.append(name) or str(plugin))
    config = ToEPeftConfig.from_plugin("user/plug")
    assert asked == ["user/plug"] and config.init_from == str(plugin)
    pm.plugin_to_adapter("user/plug", tmp_path / "adapter")
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
