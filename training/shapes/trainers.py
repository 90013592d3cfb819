"""Training loops of the shapes world: the two VAEs, the rectified-flow teacher, the eps-prediction student.

Each loop is short and readable on purpose; data is rendered on the fly (VAEs) or encoded once into
latents (diffusion models). Every loop is deterministic given its seed and thread count.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .render import render, sample_scenes

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

Log = Callable[[str], None] | None


def _cosine_lr(opt: torch.optim.Optimizer, steps: int, warmup: int = 50):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.9 + 0.1

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _log_every(steps: int) -> int:
    return max(1, steps // 8)


def psnr(a01: torch.Tensor, b01: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [0, 1]."""
    mse = (a01.float() - b01.float()).square().flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def train_vae(vae: "AutoencoderKL", resolution: int, steps: int, batch_size: int = 16, lr: float = 1e-3,
              kl_weight: float = 1e-5, crop: int | None = None, seed: int = 0, log: Log = print) -> "AutoencoderKL":
    """Reconstruction (MSE on [-1, 1] pixels) + a small KL, on freshly rendered train images.

    `crop`: train on random crops of this size (the VAE is convolutional, so a 128 px VAE learns from 64 px
    crops of 128 px renders at a quarter of the cost; pixel statistics stay those of 128 px images).
    The KL is normalised per pixel value, so kl_weight=1e-6 is the SD VAE's weighting."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps)
    t0 = time.time()
    for step in range(steps):
        x = render(sample_scenes(batch_size, "train", seed=seed * 1_000_000 + step), resolution) * 2 - 1
        if crop is not None and crop < resolution:
            i, j = torch.randint(0, resolution - crop + 1, (2,), generator=g).tolist()
            x = x[:, :, i : i + crop, j : j + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % _log_every(steps) == 0 or step == steps - 1):
            p = 10 * math.log10(4 / max(mse.item(), 1e-10))  # [-1,1] range -> PSNR of [0,1] images
            log(f"vae step {step}/{steps} mse {mse.item():.5f} (psnr {p:.1f} dB) kl {kl.item():.3f} "
                f"({time.time() - t0:.0f}s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: "AutoencoderKL", images01: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Raw latents (posterior means) of images in [0, 1]."""
    return torch.cat([vae.encode(images01[i : i + batch_size] * 2 - 1).latent_dist.mean
                      for i in range(0, len(images01), batch_size)])


@torch.no_grad()
def decode_latents(vae: "AutoencoderKL", raw: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Images in [0, 1] from raw latents."""
    return torch.cat([((vae.decode(raw[i : i + batch_size]).sample + 1) / 2).clamp(0, 1)
                      for i in range(0, len(raw), batch_size)])


def latent_statistics(raw: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) like the real VAEs' numbers: shift = mean, scale = 1 / std of the raw latents."""
    shift = float(raw.mean())
    scale = float(1 / (raw - shift).std())
    return scale, shift


def shifted_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """SD3's training timesteps: s = sigmoid(N(mean, std)), then s <- shift s / (1 + (shift - 1) s)."""
    s = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * s / (1 + (shift - 1) * s)


def _ema(params, steps: int):
    """EMA of the weights (diffusers EMAModel, decay warming up from 0); sampled models use the EMA."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=0.999 if steps >= 2000 else 0.99, use_ema_warmup=True, power=3 / 4)


def _drop_captions(cond: torch.Tensor, empty: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Replace a share p of the rows by the empty prompt's encoding (CFG dropout)."""
    drop = torch.rand(cond.shape[0], generator=g) < p
    return torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), empty.expand_as(cond), cond)


def train_teacher(transformer, latents: torch.Tensor, caption_index: torch.Tensor, prompt_embeds: torch.Tensor,
                  pooled: torch.Tensor, empty_embeds: torch.Tensor, empty_pooled: torch.Tensor, steps: int,
                  batch_size: int = 128, lr: float = 1e-3, caption_dropout: float = 0.1, logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift: float = 1.0, seed: int = 0, log: Log = print):
    """Rectified flow in the teacher's MODEL space: x_s = (1-s) x0 + s n, target v = n - x0, timestep = s * 1000,
    10% of captions dropped to the empty prompt for CFG. s is SD3's training distribution: logit-normal, then
    shifted towards noise, s <- shift s / (1 + (shift - 1) s) (SD3 shifts by 3 at 1024 px: a latent whose
    global content is visible through the noise until s is close to 1 needs that extra noise to learn it).

    latents [N,16,h,w] (model space); caption_index [N] indexes the per-caption tables prompt_embeds [P,L,D]
    and pooled [P,Dp] (each distinct caption encoded once). Returns the transformer with EMA weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    transformer.train()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = _cosine_lr(opt, steps, warmup=100)
    ema = _ema(params, steps)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        s = shifted_logit_normal(batch_size, logit_mean, logit_std, shift, generator=g)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        enc = _drop_captions(prompt_embeds[caption_index[idx]], empty_embeds, caption_dropout, g)
        pool = _drop_captions(pooled[caption_index[idx]], empty_pooled, caption_dropout, g)
        v = transformer(x_s, encoder_hidden_states=enc, pooled_projections=pool, timestep=s * 1000).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if log and (step % _log_every(steps) == 0 or step == steps - 1):
            log(f"teacher step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    ema.copy_to(params)
    return transformer.eval().requires_grad_(False)


def train_student(unet, latents: torch.Tensor, caption_index: torch.Tensor, hidden: torch.Tensor,
                  empty_hidden: torch.Tensor, schedule: dict, steps: int, batch_size: int = 128, lr: float = 1e-3,
                  caption_dropout: float = 0.1, seed: int = 0, log: Log = print):
    """SD1.5-style training in the student's MODEL space: DDPMScheduler.add_noise at uniform t in [0, 999],
    eps prediction, 10% caption dropout. Returns the UNet with EMA weights."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**schedule)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet.train()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = _cosine_lr(opt, steps, warmup=100)
    ema = _ema(params, steps)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        enc = _drop_captions(hidden[caption_index[idx]], empty_hidden, caption_dropout, g)
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=enc).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if log and (step % _log_every(steps) == 0 or step == steps - 1):
            log(f"student step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    ema.copy_to(params)
    return unet.eval().requires_grad_(False)
