"""The latent a video family's data-free pool (and self-generated pairs) gets is the one ComfyUI's own empty-latent
node makes for that family, on every ComfyUI of the matrix: v0.3.64's latent formats declare no spatial factor and
v0.14.1's no temporal factor, so the pack must not read 8 and 1 there (an LTX-Video pool 16× too many tokens, a
Wan pool of 33 latent frames for a 33-frame video)."""

from __future__ import annotations

import importlib

import npo_familykit as fk
import pytest

from comfyui_npo.nodes.host import model_facts

# family → (ComfyUI module, empty-latent node, extra inputs): the node each family's own workflows start from
EMPTY_LATENT_NODES = {
    "wan21": ("comfy_extras.nodes_hunyuan", "EmptyHunyuanLatentVideo", {}),
    "ltxv": ("comfy_extras.nodes_lt", "EmptyLTXVLatentVideo", {}),
    "wan22_5b": ("comfy_extras.nodes_wan", "Wan22ImageToVideoLatent", {"vae": None}),
}
SIZES = [(832, 480, 33), (256, 256, 9), (128, 96, 1)]


def _empty_latent(module: str, node: str, extra: dict, width: int, height: int, length: int):
    cls = getattr(importlib.import_module(module), node)
    kw = dict(width=width, height=height, length=length, batch_size=1, **extra)
    if hasattr(cls, "FUNCTION"):  # a V1 node
        out = getattr(cls(), cls.FUNCTION)(**kw)
    else:
        out = cls.execute(**kw)
        out = out.result if hasattr(out, "result") else out
    return out[0]["samples"]


@pytest.mark.parametrize("name", sorted(EMPTY_LATENT_NODES))
def test_pool_latents_are_the_shape_comfyuis_empty_latent_node_makes(name):
    fam = fk.family(name)
    assert fam.available(), f"{name}: in every ComfyUI of the matrix"
    layout = model_facts.latent_layout(fk.tiny_model(fam))
    for width, height, length in SIZES:
        want = tuple(_empty_latent(*EMPTY_LATENT_NODES[name], width, height, length).shape)
        assert layout.pool_shape(width, height, length) == want, (name, width, height, length)
