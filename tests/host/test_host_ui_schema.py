"""The node definitions as /object_info gives them: advanced inputs and search aliases on ComfyUI 0.14+ (which
has them), the schema unchanged on 0.3.64 (which raises TypeError on them); widget order never changes."""

from __future__ import annotations

import json
from pathlib import Path

import comfyui_version
import pytest

from comfyui_npo.nodes import node_list

CONTRACT = json.loads((Path(__file__).parents[1] / "e2e" / "node_contract.json").read_text(encoding="utf-8"))
VERSION = tuple(int(p) for p in comfyui_version.__version__.split("+")[0].split(".")[:3])
HAS_FEATURES = VERSION >= (0, 14, 0)  # advanced inputs and Schema.search_aliases arrived between 0.3.64 and 0.14.1

# the inputs folded away as advanced (rarely changed); every other input stays in view
ADVANCED = {
    "NPOApply": {"start_percent", "end_percent"},
    "NPONegativeModel": {"merge_weight"},
    "SelfNPOTrain": {
        "lora_layers", "truncation_steps", "ema_decay", "loss", "student_cond", "gradient_checkpointing",
        "training_dtype", "pool_steps", "pool_cfg", "grad_accumulation_steps", "optimizer", "preview_every",
        "partial_loading",
    },
    "NPOCompareReport": {"frames_per_item", "bootstrap_seed"},
    "NPOScoreImages": {"frames_per_item"},
    "NPOPreferenceTrain": {
        "loss_type", "lora_layers", "training_dtype", "grad_accumulation_steps", "optimizer", "preview_every",
        "preview_cfg", "partial_loading",
    },
    "NPOPairsFromParquet": {"ties"},
}


@pytest.fixture(scope="module")
def object_info() -> dict[str, dict]:
    return {cls.GET_SCHEMA().node_id: cls.GET_NODE_INFO_V1() for cls in node_list()}


def _inputs(info: dict) -> dict[str, dict]:
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            out[name] = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return out


def _order(info: dict) -> list[str]:
    order = info["input_order"]
    return list(order.get("required", [])) + list(order.get("optional", []))


def test_every_node_loads_with_the_frozen_widget_order(object_info):
    assert set(object_info) == set(CONTRACT)
    for node_id, frozen in CONTRACT.items():
        info = object_info[node_id]
        assert _order(info) == [e["name"] for e in frozen], node_id
        opts = _inputs(info)
        for e in frozen:
            if "default" in e:
                assert opts[e["name"]].get("default") == e["default"], f"{node_id}.{e['name']}"
        assert info["category"] == "NPO", node_id


def test_advanced_inputs_where_comfyui_has_them(object_info):
    """0.14+: the rarely changed inputs are advanced; 0.3.64: no input says advanced (the keyword never reached it:
    its inputs raise TypeError on it)."""
    for node_id, info in object_info.items():
        marked = {name for name, opts in _inputs(info).items() if "advanced" in opts}
        assert marked == (ADVANCED.get(node_id, set()) if HAS_FEATURES else set()), node_id
        assert all(opts["advanced"] is True for opts in _inputs(info).values() if "advanced" in opts), node_id


def test_search_aliases_where_comfyui_has_them(object_info):
    """0.14+: every node is found by npo and its own words; 0.3.64: no aliases (its Schema has no such field)."""
    for node_id, info in object_info.items():
        aliases = info.get("search_aliases") or []
        if not HAS_FEATURES:
            assert not aliases, node_id
            continue
        assert "npo" in aliases and len(aliases) == len(set(aliases)) > 3, (node_id, aliases)
    if HAS_FEATURES:
        assert "self-npo" in object_info["SelfNPOTrain"]["search_aliases"]
        assert {"negative", "guidance"} <= set(object_info["NPOApply"]["search_aliases"])
