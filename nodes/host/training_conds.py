"""Self-NPO training's model inputs, made from CONDITIONING the way ComfyUI makes them for sampling."""

from __future__ import annotations

import torch

from ...npo_core.errors import NPOError


def conditioning_entries(conditioning, input_name: str) -> list:
    """One ComfyUI CONDITIONING entry per prompt (Conditioning (Combine) stacks several)."""
    if not conditioning:
        raise NPOError(f"{input_name}: empty conditioning; connect a CLIP Text Encode output.")
    return [[c[0], dict(c[1])] for c in conditioning]


def _cond_objects(mp, entry, latent_shape: tuple[int, ...], device, prompt_type: str, seed: int) -> dict:
    """ComfyUI's model-cond objects (CONDRegular, CONDCrossAttn, ...) for one conditioning entry, as the
    sampler makes them from an empty latent (``process_conds``: the latent image in model space, the seed):
    c_crossattn, y, attention masks, pooled vectors, concat images (inpainting, instruct-pix2pix, x4)..."""
    import comfy.sampler_helpers
    import comfy.samplers

    conds = comfy.sampler_helpers.convert_cond([entry])
    noise = torch.zeros(latent_shape)
    latent_image = mp.model.process_latent_in(torch.zeros(latent_shape))
    conds = comfy.samplers.encode_model_conds(
        mp.model.extra_conds, conds, noise, device, prompt_type, latent_image=latent_image, denoise_mask=None,
        seed=seed,
    )
    return conds[0]["model_conds"]


def batched_model_conds(
    mp, entries: list, prompt_types: list[str], latent_shape, device, seed: int = 0
) -> tuple[list[dict], dict]:
    """Model inputs for several conditioning entries (prompts and the negative), made the same length the
    way ComfyUI batches conds for sampling (``CONDCrossAttn.concat`` repeats text to a common length).
    Returns (one batch-1 dict of tensors per entry, the inputs that are not per-row tensors, e.g. constants)."""
    objs = [_cond_objects(mp, e, latent_shape, device, t, seed) for e, t in zip(entries, prompt_types, strict=True)]
    keys = set(objs[0])
    if any(set(o) != keys for o in objs):
        raise NPOError("positive/negative: the prompts give the model different inputs; encode them the same way.")
    rows: dict[str, torch.Tensor] = {}
    constants: dict = {}
    for k in sorted(keys):
        first = objs[0][k]
        value = getattr(first, "cond", None)
        if not (torch.is_tensor(value) and value.shape[:1] == (1,)):
            constants[k] = value
            continue
        others = [o[k] for o in objs[1:]]
        if not all(first.can_concat(o) for o in others):
            import comfy.conds

            shapes = sorted({tuple(o.cond.shape) for o in [first, *others] if torch.is_tensor(o.cond)})
            pads = isinstance(first, comfy.conds.CONDCrossAttn)  # repeats text up to a common length
            why = ("their token lengths differ too much to be padded to one length" if pads else
                   "this model batches only prompts of exactly the same token length")
            raise NPOError(
                f"positive/negative: the prompts' '{k}' inputs cannot be batched for training ({why}; shapes "
                f"{', '.join(str(list(x)) for x in shapes)}). Shorten the longest prompt (or the negative) to the "
                "others' length."
            )
        try:
            rows[k] = first.concat(others).to(device)
        except RuntimeError as e:
            raise NPOError(f"positive/negative: the prompts' '{k}' inputs differ in shape ({e}).") from None
    return [{k: v[i : i + 1] for k, v in rows.items()} for i in range(len(objs))], constants


def model_inputs(mp, positive: list, negative, latent_shape, device, seed: int = 0) -> tuple[list[dict], dict, dict]:
    """(one batch-1 dict of model inputs per positive entry, the negative's, the inputs shared by every row),
    made one length the way ComfyUI batches conds for sampling (refused, naming the shapes, if they cannot be)."""
    types = ["positive"] * len(positive) + ["negative"]
    rows, constants = batched_model_conds(mp, [*positive, negative], types, latent_shape, device, seed)
    return rows[:-1], rows[-1], constants
