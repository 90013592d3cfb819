"""The one-step student: an SD1.5 UNet run once at t = 999 on pure noise.

    z ~ N(0, I)  (SD1.5 model space; at t = 999 the noised latent is almost pure noise)
    eps = unet(z, 999, text)
    x0  = (z - sqrt(1 - a) * eps) / sqrt(a),   a = alpha_bar(999) ~ 0.0047   (SD1.5 MODEL space)
    raw = sd15.to_raw(x0) = x0 / 0.18215                                      (what the VAE decodes)

This is the SwiftBrush / DMD2 convention, and what ComfyUI computes with one "euler"/"simple" step from
sigma_max = sqrt((1 - a) / a) = 14.6146 to 0 at cfg 1, so the trained UNet drops into any SD1.5 pipeline.
The schedule numbers come from diffusers' DDPMScheduler (scaled-linear betas 0.00085..0.012, 1000 steps).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ._bridge import spaces

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

# SD1.5's training schedule, as in its scheduler_config.json.
SD15_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000}
STUDENT_TIMESTEP = 999
# The attention projections of every transformer block (self and cross attention), as in diffusers' and
# SwiftBrush's LoRA recipes for SD1.5.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers names the text cross-attention of every transformer block `attn2` (`attn1` is self-attention).
CROSS_ATTENTION = "attn2"


def alphas_cumprod(schedule: dict | None = None) -> torch.Tensor:
    """alpha_bar(t) for t = 0..T-1 (float32), read from diffusers' DDPMScheduler for `schedule`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(schedule or SD15_SCHEDULE)).alphas_cumprod.clone()


def eps_to_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Noised latent + predicted noise -> clean latent: x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=z_t.device)
    return (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def x0_to_eps(z_t: torch.Tensor, x0: torch.Tensor, alpha_bar) -> torch.Tensor:
    """The inverse: eps = (z_t - sqrt(a) x0) / sqrt(1 - a)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=z_t.device)
    return (z_t.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()


def ddim_scheduler(schedule: dict | None = None):
    """DDIM over the SD1.5 training schedule; trailing spacing, so the first step is t = 999."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(schedule or SD15_SCHEDULE), timestep_spacing="trailing", set_alpha_to_one=True,
                         clip_sample=False)


@torch.no_grad()
def ddim_sample(unet: "UNet2DConditionModel", hidden: torch.Tensor, neg_hidden: torch.Tensor, noise: torch.Tensor,
                schedule: dict | None = None, steps: int = 25, cfg: float = 7.5, callback=None) -> torch.Tensor:
    """The multi-step SD1.5 sampler: DDIM with CFG from noise [B,C,h,w] -> x0, MODEL space (float32). Trailing
    spacing, so the first step is t = 999 and steps=1, cfg=1 is the one-step student base. neg_hidden: [1,L,D] or
    [B,L,D] (the negative / empty prompt). callback: called with no arguments after each step (progress)."""
    scheduler = ddim_scheduler(schedule)
    scheduler.set_timesteps(steps, device=noise.device)
    x, b, dtype = noise.float(), noise.shape[0], unet.dtype
    uncond = neg_hidden.expand(b, -1, -1) if neg_hidden.shape[0] == 1 else neg_hidden
    for t in scheduler.timesteps:
        tt = t.expand(b)
        if cfg != 1.0:
            e_u, e_c = unet(torch.cat([x, x]).to(dtype), torch.cat([tt, tt]),
                            encoder_hidden_states=torch.cat([uncond, hidden]).to(dtype)).sample.float().chunk(2)
            eps = e_u + cfg * (e_c - e_u)
        else:
            eps = unet(x.to(dtype), tt, encoder_hidden_states=hidden.to(dtype)).sample.float()
        x = scheduler.step(eps, t, x).prev_sample
        if callback is not None:
            callback()
    return x


class OneStepStudent(nn.Module):
    """Wraps a diffusers UNet2DConditionModel as a one-step generator: noise + text -> student RAW latent.

    Trains either the whole UNet (default) or a peft LoRA on its attention projections (`add_lora`).
    Optional EMA of the trained parameters (diffusers' EMAModel, `enable_ema`)."""

    def __init__(self, unet: "UNet2DConditionModel", space="sd15", timestep: int = STUDENT_TIMESTEP,
                 schedule: dict | None = None):
        super().__init__()
        self.unet = unet
        self.space = spaces.get_space(space)
        got = unet.config.in_channels
        if got != self.space.channels or unet.config.out_channels != self.space.channels:
            raise ValueError(f"The student UNet has {got} input / {unet.config.out_channels} output channels, but "
                             f"the student space {self.space.name!r} has {self.space.channels}. Pass an SD1.5 UNet.")
        pred = getattr(unet.config, "prediction_type", None) or "epsilon"
        if pred != "epsilon":
            raise ValueError(f"The student UNet predicts {pred!r}; the one-step student needs an epsilon-prediction "
                             "UNet (SD1.5).")
        self.schedule = dict(schedule or SD15_SCHEDULE)
        acp = alphas_cumprod(self.schedule)
        if not 0 <= timestep < len(acp):
            raise ValueError(f"Student timestep must be in [0, {len(acp) - 1}]; got {timestep}.")
        self.timestep = int(timestep)
        self.register_buffer("alpha_bar", acp[self.timestep].clone(), persistent=False)
        # Not submodules: the EMA lives beside the model (not in its state_dict, not moved by .to(), not
        # broadcast by DDP). Create it after moving the student to its device.
        object.__setattr__(self, "_ema", None)
        object.__setattr__(self, "_ema_shadow", None)

    # ---- generation ----
    def latent_size(self, resolution: int | None = None) -> int:
        res = resolution or self.space.native_resolution
        if res % self.space.downscale:
            raise ValueError(f"Resolution {res} is not a multiple of {self.space.downscale} (pixels per latent).")
        return res // self.space.downscale

    def make_noise(self, batch: int, latent_size: int, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
        """Pure noise [B,C,h,w] in model space: the input at t = 999."""
        return torch.randn((batch, self.space.channels, latent_size, latent_size), generator=generator,
                           device=device or self.alpha_bar.device)

    def forward_model(self, noise: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Noise [B,C,h,w] + CLIP hidden states [B,L,D] -> x0 in the student's MODEL space (float32)."""
        if noise.ndim != 4 or noise.shape[1] != self.space.channels:
            raise ValueError(f"Student noise must be [B,{self.space.channels},h,w]; got {tuple(noise.shape)}.")
        if noise.shape[0] < 1:
            raise ValueError(f"The student's batch is empty (noise {tuple(noise.shape)}); generate at least one image.")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != noise.shape[0]:
            raise ValueError(f"Student text embeddings must be [B,L,D] with B = {noise.shape[0]}; got "
                             f"{tuple(encoder_hidden_states.shape)}.")
        dtype = self.unet.dtype
        t = torch.full((noise.shape[0],), self.timestep, device=noise.device, dtype=torch.long)
        eps = self.unet(noise.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype)).sample
        return eps_to_x0(noise, eps, self.alpha_bar)

    def forward(self, noise: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Noise + text -> the student's RAW latent (what the SD1.5 VAE decodes and the Bridge takes)."""
        return self.space.to_raw(self.forward_model(noise, encoder_hidden_states))

    # ---- what is trained ----
    @property
    def is_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    def add_lora(self, rank: int = 64, alpha: float | None = None, target_modules=LORA_TARGETS) -> None:
        """Train a LoRA on the UNet's attention projections instead of the whole UNet (base weights frozen)."""
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}.")
        if self.is_lora:
            raise ValueError("The student UNet already has a LoRA adapter.")
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                         target_modules=list(target_modules)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights when a LoRA is attached, else every UNet weight."""
        if self.is_lora:
            return [p for n, p in self.unet.named_parameters() if "lora_" in n]
        return list(self.unet.parameters())

    def parameter_groups(self, lr: float, cross_attention_lr: float = 0.0) -> list[dict]:
        """Optimizer groups of `trainable_parameters`: with cross_attention_lr > 0 the cross-attention layers
        (diffusers' `attn2`: the only layers that read the prompt) get that learning rate, the rest `lr`."""
        if not cross_attention_lr:
            return [{"params": self.trainable_parameters(), "lr": lr}]
        trainable = {id(p) for p in self.trainable_parameters()}
        cross, rest = [], []
        for name, p in self.unet.named_parameters():
            if id(p) in trainable:
                (cross if CROSS_ATTENTION in name.split(".") else rest).append(p)
        if not cross:
            raise ValueError(f"The student UNet has no trainable cross-attention ('{CROSS_ATTENTION}') layers for "
                             "the cross-attention learning rate; use a UNet2DConditionModel with cross-attention.")
        return [{"params": cross, "lr": cross_attention_lr}, {"params": rest, "lr": lr}]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    # ---- EMA ----
    def enable_ema(self, decay: float = 0.999, warmup: bool = True) -> None:
        """Keep an EMA of the trained parameters (diffusers EMAModel; its decay ramps up from 0)."""
        from diffusers.training_utils import EMAModel

        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1); got {decay}.")
        params = self.trainable_parameters()
        ema = EMAModel(params, decay=decay, use_ema_warmup=warmup)
        # The shadow tensors as buffers of a plain module, so training-state checkpoints save and restore
        # them like any other module (load_state_dict copies in place into the EMA's own tensors).
        shadow = nn.Module()
        for i, t in enumerate(ema.shadow_params):
            shadow.register_buffer(f"p{i}", t)
        object.__setattr__(self, "_ema", ema)
        object.__setattr__(self, "_ema_shadow", shadow)

    @property
    def ema(self):
        return self._ema

    def ema_step(self) -> None:
        if self._ema is not None:
            self._ema.step(self.trainable_parameters())

    def ema_state_module(self) -> nn.Module | None:
        """The EMA shadow weights as a module (for save/load_training_state); None without EMA."""
        return self._ema_shadow

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily run with the EMA weights (no-op without EMA)."""
        if self._ema is None:
            yield
            return
        params = self.trainable_parameters()
        self._ema.store(params)
        self._ema.copy_to(params)
        try:
            yield
        finally:
            self._ema.restore(params)

    # ---- export ----
    def merged_unet(self, use_ema: bool = True, device=None) -> "UNet2DConditionModel":
        """A plain UNet2DConditionModel copy with the trained weights (EMA if kept; LoRA fused in), built from
        `merged_state_dict` on the CPU and then moved to `device` (default: where the student is)."""
        from diffusers import UNet2DConditionModel

        state = self.merged_state_dict(use_ema=use_ema)
        with torch.device("meta"):  # no random init: every weight comes from `state`
            unet = UNet2DConditionModel.from_config(self.unet.config)
        unet.load_state_dict(state, strict=True, assign=True)
        device = self.alpha_bar.device if device is None else device
        return unet.to(device).requires_grad_(False).eval()

    @torch.no_grad()
    def merged_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The plain UNet's state dict (EMA weights if kept; a LoRA merged in: W + scale * B @ A), copied to the CPU
        one tensor at a time and merged there: no copy of the UNet on its device, so a checkpoint can be saved right
        after the GPU ran out of memory."""
        from peft.tuners.lora import Linear as LoraLinear

        with self.ema_weights() if use_ema else contextlib.nullcontext():
            out = {k: v.detach().to("cpu", copy=True) for k, v in self.unet.state_dict().items()
                   if "lora_" not in k}
            if self.is_lora:
                for name, module in self.unet.named_modules():
                    if not hasattr(module, "lora_A"):
                        continue
                    if not isinstance(module, LoraLinear) or module.use_dora.get("default") or module.fan_in_fan_out:
                        raise ValueError(f"Cannot merge the student's LoRA layer {name!r} ({type(module).__name__}): "
                                         "only plain LoRA on linear layers (the student's attention projections).")
                    key = f"{name}.base_layer.weight"
                    a = module.lora_A["default"].weight.detach().to("cpu", torch.float32)
                    b = module.lora_B["default"].weight.detach().to("cpu", torch.float32)
                    w = out[key]
                    out[key] = (w.float() + (b @ a) * module.scaling["default"]).to(w.dtype)
        return {k.replace(".base_layer.", "."): v for k, v in out.items()}
