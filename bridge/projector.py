"""The Bridge's trainable part: a compact conv net from what it reads of the frozen student decoder to a
teacher latent.

    image01 [B,3,H,W]  --(full-res 3x3 stem)--> [B,s,H,W]  --PixelUnshuffle(d)--> [B,s*d*d,H/d,W/d]
      --1x1--> width  --depth x residual(GroupNorm, SiLU, 3x3, GroupNorm, SiLU, 3x3)-->  --3x3--> [B,C_t,H/d,W/d]

d = student pixels per latent / k, so the output lands on the teacher's latent grid (SD1.5 at 512 px,
k = 2: d = 4, 128 x 128). Almost all the work happens at the output resolution, which keeps the net
cheap next to the SD1.5 decoder that feeds it. The output is in the teacher's MODEL space (normalised,
about unit variance); the Bridge converts it to raw latents.

The Bridge's 'features' tap (bridge/taps.py) feeds decoder features that already lie on the teacher grid
instead: in_channels = their channels (512 for SD1.5), d = 1, no stem, and input_norm = 1, a GroupNorm on the
input (the decoder's residual stream has no fixed scale; its own next layers normalise it too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


# in_channels: decoder channels for the 'features' tap (SD1.5: 512), 3 for images.
_MAX = {"in_channels": 8192, "out_channels": 1024, "downsample": 64, "width": 8192, "depth": 256,
        "stem_channels": 1024, "norm_groups": 8192, "input_norm": 1}


@dataclass
class ProjectorConfig:
    in_channels: int = 3
    out_channels: int = 16  # teacher latent channels
    downsample: int = 4  # image pixels per output latent = student downscale / k
    width: int = 192
    depth: int = 6  # residual blocks at the output resolution
    stem_channels: int = 16  # full-resolution 3x3 stem before space-to-depth; 0 = plain space-to-depth
    norm_groups: int = 32  # GroupNorm groups (the gcd with `width` is used, so any width works)
    # 1: GroupNorm the input (decoder features of any scale); 0: the input is an image in [0,1], mapped to [-1,1].
    # Missing from version-1 Bridge files, which all read images: the default keeps them as they were.
    input_norm: int = 0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"ProjectorConfig.{f.name} must be an integer; got {v!r}.")
            low = 0 if f.name in ("stem_channels", "depth", "input_norm") else 1
            if v < low:
                raise ValueError(f"ProjectorConfig.{f.name} must be >= {low}; got {v}.")
            if v > _MAX[f.name]:
                # Bounds what a Bridge file's header can ask to be built (far above any sensible projector).
                raise ValueError(f"ProjectorConfig.{f.name} must be <= {_MAX[f.name]}; got {v}.")
        if self.input_norm not in (0, 1):
            raise ValueError(f"ProjectorConfig.input_norm must be 0 or 1; got {self.input_norm}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorConfig":
        if not isinstance(d, dict):
            raise ValueError(f"A projector config must be a dict; got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            # Unknown fields would silently change the architecture: refuse rather than guess.
            raise ValueError(f"Unknown projector config fields {unknown}; known fields: {sorted(known)}. "
                             "The checkpoint may come from a newer version of this pack: update it.")
        return cls(**d)


class _ResBlock(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ProjectorConfig(**overrides)
        elif overrides:
            config = ProjectorConfig(**{**config.to_dict(), **overrides})
        self.config = c = config
        groups = math.gcd(c.norm_groups, c.width)
        self.norm_in = nn.GroupNorm(math.gcd(c.norm_groups, c.in_channels), c.in_channels) if c.input_norm else None
        if c.stem_channels > 0:
            self.stem = nn.Sequential(nn.Conv2d(c.in_channels, c.stem_channels, 3, padding=1), nn.SiLU())
            unshuffled = c.stem_channels * c.downsample**2
        else:
            self.stem = nn.Identity()
            unshuffled = c.in_channels * c.downsample**2
        self.unshuffle = nn.PixelUnshuffle(c.downsample)
        self.proj_in = nn.Conv2d(unshuffled, c.width, 1)
        self.blocks = nn.ModuleList(_ResBlock(c.width, groups) for _ in range(c.depth))
        self.norm_out = nn.GroupNorm(groups, c.width)
        self.act = nn.SiLU()
        self.proj_out = nn.Conv2d(c.width, c.out_channels, 3, padding=1)
        # Small, not zero, init of the last conv: the output starts near 0 (the mean of a model-space
        # latent) while gradients still reach every layer and the input image from the first step.
        with torch.no_grad():
            self.proj_out.weight.mul_(0.1)
            self.proj_out.bias.zero_()
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image01 [B,3,H,W] in [0,1] (or decoder features [B,in_channels,H,W] with input_norm)
        -> teacher model-space latent [B,C_t,H/d,W/d]."""
        d = self.config.downsample
        what = "images" if not self.config.input_norm else "decoder features"
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"Projector expects {what} [B,{self.config.in_channels},H,W]; "
                             f"got shape {tuple(x.shape)}.")
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"Projector needs input sides divisible by {d}; got {x.shape[-2]}x"
                             f"{x.shape[-1]}. Crop or resize the image to a multiple of {d}.")
        if self.norm_in is not None:
            # contiguous: decoder features can come channels-last, and torch 2.13's CPU GroupNorm backward crashes
            # (segfault) on a channels-last input that needs no gradient itself (a frozen decoder fed cached latents).
            x = self.norm_in(x.contiguous())
        else:
            x = x * 2 - 1  # images: the [-1, 1] range VAEs work in
        x = self.proj_in(self.unshuffle(self.stem(x)))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.proj_out(self.act(self.norm_out(x)))

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self):
        self.gradient_checkpointing = False
