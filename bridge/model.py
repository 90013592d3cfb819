"""The Bridge: frozen student VAE decoder + compact projector, student raw latent -> teacher latent.

    z_s raw [B,C_s,h,w] --frozen student decoder--> image01 [B,3,8h,8w] --projector--> teacher [B,C_t,k*h,k*w]

The decoder is the spatial prior (it already knows how to turn 4 channels into pixels); only the
projector is trained. k = teacher pixels / student pixels (2: SD1.5 at 512 px -> SD3.5/Flux at 1024 px).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .projector import Projector, ProjectorConfig
from .spaces import LatentSpace, get_space

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

# How error messages name the registered spaces.
_DISPLAY = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "Flux"}


def display_name(space: LatentSpace) -> str:
    return _DISPLAY.get(space.name, space.name)


def decode_to_image01(vae: "AutoencoderKL", z_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """Raw latent -> RGB image in [0,1], NCHW: what ComfyUI's VAE.decode returns (there as NHWC).

    straight_through (training only): the forward value is the same clamped image, but the backward passes
    the gradient of saturated pixels as if there were no clamp (the plain clamp zeroes it)."""
    image = (vae.decode(z_raw.to(vae.dtype)).sample.float() + 1) / 2
    if straight_through:
        return image + (image.clamp(0, 1) - image).detach()
    return image.clamp(0, 1)


def exact_round_trip(z_s_raw: torch.Tensor, student_vae: "AutoencoderKL", teacher_vae: "AutoencoderKL", k: int = 2,
                     upsample: str = "bicubic", straight_through: bool = False) -> torch.Tensor:
    """The exact reference the Bridge approximates: E_t(upsample_k(D_s(z_s))) -> teacher RAW latent.

    Uses the latent distribution's mean (deterministic), like the Bridge targets. straight_through: see
    decode_to_image01 (training only)."""
    image = decode_to_image01(student_vae, z_s_raw, straight_through=straight_through)
    if k != 1:
        image = F.interpolate(image, scale_factor=k, mode=upsample, align_corners=False).clamp(0, 1)
    return teacher_vae.encode((image * 2 - 1).to(teacher_vae.dtype)).latent_dist.mean


class Bridge(nn.Module):
    def __init__(self, projector: Projector, student_space, teacher_space, k: int = 2,
                 student_vae: "AutoencoderKL | None" = None):
        super().__init__()
        self.student_space = get_space(student_space)
        self.teacher_space = get_space(teacher_space)
        if isinstance(k, bool) or not isinstance(k, int) or k not in (1, 2):
            raise ValueError(f"Bridge k (teacher pixels / student pixels) must be 1 or 2; got {k!r}.")
        self.k = k
        c = projector.config
        want_d = self.student_space.downscale // k
        problems = []
        if c.in_channels != 3:
            problems.append(f"projector in_channels is {c.in_channels}, but it reads RGB images (3)")
        if c.out_channels != self.teacher_space.channels:
            problems.append(f"projector out_channels is {c.out_channels}, but {display_name(self.teacher_space)} "
                            f"latents have {self.teacher_space.channels} channels")
        if c.downsample * k != self.student_space.downscale:
            problems.append(f"projector downsample is {c.downsample}, but {display_name(self.student_space)} "
                            f"({self.student_space.downscale} px per latent) at k={k} needs {want_d}")
        if problems:
            raise ValueError("Projector does not fit this Bridge: " + "; ".join(problems) +
                             f". Build it with ProjectorConfig(out_channels={self.teacher_space.channels}, "
                             f"downsample={want_d}) or use Bridge.create(...).")
        self.projector = projector
        # Kept here too: a training wrapper (DDP) around `projector` hides its config.
        self.projector_config = c
        if student_vae is not None:
            got = student_vae.config.latent_channels
            if got != self.student_space.channels:
                raise ValueError(f"The student VAE has {got} latent channels, but this Bridge's student space "
                                 f"{display_name(self.student_space)} has {self.student_space.channels}. "
                                 "Pass the VAE of the student model.")
            # Frozen: gradients pass through the decoder to the latent, never into its weights.
            student_vae.requires_grad_(False)
            student_vae.eval()
        self.student_vae = student_vae

    @classmethod
    def create(cls, student_space="sd15", teacher_space="sd3", k: int = 2, student_vae=None, **projector_kwargs):
        """A Bridge with a fresh projector sized for the two spaces (projector_kwargs: width, depth, ...)."""
        s, t = get_space(student_space), get_space(teacher_space)
        if k not in (1, 2):
            raise ValueError(f"Bridge k (teacher pixels / student pixels) must be 1 or 2; got {k!r}.")
        config = ProjectorConfig(out_channels=t.channels, downsample=s.downscale // k, **projector_kwargs)
        return cls(Projector(config), s, t, k, student_vae=student_vae)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.student_vae is not None:
            self.student_vae.eval()  # frozen, always in inference behaviour
        return self

    # ---- input checks ----
    def check_student_latent(self, z: torch.Tensor) -> None:
        s, t = self.student_space, self.teacher_space
        if not isinstance(z, torch.Tensor) or z.ndim != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"This Bridge expects {display_name(s)} latents [B,{s.channels},h,w]; got {shape}. "
                             "Add a batch dimension or pass LATENT['samples'].")
        got = z.shape[1]
        if got != s.channels:
            hint = ""
            if got == t.channels:
                hint = " — did you pass a teacher latent?"
            elif got == 3:
                hint = " — did you pass an image? Use project_image for images."
            raise ValueError(f"This Bridge expects {display_name(s)} latents ({s.channels} channels); got {got} "
                             f"channels{hint}")
        if z.shape[-2] < 1 or z.shape[-1] < 1:
            raise ValueError(f"Student latent has an empty spatial size {tuple(z.shape[-2:])}.")
        if not z.is_floating_point():
            raise ValueError(f"Student latents must be floating point; got {z.dtype}.")
        if z.shape[0] < 1:
            raise ValueError(f"The student latent batch is empty (shape {tuple(z.shape)}); pass at least one latent.")

    def check_image(self, img: torch.Tensor) -> None:
        d = self.projector_config.downsample
        if not isinstance(img, torch.Tensor) or img.ndim != 4:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"This Bridge expects images [B,3,H,W] in [0,1]; got {shape}.")
        if img.shape[1] != 3:
            if img.shape[-1] == 3:
                raise ValueError(f"This Bridge expects images [B,3,H,W]; got {tuple(img.shape)}, which looks like "
                                 "a ComfyUI IMAGE [B,H,W,3]: use image.movedim(-1, 1).")
            raise ValueError(f"This Bridge expects RGB images with 3 channels; got {img.shape[1]} channels"
                             + (" — did you pass a latent? Use forward() for latents." if img.shape[1] in
                                (self.student_space.channels, self.teacher_space.channels) else "."))
        H, W = img.shape[-2:]
        if H % d or W % d or H < d or W < d:
            raise ValueError(f"Image size {H}x{W} is not usable: this Bridge (k={self.k}) needs sides divisible "
                             f"by {d} (one {display_name(self.teacher_space)} latent per {d}x{d} pixels). "
                             f"Resize or crop to e.g. {max(d, H // d * d)}x{max(d, W // d * d)}.")
        if not img.is_floating_point():
            raise ValueError(f"Images must be floating point in [0,1]; got {img.dtype}. Divide uint8 images by 255.")
        if img.shape[0] < 1:
            raise ValueError(f"The image batch is empty (shape {tuple(img.shape)}); pass at least one image.")

    @staticmethod
    def check_finite(x: torch.Tensor, what: str = "student latent") -> None:
        """NaN/inf in gives NaN out, silently: refuse it with the likely cause. The raw-latent API (forward,
        project_image) checks; the model-space methods training uses do not (its NaN guard skips such steps)."""
        if not torch.isfinite(x).all():
            raise ValueError(f"The {what} holds NaN or inf values, which the Bridge would turn into a NaN latent. "
                             "Whatever produced it diverged: check the sampler settings (steps, CFG), the VAE "
                             "precision (an fp16 VAE can overflow: try fp32 or bf16) or the node that made it.")

    # ---- the mapping ----
    def decode_student(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """Student raw latent [B,C_s,h,w] -> image01 [B,3,8h,8w] through the frozen decoder (straight_through: see
        decode_to_image01; training only)."""
        self.check_student_latent(z_s_raw)
        if self.student_vae is None:
            raise ValueError("This Bridge has no student VAE: pass student_vae=... (e.g. to load_bridge), or decode "
                             "the latent yourself and call project_image.")
        return decode_to_image01(self.student_vae, z_s_raw, straight_through=straight_through)

    def project_image_model(self, image01: torch.Tensor) -> torch.Tensor:
        """Decoded image [B,3,H,W] in [0,1] -> teacher MODEL-space latent [B,C_t,H/d,W/d] (what losses use).

        The input is the clamped [0,1] image exactly as ComfyUI's VAE.decode returns it, so the ComfyUI node
        (which decodes with ComfyUI's VAE) and the trainer (which decodes with diffusers) feed the projector
        identical inputs."""
        self.check_image(image01)
        p = next(self.projector.parameters())
        return self.projector(image01.to(p.dtype))

    def project_image(self, image01: torch.Tensor) -> torch.Tensor:
        """Decoded image -> teacher RAW latent (what the teacher VAE decodes, what ComfyUI LATENTs hold)."""
        self.check_image(image01)
        self.check_finite(image01, "image")
        return self.teacher_space.to_raw(self.project_image_model(image01))

    def forward_model(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """Student raw latent -> teacher MODEL-space latent (straight_through: the decoded image's clamp passes
        gradients, for distillation)."""
        return self.project_image_model(self.decode_student(z_s_raw, straight_through=straight_through))

    def forward(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        """Student raw latent -> teacher RAW latent [B,C_t,k*h,k*w]."""
        self.check_student_latent(z_s_raw)
        self.check_finite(z_s_raw)
        return self.teacher_space.to_raw(self.forward_model(z_s_raw))

    def enable_gradient_checkpointing(self):
        """Recompute decoder and projector activations in backward (much less memory, ~1 extra forward)."""
        self.projector.enable_gradient_checkpointing()
        if self.student_vae is not None:
            # Enables it on the whole VAE; the Bridge only ever runs the decoder with gradients.
            self.student_vae.enable_gradient_checkpointing()
