"""Load NPO Offset and Compress NPO Offset: files in, NPO_OFFSET out."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..npo_core import formats
from ..npo_core.inject import dense_cost_note
from .common import CATEGORY, NPOOffsetType
from .host import files, model_facts, runtime


class NPOLoadOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOLoadOffset",
            display_name="Load NPO Offset",
            category=CATEGORY,
            description="Loads an NPO offset δ: the authors' released LoRA files (diffusers/PEFT keys), kohya or "
            "ComfyUI LoRA files, files saved by this pack, or a full NPO UNet state dict.",
            inputs=[
                io.Combo.Input(
                    "offset_name",
                    options=files.offset_file_list(),
                    tooltip="A file from models/npo or models/loras (.safetensors; .ckpt/.pt only if they "
                    "hold plain tensors).",
                ),
                io.Model.Input(
                    "base_model",
                    optional=True,
                    tooltip="Only for full-weight files (a whole NPO UNet): the base checkpoint they were "
                    "trained from, so δ = file − base. Without it δ is taken against the model "
                    "the offset is applied to.",
                ),
            ],
            outputs=[NPOOffsetType.Output(display_name="npo_offset")],
        )

    @classmethod
    def fingerprint_inputs(cls, offset_name: str, base_model=None) -> str:
        try:
            st = os.stat(files.offset_file_path(offset_name))
            return f"{offset_name}:{st.st_mtime_ns}:{st.st_size}"
        except Exception:
            return offset_name

    @classmethod
    def execute(cls, offset_name: str, base_model=None) -> io.NodeOutput:
        offset = formats.load_offset(files.offset_file_path(offset_name))
        if base_model is not None:
            offset = model_facts.resolve_for_model(offset, base_model, input_name="offset_name")
        text = offset.summary() + "\n" + dense_cost_note(offset)
        runtime.log.info("NPO offset loaded:\n%s", text)
        return io.NodeOutput(offset, ui=ui.PreviewText(text))


class NPOCompressOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOCompressOffset",
            display_name="Compress NPO Offset (SVD)",
            category=CATEGORY,
            description="Turns dense offsets (full-weight NPO models, .diff tensors) into rank-r low-rank ones by "
            "SVD, so the negative pass costs low-rank matmuls only. Shows the energy kept.",
            inputs=[
                NPOOffsetType.Input("npo_offset", tooltip="The offset to compress."),
                io.Model.Input(
                    "model",
                    tooltip="The model the offset will be applied to (maps key names and turns full weights into δ).",
                ),
                io.Int.Input(
                    "rank",
                    default=64,
                    min=1,
                    max=1024,
                    tooltip="Rank r of the approximation: higher keeps more of δ and costs more.",
                ),
            ],
            outputs=[NPOOffsetType.Output(display_name="npo_offset")],
        )

    @classmethod
    def execute(cls, npo_offset, model, rank: int) -> io.NodeOutput:
        resolved = model_facts.resolve_for_model(npo_offset, model)
        out, energy = resolved.compressed(int(rank))
        n = int(out.metadata.get("npo.svd_entries", "0"))
        if n:
            text = f"rank {rank}: {n} layers compressed, kept {energy:.2%} of their energy (Σσ² kept / Σσ²)\n"
        else:
            text = f"rank {rank}: nothing to compress (every layer already has rank ≤ {rank})\n"
        text += out.summary()
        runtime.log.info("NPO offset compressed: %s", text.splitlines()[0])
        return io.NodeOutput(out, ui=ui.PreviewText(text))
