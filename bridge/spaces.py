"""Latent spaces: the numbers that say how a VAE's raw latents relate to what a diffusion model sees.

ComfyUI LATENT tensors and diffusers' ``vae.encode(...).latent_dist`` both hold *raw* VAE latents;
diffusion models see ``(raw - shift) * scale`` ("model space"). Every conversion in this project goes
through one of these two functions so the convention lives in one place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LatentSpace:
    name: str
    channels: int
    downscale: int  # pixels per latent along each side
    scale: float
    shift: float
    native_resolution: int  # pixels along each side the models were trained at

    def __post_init__(self):
        # A space comes from code or from a file's header: refuse numbers that would make every latent NaN/inf
        # (scale 0 divides by zero in to_raw) or ask for absurd tensors.
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name must be a non-empty string, not {self.name!r}")
        for f, high in (("channels", 1024), ("downscale", 64), ("native_resolution", 65536)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
                problems.append(f"{f} must be an integer from 1 to {high}, not {v!r}")
        for f in ("scale", "shift"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{f} must be a finite number, not {v!r}")
        if not problems and self.scale == 0:
            problems.append("scale must not be 0 (raw latents would be divided by it)")
        if problems:
            raise ValueError(f"Invalid latent space {self.name!r}: " + "; ".join(problems) + ".")

    def to_model(self, raw):
        """Raw VAE latent -> the normalised latent a diffusion model sees."""
        return (raw - self.shift) * self.scale

    def to_raw(self, model):
        """Normalised model-space latent -> raw VAE latent (what VAE.decode takes)."""
        return model / self.scale + self.shift

    @property
    def native_latent_size(self) -> int:
        return self.native_resolution // self.downscale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpace":
        try:
            return cls(
                name=str(d["name"]),
                channels=int(d["channels"]),
                downscale=int(d["downscale"]),
                scale=float(d["scale"]),
                shift=float(d["shift"]),
                native_resolution=int(d["native_resolution"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Invalid latent space description {d!r}: {e}") from None


SPACES: dict[str, LatentSpace] = {
    s.name: s
    for s in (
        LatentSpace("sd15", 4, 8, 0.18215, 0.0, 512),
        LatentSpace("sdxl", 4, 8, 0.13025, 0.0, 1024),
        LatentSpace("sd3", 16, 8, 1.5305, 0.0609, 1024),
        LatentSpace("flux", 16, 8, 0.3611, 0.1159, 1024),
    )
}

# The model families' own spaces, as shipped (SPACES also holds what register_space adds at run time): a file that
# names one of these must have its numbers (bridge/checkpoint.py).
BUILT_IN: dict[str, LatentSpace] = dict(SPACES)

# Names people actually type for the same spaces.
_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd35": "sd3", "sd3.5": "sd3", "flux1": "flux", "flux.1": "flux"}


def get_space(space: "str | LatentSpace | dict") -> LatentSpace:
    """Look a space up by name (or pass a LatentSpace / its dict through)."""
    if isinstance(space, LatentSpace):
        return space
    if isinstance(space, dict):
        return LatentSpace.from_dict(space)
    key = _ALIASES.get(str(space).lower(), str(space).lower())
    if key not in SPACES:
        raise ValueError(f"Unknown latent space {space!r}; known spaces: {', '.join(SPACES)}.")
    return SPACES[key]


def register_space(space: LatentSpace) -> LatentSpace:
    """Add a space (e.g. the shapes world's own VAEs). Re-registering identical numbers is a no-op."""
    old = SPACES.get(space.name)
    if old is not None and old != space:
        raise ValueError(f"Latent space {space.name!r} is already registered with different numbers: {old}.")
    SPACES[space.name] = space
    return space
