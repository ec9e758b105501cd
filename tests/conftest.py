from __future__ import annotations

import pytest
import torch

from tree_of_experts import ToEModel
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

# Every command and recipe module imported now: a test that patches tree_of_experts.hf.loading.load_causal_lm would
# otherwise leave its patch bound in a module first imported during that test (`from ..hf.loading import ...`).
from tree_of_experts.cli import _commands  # noqa: E402

_commands()

# Plug-in configurations the plug-in and export tests run through (shapes, selections, layer sets, gates).
PLUGIN_CASES = [
    dict(layers=[0], num_leaves=8, shape="balanced", selection="topk", top_k=2),
    dict(layers=[0, 1], num_leaves=5, shape="deep", selection="topp", top_k=5, intensity=True),
    dict(layers=[1], num_leaves=16, shape="balanced", selection="beam", top_k=3),
    dict(layers=[1], num_leaves=4, shape="balanced", selection="dense"),
    dict(layers=[0], num_leaves=6, shape="flat", selection="topk", top_k=2),
    dict(layers=[0], num_leaves=8, shape="balanced", selection="topk", top_k=2, query_norm=True),
]


# The Hub settings the shell may export. huggingface_hub (and datasets) read them once, at import, into constants:
# clearing the variables alone leaves e.g. HF_HUB_OFFLINE=1 in force, so the constants are reset too.
HUB_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN",
           "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")


@pytest.fixture(autouse=True)
def hermetic_hub(monkeypatch, tmp_path_factory):
    """Every test sees an online Hub at its default address and no token (none from the shell, none logged in on
    this machine), whatever the environment says; tests that need a token or offline mode set it themselves."""
    import sys

    from huggingface_hub import constants

    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.getbasetemp() / "no-hf-token"))
    if "datasets.config" in sys.modules:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setattr(sys.modules["datasets.config"], name, False)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def base():
    return tiny_qwen2(hidden_size=32, num_layers=2, seed=0)


@pytest.fixture
def batch(tok):
    """Two prompts of different lengths, left-padded (the first row has padding)."""
    return tok(["Question: 3 plus 4?", "Question: what is 12 times 7 then?"], return_tensors="pt", padding=True)


@pytest.fixture
def single(tok):
    """One unpadded prompt: `generate` then passes no attention mask, only the cache."""
    return tok(["Question: what is 12 times 7 then?"], return_tensors="pt")


def save_tiny_pair(directory) -> None:
    """A base (32 wide, 2 layers) and a teacher of another size (48 wide, 3 layers) sharing one tokenizer, saved as
    Hugging Face folders ``directory/base`` and ``directory/teacher``."""
    tok = tiny_tokenizer()
    for name, width, layers, seed in (("base", 32, 2, 0), ("teacher", 48, 3, 1)):
        tiny_qwen2(hidden_size=width, num_layers=layers, seed=seed).save_pretrained(directory / name)
        tok.save_pretrained(directory / name)


def randomize(model: ToEModel, seed: int = 0, scale: float = 1.0) -> ToEModel:
    """Gives every plug-in parameter a random non-trivial value (so the plug-in actually changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.plugin.named_parameters():
            if name.endswith("scale"):
                p.copy_(torch.rand(p.shape, generator=g) * scale + 0.5)
            elif name.endswith("norm.weight"):
                continue
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """The tiny pair saved as folders plus an extraction of the arithmetic fixture (N = 8): `d/base`, `d/teacher`,
    `d/ex` (one per test module)."""
    import os

    from tree_of_experts.commands.extract import extract

    d = tmp_path_factory.mktemp("pair")
    save_tiny_pair(d)
    data = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    extract(teacher=str(d / "teacher"), base=str(d / "base"), data=data, out=str(d / "ex"), num_leaves=8,
            shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny pair saved as Hugging Face folders `pair/base` and `pair/teacher` (one per test module)."""
    d = tmp_path_factory.mktemp("pair")
    save_tiny_pair(d)
    return d


def make_world(tmp_path_factory, trained: bool = True):
    """The tiny pair saved as folders, an extraction of the arithmetic fixture (N = 8, 3 shards of 8 rows, the
    teacher's top-k cached) in ``ex`` and, with ``trained``, a plug-in trained 2 steps with a checkpoint in
    ``trained``: the world the safety tests damage copies of."""
    import os

    from tree_of_experts.commands.extract import extract
    from tree_of_experts.commands.train import train

    data = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    w = tmp_path_factory.mktemp("world")
    save_tiny_pair(w)
    extract(teacher=str(w / "teacher"), base=str(w / "base"), data=data, out=str(w / "ex"), num_leaves=8,
            shard_size=8, heldout_frac=0.25, batch_size=4, gate_rank=8)
    if trained:
        train(base=str(w / "base"), experts=str(w / "ex"), data=data, out=str(w / "trained"), max_steps=2,
              stage_a_steps=1, batch_size=4, save_every=1)
    return w
