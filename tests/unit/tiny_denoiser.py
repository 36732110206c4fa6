"""A tiny conditional eps-prediction network wrapped as a VE denoiser D(x_ve, ν, cond) -> x0."""

import torch
from torch import nn


class TinyEps(nn.Module):
    def __init__(self, channels: int = 2, cond_dim: int = 3, width: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.to_q = nn.Linear(cond_dim, width)
        self.time = nn.Linear(1, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, cond):
        h = self.conv_in(x) + self.to_q(cond)[:, :, None, None] + self.time(t[:, None])[:, :, None, None]
        return self.conv_out(torch.tanh(h))


def denoiser_of(net: TinyEps):
    def denoise(x_ve, nu, cond):
        shape = (-1,) + (1,) * (x_ve.dim() - 1)
        x_in = x_ve / torch.sqrt(nu**2 + 1).view(shape)  # ComfyUI's calculate_input for eps models
        eps = net(x_in, torch.log(nu), cond)
        return x_ve - nu.view(shape) * eps  # calculate_denoised (eps)

    return denoise
