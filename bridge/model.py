"""The Bridge: frozen student VAE decoder + compact projector, student raw latent -> teacher latent.

    tap "image":    z_s raw [B,C_s,h,w] --frozen decoder--> image01 [B,3,8h,8w] --projector--> teacher [B,C_t,k*h,k*w]
    tap "features": z_s raw --frozen decoder, up to the teacher grid--> [B,C_f,k*h,k*w] --projector--> teacher

The decoder is the spatial prior (it already knows how to turn 4 channels into pixels); only the
projector is trained. k = teacher pixels / student pixels (2: SD1.5 at 512 px -> SD3.5/Flux at 1024 px).
The "features" tap (bridge/taps.py) skips the decoder's last, most expensive stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import taps
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


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k not in (1, 2):
        raise ValueError(f"Bridge k (teacher pixels / student pixels) must be 1 or 2; got {k!r}.")
    return k


def projector_config(student_space, teacher_space, k: int = 2, tap: str = "image", student_vae=None,
                     feature_channels: int | None = None, **overrides) -> ProjectorConfig:
    """The projector config a fresh Bridge needs (overrides: width, depth, ...). The 'features' tap sizes the input
    layer for the decoder's channels at the teacher grid: from `student_vae`, or `feature_channels` when there is
    no VAE at hand (e.g. on the meta device)."""
    s, t = get_space(student_space), get_space(teacher_space)
    _check_k(k)
    taps.check_tap(tap)
    if tap == "image":
        return ProjectorConfig(out_channels=t.channels, downsample=s.downscale // k, **overrides)
    if feature_channels is None:
        if student_vae is None:
            raise ValueError("A 'features' Bridge sizes its projector for the student decoder's channels: pass "
                             "student_vae=... (or feature_channels=...).")
        feature_channels = taps.feature_channels(student_vae, k)
    return ProjectorConfig(**{"stem_channels": 0, **overrides, "in_channels": feature_channels,
                              "out_channels": t.channels, "downsample": 1, "input_norm": 1})


class Bridge(nn.Module):
    def __init__(self, projector: Projector, student_space, teacher_space, k: int = 2,
                 student_vae: "AutoencoderKL | None" = None, tap: str = "image"):
        super().__init__()
        self.student_space = get_space(student_space)
        self.teacher_space = get_space(teacher_space)
        self.k = _check_k(k)
        self.tap = taps.check_tap(tap)
        c = projector.config
        want_d = self.student_space.downscale // k if tap == "image" else 1
        problems = []
        if tap == "image" and (c.in_channels != 3 or c.input_norm):
            problems.append(f"projector in_channels is {c.in_channels} (input_norm {c.input_norm}), but it reads "
                            "RGB images (3, input_norm 0)")
        if tap == "features" and not c.input_norm:
            problems.append("projector input_norm is 0, but it reads decoder features (input_norm 1)")
        if c.out_channels != self.teacher_space.channels:
            problems.append(f"projector out_channels is {c.out_channels}, but {display_name(self.teacher_space)} "
                            f"latents have {self.teacher_space.channels} channels")
        if c.downsample != want_d:
            where = (f"{display_name(self.student_space)} ({self.student_space.downscale} px per latent) at k={k}"
                     if tap == "image" else "the 'features' tap (already on the teacher grid)")
            problems.append(f"projector downsample is {c.downsample}, but {where} needs {want_d}")
        if problems:
            raise ValueError("Projector does not fit this Bridge: " + "; ".join(problems) +
                             ". Build it with bridge.model.projector_config(...) or use Bridge.create(...).")
        self.projector = projector
        # Kept here too: a training wrapper (DDP) around `projector` hides its config.
        self.projector_config = c
        if student_vae is not None:
            got = student_vae.config.latent_channels
            if got != self.student_space.channels:
                raise ValueError(f"The student VAE has {got} latent channels, but this Bridge's student space "
                                 f"{display_name(self.student_space)} has {self.student_space.channels}. "
                                 "Pass the VAE of the student model.")
            if tap == "features":
                got = taps.feature_channels(student_vae, k)
                if got != c.in_channels:
                    raise ValueError(f"This 'features' Bridge reads {c.in_channels} decoder channels at the teacher "
                                     f"grid, but this student VAE's decoder has {got} there: it is another decoder "
                                     "architecture. Pass the VAE the Bridge was trained with.")
            # Frozen: gradients pass through the decoder to the latent, never into its weights.
            student_vae.requires_grad_(False)
            student_vae.eval()
        self.student_vae = student_vae

    @classmethod
    def create(cls, student_space="sd15", teacher_space="sd3", k: int = 2, student_vae=None, tap: str = "image",
               **projector_kwargs):
        """A Bridge with a fresh projector sized for the two spaces and the tap (projector_kwargs: width, depth, ...;
        feature_channels for a 'features' Bridge without a VAE)."""
        config = projector_config(student_space, teacher_space, k, tap, student_vae, **projector_kwargs)
        return cls(Projector(config), student_space, teacher_space, k, student_vae=student_vae, tap=tap)

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

    @staticmethod
    def check_output(out: torch.Tensor, x: torch.Tensor, what: str = "student latent") -> torch.Tensor:
        """A finite input gave a non-finite output: refuse it with the likely cause instead of passing NaN on."""
        if not torch.isfinite(out).all():
            raise ValueError(f"The Bridge turned a finite {what} (largest |value| {x.abs().max().item():.3g}) into "
                             "NaN/inf: the input is far outside the range its VAE produces (VAE latents are of order "
                             "1-10, images in [0, 1]). Pass the VAE's own output, not a rescaled or synthetic tensor.")
        return out

    # ---- the mapping ----
    def decode_student(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """Student raw latent [B,C_s,h,w] -> image01 [B,3,8h,8w] through the frozen decoder (straight_through: see
        decode_to_image01; training only)."""
        self.check_student_latent(z_s_raw)
        if self.student_vae is None:
            raise ValueError("This Bridge has no student VAE: pass student_vae=... (e.g. to load_bridge), or decode "
                             "the latent yourself and call project_image.")
        return decode_to_image01(self.student_vae, z_s_raw, straight_through=straight_through)

    def decode_features(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        """Student raw latent -> the decoder's features at the teacher grid [B,C_f,k*h,k*w] (the 'features' tap)."""
        self.check_student_latent(z_s_raw)
        if self.student_vae is None:
            raise ValueError("This Bridge has no student VAE: pass student_vae=... (e.g. to load_bridge), or run the "
                             "partial decode yourself (bridge.taps) and call project_features.")
        return taps.decode_features(self.student_vae, z_s_raw, self.k)

    def _require_tap(self, tap: str, instead: str) -> None:
        if self.tap != tap:
            raise ValueError(f"This Bridge reads the decoder's {'image' if self.tap == 'image' else 'features'} "
                             f"(tap {self.tap!r}), not its {'image' if tap == 'image' else 'features'}: use {instead}, "
                             "or forward() with the student latent.")

    def project_image_model(self, image01: torch.Tensor) -> torch.Tensor:
        """Decoded image [B,3,H,W] in [0,1] -> teacher MODEL-space latent [B,C_t,H/d,W/d] (what losses use).

        The input is the clamped [0,1] image exactly as ComfyUI's VAE.decode returns it, so the ComfyUI node
        (which decodes with ComfyUI's VAE) and the trainer (which decodes with diffusers) feed the projector
        identical inputs."""
        self._require_tap("image", "project_features")
        self.check_image(image01)
        p = next(self.projector.parameters())
        return self.projector(image01.to(p.dtype))

    def project_image(self, image01: torch.Tensor) -> torch.Tensor:
        """Decoded image -> teacher RAW latent (what the teacher VAE decodes, what ComfyUI LATENTs hold)."""
        self.check_image(image01)
        self.check_finite(image01, "image")
        return self.check_output(self.teacher_space.to_raw(self.project_image_model(image01)), image01, "image")

    def project_features_model(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder features at the teacher grid [B,C_f,k*h,k*w] -> teacher MODEL-space latent [B,C_t,k*h,k*w]."""
        self._require_tap("features", "project_image")
        c = self.projector_config.in_channels
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[1] != c:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"This 'features' Bridge reads decoder features [B,{c},H,W]; got {shape}. A different "
                             "channel count means another decoder architecture than the one it was trained behind.")
        p = next(self.projector.parameters())
        return self.projector(features.to(p.dtype))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder features -> teacher RAW latent."""
        return self.teacher_space.to_raw(self.project_features_model(features))

    def forward_model(self, z_s_raw: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """Student raw latent -> teacher MODEL-space latent (straight_through: the decoded image's clamp passes
        gradients, for distillation; the features tap has no clamp)."""
        if self.tap == "features":
            return self.project_features_model(self.decode_features(z_s_raw))
        return self.project_image_model(self.decode_student(z_s_raw, straight_through=straight_through))

    def forward(self, z_s_raw: torch.Tensor) -> torch.Tensor:
        """Student raw latent -> teacher RAW latent [B,C_t,k*h,k*w]."""
        self.check_student_latent(z_s_raw)
        self.check_finite(z_s_raw)
        return self.check_output(self.teacher_space.to_raw(self.forward_model(z_s_raw)), z_s_raw)

    def enable_gradient_checkpointing(self):
        """Recompute decoder and projector activations in backward (much less memory, ~1 extra forward)."""
        self.projector.enable_gradient_checkpointing()
        if self.student_vae is not None:
            # Enables it on the whole VAE; the Bridge only ever runs the decoder with gradients.
            self.student_vae.enable_gradient_checkpointing()
