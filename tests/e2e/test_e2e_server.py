"""The pack as a ComfyUI server sees it: import, node definitions, model folder, example workflows."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import npo_e2ekit as kit

# node id → output types. The inputs, in order, are frozen in node_contract.json
# (test_e2e_widget_contract.py): saved workflows store widget values by position.
EXPECTED_OUTPUTS = {
    "NPOLoadOffset": ["NPO_OFFSET"],
    "NPOApply": ["MODEL"],
    "NPONegativeModel": ["MODEL"],
    "NPOCFGGuider": ["GUIDER"],
    "NPOCompressOffset": ["NPO_OFFSET"],
    "SelfNPOTrain": ["NPO_OFFSET", "IMAGE", "INT"],
    "NPOSaveOffset": [],
    "NPOLoadScorer": ["NPO_SCORER"],
    "NPOCompareReport": ["STRING", "IMAGE"],
    "NPOScoreImages": ["FLOAT", "STRING"],
    "NPOPromptList": ["STRING", "INT"],
    "NPOPreferenceTrain": ["NPO_OFFSET", "IMAGE", "INT"],
    "NPOPairsFromImages": ["NPO_PAIRS"],
    "NPOPairsFromFolder": ["NPO_PAIRS"],
    "NPOSelfGeneratedPairs": ["NPO_PAIRS", "IMAGE"],
    "NPOPairsFromParquet": ["NPO_PAIRS"],
}
CONTRACT = json.loads((Path(__file__).with_name("node_contract.json")).read_text(encoding="utf-8"))
PACK_MODULE = f"custom_nodes.{kit.PACK_FOLDER}"


def test_pack_imports_without_errors(server):
    log = server.log_text()
    pack_lines = [ln for ln in log.splitlines() if kit.PACK_FOLDER in ln]
    failed = [ln for ln in pack_lines if "IMPORT FAILED" in ln or "Cannot import" in ln]
    assert not failed, "ComfyUI could not import the pack:\n" + "\n".join(failed) + "\n" + server.log_tail(120)
    assert any(re.search(r"seconds: .*custom_nodes/" + re.escape(kit.PACK_FOLDER), ln) for ln in pack_lines), \
        "the pack is missing from ComfyUI's 'Import times for custom nodes' list:\n" + server.log_tail(120)


def test_comfyui_starts_complete(server):
    """A complete ComfyUI Python: none of ComfyUI's own node modules (audio, video, ...) fails to import."""
    log = server.log_text()
    failed = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln or "Cannot import" in ln]
    assert not failed, "ComfyUI started with modules missing:\n" + "\n".join(failed) + "\n" + server.log_tail(200)


def test_object_info_lists_every_node_with_declared_inputs(object_info):
    assert set(CONTRACT) == set(EXPECTED_OUTPUTS)
    for node_id, outputs in EXPECTED_OUTPUTS.items():
        inputs = [entry["name"] for entry in CONTRACT[node_id]]
        assert node_id in object_info, f"{node_id} is not registered; /object_info has no such node"
        info = object_info[node_id]
        assert info["python_module"] == PACK_MODULE, info["python_module"]
        assert info["category"] == "NPO"
        assert info["display_name"] and info["display_name"] != node_id
        assert info.get("description"), f"{node_id} has no description"
        assert kit.input_order(info) == inputs, f"{node_id} inputs changed: {kit.input_order(info)}"
        assert info["output"] == outputs, f"{node_id} outputs: {info['output']}"


def test_every_pack_input_has_a_tooltip(object_info):
    pack_nodes = {k: v for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    assert set(EXPECTED_OUTPUTS) <= set(pack_nodes)
    missing = []
    for node_id, info in pack_nodes.items():
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(opts.get("tooltip", "")).strip():
                    missing.append(f"{node_id}.{name}")
    assert not missing, f"inputs without tooltip: {missing}"


def test_widget_defaults_and_ranges(object_info):
    def spec(node, name):
        return kit.input_spec(object_info[node], name)

    typ, opts = spec("NPOApply", "strength")
    assert typ == "FLOAT" and opts["default"] == 1.0 and opts["min"] == 0.0
    typ, opts = spec("NPOCFGGuider", "cfg")
    assert typ == "FLOAT" and opts["default"] == 7.5
    for node, name in (("NPOApply", "start_percent"), ("NPOApply", "end_percent")):
        typ, opts = spec(node, name)
        assert typ == "FLOAT" and opts["min"] == 0.0 and opts["max"] == 1.0


def test_offset_list_reads_models_npo(object_info):
    typ, opts = kit.input_spec(object_info["NPOLoadOffset"], "offset_name")
    options = kit.combo_options(typ, opts)
    assert kit.TINY_OFFSET in options and kit.SDXL_OFFSET in options, options


def test_workflow_templates_lists_and_serves_the_examples(server):
    names = kit.example_names()
    assert {kit.EXAMPLE_KSAMPLER, kit.EXAMPLE_GUIDER, kit.EXAMPLE_SDXL} <= set(names)
    templates = kit.get_json(server.url + "/workflow_templates")
    assert sorted(templates.get(kit.PACK_FOLDER, [])) == names, templates
    for name in names:
        route = f"{server.url}/api/workflow_templates/{kit.PACK_FOLDER}/{urllib.parse.quote(name)}"
        assert json.loads(kit.get_bytes(route + ".json")) == kit.load_example(name)
        assert kit.get_bytes(route + ".jpg") == (kit.EXAMPLES / f"{name}.jpg").read_bytes()  # the thumbnail
