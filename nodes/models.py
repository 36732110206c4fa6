"""Apply NPO and NPO Negative Model: MODEL in, MODEL out."""

from __future__ import annotations

from comfy_api.latest import io

from ..npo_core.errors import NPOError
from ..npo_core.offset import negative_offset
from .common import ABSENT, STRENGTH_MAX, NPOOffsetType, advanced, check_range, refusal, schema, strength_input
from .host import model_facts, sampling


class NPOApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOApply",
            display_name="Apply NPO",
            search_aliases=["negative", "guidance", "cfg", "offset", "self-npo", "negative lora", "apply offset"],
            description="Makes the negative/unconditional CFG pass run θ + strength·δ while the positive pass keeps θ. "
            "Works with KSampler, KSamplerAdvanced and SamplerCustom; no effect at cfg 1.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model to sample with: SD UNets and the supported DiT / video families, fine-tunes and "
                    "LoRA'd models included.",
                ),
                NPOOffsetType.Input("npo_offset", tooltip="From Load NPO Offset or Self-NPO Train."),
                strength_input(),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of the schedule (0 = first, noisiest step) where NPO starts.",
                    **advanced(),
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of the schedule where NPO stops (1 = the last step).",
                    **advanced(),
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=0.0, end_percent=1.0) -> bool | str:
        return refusal(lambda: apply_knobs(strength, start_percent, end_percent))

    @classmethod
    def execute(
        cls, model, npo_offset, strength: float, start_percent: float = 0.0, end_percent: float = 1.0
    ) -> io.NodeOutput:
        strength, start, end = apply_knobs(strength, start_percent, end_percent)
        if strength == 0.0:
            return io.NodeOutput(model)
        return io.NodeOutput(sampling.apply_offset(model, npo_offset, strength, start, end))


class NPONegativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPONegativeModel",
            display_name="NPO Negative Model",
            search_aliases=["negative", "negative model", "bad model", "merge", "offset", "self-npo"],
            description="A MODEL whose weights are the NPO negative weights θ_neg = θ_base + s·δ + (1 − m)(θ − θ_base) "
            "(m = merge_weight; m = 0 gives θ + s·δ). Preview the 'bad' model alone, or feed NPO CFG Guider.",
            inputs=[
                io.Model.Input("model", tooltip="The positive model θ (the checkpoint you sample with)."),
                NPOOffsetType.Input("npo_offset", tooltip="From Load NPO Offset or Self-NPO Train."),
                strength_input(),
                io.Model.Input(
                    "base_model",
                    optional=True,
                    tooltip="The original base (SD1.5 / SDXL base) δ was trained on. Needed when "
                    "merge_weight > 0, and for full-weight NPO files on a fine-tune.",
                ),
                io.Float.Input(
                    "merge_weight",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    optional=True,
                    tooltip="The authors' --merge_weight m: how much of the fine-tune's own offset "
                    "(θ − θ_base) to drop from the negative. 0 (default) keeps it: θ + s·δ.",
                    **advanced(),
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, strength=None, merge_weight=0.0, base_model=ABSENT) -> bool | str:
        return refusal(lambda: negative_knobs(strength, merge_weight, base_model is not ABSENT))

    @classmethod
    def execute(cls, model, npo_offset, strength: float, base_model=None, merge_weight: float = 0.0) -> io.NodeOutput:
        strength, m = negative_knobs(strength, merge_weight, base_model is not None)
        if base_model is not None:
            model_facts.check_supported_model(model)
            model_facts.check_supported_model(base_model, "base_model")
            if model_facts.param_shapes(base_model) != model_facts.param_shapes(model):
                raise NPOError(
                    f"base_model is {model_facts.model_arch(base_model)} with other layers than model "
                    f"({model_facts.model_arch(model)}); base_model must be the base checkpoint of the same "
                    "architecture (e.g. SD1.5 for SD1.5 fine-tunes, SDXL base for SDXL ones, the Wan 2.1 base for "
                    "its fine-tunes)."
                )
        resolved = model_facts.resolve_for_model(npo_offset, model, reference=base_model)
        positive = base = None
        if m > 0:
            names = list(model_facts.param_shapes(model))
            positive, base = model_facts.model_weights(model, names), model_facts.model_weights(base_model, names)
        offset = negative_offset(resolved, strength, m, positive, base)
        if not offset.entries:
            return io.NodeOutput(model.clone())
        return io.NodeOutput(sampling.add_offset_patches(model, offset, 1.0))


def apply_knobs(strength, start_percent, end_percent) -> tuple:
    """Apply NPO's widgets checked (at validation a linked one is None and skipped there)."""
    strength = _known("strength", strength, STRENGTH_MAX)
    start, end = _known("start_percent", start_percent, 1.0), _known("end_percent", end_percent, 1.0)
    if start is not None and end is not None and start > end:
        raise NPOError(f"start_percent ({start}) is after end_percent ({end}); set start_percent ≤ end_percent.")
    return strength, start, end


def _known(name: str, value, hi: float) -> float | None:
    return None if value is None else check_range(name, value, 0.0, hi)


def negative_knobs(strength, merge_weight, has_base_model: bool) -> tuple:
    """NPO Negative Model's widgets checked, and merge_weight > 0 against a connected base_model."""
    strength, m = _known("strength", strength, STRENGTH_MAX), _known("merge_weight", merge_weight, 1.0)
    if m and not has_base_model:
        raise NPOError(
            "merge_weight > 0 needs base_model: connect the base checkpoint δ was trained on, or set "
            "merge_weight to 0."
        )
    return strength, m
