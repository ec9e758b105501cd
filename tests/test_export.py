"""`toe export`: the exported folder loads with AutoModelForCausalLM(trust_remote_code=True) and equals ToEModel."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PLUGIN_CASES, randomize

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.cli import main
from tree_of_experts.commands import export as export_module
from tree_of_experts.commands.export import export
from tree_of_experts.hf.loading import load_causal_lm, load_tokenizer
from tree_of_experts.toy import tiny_qwen2

CASES = PLUGIN_CASES


def build(pair, tmp_path, fields, name="plugin"):
    """A randomized plug-in on the tiny base, saved to ``tmp_path / name``; returns the ToEModel."""
    model = randomize(ToEModel.fresh(load_causal_lm(str(pair / "base")), **fields))
    model.save_pretrained(tmp_path / name)
    return model


def load_exported(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)


def run(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("fields", CASES)
def test_exported_model_equals_toe_model(pair, tmp_path, batch, fields):
    toe = build(pair, tmp_path, fields)
    result = export(str(pair / "base"), str(tmp_path / "plugin"), str(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "modeling_toe.py", "tokenizer.json"} <= set(result["files"])
    exported = load_exported(tmp_path / "out")
    assert type(exported).__name__ == "ToEForCausalLM"
    ref_logits, ref_tokens = run(toe, batch)
    logits, tokens = run(exported, batch)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    with toe.disabled():  # and the plug-in is not a no-op here: the equality above says something
        assert not torch.allclose(run(toe, batch)[0], ref_logits)


def test_exported_code_runs_without_tree_of_experts(pair, tmp_path, batch):
    toe = build(pair, tmp_path, CASES[1])
    export(str(pair / "base"), str(tmp_path / "plugin"), str(tmp_path / "out"))
    for name in os.listdir(tmp_path / "out"):
        if name.endswith(".py"):
            tree = ast.parse((tmp_path / "out" / name).read_text())
            modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m.startswith("tree_of_experts") for m in modules), name
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(toe(**batch).logits, tmp_path / "ref.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['tree_of_experts'] = None  # importing it now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logits = m(**batch).logits\n"
        f"assert torch.equal(logits, torch.load({str(tmp_path / 'ref.pt')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pipeline_runs_the_exported_folder(pair, tmp_path, tok):
    from transformers import pipeline

    toe = build(pair, tmp_path, CASES[0])
    export(str(pair / "base"), str(tmp_path / "plugin"), str(tmp_path / "out"))
    pipe = pipeline("text-generation", model=str(tmp_path / "out"), trust_remote_code=True)
    prompt = "Question: what is 12 times 7 then?"
    text = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    enc = tok([prompt], return_tensors="pt")
    ids = toe.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_bfloat16_base_keeps_the_plugin_in_float32(tmp_path, tok, batch):
    tiny_qwen2(seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    toe = randomize(ToEModel.fresh(load_causal_lm(str(tmp_path / "base")), layers=[0], num_leaves=8))
    assert toe.dtype == torch.bfloat16
    toe.save_pretrained(tmp_path / "plugin")
    export(str(tmp_path / "base"), str(tmp_path / "plugin"), str(tmp_path / "out"))
    exported = load_exported(tmp_path / "out")
    assert exported.base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in exported.plugin.parameters())
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, toe(**batch).logits)


def test_out_is_refused_when_not_empty_and_replaced_whole(pair, tmp_path, monkeypatch):
    build(pair, tmp_path, CASES[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a file an export does not write is never replaced with the folder
        with pytest.raises(ToEError, match=r"does not write \(keep\.txt\).*new --out"):
            export(str(pair / "base"), str(tmp_path / "plugin"), str(out), overwrite=overwrite)
    os.remove(out / "keep.txt")
    export(str(pair / "base"), str(tmp_path / "plugin"), str(out))
    first = sorted(os.listdir(out))
    with pytest.raises(ToEError, match="an earlier export: pass --overwrite true"):
        export(str(pair / "base"), str(tmp_path / "plugin"), str(out))

    import huggingface_hub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", broken)
    with pytest.raises(OSError, match="disk full"):
        export(str(pair / "base"), str(tmp_path / "plugin"), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == first  # a failed export leaves the old folder as it was ...
    assert sorted(os.listdir(tmp_path)) == ["out", "plugin"]  # ... and no temporary folder behind
    monkeypatch.undo()
    export(str(pair / "base"), str(tmp_path / "plugin"), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == first
    assert sorted(os.listdir(tmp_path)) == ["out", "plugin"]


def test_cli_export_and_a_plugin_for_another_base_is_refused(pair, tmp_path, capsys):
    build(pair, tmp_path, CASES[0])
    code = main(["export", "--base", str(pair / "base"), "--plugin", str(tmp_path / "plugin"),
                 "--out", str(tmp_path / "out"), "--base_id", "org/tiny-base"])
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert "base_model: org/tiny-base" in (tmp_path / "out" / "README.md").read_text()
    assert load_tokenizer(str(tmp_path / "out")).pad_token is not None
    code = main(["export", "--base", str(pair / "teacher"), "--plugin", str(tmp_path / "plugin"),
                 "--out", str(tmp_path / "other")])
    assert code == 2 and "does not fit" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_folder_whose_logits_differ_is_refused(pair, tmp_path, monkeypatch):
    build(pair, tmp_path, CASES[0])
    template = tmp_path / "template"
    shutil.copytree(str(export_module.TEMPLATE), template)
    code = (template / "modeling_toe.py").read_text()
    assert "self.scale, h, self.clip" in code
    (template / "modeling_toe.py").write_text(code.replace("self.scale, h", "2 * self.scale, h"))  # twice the Δ
    monkeypatch.setattr(export_module, "TEMPLATE", template)
    with pytest.raises(ToEError, match="logits differ"):
        export(str(pair / "base"), str(tmp_path / "plugin"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["plugin", "template"]
