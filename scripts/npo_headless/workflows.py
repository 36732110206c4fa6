"""Example workflows and the UI-format → API-format converter (what the frontend's graphToPrompt does)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import EXAMPLES

# The example workflows by role. Their file names are the titles ComfyUI's template browser shows, numbered
# simplest first.
EXAMPLE_KSAMPLER = "1 Apply NPO with KSampler"
EXAMPLE_SDXL = "2 NPO on SDXL with a zeroed negative"
EXAMPLE_GUIDER = "3 NPO CFG Guider with SamplerCustomAdvanced"
EXAMPLE_SELF_NPO = "4 Train a Self-NPO offset and compare"
EXAMPLE_SD35 = "5 NPO on SD3.5 with a trained offset"
EXAMPLE_WAN21 = "6 NPO on Wan 2.1 video"
EXAMPLE_WAN21_SELF_NPO = "7 Train a Self-NPO offset for Wan 2.1 and compare"
EXAMPLE_COMPARE = "8 Does NPO help on my checkpoint"
EXAMPLE_PREFERENCE = "9 Train an NPO offset from preference pairs"
# The examples for DiT families: no released offset, tiny DiT assets of their own (tests/e2e/test_e2e_dit_examples.py,
# tests/e2e/test_e2e_dit_self_npo.py)
DIT_EXAMPLES = (EXAMPLE_SD35, EXAMPLE_WAN21, EXAMPLE_WAN21_SELF_NPO)
# The examples that score images: they need scorer files in models/npo_scorers, a tiny PickScore folder on the
# test server (tests/e2e/test_e2e_compare_example.py, test_e2e_preference_example.py)
SCORER_EXAMPLES = (EXAMPLE_COMPARE, EXAMPLE_PREFERENCE)

# Nodes that exist only in the frontend: never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_KEEP_WIDGET = object()  # a link from a PrimitiveNode: the target's own widget value is the value
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class ConversionError(ValueError):
    pass


def input_spec(info: Mapping, name: str) -> tuple[Any, dict]:
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section, {}).get(name)
        if spec is not None:
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return typ, opts
    raise KeyError(name)


def is_widget(typ: Any) -> bool:
    return isinstance(typ, list) or (isinstance(typ, str) and typ in WIDGET_TYPES)


def combo_options(typ: Any, opts: Mapping) -> list | None:
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return list(opts.get("options", []))
    return None


def input_order(info: Mapping) -> list[str]:
    order = info.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inputs = info.get("input") or {}
    return list(inputs.get("required", {})) + list(inputs.get("optional", {}))


def has_control_after_generate(name: str, typ: Any, opts: Mapping) -> bool:
    """Frontends add a hidden 'control_after_generate' value after seed-like INT widgets: when the input
    says so, or (no explicit setting) for INT inputs named seed/noise_seed. An explicit
    ``control_after_generate: false`` (e.g. Self-NPO Train's seed) means no control value."""
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in ("seed", "noise_seed")


def widget_values(node: Mapping, info: Mapping) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto its widget inputs (positional, like the frontend)."""
    raw = node.get("widgets_values")
    names = []
    for name in input_order(info):
        typ, opts = input_spec(info, name)
        if is_widget(typ) and not opts.get("forceInput"):
            names.append((name, typ, opts))
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {n: raw[n] for n, _, _ in names if n in raw}
    values = list(raw)
    out: dict[str, Any] = {}
    i = 0
    for name, typ, opts in names:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if has_control_after_generate(name, typ, opts):
            if i < len(values) and values[i] in ("fixed", "increment", "decrement", "randomize"):
                i += 1
        if any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload")):
            if i < len(values) and values[i] in ("image", "video", "audio"):
                i += 1  # the upload button's serialized value
    if i != len(values):
        raise ConversionError(f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values but "
                              f"{i} were used by widget inputs {[n for n, _, _ in names]}")
    return out


def ui_to_api(workflow: Mapping, object_info: Mapping, substitutions: Mapping[str, Any] | None = None,
              overrides: Mapping[tuple[str, str], Any] | None = None) -> dict[str, dict]:
    """Convert a UI-format workflow (``nodes`` + ``links``) into the API prompt ``/prompt`` takes.

    - widget values come from ``widgets_values`` by position over ``/object_info`` ``input_order``
      (seed widgets carry an extra control_after_generate value);
    - links become ``[source id, source slot]``; links through Reroute nodes are followed;
    - Note/MarkdownNote/Reroute/PrimitiveNode (frontend-only) and muted nodes are left out; bypassed
      nodes pass their first input of the matching type through;
    - ``substitutions`` {input name: value}: for combo inputs whose value is not offered by this server
      (e.g. the example's "v1-5-pruned-emaonly.safetensors" on a test server), the value to use instead;
    - ``overrides`` {(class_type, input name): value}: forced values (e.g. smaller images for speed).
    """
    substitutions = dict(substitutions or {})
    overrides = dict(overrides or {})
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, src, sslot, dst, dslot, typ = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                                                link["target_slot"], link.get("type"))
        else:
            lid, src, sslot, dst, dslot, typ = link[:6]
        links[int(lid)] = (int(src), int(sslot), int(dst), int(dslot), typ)

    def resolve_link(lid: int, seen: frozenset = frozenset()) -> Any:
        """[source id, slot]; None when the input is left out; _KEEP_WIDGET for a PrimitiveNode."""
        if lid in seen:
            raise ConversionError(f"link cycle through {lid}")
        src, sslot, _, _, typ = links[lid]
        node = nodes[src]
        ntype, mode = node["type"], node.get("mode", MODE_ALWAYS)
        if ntype == "Reroute" or mode == MODE_BYPASS:
            for inp in node.get("inputs", []):
                if inp.get("link") is None:
                    continue
                if ntype == "Reroute" or inp.get("type") in (typ, "*"):
                    return resolve_link(int(inp["link"]), seen | {lid})
            return None
        if mode == MODE_NEVER:
            return None
        if ntype == "PrimitiveNode":
            return _KEEP_WIDGET
        if ntype in FRONTEND_ONLY:
            raise ConversionError(f"link {lid} starts at frontend-only node {src} ({ntype})")
        return [str(src), sslot]

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        ntype, mode = node["type"], node.get("mode", MODE_ALWAYS)
        if ntype in FRONTEND_ONLY or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(ntype)
        if info is None:
            raise ConversionError(f"node {nid}: type '{ntype}' is not registered on the server (missing node pack?)")
        inputs: dict[str, Any] = widget_values(node, info)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = resolve_link(int(inp["link"]))
            if src is None:
                inputs.pop(inp["name"], None)
            elif src is not _KEEP_WIDGET:
                inputs[inp["name"]] = src
        for name in list(inputs):
            if isinstance(inputs[name], list):
                continue
            try:
                typ, opts = input_spec(info, name)
            except KeyError:
                continue
            options = combo_options(typ, opts)
            if options is not None and inputs[name] not in options and name in substitutions:
                inputs[name] = substitutions[name]
        for (cls, name), value in overrides.items():
            if cls == ntype and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
        entry: dict[str, Any] = {"class_type": ntype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    return prompt


def validate_against_object_info(prompt: Mapping[str, Mapping], object_info: Mapping) -> list[str]:
    """Problems the server's validation would report: missing required inputs, combo values it does not
    offer, out-of-range numbers, links to missing nodes or wrong output types."""
    problems = []
    for nid, entry in prompt.items():
        info = object_info[entry["class_type"]]
        inputs = entry["inputs"]
        required = (info.get("input") or {}).get("required", {})
        for name in required:
            if name not in inputs:
                problems.append(f"{nid} {entry['class_type']}: required input '{name}' missing")
        for name, value in inputs.items():
            try:
                typ, opts = input_spec(info, name)
            except KeyError:
                problems.append(f"{nid} {entry['class_type']}: unknown input '{name}'")
                continue
            if isinstance(value, list):
                src = prompt.get(str(value[0]))
                if src is None:
                    problems.append(f"{nid}.{name}: links to missing node {value[0]}")
                    continue
                out_types = object_info[src["class_type"]]["output"]
                if value[1] >= len(out_types):
                    problems.append(f"{nid}.{name}: links to output {value[1]} of {src['class_type']}")
                elif not isinstance(typ, list) and typ not in ("*", out_types[value[1]]):
                    problems.append(f"{nid}.{name}: expects {typ}, gets {out_types[value[1]]}")
                continue
            options = combo_options(typ, opts)
            if options is not None:
                if value not in options:
                    problems.append(f"{nid}.{name}: '{value}' not among {options[:8]}")
            elif typ in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{nid}.{name}: {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"{nid}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
            elif typ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{nid}.{name}: {value!r} is not a boolean")
            elif typ == "STRING" and not isinstance(value, str):
                problems.append(f"{nid}.{name}: {value!r} is not a string")
    return problems


def load_example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.json"))
