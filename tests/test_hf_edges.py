"""Where a Hugging Face user's habits meet the plug-in: whole-model casts, packed batches, a second plug-in on one
base, transformers' own adapter loading, the loading options, and lm-eval on a plug-in over a LoRA-adapted base."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import randomize

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.plugin import injection_mask
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer


def test_a_cast_of_the_whole_model_leaves_the_plugin_in_float32(base, batch):
    toe = randomize(ToEModel.fresh(base, layers=[0, 1], num_leaves=8))
    before = {k: v.clone() for k, v in toe.plugin.state_dict().items()}
    toe.to(torch.bfloat16)  # as Trainer's bf16_full_eval or trl's cast of the trainable parameters do
    assert next(toe.base.parameters()).dtype == torch.bfloat16
    state = toe.plugin.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # not rounded through bf16 either
    with torch.no_grad():
        out = toe(**batch).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_packed_sequences_each_keep_their_first_token():
    """trl's padding_free / DataCollatorWithFlattening: no attention mask, positions restart at each sequence."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert injection_mask(1, 8, torch.device("cpu"), None, 0, pos).tolist() == [[0, 1, 1, 0, 1, 0, 1, 1]]
    assert injection_mask(1, 8, torch.device("cpu"), None, 0).tolist() == [[0] + [1] * 7]  # no positions: as before


def test_the_plugin_reads_the_packed_rows_positions(base):
    toe = randomize(ToEModel.fresh(base, layers=[0], num_leaves=4))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        toe(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert toe.plugin._mask.tolist() == [[0, 1, 1, 0, 1, 1]]


def test_a_second_plugin_on_one_base_takes_it_instead_of_stacking(base, batch, caplog):
    """The usual way to meet this: a plug-in made (or loaded) on a base, then another loaded onto the same base."""
    first = randomize(ToEModel.fresh(base, layers=[0], num_leaves=4))
    second = randomize(ToEModel.fresh(base, layers=[1], num_leaves=4), seed=1)
    assert not first.plugin.is_attached and second.plugin.is_attached and "its hooks are removed" in caplog.text
    with torch.no_grad():
        taken = second(**batch).logits
        second.plugin.detach()
        with second.plugin.attached(base):
            alone = second(**batch).logits
    assert torch.equal(taken, alone)  # what runs is the second plug-in alone, not the two added up


def test_a_copy_of_a_hooked_base_takes_its_own_plugin_without_touching_the_original(base):
    """from_pretrained copies a caller's base to merge a LoRA adapter: a plug-in on the copy leaves the original's
    plug-in attached; and a plug-in attached again and again is remembered once."""
    import copy

    first = ToEModel.fresh(base, layers=[0], num_leaves=4)
    for _ in range(5):
        first.plugin.detach()
        first.plugin.attach(base)
    assert len(base.__dict__["_toe_plugins"]) == 1
    second = ToEModel.fresh(copy.deepcopy(base), layers=[1], num_leaves=4)
    assert first.plugin.is_attached and second.plugin.is_attached


def test_transformers_own_adapter_loading_refuses_instead_of_giving_the_bare_base(base, tmp_path):
    from peft import get_peft_model

    from tree_of_experts.peft_method import ToEPeftConfig

    get_peft_model(tiny_qwen2(seed=0), ToEPeftConfig(toe={"layers": [0], "num_leaves": 4})).save_pretrained(
        tmp_path / "adapter")
    with pytest.raises(ValueError, match="get_peft_model"):
        tiny_qwen2(seed=0).load_adapter(str(tmp_path / "adapter"))


def test_loading_options_go_where_transformers_users_expect(base, tmp_path, monkeypatch):
    import tree_of_experts.model as model_mod

    toe = ToEModel.fresh(base, layers=[0], num_leaves=4)
    toe.save_pretrained(tmp_path / "plug")
    toe.plugin.detach()
    loaded = ToEModel.from_pretrained(base, str(tmp_path / "plug"))
    assert not loaded.training  # as transformers returns a model
    loaded.plugin.detach()
    with pytest.raises(TypeError, match=r"\['dtype'\] would load the base, which is already loaded"):
        ToEModel.from_pretrained(base, str(tmp_path / "plug"), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="use model.push_to_hub"):
        loaded.save_pretrained(tmp_path / "again", push_to_hub=True)
    asked = {}

    def resolve(path, what, revision=None, token=None):
        asked["revision"] = revision
        raise ToEError("stop here")

    monkeypatch.setattr(model_mod, "resolve_folder", resolve)
    with pytest.raises(ToEError, match="stop here"):
        ToEModel.from_pretrained("user/toe-plugin", revision="v2")  # the one-argument form: the plug-in's revision
    assert asked["revision"] == "v2"


def test_lm_eval_scores_the_adapted_base_a_plugin_on_lora_runs_on(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra")
    from peft import LoraConfig, get_peft_model

    from tree_of_experts.harness import ToELM

    tok = tiny_tokenizer()
    base = tiny_qwen2(seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = get_peft_model(tiny_qwen2(seed=0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    toe = ToEModel.from_pretrained(base, _fresh_plugin(base, tmp_path), base_adapter=str(tmp_path / "lora"))
    toe.save_pretrained(tmp_path / "plug-on-lora")
    lm = ToELM(pretrained=str(tmp_path / "base"), plugin=str(tmp_path / "plug-on-lora"), tokenizer=tok,
               device="cpu", batch_size=2)
    assert lm.model is lm.toe.base and lm.toe.plugin.is_attached  # not the bare base it loaded first


def _fresh_plugin(base, tmp_path) -> str:
    plug = ToEModel.fresh(base, layers=[0], num_leaves=4)
    plug.save_pretrained(tmp_path / "plug")
    plug.plugin.detach()
    return str(tmp_path / "plug")


def test_the_exported_model_edits_the_same_positions(tmp_path, monkeypatch):
    """The exported folder's modeling_toe.py is self-contained (remote code cannot import the package): its copy of
    the mask must stay the package's, packed rows included."""
    import importlib
    import shutil
    import sys

    import tree_of_experts.commands.export as export_module

    package = tmp_path / "exported_toe"  # the folder's code as `toe export` writes it, imported as a package
    shutil.copytree(export_module.TEMPLATE, package)
    for name, library in export_module.LIBRARY_CODE.items():
        shutil.copy(os.path.join(os.path.dirname(export_module.__file__), "..", library), package / name)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    exported = importlib.import_module("exported_toe.modeling_toe")
    sys.modules.pop("exported_toe", None)
    cpu = torch.device("cpu")
    cases = [(None, 0, None), (None, 3, None), (torch.tensor([[0, 1, 1, 1, 1]]), 0, None),
             (torch.tensor([[0, 0, 1, 1, 1]]), 0, torch.tensor([[1, 1, 0, 1, 2]])),
             (None, 0, torch.tensor([[0, 1, 2, 0, 1]]))]
    for mask, past, pos in cases:
        assert torch.equal(exported.injection_mask(1, 5, cpu, mask, past, pos),
                           injection_mask(1, 5, cpu, mask, past, pos))
