"""Distribution-matching losses, in the teacher's MODEL space, for rectified-flow teachers.

Notation (DESIGN.md §2): x is a (bridged) generator sample, x_s = (1 - s) x + s n, the teacher and the fake
score predict x0_real(x_s) and x0_fake(x_s). Descent on a loss below moves x along -grad, i.e. toward
x0_real and away from x0_fake: the generator's distribution is pushed toward the teacher's.

- DMD (DMD2, default): p_real = x - x0_real, p_fake = x - x0_fake,
  grad = (p_real - p_fake) / mean(|p_real|) per sample. The normaliser makes the step size independent of
  the noise level and of the latent scale.
- VSD (SwiftBrush): grad = w(s) (eps_real - eps_fake) with w = sigma^2. For a flow, sigma_s = s and
  eps = x_s + (1 - s) v = (x_s - (1 - s) x0) / s, so eps_real - eps_fake = (1 - s) / s (x0_fake - x0_real) and
      grad = s (1 - s) (x0_fake - x0_real).
  Like SwiftBrush we drop the chain-rule factor d x_s / d x = 1 - s (it only re-weights timesteps); the
  weight s (1 - s) vanishes at both ends, where the score difference carries no signal.
Both are turned into a loss the same way: loss = 0.5 * mse(x, (x - grad).detach()) (mean reduction; AdamW
is invariant to the overall scale, the learning rate absorbs it), so d loss / d x = grad / numel.

The fake score is trained with the flow-matching loss mse(v_fake(x_s), n - x) on detached samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

S_MIN, S_MAX = 0.02, 0.98  # DMD2's timestep range: the ends carry no useful gradient
TIMESTEP_DISTS = ("uniform", "logit_normal", "teacher")
LOSSES = ("dmd", "vsd")


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.float().reshape(-1, *([1] * (like.ndim - 1)))


def sample_timesteps(n: int, dist: str = "uniform", s_min: float = S_MIN, s_max: float = S_MAX,
                     generator: torch.Generator | None = None, device=None, teacher=None, logit_mean: float = 0.0,
                     logit_std: float = 1.0, resolution: int | None = None) -> torch.Tensor:
    """Noise levels s in [s_min, s_max], shape [n], float32.

    dist: "uniform" on [s_min, s_max]; "logit_normal" (sigmoid of N(logit_mean, logit_std)); "teacher" (the
    teacher's own training distribution, `teacher.sample_s`, e.g. SD3's shifted one). The last two are drawn
    on (0, 1) and mapped affinely into [s_min, s_max], which keeps their shape without piling mass on the ends."""
    if dist not in TIMESTEP_DISTS:
        raise ValueError(f"Unknown timestep distribution {dist!r}; choose one of {', '.join(TIMESTEP_DISTS)}.")
    if not 0 <= s_min < s_max <= 1:
        raise ValueError(f"Need 0 <= s_min < s_max <= 1 for the timestep range; got [{s_min}, {s_max}].")
    if dist == "uniform":
        u = torch.rand(n, generator=generator, device=device)
    elif dist == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    else:
        if teacher is None:
            raise ValueError('Timestep distribution "teacher" needs the teacher (its sample_s).')
        u = teacher.sample_s(n, generator=generator, device=device, resolution=resolution).float()
    return s_min + (s_max - s_min) * u


def sample_guidance(n: int, guidance, generator: torch.Generator | None = None, device=None):
    """Real-score guidance: a float (fixed), or a (low, high) range -> a per-sample uniform tensor [n]."""
    if isinstance(guidance, (int, float)):
        return float(guidance)
    lo, hi = (float(g) for g in guidance)
    if hi < lo:
        raise ValueError(f"Guidance range must be (low, high) with low <= high; got ({lo}, {hi}).")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """DMD2-normalised gradient (p_real - p_fake) / mean(|p_real|), per sample, NaN/inf zeroed.

    normalise False: the raw direction p_real - p_fake = x0_fake - x0_real (for a normalisation that acts
    later, in the student's space)."""
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    p_real = x - x0_real
    p_fake = x - x0_fake
    if not normalise:
        return torch.nan_to_num(p_real - p_fake, nan=0.0, posinf=0.0, neginf=0.0)
    dims = list(range(1, x.ndim))
    norm = p_real.abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / norm, nan=0.0, posinf=0.0, neginf=0.0)


def vsd_gradient(x0_real: torch.Tensor, x0_fake: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """VSD gradient for a flow teacher: s (1 - s) (x0_fake - x0_real) = sigma_s^2 (eps_real - eps_fake)."""
    x0_real, x0_fake = x0_real.detach().float(), x0_fake.detach().float()
    s = _per_sample(s, x0_real)
    return torch.nan_to_num(s * (1 - s) * (x0_fake - x0_real), nan=0.0, posinf=0.0, neginf=0.0)


def loss_from_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x, (x - grad).detach()): its gradient w.r.t. x is grad / x.numel()."""
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def distribution_matching_loss(kind: str, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                               s: torch.Tensor, normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad) for `kind` "dmd" or "vsd"; x carries the generator's graph, the x0s are detached.
    normalise: DMD2's teacher-space normaliser (DMD only)."""
    if kind == "dmd":
        grad = dmd_gradient(x, x0_real, x0_fake, normalise=normalise)
    elif kind == "vsd":
        grad = vsd_gradient(x0_real, x0_fake, s)
    else:
        raise ValueError(f"Unknown distillation loss {kind!r}; choose one of {', '.join(LOSSES)}.")
    return loss_from_gradient(x, grad), grad


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Fake-score loss: mse(v_pred, n - x0), x0 detached (the fake score only tracks the generator)."""
    return F.mse_loss(v_pred.float(), (noise.float() - x0.detach().float()))

