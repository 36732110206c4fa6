"""Widget order is a contract: saved workflows store a node's widget values by position.

``node_contract.json`` freezes, per pack node, its inputs in order as /object_info gives them to the
frontend: name, type (a combo is ``COMBO``: its file lists differ between machines), default, whether
it is a widget (stores a value) and whether the frontend stores a control_after_generate value after
it. Any change fails. A change that only appends inputs at the end keeps every saved workflow's values;
extend the frozen list deliberately with ``NPO_FREEZE_CONTRACT=1`` (it refuses anything but appends).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import npo_e2ekit as kit

CONTRACT = Path(__file__).with_name("node_contract.json")
PACK_MODULE = f"custom_nodes.{kit.PACK_FOLDER}"


def input_contract(info: dict) -> list[dict]:
    """A node's inputs in order, as the entries the frontend's serialization depends on."""
    out = []
    for name in kit.input_order(info):
        typ, opts = kit.input_spec(info, name)
        widget = kit.is_widget(typ) and not opts.get("forceInput")
        entry = {"name": name, "type": "COMBO" if kit.combo_options(typ, opts) is not None else typ, "widget": widget}
        if widget and "default" in opts and entry["type"] != "COMBO":
            entry["default"] = opts["default"]
        if widget and kit.has_control_after_generate(name, typ, opts):
            entry["control_after_generate"] = True
        out.append(entry)
    return out


def _dump(contract: dict[str, list[dict]]) -> str:
    """One node a block, one input a line (diffs show exactly which input changed)."""
    blocks = [f"  {json.dumps(nid)}: [\n" + ",\n".join(f"    {json.dumps(e, sort_keys=True)}" for e in inputs) + "\n  ]"
              for nid, inputs in sorted(contract.items())]
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _breaks(frozen: list[dict], now: list[dict]) -> str | None:
    """Why ``now`` would misread workflows saved against ``frozen``; None when it only appends."""
    for i, old in enumerate(frozen):
        if i >= len(now):
            return f"input {i} ({old['name']}) was removed"
        if now[i] != old:
            return f"input {i} was {old}, is now {now[i]}"
    return None


def test_pack_inputs_match_the_frozen_contract(object_info):
    frozen = json.loads(CONTRACT.read_text(encoding="utf-8"))
    now = {nid: input_contract(info) for nid, info in object_info.items() if info.get("python_module") == PACK_MODULE}
    assert set(frozen) <= set(now), f"nodes missing from this pack: {sorted(set(frozen) - set(now))}"
    problems, appended = [], {}
    for nid, inputs in now.items():
        old = frozen.get(nid, [])
        why = _breaks(old, inputs)
        if why:
            problems.append(f"{nid}: {why}: saved workflows would load shifted values")
        elif inputs != old:
            appended[nid] = inputs[len(old):]
    assert not problems, "\n".join(problems) + "\nnew inputs go last; never rename, retype or reorder one"
    if appended and os.environ.get("NPO_FREEZE_CONTRACT") == "1":
        CONTRACT.write_text(_dump({**frozen, **now}), encoding="utf-8")
    assert not appended, (f"inputs appended at the end (safe for saved workflows): "
                          f"{ {k: [e['name'] for e in v] for k, v in appended.items()} }; extend {CONTRACT.name} "
                          "deliberately: NPO_FREEZE_CONTRACT=1 pytest tests/e2e/test_e2e_widget_contract.py")


def test_the_contract_check_tells_a_shift_from_an_append():
    frozen = [{"name": "a", "type": "INT", "widget": True, "default": 1},
              {"name": "b", "type": "FLOAT", "widget": True}]
    assert _breaks(frozen, frozen + [{"name": "c", "type": "BOOLEAN", "widget": True}]) is None
    assert "input 1" in _breaks(frozen, [frozen[0], {"name": "c", "type": "BOOLEAN", "widget": True}, frozen[1]])
    assert "default" in _breaks(frozen, [{**frozen[0], "default": 2}, frozen[1]])
    assert "removed" in _breaks(frozen, frozen[:1])


SAVED = Path(__file__).with_name("saved_workflows") / "every_pack_node.json"
SAVED_EXPECTED = SAVED.with_name("every_pack_node.expected.json")
# the first save (2026-12-07), before inputs were appended to NPO Preference Train and NPO Self-Generated Pairs and
# before the pair nodes existed: an older workflow must load with the values it stored
FIRST_SAVE = SAVED.with_name("every_pack_node_2026-12-07.json")
FIRST_SAVE_NODES = 11


def saved_workflow(path: Path = SAVED) -> tuple[dict, dict]:
    """A workflow saved by the v0.33.0 frontend with every pack node at non-default values, and the
    API prompt that frontend made of it at the time (each value under its input's name)."""
    expected = path.with_name(path.name.replace(".json", ".expected.json"))
    return json.loads(path.read_text(encoding="utf-8")), json.loads(expected.read_text(encoding="utf-8"))


def test_a_workflow_saved_with_todays_pack_loads_with_its_values(object_info):
    workflow, expected = saved_workflow()
    every = set(json.loads(CONTRACT.read_text(encoding="utf-8")))
    assert {e["class_type"] for e in expected.values()} == every, "re-save the workflow with the new nodes"
    assert kit.ui_to_api(workflow, object_info) == expected


def test_a_workflow_saved_before_inputs_were_appended_loads_with_its_values(object_info):
    """The stored values stay under their names (the inputs appended since are left to their defaults)."""
    workflow, expected = saved_workflow(FIRST_SAVE)
    assert len(expected) == FIRST_SAVE_NODES
    assert kit.ui_to_api(workflow, object_info) == expected
