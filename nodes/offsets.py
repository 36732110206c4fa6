"""Load NPO Offset, Compress NPO Offset and Save NPO Offset: offset files in and out."""

from __future__ import annotations

import dataclasses
import os

from comfy_api.latest import io, ui

from ..npo_core import formats
from ..npo_core.errors import NPOError
from ..npo_core.inject import dense_cost_note
from .common import NPOOffsetType, refusal, schema
from .host import files, model_facts, runtime


class NPOLoadOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOLoadOffset",
            display_name="Load NPO Offset",
            search_aliases=["negative", "offset", "load offset", "npo lora", "negative lora", "self-npo"],
            description="Loads an NPO offset δ: the authors' released LoRA files (diffusers/PEFT keys), kohya or "
            "ComfyUI LoRA files, files saved by this pack, or a full NPO UNet state dict.",
            inputs=[
                io.Combo.Input(
                    "offset_name",
                    options=files.offset_file_list(),
                    tooltip="A file from models/npo (listed first) or models/loras (marked [loras]); .safetensors, "
                    ".ckpt/.pt only if they hold plain tensors.",
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
        if files.from_loras_folder(offset_name) and "npo.format_version" not in offset.metadata:
            text += (
                "\nnote: a LoRA from models/loras without NPO metadata: it will be used as a NEGATIVE offset "
                "(the negative pass runs θ + δ, so CFG pushes away from what it adds). That is right for the "
                "authors' NPO files; an ordinary style LoRA belongs in a LoRA loader instead."
            )
        runtime.log.info("NPO offset loaded:\n%s", text)
        return io.NodeOutput(offset, ui=ui.PreviewText(text))


class NPOCompressOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOCompressOffset",
            display_name="Compress NPO Offset (SVD)",
            search_aliases=["svd", "low rank", "compress", "offset", "negative", "rank"],
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


class NPOSaveOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOSaveOffset",
            display_name="Save NPO Offset",
            search_aliases=["save offset", "export offset", "offset", "negative", "self-npo", "save lora"],
            description="Writes an NPO *negative* offset into models/npo in ComfyUI's LoRA key format, with NPO "
            "metadata and modelspec.* keys that LoRA managers show. It is meant for the negative CFG pass only "
            "(Apply NPO, NPO CFG Guider): loaded with an ordinary LoRA loader it changes both passes and "
            "degrades the images. Never overwrites: a counter is added.",
            inputs=[
                NPOOffsetType.Input(
                    "npo_offset", tooltip="From Self-NPO Train, Load NPO Offset or Compress NPO Offset."
                ),
                io.String.Input(
                    "filename_prefix",
                    default="self_npo",
                    tooltip="File name inside models/npo (subfolders allowed, no '..').",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Needed only when the offset still has diffusers/kohya key names or full "
                    "weights: the model it belongs to, to convert them.",
                ),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return refusal(lambda: filename_prefix is None or files.check_prefix(filename_prefix))

    @classmethod
    def execute(cls, npo_offset, filename_prefix: str, model=None) -> io.NodeOutput:
        offset = npo_offset
        if not offset.is_resolved:
            if model is None:
                raise NPOError(
                    "npo_offset: this offset still has non-ComfyUI key names or full weights; connect model "
                    "so they can be converted before saving."
                )
            offset = model_facts.resolve_for_model(offset, model)
        folder, name, counter = files.save_path(files.npo_dir(), filename_prefix)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        if os.path.lexists(path):  # a dangling symlink counts as taken too
            raise NPOError(f"filename_prefix: '{os.path.basename(path)}' exists already; choose another prefix.")
        # the prompt and workflow, as ComfyUI's checkpoint savers write them (none under --disable-metadata)
        meta = {k: v for k, v in offset.metadata.items() if k not in files.PROVENANCE_KEYS}
        meta.update(files.provenance(getattr(cls.hidden, "prompt", None), getattr(cls.hidden, "extra_pnginfo", None)))
        formats.save_offset(dataclasses.replace(offset, metadata=meta), path)
        rel = os.path.relpath(path, files.npo_dir())
        runtime.log.info("NPO offset saved to %s", path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved models/npo/{rel}\n{offset.summary()}"))
