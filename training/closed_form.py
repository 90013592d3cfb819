"""A test teacher whose denoiser is exact: rectified flow on a Gaussian data distribution.

Data x0 ~ N(mu(c), Sigma) in a (small) teacher MODEL space, x_s = (1 - s) x0 + s n. Then
    E[x0 | x_s] = mu + (1 - s) Sigma ((1 - s)^2 Sigma + s^2 I)^-1 (x_s - (1 - s) mu),   v = (x_s - x0_hat) / s,
computed through Sigma's eigen-decomposition for the real teacher. The conditional mean is
mu(c) = mu + W f(c) with f(c) the pooled text embedding (or the token mean); W = 0 makes it unconditional.
Guidance is true CFG: x0_neg + g (x0_cond - x0_neg).

The fake score follows the real teachers' LoRA recipe: `add_fake_adapter` adds a learnable Gaussian
N(mu + dmu, (S + a U V^T)(S + a U V^T)^T) with S = Sigma^(1/2), dmu = 0 and U = 0 at the start, so the fake
equals the teacher until it is trained (with the flow-matching loss, like the LoRA). `with teacher.fake():`
switches every prediction to it. Distillation against this teacher checks the sign and scale of every
conversion in the chain, because where the generator must end up is known exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ._bridge import spaces


def _bcast(s: torch.Tensor, n: int) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float32)
    return s.expand(n) if s.ndim == 0 else s.reshape(n)


def gaussian_x0(x_s: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, evals: torch.Tensor,
                evecs: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_s] for x0 ~ N(mean, Q diag(l) Q^T), flattened (x_s [B,D], s [B], mean [B,D] or [D]).

    In the eigenbasis the posterior mean is a per-coordinate gain (1-s) l / ((1-s)^2 l + s^2): no solves,
    and differentiable in mean, l and Q."""
    sb = s.reshape(-1, 1)
    gain = (1 - sb) * evals / ((1 - sb) ** 2 * evals + sb**2)
    return mean + (gain * ((x_s - (1 - sb) * mean) @ evecs)) @ evecs.T


class _FakeGaussian(nn.Module):
    """The trainable fake score: a full Gaussian, starting exactly at the teacher's (like a zero-init LoRA).

    Parameterised in eigen-form, Sigma_f = Q diag(exp(log_l)) Q^T with Q = Q0 cayley(A), A skew-symmetric
    and 0 at the start, so every covariance is reachable and the denoiser needs no per-sample solve."""

    def __init__(self, mean: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, floor: float):
        super().__init__()
        d = mean.numel()
        self.register_buffer("q0", evecs.clone())
        self.mean = nn.Parameter(mean.clone())
        self.log_evals = nn.Parameter(evals.clamp_min(floor).log())
        self.skew = nn.Parameter(torch.zeros(d, d))

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.skew - self.skew.T
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        rot = torch.linalg.solve(eye - a, eye + a)  # Cayley transform: orthogonal, identity at a = 0
        return self.log_evals.exp(), self.q0 @ rot


class _GaussianModel(nn.Module):
    """Holds the teacher's Gaussian (buffers) and, once added, the fake adapter (parameters)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, cond_proj: torch.Tensor | None):
        super().__init__()
        cov = 0.5 * (cov + cov.T)
        evals, evecs = torch.linalg.eigh(cov.double())
        if evals.min() < -1e-6 * max(1.0, evals.max().item()):
            raise ValueError(f"The closed-form teacher's covariance must be positive semi-definite; its smallest "
                             f"eigenvalue is {evals.min().item():.3g}.")
        evals = evals.clamp_min(0)
        self.register_buffer("mean", mean.reshape(-1).float())
        self.register_buffer("evals", evals.float())
        self.register_buffer("evecs", evecs.float())
        self.register_buffer("sqrt_cov", ((evecs * evals.sqrt()) @ evecs.T).float())  # symmetric root
        self.register_buffer("cond_proj", cond_proj.float() if cond_proj is not None else None)
        self.fake: _FakeGaussian | None = None


class ClosedFormTeacher:
    """Teacher interface (sample_s, add_noise, velocity, predict_x0, fake adapter) over an exact Gaussian."""

    family = "closed_form"

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, space="sd3", cond_proj: torch.Tensor | None = None):
        """mean: [C,H,W] (the latent shape it models), cov: [D,D] with D = C*H*W, cond_proj: [D,F] or None."""
        if mean.ndim != 3:
            raise ValueError(f"The closed-form teacher's mean is one latent [C,H,W]; got {tuple(mean.shape)}.")
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"Covariance must be [{d},{d}] for a mean of shape {tuple(mean.shape)}; "
                             f"got {tuple(cov.shape)}.")
        if cond_proj is not None and (cond_proj.ndim != 2 or cond_proj.shape[0] != d):
            raise ValueError(f"cond_proj must be [{d},F]; got {tuple(cond_proj.shape)}.")
        self.space = spaces.get_space(space)
        if mean.shape[0] != self.space.channels:
            raise ValueError(f"The mean has {mean.shape[0]} channels, but space {self.space.name!r} has "
                             f"{self.space.channels}.")
        self.shape = tuple(mean.shape)
        self.model = _GaussianModel(mean, cov, cond_proj)
        self._fake_on = False

    @classmethod
    def from_samples(cls, x0: torch.Tensor, space="sd3", ridge: float = 1e-4) -> "ClosedFormTeacher":
        """The Gaussian that best fits samples [N,C,H,W] (their mean and covariance, plus a small ridge)."""
        flat = x0.detach().reshape(x0.shape[0], -1).double()
        mean = flat.mean(0)
        cov = torch.cov(flat.T) + ridge * torch.eye(flat.shape[1], dtype=flat.dtype)
        return cls(mean.float().reshape(x0.shape[1:]), cov.float(), space=space)

    # ---- distribution ----
    def _mean_for(self, cond, n: int, device) -> torch.Tensor:
        m = self.model
        mean = m.mean.to(device).expand(n, -1)
        if cond is None or m.cond_proj is None:
            return mean
        feat = cond.pooled if getattr(cond, "pooled", None) is not None else cond.prompt_embeds.mean(1)
        if feat.shape[0] == 1 and n > 1:
            feat = feat.expand(n, -1)
        return mean + feat.float().to(device) @ m.cond_proj.to(device).T

    def target_moments(self, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], covariance [D,D]) of the data under `cond` (first sample's condition)."""
        mean = self._mean_for(cond, 1, self.model.mean.device)[0]
        return mean, self.model.sqrt_cov @ self.model.sqrt_cov.T

    def fake_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], covariance [D,D]) of the fake score's Gaussian (unconditional part)."""
        if self.model.fake is None:
            raise ValueError("No fake adapter: call add_fake_adapter() first.")
        evals, evecs = self.model.fake.eigen()
        return self.model.fake.mean, (evecs * evals) @ evecs.T

    def sample(self, n: int, generator: torch.Generator | None = None, cond=None) -> torch.Tensor:
        """Exact samples [n,C,H,W] from the teacher's data distribution."""
        m = self.model
        z = torch.randn(n, m.mean.numel(), generator=generator)
        return (self._mean_for(cond, n, "cpu") + z @ m.sqrt_cov.cpu().T).reshape(n, *self.shape)

    # ---- Teacher interface ----
    def sample_s(self, n: int, generator: torch.Generator | None = None, device=None,
                 resolution: int | None = None) -> torch.Tensor:
        """Logit-normal(0, 1) noise levels, SD3's training distribution without its shift."""
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = _bcast(s, x0.shape[0]).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise

    def _x0(self, x_s: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        if tuple(x_s.shape[1:]) != self.shape:
            raise ValueError(f"The closed-form teacher models latents {list(self.shape)}; got {list(x_s.shape[1:])}.")
        b = x_s.shape[0]
        flat = x_s.reshape(b, -1).float()
        s = _bcast(s, b).to(flat.device)
        mean = self._mean_for(cond, b, flat.device)
        m = self.model
        if self._fake_on:
            if m.fake is None:
                raise ValueError("No fake adapter: call add_fake_adapter() before using teacher.fake().")
            evals, evecs = m.fake.eigen()
            out = gaussian_x0(flat, s, mean - m.mean + m.fake.mean, evals, evecs)
        else:
            out = gaussian_x0(flat, s, mean, m.evals, m.evecs)
        return out.reshape(x_s.shape)

    def predict_x0(self, x_s: torch.Tensor, s: torch.Tensor, cond, neg_cond=None, guidance=None) -> torch.Tensor:
        """x0 with true CFG (x0_neg + g (x0_cond - x0_neg)); guidance None or 1 = conditional only."""
        x0 = self._x0(x_s, s, cond)
        if guidance is None or (isinstance(guidance, (int, float)) and guidance == 1):
            return x0
        x0_neg = self._x0(x_s, s, neg_cond)
        g = _bcast(guidance, x_s.shape[0]).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return x0_neg + g * (x0 - x0_neg)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """v = n - x0 = (x_s - x0_hat) / s."""
        sb = _bcast(s, x_s.shape[0]).to(x_s.device).reshape(-1, *([1] * (x_s.ndim - 1)))
        return (x_s - self._x0(x_s, s, cond)) / sb.clamp_min(1e-4)

    # ---- fake adapter ----
    def add_fake_adapter(self, rank: int | None = None, alpha: float | None = None, target_modules=None,
                         floor: float = 1e-4) -> None:
        """Add the learnable Gaussian fake score (initialised at the teacher). It is always full rank, so the
        LoRA arguments (rank, alpha, target_modules) are accepted for the common interface and not used;
        `floor` keeps its variances positive in log space."""
        m = self.model
        m.fake = _FakeGaussian(m.mean, m.evals, m.evecs, floor).to(m.mean.device)

    def fake_parameters(self) -> list[nn.Parameter]:
        if self.model.fake is None:
            raise ValueError("No fake adapter: call add_fake_adapter() first.")
        return list(self.model.fake.parameters())

    @contextlib.contextmanager
    def fake(self) -> Iterator[None]:
        """Predictions inside come from the fake score; outside, from the real (exact) teacher."""
        if self.model.fake is None:
            raise ValueError("No fake adapter: call add_fake_adapter() before using teacher.fake().")
        prev, self._fake_on = self._fake_on, True
        try:
            yield
        finally:
            self._fake_on = prev

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to recompute: the denoiser is a closed-form expression."""

    def to(self, device=None, dtype=None) -> "ClosedFormTeacher":
        self.model.to(device=device)  # stays float32: the exact math is the point of this teacher
        return self
