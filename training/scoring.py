"""Teacher scores for generated latents: how plausible a latent looks to a frozen diffusion teacher, and how
much the prompt helps the teacher explain it. Used to re-rank one-step samples (best-of-N).

For each noise level sigma and each fixed seed the clean latent x0 is noised, the teacher predicts x0 back
with the positive and with the negative conditioning, and per sample:

    denoise_error  = mean over levels and seeds of  mse(x0_pos, x0)                 (lower = more plausible)
    text_alignment = mean over levels and seeds of  (e_neg - e_pos) / e_neg         (higher = better aligned)

with e_pos / e_neg the errors of the positive / negative predictions. The noise for a seed is one tensor
shared by every sample of the batch (common random numbers), so differences between samples come from
the samples, not from the luck of their noise.

The math takes the teacher as a callable `denoise(x_noisy, sigma[B], which) -> x0` with which in
("positive", "negative") and a noising function, so it runs on any teacher: ComfyUI's sampling machinery,
a diffusers model, or a closed-form test denoiser. Pure torch; nothing here knows ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
AddNoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

RANK_BY = ("combined", "denoise_error", "text_alignment")
DEFAULT_LEVELS = "0.3, 0.5, 0.7"


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow (SD3/Flux): x_s = (1 - s) x0 + s n, with s = sigma per sample (the teachers' formula)."""
    from .teachers import add_noise

    return add_noise(x0, noise, sigma)


def parse_levels(text: str) -> list[float]:
    """'0.3, 0.5, 0.7' -> [0.3, 0.5, 0.7]: noise levels as fractions of the schedule (0 clean, 1 pure noise)."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"No noise levels given ({text!r}). Give comma-separated numbers in (0, 1), e.g. "
                         f"'{DEFAULT_LEVELS}'.")
    levels = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"Noise level {p!r} is not a number. Give comma-separated numbers in (0, 1), e.g. "
                             f"'{DEFAULT_LEVELS}'.") from None
        if not (0.0 < v < 1.0) or not math.isfinite(v):
            raise ValueError(f"Noise level {v} is outside (0, 1): 0 would be a clean latent and 1 pure noise, "
                             "neither tells anything. Use values such as 0.3, 0.5, 0.7.")
        levels.append(v)
    return levels


def seed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Noise [1, *shape] for one seed: CPU generator, so the same seed gives the same noise everywhere."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=g, dtype=torch.float32)


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


@dataclass
class TeacherScores:
    denoise_error: torch.Tensor  # [B]
    text_alignment: torch.Tensor  # [B]
    error_per_level: torch.Tensor  # [L, B] (averaged over seeds)
    alignment_per_level: torch.Tensor  # [L, B]
    levels: tuple[float, ...]  # as the caller named them (e.g. schedule fractions)
    sigmas: tuple[float, ...]  # what the teacher was run at
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.denoise_error.shape[0])

    def key(self, by: str = "combined") -> torch.Tensor:
        """Per-sample sort key, lower = better."""
        if by == "denoise_error":
            return self.denoise_error.clone()
        if by == "text_alignment":
            return -self.text_alignment
        if by == "combined":
            # Average rank of the two scores: both count equally whatever their scales.
            return (_ranks(self.denoise_error) + _ranks(-self.text_alignment)) / 2
        raise ValueError(f"Unknown ranking {by!r}; choose one of {', '.join(RANK_BY)}.")

    def order(self, by: str = "combined") -> list[int]:
        """Sample indices, best first (ties keep batch order)."""
        return torch.sort(self.key(by), stable=True).indices.tolist()

    def select(self, count: int, by: str = "combined") -> list[int]:
        """Indices of the `count` best samples, best first (all of them if count >= batch size)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer; got {count!r}.")
        return self.order(by)[:count]

    def format(self, by: str = "combined") -> str:
        """A small table for display: one row per sample, with its rank."""
        rank = [0] * len(self)
        for r, i in enumerate(self.order(by)):
            rank[i] = r + 1
        head = (f"Teacher scores: noise levels {', '.join(f'{v:g}' for v in self.levels)}; "
                f"sigmas {', '.join(f'{v:g}' for v in self.sigmas)}; "
                f"seeds {', '.join(str(s) for s in self.seeds)}; rank by {by}\n"
                f"{'sample':>6}  {'denoise_error':>13}  {'text_alignment':>14}  {'rank':>4}")
        rows = [f"{i:>6}  {self.denoise_error[i].item():>13.6g}  {self.text_alignment[i].item():>+14.6g}  {rank[i]:>4}"
                for i in range(len(self))]
        return "\n".join([head, *rows])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of each entry (ascending), ties broken by position."""
    order = torch.sort(values, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks.float()


@torch.no_grad()
def teacher_scores(x0: torch.Tensor, denoise: DenoiseFn, sigmas: Sequence[float], seeds: Sequence[int],
                   add_noise: AddNoiseFn = flow_add_noise, levels: Sequence[float] | None = None,
                   callback: Callable[[int, int], None] | None = None) -> TeacherScores:
    """Score a batch of clean latents x0 [B,...] (in the space `denoise` works in).

    sigmas: the noise levels the teacher is run at; levels: how to report them (defaults to sigmas);
    callback(done, total) after every teacher evaluation pair (progress and cancel)."""
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] < 1:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"Expected a batch of latents [B,C,...]; got {shape}.")
    sigmas = [float(s) for s in sigmas]
    seeds = [int(s) for s in seeds]
    if not sigmas or not seeds:
        raise ValueError("Scoring needs at least one noise level and one seed.")
    levels = list(sigmas if levels is None else levels)
    if len(levels) != len(sigmas):
        raise ValueError(f"{len(levels)} level labels for {len(sigmas)} noise levels.")
    B = x0.shape[0]
    noises = [seed_noise(x0.shape[1:], s).to(device=x0.device, dtype=x0.dtype) for s in seeds]
    err = torch.zeros(len(sigmas), B)
    align = torch.zeros(len(sigmas), B)
    total, done = len(sigmas) * len(seeds), 0
    for li, sigma in enumerate(sigmas):
        sig = torch.full((B,), sigma, device=x0.device, dtype=torch.float32)
        for noise in noises:
            x = add_noise(x0, noise.expand_as(x0), sig)
            e_pos = _per_sample_mse(denoise(x, sig, "positive"), x0).cpu()
            e_neg = _per_sample_mse(denoise(x, sig, "negative"), x0).cpu()
            err[li] += e_pos / len(seeds)
            align[li] += (e_neg - e_pos) / e_neg.clamp_min(1e-12) / len(seeds)
            done += 1
            if callback is not None:
                callback(done, total)
    return TeacherScores(denoise_error=err.mean(0), text_alignment=align.mean(0), error_per_level=err,
                         alignment_per_level=align, levels=tuple(levels), sigmas=tuple(sigmas), seeds=tuple(seeds))
