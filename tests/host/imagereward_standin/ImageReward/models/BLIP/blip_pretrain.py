"""A tiny BLIP: a patch encoder for images and a one-layer text encoder with cross-attention to the image tokens."""

from types import SimpleNamespace

import torch
from torch import nn
from transformers import BertConfig

from .blip import init_tokenizer


class PatchEncoder(nn.Module):
    """[B, 3, S, S] → [B, 1 + (S / 32)², width] image tokens (a class token first)."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 32, stride=32)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1))


class CrossTextEncoder(nn.Module):
    """Token embeddings → masked self-attention → cross-attention to the image → last_hidden_state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        w = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, w)
        self.position = nn.Embedding(config.max_position_embeddings, w)
        self.self_attn = nn.MultiheadAttention(w, config.num_attention_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(w, config.num_attention_heads, batch_first=True,
                                                kdim=config.encoder_width, vdim=config.encoder_width)
        self.norm = nn.LayerNorm(w)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)
        h = h + self.self_attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)[0]
        image_pad = encoder_attention_mask == 0
        h = h + self.cross_attn(h, encoder_hidden_states, encoder_hidden_states, key_padding_mask=image_pad,
                                need_weights=False)[0]
        return SimpleNamespace(last_hidden_state=self.norm(h))


class BLIP_Pretrain(nn.Module):  # noqa: N801  (the package's name)
    def __init__(self, med_config="med_config.json", image_size=224, vit="large"):
        super().__init__()
        config = BertConfig.from_json_file(med_config)
        self.visual_encoder = PatchEncoder(config.encoder_width)
        self.tokenizer = init_tokenizer()
        self.text_encoder = CrossTextEncoder(config)
