"""The reward model: BLIP's text CLS feature attending to the image, an MLP, normalised by the package's mean/std."""

import json

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .models.BLIP.blip_pretrain import BLIP_Pretrain


def _transform(n_px):
    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


class MLP(nn.Module):
    def __init__(self, input_size):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 16), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class ImageReward(nn.Module):
    def __init__(self, med_config, device="cpu"):
        super().__init__()
        self.device = device
        self.blip = BLIP_Pretrain(image_size=224, vit="large", med_config=med_config)
        self.preprocess = _transform(224)
        with open(med_config) as f:
            self.mlp = MLP(json.load(f)["hidden_size"])
        self.mean = 0.16717362830052426
        self.std = 1.0333394966054072

    def score(self, prompt, image_path):
        """The package's per-image reward of the image file for the prompt (a float)."""
        text_input = self.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                         return_tensors="pt").to(self.device)
        image = self.preprocess(Image.open(image_path)).unsqueeze(0).to(self.device)
        image_embeds = self.blip.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long).to(self.device)
        text_output = self.blip.text_encoder(text_input.input_ids, attention_mask=text_input.attention_mask,
                                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                             return_dict=True)
        rewards = self.mlp(text_output.last_hidden_state[:, 0, :].float())
        return ((rewards - self.mean) / self.std).detach().cpu().numpy().item()
