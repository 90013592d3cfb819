"""Samplers of the shapes world, on diffusers' schedulers.

- Teacher (rectified flow, SD3 convention: x_s = (1-s) x0 + s n, the transformer predicts v = n - x0 and takes
  timestep = s * 1000): FlowMatchEulerDiscreteScheduler, Euler steps, true CFG v = v_u + w (v_c - v_u).
- Student (SD1.5 schedule, eps prediction): DDIMScheduler with "trailing" spacing, so 1 step is exactly the
  one-step student convention (pure noise at t = 999 -> x0) and 25 steps is an ordinary DDIM run.
All functions take and return MODEL-space latents; convert with the world's LatentSpace before decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel


def _batched(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def sample_teacher(transformer: "SD3Transformer2DModel", prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                   neg_embeds: torch.Tensor, neg_pooled: torch.Tensor, noise: torch.Tensor, steps: int = 20,
                   cfg: float = 4.0, shift: float = 1.0, batch_size: int = 128) -> torch.Tensor:
    """Euler sampling with CFG from noise [B,16,h,w] (model space) -> x0 [B,16,h,w] (model space).
    neg_embeds / neg_pooled: [1, ...] or [B, ...] (the empty prompt's encoding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = []
    for sl in _batched(noise.shape[0], batch_size):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise[sl].float()
        b = x.shape[0]
        cond = prompt_embeds[sl]
        uncond = neg_embeds.expand(b, -1, -1) if neg_embeds.shape[0] == 1 else neg_embeds[sl]
        pool_c = pooled[sl]
        pool_u = neg_pooled.expand(b, -1) if neg_pooled.shape[0] == 1 else neg_pooled[sl]
        use_cfg = cfg != 1.0
        for t in scheduler.timesteps:
            if use_cfg:
                v_u, v_c = transformer(
                    torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond, cond]),
                    pooled_projections=torch.cat([pool_u, pool_c]), timestep=t.expand(2 * b),
                ).sample.chunk(2)
                v = v_u + cfg * (v_c - v_u)
            else:
                v = transformer(x, encoder_hidden_states=cond, pooled_projections=pool_c, timestep=t.expand(b)).sample
            x = scheduler.step(v, t, x).prev_sample
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def sample_student(unet: "UNet2DConditionModel", hidden: torch.Tensor, neg_hidden: torch.Tensor,
                   noise: torch.Tensor, schedule: dict, steps: int = 25, cfg: float = 4.0,
                   batch_size: int = 128) -> torch.Tensor:
    """DDIM sampling with CFG from noise [B,4,h,w] (model space) -> x0 [B,4,h,w] (model space), in batches
    (`training.student.ddim_sample`). steps=1, cfg=1 is the one-step student: x0 = (z - sqrt(1-a) eps(z, 999)) / sqrt(a)."""
    from ..student import ddim_sample

    out = []
    for sl in _batched(noise.shape[0], batch_size):
        neg = neg_hidden if neg_hidden.shape[0] == 1 else neg_hidden[sl]
        out.append(ddim_sample(unet, hidden[sl], neg, noise[sl], schedule, steps=steps, cfg=cfg))
    return torch.cat(out)
