"""Widget values the pack checks are refused by ComfyUI's own prompt validation (``execution.validate_prompt``,
what the server runs before it queues a prompt), with a message naming the input; no node runs."""

from __future__ import annotations

import asyncio
import math

import execution
import pytest
from comfy_api.latest import io

import nodes
from comfyui_npo.nodes.common import NPOOffsetType, NPOScorerType
from comfyui_npo.nodes.evaluate import NPOCompareReport
from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.models import NPOApply, NPONegativeModel, apply_knobs
from comfyui_npo.nodes.offsets import NPOSaveOffset
from comfyui_npo.nodes.train import SelfNPOTrain
from comfyui_npo.npo_core.errors import NPOError

RAN: list[str] = []  # node ids whose execute ran


class _Source(io.ComfyNode):
    """Every socket type the tested nodes take; records a run."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOTestSource",
            outputs=[io.Model.Output(), NPOOffsetType.Output(), io.Conditioning.Output(), io.Image.Output(),
                     NPOScorerType.Output(), io.Float.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        RAN.append("NPOTestSource")
        raise AssertionError("a node ran although the prompt should have been refused")


class _Sink(io.ComfyNode):
    """An output node taking a MODEL or a GUIDER, so that Apply NPO & co. are validated."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOTestSink",
            inputs=[io.Model.Input("model", optional=True), io.Guider.Input("guider", optional=True)],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model=None, guider=None) -> io.NodeOutput:
        RAN.append("NPOTestSink")
        return io.NodeOutput()


PACK = (NPOApply, NPONegativeModel, NPOCFGGuider, SelfNPOTrain, NPOSaveOffset, NPOCompareReport)
SOURCE = {"MODEL": 0, "NPO_OFFSET": 1, "CONDITIONING": 2, "IMAGE": 3, "NPO_SCORER": 4, "FLOAT": 5}


@pytest.fixture(autouse=True)
def registered(monkeypatch, npo_dir, out_dir):
    """The pack's nodes and the two test nodes in ComfyUI's node table; every execute recorded."""
    RAN.clear()
    for cls in (*PACK, _Source, _Sink):
        node_id = cls.GET_SCHEMA().node_id
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, node_id, cls)
        if cls in PACK:
            monkeypatch.setattr(cls, "execute", classmethod(lambda c, **kw: RAN.append(c.__name__)))
    yield
    assert not RAN, f"nodes ran during validation: {RAN}"


def _widgets(cls) -> dict:
    """Every required widget of ``cls`` at its default (a combo at its default or first option)."""
    out = {}
    for i in cls.define_schema().inputs:
        if i.optional:
            continue
        if isinstance(i, io.Combo.Input):
            out[i.id] = i.default if i.default is not None else i.options[0]
        elif isinstance(i, (io.Int.Input, io.Float.Input, io.String.Input, io.Boolean.Input)):
            out[i.id] = i.default if i.default is not None else ""
    return out


def _prompt(cls, links: dict[str, str], sink: str | None = None, **values) -> dict:
    """A prompt: the NPOTestSource feeding ``links`` (input → source type), ``cls`` with its defaults and
    ``values``, and (``sink``: the input it feeds) NPOTestSink after it."""
    node = {"class_type": cls.GET_SCHEMA().node_id, "inputs": {**_widgets(cls), **values}}
    node["inputs"].update({name: ["1", SOURCE[typ]] for name, typ in links.items()})
    prompt = {"1": {"class_type": "NPOTestSource", "inputs": {}}, "2": node}
    if sink:
        prompt["3"] = {"class_type": "NPOTestSink", "inputs": {sink: ["2", 0]}}
    return prompt


def _validate(prompt: dict):
    return asyncio.run(execution.validate_prompt("npo-test", prompt, None))


def _refusal(prompt: dict, input_name: str) -> list[str]:
    """The messages ComfyUI gives for node 2; asserts the prompt is refused and a message names the input."""
    valid, error, _outputs, node_errors = _validate(prompt)
    assert valid is False, "the prompt was accepted"
    assert "2" in node_errors, f"node 2 not blamed: {error} {node_errors}"
    details = [e["details"] for e in node_errors["2"]["errors"]]
    assert all(e["type"] == "custom_validation_failed" for e in node_errors["2"]["errors"]), node_errors["2"]
    assert any(input_name in d.split(" - ", 1)[-1] for d in details), details
    return details


def _accepted(prompt: dict) -> None:
    valid, error, _outputs, node_errors = _validate(prompt)
    assert valid is True, f"{error} {node_errors}"


APPLY = {"model": "MODEL", "npo_offset": "NPO_OFFSET"}
TRAIN = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING"}
COMPARE = {"images_a": "IMAGE", "images_b": "IMAGE", "scorer": "NPO_SCORER"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan"])
@pytest.mark.fault(
    "Apply NPO strength NaN or ±inf in a queued prompt (passes ComfyUI's own min/max check)",
    "the prompt is refused at validation naming strength; nothing runs, no history entry holds a NaN",
)
def test_apply_npo_strength_not_finite(value):
    details = _refusal(_prompt(NPOApply, APPLY, "model", strength=value), "strength")
    assert any("not a finite number" in d for d in details), details


@pytest.mark.fault(
    "Apply NPO start_percent after end_percent",
    "the prompt is refused at validation naming start_percent and end_percent",
)
def test_apply_npo_start_after_end():
    _refusal(_prompt(NPOApply, APPLY, "model", start_percent=0.8, end_percent=0.2), "start_percent")
    _accepted(_prompt(NPOApply, APPLY, "model", start_percent=0.2, end_percent=0.8))


def test_apply_npo_bounds_still_checked():
    """Inputs that validate_inputs takes lose ComfyUI's own min/max check: the pack's covers them."""
    _refusal(_prompt(NPOApply, APPLY, "model", strength=9.0), "strength")
    _refusal(_prompt(NPOApply, APPLY, "model", end_percent=1.5), "end_percent")
    _accepted(_prompt(NPOApply, APPLY, "model", strength=4.0))


def test_a_linked_widget_is_checked_when_it_runs():
    """strength fed by a link is unknown at validation: accepted there, refused in execute."""
    prompt = _prompt(NPOApply, APPLY, "model")
    prompt["2"]["inputs"]["strength"] = ["1", SOURCE["FLOAT"]]
    _accepted(prompt)
    with pytest.raises(NPOError, match="strength"):  # what execute runs first
        apply_knobs(math.nan, 0.0, 1.0)


@pytest.mark.fault(
    "NPO CFG Guider cfg NaN, or neither / both of npo_offset and negative_model connected",
    "the prompt is refused at validation naming the input",
)
def test_guider_knobs_and_connections():
    _refusal(_prompt(NPOCFGGuider, {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                                    "npo_offset": "NPO_OFFSET"}, "guider", cfg=math.nan), "cfg")
    base = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING"}
    _refusal(_prompt(NPOCFGGuider, base, "guider"), "npo_offset")
    _refusal(_prompt(NPOCFGGuider, {**base, "npo_offset": "NPO_OFFSET", "negative_model": "MODEL"}, "guider"),
             "negative_model")
    _accepted(_prompt(NPOCFGGuider, {**base, "negative_model": "MODEL"}, "guider"))


@pytest.mark.fault(
    "NPO Negative Model merge_weight > 0 with no base_model connected",
    "the prompt is refused at validation naming merge_weight and base_model",
)
def test_negative_model_merge_weight_needs_a_connected_base():
    _refusal(_prompt(NPONegativeModel, APPLY, "model", merge_weight=0.5), "base_model")
    _accepted(_prompt(NPONegativeModel, {**APPLY, "base_model": "MODEL"}, "model", merge_weight=0.5))


@pytest.mark.parametrize(
    "values,name",
    [
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": "2"}, "learning_rate"),
        ({"width": 8192}, "width"),
        ({"height": 8}, "height"),
        ({"ema_decay": math.nan}, "ema_decay"),
        ({"teacher_guidance": math.inf}, "teacher_guidance"),
        ({"filename_prefix": "../escape"}, "filename_prefix"),
        ({"filename_prefix": "/tmp/abs"}, "filename_prefix"),
        ({"filename_prefix": "  "}, "filename_prefix"),
    ],
)
@pytest.mark.fault(
    "Self-NPO Train learning_rate text that is neither auto nor a number in (0, 1), a size outside the widget's "
    "range, ema_decay / teacher_guidance NaN or inf, a filename_prefix that is absolute, has '..' or is empty",
    "the prompt is refused at validation naming the input, before any upstream node runs",
)
def test_self_npo_train_widgets(values, name):
    _refusal(_prompt(SelfNPOTrain, TRAIN, save_every=10, **values), name)


def test_self_npo_train_good_values_pass():
    for values in ({"learning_rate": "auto"}, {"learning_rate": "5e-5"}, {"width": 1024, "height": 768},
                   {"filename_prefix": "sd15/run", "save_every": 10},
                   {"filename_prefix": "", "save_every": 0}):  # no checkpoint written: the prefix is not used
        _accepted(_prompt(SelfNPOTrain, TRAIN, **values))


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "C:/abs", "a/../../b", ""])
@pytest.mark.fault(
    "Save NPO Offset / NPO Compare Report filename_prefix absolute, with '..' or empty",
    "the prompt is refused at validation naming filename_prefix",
)
def test_save_prefixes(prefix):
    _refusal(_prompt(NPOSaveOffset, {"npo_offset": "NPO_OFFSET"}, filename_prefix=prefix), "filename_prefix")
    _refusal(_prompt(NPOCompareReport, COMPARE, filename_prefix=prefix), "filename_prefix")


def test_save_prefix_subfolder_passes():
    _accepted(_prompt(NPOSaveOffset, {"npo_offset": "NPO_OFFSET"}, filename_prefix="sd15/my_offset"))
    _accepted(_prompt(NPOCompareReport, COMPARE, filename_prefix="npo_compare/report"))


def test_error_type_is_short():
    """ComfyUI names an error raised in execute by ``full_type_name``: the pack's is "NPOError", not a
    module named after the pack's install path."""
    assert execution.full_type_name(NPOError) == "NPOError"
    assert issubclass(NPOError, ValueError)
