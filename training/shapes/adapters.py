"""Pieces that let the benchmark's baselines run through the same Distiller as cross-space distillation.

- `EpsFlowTeacher`: an eps-prediction UNet (the student base, SD1.5 schedule) behind the Teacher interface.
  DDPM noising x_t = a x0 + b n (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t)) is, divided by a + b, exactly
  a rectified flow:
      x_s = x_t / (a + b) = (1 - s) x0 + s n,     s = b / (a + b).
  Given s: r = s / (1 - s) = b / a and a^2 + b^2 = 1 give a = 1 / sqrt(1 + r^2), b = r a, alpha_bar = a^2; the
  UNet's timestep is where the schedule's alpha_bar equals that (interpolated in log alpha_bar, clamped to
  [0, T-1]). Then eps = unet((a + b) x_s, t), x0 = ((a + b) x_s - b eps) / a and v = n - x0 = eps - x0, so the
  DMD loss and the flow-matching fake loss apply unchanged. The fake score is a peft LoRA on the UNet.
  (Levels above s(T-1) ~ 0.936 are noisier than any the UNet was trained on: they use t = T-1 with the exact
  a, b of s; keep s_max <= `s_max` to stay inside the schedule.)
- `IdentityBridge`: the "Bridge" of same-space distillation, student raw latent -> student model space.
- `RoundTripBridge`: the exact round trip E_t(upsample_k(D_s(z))) as a differentiable module with the Bridge's
  interface (`bridge.model.exact_round_trip`), the ablation that replaces the learned projector.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .._bridge import model as bridge_model
from .._bridge import spaces
from ..student import LORA_TARGETS, alphas_cumprod

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel


def _per_sample(s, n: int, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    s = s.expand(n) if s.ndim == 0 else s.reshape(n)
    return s.reshape(-1, *([1] * (like.ndim - 1)))


class EpsFlowTeacher:
    """Teacher interface (sample_s, add_noise, velocity, predict_x0, fake adapter) over an eps-prediction UNet.

    cond / neg_cond: TextCond whose prompt_embeds are the UNet's encoder_hidden_states (pooled unused)."""

    family = "eps_as_flow"

    def __init__(self, unet: "UNet2DConditionModel", space, schedule: dict | None = None,
                 default_guidance: float | None = None):
        self.model = unet.requires_grad_(False).eval()
        self.space = spaces.get_space(space)
        if unet.config.in_channels != self.space.channels:
            raise ValueError(f"The UNet has {unet.config.in_channels} input channels, but space {self.space.name!r} "
                             f"has {self.space.channels}.")
        self.default_guidance = default_guidance
        acp = alphas_cumprod(schedule).double()
        self.num_timesteps = len(acp)
        self._log_acp = acp.log()  # decreasing in t
        a, b = acp.sqrt(), (1 - acp).sqrt()
        self._s_table = (b / (a + b)).float()  # s(t) for integer t, increasing
        self._fake_added = False

    # ---- the reparametrisation ----
    @property
    def s_max(self) -> float:
        """s of the last training timestep: the noisiest level the UNet knows."""
        return float(self._s_table[-1])

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """s = b / (a + b) at integer timesteps t."""
        return self._s_table.to(t.device)[t.long()]

    @staticmethod
    def coefficients(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with b / (a + b) = s and a^2 + b^2 = 1, float64."""
        r = s.double() / (1 - s.double())
        a = (1 + r * r).rsqrt()
        return a, r * a

    def timestep(self, s: torch.Tensor) -> torch.Tensor:
        """Continuous UNet timestep whose alpha_bar is a(s)^2, clamped to [0, T-1] (float32)."""
        a, _ = self.coefficients(s)
        log_ab = (2 * a.log()).cpu()
        desc = self._log_acp  # decreasing; search on its negation, which increases
        idx = torch.searchsorted(-desc, -log_ab).clamp(1, self.num_timesteps - 1)
        lo, hi = desc[idx - 1], desc[idx]
        frac = ((lo - log_ab) / (lo - hi)).clamp(0, 1)
        t = (idx - 1).double() + frac
        return t.clamp(0, self.num_timesteps - 1).float().to(s.device)

    # ---- Teacher interface ----
    def sample_s(self, n: int, generator: torch.Generator | None = None, device=None,
                 resolution: int | None = None) -> torch.Tensor:
        """The UNet's own training distribution: uniform integer t, mapped to s(t)."""
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return self.s_of_t(t)

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = _per_sample(s, x0.shape[0], x0)
        return (1 - s) * x0 + s * noise

    def _eps_x0(self, x_s: torch.Tensor, s: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x_s.shape[0]
        s = torch.as_tensor(s, dtype=torch.float32, device=x_s.device)
        s = s.expand(n) if s.ndim == 0 else s.reshape(n)
        a, b = (c.float().reshape(-1, 1, 1, 1) for c in self.coefficients(s))
        x_t = (a + b) * x_s.float()
        dtype = self.model.dtype
        eps = self.model(x_t.to(dtype), self.timestep(s), encoder_hidden_states=hidden.to(x_s.device, dtype)).sample
        eps = eps.float()
        return eps, (x_t - b * eps) / a

    def predict_x0(self, x_s: torch.Tensor, s: torch.Tensor, cond, neg_cond=None, guidance=None) -> torch.Tensor:
        """x0 with true CFG x0_neg + g (x0_cond - x0_neg) in one batched forward (g None: the default guidance;
        g None/1 or no neg_cond: conditional only). g may be a float or a per-sample tensor [B]."""
        g = self.default_guidance if guidance is None else guidance
        plain = g is None or neg_cond is None or (isinstance(g, (int, float)) and g == 1)
        if plain:
            return self._eps_x0(x_s, s, cond.prompt_embeds)[1]
        n = x_s.shape[0]
        neg = neg_cond.prompt_embeds
        neg = neg.expand(n, -1, -1) if neg.shape[0] == 1 else neg
        s = torch.as_tensor(s, dtype=torch.float32, device=x_s.device)
        s = s.expand(n) if s.ndim == 0 else s.reshape(n)
        _, x0 = self._eps_x0(torch.cat([x_s, x_s]), torch.cat([s, s]),
                             torch.cat([neg.to(cond.prompt_embeds), cond.prompt_embeds]))
        x0_neg, x0_cond = x0.chunk(2)
        g = _per_sample(g, n, x0_cond)
        return x0_neg + g * (x0_cond - x0_neg)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """v = n - x0 = eps - x0 (conditional, no guidance)."""
        eps, x0 = self._eps_x0(x_s, s, cond.prompt_embeds)
        return eps - x0

    # ---- fake adapter ----
    def add_fake_adapter(self, rank: int = 64, alpha: float | None = None, target_modules=None) -> None:
        """A peft LoRA named "fake" on the UNet's attention projections, zero at the start (fake == teacher);
        disabled outside `fake()`."""
        from peft import LoraConfig

        if self._fake_added:
            raise ValueError("This teacher already has a fake adapter.")
        self.model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                                          target_modules=list(target_modules or LORA_TARGETS)), adapter_name="fake")
        self.model.disable_adapters()
        self._fake_added = True

    def fake_parameters(self) -> list[nn.Parameter]:
        if not self._fake_added:
            raise ValueError("No fake adapter: call add_fake_adapter() first.")
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def fake(self) -> Iterator[None]:
        """Predictions inside come from the UNet with the fake LoRA on; outside, from the frozen UNet."""
        if not self._fake_added:
            raise ValueError("No fake adapter: call add_fake_adapter() before using teacher.fake().")
        self.model.enable_adapters()
        try:
            yield
        finally:
            self.model.disable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()


class IdentityBridge(nn.Module):
    """Same-space distillation's "Bridge": the teacher works in the student's own space, so the student's raw
    latent only goes to model space. Holds the student VAE for previews (and the Distiller's checks)."""

    def __init__(self, space, student_vae: "AutoencoderKL"):
        super().__init__()
        self.student_space = self.teacher_space = spaces.get_space(space)
        self.k = 1
        self.student_vae = student_vae.requires_grad_(False).eval()

    def forward_model(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        return self.student_space.to_model(z_s_raw)  # no decode, no clamp

    def forward(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        return z_s_raw

    def decode_student(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        return bridge_model.decode_to_image01(self.student_vae, z_s_raw)

    def enable_gradient_checkpointing(self) -> None:
        self.student_vae.enable_gradient_checkpointing()


class RoundTripBridge(nn.Module):
    """The exact round trip E_t(upsample_k(D_s(z))) with the Bridge's interface: no learned part, both VAEs frozen,
    differentiable (gradients pass through the teacher encoder and the student decoder)."""

    def __init__(self, student_vae: "AutoencoderKL", teacher_vae: "AutoencoderKL", student_space, teacher_space,
                 k: int = 2):
        super().__init__()
        self.student_space = spaces.get_space(student_space)
        self.teacher_space = spaces.get_space(teacher_space)
        self.k = k
        self.student_vae = student_vae.requires_grad_(False).eval()
        self.teacher_vae = teacher_vae.requires_grad_(False).eval()

    def forward_model(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        return self.teacher_space.to_model(bridge_model.exact_round_trip(
            z_s_raw, self.student_vae, self.teacher_vae, self.k, straight_through=straight_through).float())

    def forward(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        return bridge_model.exact_round_trip(z_s_raw, self.student_vae, self.teacher_vae, self.k)

    def decode_student(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        return bridge_model.decode_to_image01(self.student_vae, z_s_raw)

    def enable_gradient_checkpointing(self) -> None:
        self.student_vae.enable_gradient_checkpointing()
        self.teacher_vae.enable_gradient_checkpointing()
