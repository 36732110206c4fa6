"""The UI→API converter on hand-made graphs (no server): Reroute, PrimitiveNode, muted and bypassed
nodes, seed control values, substitutions and overrides. (test_browser.py also checks it against the
frontend's own conversion of the example workflows.)"""

from __future__ import annotations

import npo_e2ekit as kit
import pytest

OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {"min": 1}], "cfg": ["FLOAT", {}],
                                       "name": ["COMBO", {"options": ["euler", "dpmpp_2m"]}]},
                          "optional": {"extra": ["MODEL", {}], "strength": ["FLOAT", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "cfg", "name"],
                                "optional": ["extra", "strength"]},
                "output": ["LATENT"]},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "amount": ["FLOAT", {}]}},
              "input_order": {"required": ["model", "amount"]}, "output": ["MODEL"]},
}


def node(nid, type_, widgets=(), inputs=(), mode=0):
    return {"id": nid, "type": type_, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": lk} for n, t, lk in inputs]}


def graph():
    return {
        "nodes": [
            node(1, "Loader", ["v1-5-pruned-emaonly.safetensors"]),
            node(2, "Reroute", inputs=[("", "*", 1)]),
            node(3, "Patch", [0.5], inputs=[("model", "MODEL", 2)], mode=4),  # bypassed
            node(4, "Sampler", [7, "fixed", 20, 7.5, "euler", 1.0],
                 inputs=[("model", "MODEL", 3), ("extra", "MODEL", 4), ("steps", "INT", 5)]),
            node(5, "Patch", [2.0], inputs=[("model", "MODEL", 6)], mode=2),  # muted
            node(6, "PrimitiveNode", [20]),
            node(7, "Note", ["read me"]),
        ],
        # [id, src, src_slot, dst, dst_slot, type]
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"],
                  [4, 5, 0, 4, 1, "MODEL"], [5, 6, 0, 4, 2, "INT"], [6, 1, 0, 5, 0, "MODEL"]],
    }


def test_converts_through_reroute_bypass_mute_and_primitive():
    prompt = kit.ui_to_api(graph(), OBJECT_INFO)
    assert set(prompt) == {"1", "4"}
    assert prompt["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}}
    # the bypassed Patch and the Reroute pass the loader's MODEL through; the muted Patch's link is dropped;
    # the PrimitiveNode's value is the sampler's own widget value; 'fixed' is the seed's control value
    assert prompt["4"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 20, "cfg": 7.5, "name": "euler",
                                     "strength": 1.0}


def test_substitutions_apply_only_to_values_the_server_lacks():
    wf = graph()
    prompt = kit.ui_to_api(wf, OBJECT_INFO, substitutions={"ckpt_name": "b.safetensors", "name": "dpmpp_2m"},
                           overrides={("Sampler", "cfg"): 3.0})
    assert prompt["1"]["inputs"]["ckpt_name"] == "b.safetensors"
    assert prompt["4"]["inputs"]["name"] == "euler"  # offered by the server: kept
    assert prompt["4"]["inputs"]["cfg"] == 3.0
    assert kit.validate_against_object_info(prompt, OBJECT_INFO) == []


def test_validation_reports_unknown_combo_values_and_missing_inputs():
    prompt = kit.ui_to_api(graph(), OBJECT_INFO)
    problems = kit.validate_against_object_info(prompt, OBJECT_INFO)
    assert any("ckpt_name" in p and "v1-5-pruned-emaonly.safetensors" in p for p in problems), problems
    del prompt["4"]["inputs"]["steps"]
    assert any("'steps' missing" in p for p in kit.validate_against_object_info(prompt, OBJECT_INFO))


def test_wrong_widget_count_and_unknown_nodes_are_errors():
    wf = graph()
    wf["nodes"][3]["widgets_values"].append("surplus")
    with pytest.raises(kit.ConversionError, match="widgets_values"):
        kit.ui_to_api(wf, OBJECT_INFO)
    wf = graph()
    wf["nodes"][0]["type"] = "NotInstalled"
    with pytest.raises(kit.ConversionError, match="not registered"):
        kit.ui_to_api(wf, OBJECT_INFO)
