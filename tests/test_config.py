"""tree_of_experts.config: a plug-in's config refuses what cannot be built, naming the fix."""

from __future__ import annotations

import pytest

from tree_of_experts import ToEConfig, ToEError, ToEModel
from tree_of_experts.toy import tiny_qwen2


def test_config_validation_names_the_fix():
    with pytest.raises(ToEError, match="power of two"):
        ToEConfig(hidden_size=8, layers=[0], num_leaves=6)
    with pytest.raises(ToEError, match="needs shape='balanced'"):
        ToEConfig(hidden_size=8, layers=[0], num_leaves=6, shape="deep", selection="beam")
    with pytest.raises(ToEError, match="out of range"):
        ToEModel.fresh(tiny_qwen2(num_layers=2), layers=[5], num_leaves=4)
