"""A 1-D flow whose every quantity is known in closed form, behind the real adapter interface.

Data x0 ~ N(m, s^2); x_sigma = (1 - sigma) x0 + sigma eps. The exact velocity is E[eps - x0 | x_sigma] (jointly
Gaussian), so sampling with it reproduces N(m, s^2), and tilting by exp(lam * x0) gives N(m + lam s^2, s^2).
Pixels are sigmoid(x) broadcast to 3x1x1, and `LinearReward` reads x back (logit of the mean pixel)."""

import torch
from torch import nn

from visalign.models.base import Conditioning, FlowModelAdapter
from visalign.rewards.base import Reward


class GaussianFlow(FlowModelAdapter):
    name = "toy-gaussian"
    guidance = "none"

    def __init__(self, m: float = 0.0, s: float = 1.0):
        self.m, self.s = m, s
        self.denoiser = nn.Linear(1, 1)  # only for device / dtype

    @property
    def size_multiple(self) -> int:
        return 1

    def check_request(self, height, width, num_frames=None):
        if (height, width) != (1, 1):
            raise ValueError("the toy flow draws 1x1 only")

    def latent_shape(self, height, width, num_frames=None):
        return (1, 1, 1)

    def sigmas(self, num_steps, latent_shape):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def encode_prompts(self, prompts, negative_prompts=None, cfg=True):
        return Conditioning({"dummy": torch.zeros(len(prompts), 1)}, None, list(prompts))

    def _velocity(self, latents, sigma, embeds, guidance_scale):
        s2 = self.s**2
        sig = sigma.view(-1, 1, 1, 1).double()
        x = latents.double()
        var = (1 - sig) ** 2 * s2 + sig**2
        centred = x - (1 - sig) * self.m
        x0 = self.m + (1 - sig) * s2 / var * centred
        eps = sig / var * centred
        return (eps - x0).to(latents.dtype)

    def decode(self, latents):
        return torch.sigmoid(latents.float()).expand(-1, 3, -1, -1)

    def encode(self, pixels, generator=None):
        return torch.logit(pixels[:, :1].float())


class LinearReward(Reward):
    name = "toy-linear"
    differentiable = True
    needs_prompts = False

    def score(self, *, prompts, images, videos, metadata):
        return torch.logit(images.mean(dim=(1, 2, 3)).clamp(1e-7, 1 - 1e-7))
