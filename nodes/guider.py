"""NPO CFG Guider: a GUIDER for SamplerCustomAdvanced whose negative pass runs NPO weights."""

from __future__ import annotations

from comfy_api.latest import io

from ..npo_core.errors import NPOError
from .common import ABSENT, STRENGTH_MAX, NPOOffsetType, check_range, refusal, schema, strength_input
from .host import sampling


class NPOCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOCFGGuider",
            display_name="NPO CFG Guider",
            search_aliases=["negative", "guidance", "cfg", "guider", "sampler custom", "self-npo", "offset"],
            description="CFG guider for SamplerCustomAdvanced: denoised = neg + cfg·(pos − neg), where the negative "
            "pass runs θ + strength·δ (npo_offset) or a separate negative_model. Connect exactly one.",
            inputs=[
                io.Model.Input("model", tooltip="The positive model θ."),
                io.Conditioning.Input("positive", tooltip="Positive prompt, run through model."),
                io.Conditioning.Input(
                    "negative",
                    tooltip="Negative prompt (SD1.5: empty prompt; SDXL: a zeroed "
                    "conditioning, as the authors did), run through NPO weights.",
                ),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance scale s. The authors used 7.5 for SD1.5 and 5 for SDXL. At 1 NPO has no effect.",
                ),
                NPOOffsetType.Input(
                    "npo_offset", optional=True, tooltip="The NPO offset δ (or connect negative_model)."
                ),
                strength_input(),
                io.Model.Input(
                    "negative_model",
                    optional=True,
                    tooltip="A model for the negative pass instead of an offset, e.g. from NPO Negative "
                    "Model or a LoRA loader. Clones of model are handled exactly.",
                ),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, cfg=None, strength=None, npo_offset=ABSENT, negative_model=ABSENT) -> bool | str:
        return refusal(lambda: guider_knobs(cfg, strength, npo_offset is not ABSENT, negative_model is not ABSENT))

    @classmethod
    def execute(
        cls, model, positive, negative, cfg: float, strength: float = 1.0, npo_offset=None, negative_model=None
    ) -> io.NodeOutput:
        cfg, strength = guider_knobs(cfg, strength, npo_offset is not None, negative_model is not None)
        return io.NodeOutput(sampling.make_guider(model, positive, negative, cfg, npo_offset, strength, negative_model))


def guider_knobs(cfg, strength, has_offset: bool, has_negative_model: bool) -> tuple:
    """NPO CFG Guider's widgets checked (a linked one, None at validation, skipped) and exactly one negative
    source connected."""
    if has_offset == has_negative_model:
        raise NPOError("npo_offset / negative_model: connect exactly one of npo_offset or negative_model.")
    cfg = None if cfg is None else check_range("cfg", cfg, 0.0, 100.0)
    return cfg, None if strength is None else check_range("strength", strength, 0.0, STRENGTH_MAX)
