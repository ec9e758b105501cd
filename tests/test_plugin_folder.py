"""tree_of_experts.plugin_folder: what a plug-in folder records about its base, and what loading it on another base
says."""

from __future__ import annotations

import json
import logging


def test_base_is_recorded_portably_and_other_weights_warn(experts, caplog):
    from tree_of_experts import ToEModel
    from tree_of_experts.toy import tiny_qwen2

    config = json.loads((experts / "ex" / "toe_config.json").read_text())
    assert config["base_name"] == "base" and len(config["base_weight_sample"]) == 16
    with caplog.at_level(logging.WARNING):
        ToEModel.from_pretrained(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), str(experts / "ex"))
    assert not [r for r in caplog.records if "other weights" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # same architecture, other training: loads, with a warning
        ToEModel.from_pretrained(tiny_qwen2(hidden_size=32, num_layers=2, seed=7), str(experts / "ex"))
    assert [r for r in caplog.records if "other weights" in r.getMessage()]
