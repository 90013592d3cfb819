"""The shapes world's models: configs, builders, and `load_shapes_world` for the shipped weights.

Structurally the real pair, only small:
- student: 64 px, AutoencoderKL with 4 channels and x8 (8x8x4 latents, quant convs like SD1.5's VAE),
  an eps-prediction UNet2DConditionModel with SD1.5's schedule, a 32-wide CLIP text encoder;
- teacher: 128 px, AutoencoderKL with 16 channels and x8 (16x16x16 latents, no quant convs and a shift like
  SD3's VAE), a rectified-flow SD3Transformer2DModel (SD3.5 variant: dual attention, RMS q/k norm), a
  64-wide CLIP text encoder with projection (sequence + pooled, like SD3).
So k = 2 and the Bridge maps 8x8x4 -> 16x16x16, as SD1.5 (64x64x4) -> SD3.5 (128x128x16).

Folder layout written by `python -m training.shapes.pretrain` (every model: config.json + safetensors):
  student_vae/ teacher_vae/ teacher_transformer/ student_unet/ (diffusers save_pretrained),
  student_text_encoder/ teacher_text_encoder/ (transformers save_pretrained), judge/,
  world.json (latent spaces, sampling settings, data settings), report.json (measured numbers, timings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import _bridge
from .judge import Judge, load_judge
from .settings import DEFAULT_WORLD
from .text import build_tokenizer, encode_student, encode_teacher

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

STUDENT_RESOLUTION, TEACHER_RESOLUTION, K = 64, 128, 2
DEFAULT_DIR = DEFAULT_WORLD  # the shipped world (settings.py: the command line knows it without torch)

_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: x8, like the real VAEs
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    # No attention in the mid block: at these sizes it slowed early training measurably (flat-colour images)
    # and it is the one part of the real VAEs that carries no spatial prior.
    mid_block_add_attention=False,
)
STUDENT_VAE = dict(_VAE_COMMON, block_out_channels=(16, 32, 64, 64), latent_channels=4,
                   sample_size=STUDENT_RESOLUTION)
TEACHER_VAE = dict(_VAE_COMMON, block_out_channels=(16, 32, 64, 64), latent_channels=16,
                   sample_size=TEACHER_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False)

# SD3.5-style transformer over 16x16x16 latents (patch 2 -> 64 image tokens); text: 64-wide sequence + pooled.
TEACHER_TRANSFORMER = dict(
    sample_size=TEACHER_RESOLUTION // 8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=64,
    caption_projection_dim=96,  # = heads * head_dim, as in SD3
    pooled_projection_dim=64,
    pos_embed_max_size=TEACHER_RESOLUTION // 8,
    dual_attention_layers=(0, 1),
    qk_norm="rms_norm",
)
# A smaller eps-prediction UNet over 8x8x4 latents; cross-attention reads the student text encoder (32 wide).
STUDENT_UNET = dict(
    sample_size=STUDENT_RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
# SD1.5's schedule and the matching sampler settings.
STUDENT_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        prediction_type="epsilon")


def build_student_vae() -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    return AutoencoderKL(**STUDENT_VAE)


def build_teacher_vae() -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TEACHER_VAE)


def build_teacher_transformer() -> "SD3Transformer2DModel":
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TEACHER_TRANSFORMER)


def build_student_unet() -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**STUDENT_UNET)


@dataclass
class ShapesWorld:
    """Everything of one built shapes world, loaded and frozen (eval mode, no grad)."""

    folder: str
    config: dict  # world.json
    report: dict  # report.json ({} if absent)
    student_space: object  # bridge.spaces.LatentSpace "shapes_student"
    teacher_space: object  # bridge.spaces.LatentSpace "shapes_teacher"
    student_vae: "AutoencoderKL"
    teacher_vae: "AutoencoderKL"
    teacher_transformer: "SD3Transformer2DModel"
    student_unet: "UNet2DConditionModel"
    student_text_encoder: object  # transformers CLIPTextModel
    teacher_text_encoder: object  # transformers CLIPTextModelWithProjection
    tokenizer: object  # transformers PreTrainedTokenizerFast
    judge: Judge
    k: int = K
    _empty: dict = field(default_factory=dict, repr=False)

    # ---- text ----
    def encode_teacher_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B,16,64], pooled [B,64]) for the teacher transformer."""
        return encode_teacher(prompts, self.tokenizer, self.teacher_text_encoder)

    def encode_student_prompts(self, prompts: list[str]) -> torch.Tensor:
        """encoder_hidden_states [B,16,32] for the student UNet."""
        return encode_student(prompts, self.tokenizer, self.student_text_encoder)

    def _empty_prompt(self, who: str):
        if who not in self._empty:
            self._empty[who] = (self.encode_teacher_prompts([""]) if who == "teacher"
                                else self.encode_student_prompts([""]))
        return self._empty[who]

    def sample_teacher_s(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n noise levels s in (0, 1) from the teacher's own training distribution (world.json teacher_training)."""
        from .trainers import shifted_logit_normal

        t = self.config["teacher_training"]
        return shifted_logit_normal(n, t["logit_mean"], t["logit_std"], t.get("shift", 1.0), generator=generator)

    # ---- sampling (MODEL-space latents in and out) ----
    def _noise(self, n, channels, size, generator, noise):
        if noise is not None:
            return noise
        return torch.randn((n, channels, size, size), generator=generator)

    def sample_teacher(self, prompts: list[str], generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, steps: int | None = None, cfg: float | None = None,
                       shift: float | None = None, transformer: "SD3Transformer2DModel | None" = None) -> torch.Tensor:
        """Teacher samples [B,16,16,16] in the teacher's MODEL space (defaults: world.json teacher_sampling).
        transformer: another teacher transformer (e.g. with a fake-score LoRA on) sampled the same way."""
        from .sampling import sample_teacher

        s = self.config["teacher_sampling"]
        embeds, pooled = self.encode_teacher_prompts(prompts)
        neg, neg_pooled = self._empty_prompt("teacher")
        noise = self._noise(len(prompts), 16, TEACHER_RESOLUTION // 8, generator, noise)
        return sample_teacher(transformer if transformer is not None else self.teacher_transformer, embeds, pooled, neg, neg_pooled, noise,
                              steps=steps or s["steps"], cfg=s["cfg"] if cfg is None else cfg,
                              shift=s["shift"] if shift is None else shift)

    def sample_student(self, prompts: list[str], generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, steps: int | None = None,
                       cfg: float | None = None, unet: "UNet2DConditionModel | None" = None) -> torch.Tensor:
        """Student-base samples [B,4,8,8] in the student's MODEL space (DDIM; steps=1, cfg=1: one-step).
        unet: another student UNet (e.g. a distilled one) sampled the same way; default the student base."""
        from .sampling import sample_student

        s = self.config["student_sampling"]
        hidden = self.encode_student_prompts(prompts)
        noise = self._noise(len(prompts), 4, STUDENT_RESOLUTION // 8, generator, noise)
        return sample_student(unet if unet is not None else self.student_unet, hidden, self._empty_prompt("student"), noise,
                              self.config["student_schedule"], steps=steps or s["steps"],
                              cfg=s["cfg"] if cfg is None else cfg)

    # ---- decoding ----
    def decode_teacher(self, model_latents: torch.Tensor) -> torch.Tensor:
        """Teacher MODEL-space latents -> images [B,3,128,128] in [0,1]."""
        from .trainers import decode_latents

        return decode_latents(self.teacher_vae, self.teacher_space.to_raw(model_latents))

    def decode_student(self, model_latents: torch.Tensor) -> torch.Tensor:
        """Student MODEL-space latents -> images [B,3,64,64] in [0,1]."""
        from .trainers import decode_latents

        return decode_latents(self.student_vae, self.student_space.to_raw(model_latents))


COMPONENTS = ("student_vae", "teacher_vae", "teacher_transformer", "student_unet", "student_text_encoder",
              "teacher_text_encoder", "judge")


def save_component(folder: str, name: str, model) -> None:
    """Save one model with its library's save_pretrained (config.json + safetensors) in float16, which keeps
    the shipped world a few MB; loading upcasts to float32. The model is left with the float16-rounded
    weights, so whatever is measured or trained on it next matches what ships."""
    from .judge import save_judge

    path = os.path.join(folder, name)
    if name == "judge":
        save_judge(path, model)  # float32: it is the measuring stick
        return
    model.half().save_pretrained(path, safe_serialization=True)
    model.float()


def _check_folder(folder: str) -> None:
    missing = [n for n in (*COMPONENTS, "world.json") if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"Shapes world folder {folder!r} is incomplete (missing: {', '.join(missing)}). "
            "Rebuild it with `python -m training.shapes.pretrain --out <folder>`."
        )


def load_shapes_world(folder: str = DEFAULT_DIR, device: str | torch.device = "cpu",
                      register: bool = True) -> ShapesWorld:
    """Load a built shapes world (default: the shipped assets/shapes) in float32, frozen.

    register: add its latent spaces to bridge.spaces' registry as "shapes_student" / "shapes_teacher"
    (pass False for a second, differently trained world in the same process)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _check_folder(folder)
    with open(os.path.join(folder, "world.json")) as f:
        config = json.load(f)
    report_path = os.path.join(folder, "report.json")
    report = {}
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    student_space = _bridge.spaces.LatentSpace.from_dict(config["student_space"])
    teacher_space = _bridge.spaces.LatentSpace.from_dict(config["teacher_space"])
    if register:
        for space in (student_space, teacher_space):
            try:
                _bridge.spaces.register_space(space)
            except ValueError as e:
                raise ValueError(f"{e} Load this world with register=False to keep both.") from None

    def frozen(model):
        return model.to(device).eval().requires_grad_(False)

    def load(cls, name):
        return frozen(cls.from_pretrained(os.path.join(folder, name), torch_dtype=torch.float32,
                                          use_safetensors=True))

    return ShapesWorld(
        folder=folder,
        config=config,
        report=report,
        student_space=student_space,
        teacher_space=teacher_space,
        student_vae=load(AutoencoderKL, "student_vae"),
        teacher_vae=load(AutoencoderKL, "teacher_vae"),
        teacher_transformer=load(SD3Transformer2DModel, "teacher_transformer"),
        student_unet=load(UNet2DConditionModel, "student_unet"),
        student_text_encoder=load(CLIPTextModel, "student_text_encoder"),
        teacher_text_encoder=load(CLIPTextModelWithProjection, "teacher_text_encoder"),
        tokenizer=build_tokenizer(),
        judge=frozen(load_judge(os.path.join(folder, "judge"))),
        k=int(config.get("k", K)),
    )
