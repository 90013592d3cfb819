"""Saving the one-step student.

- `save_student_unet` / `load_student_unet`: the trainer's own checkpoint of the student, one safetensors file
  with the UNet weights (EMA and LoRA merged in, diffusers layout) and its config + schedule in the header.
- `export_sd15`: a standard SD1.5 model: the new UNet with the base model's VAE and CLIP-L, as a single file
  in the original (LDM) key layout that ComfyUI's Load Checkpoint and diffusers' `from_single_file` read,
  and/or as a diffusers folder (StableDiffusionPipeline.save_pretrained, with a one-step Euler scheduler).
- `save_student_lora`: a LoRA student as a LoRA file in the kohya layout (`lora_unet_<diffusers module>` with
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`), what ComfyUI's LoraLoader and diffusers' `load_lora_weights`
  both read, to apply the one-step student to any SD1.5 checkpoint (as LCM-LoRA / Hyper-SD are used).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

import torch

from .._bridge import checkpoint as bridge_checkpoint
from .._bridge import files
from ..student import SD15_SCHEDULE, OneStepStudent

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

STUDENT_FORMAT = "csd-student-unet"
STUDENT_FORMAT_VERSION = 1


def _plain_config(unet) -> dict:
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def save_student_unet(path, student: OneStepStudent, summary: dict | None = None, use_ema: bool = True) -> None:
    """Atomic safetensors file: the student's UNet (EMA weights if kept, LoRA fused) + config in the header."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"Student checkpoints are .safetensors files; got {path!r}.")
    # Streamed to the CPU and merged there: saving needs no GPU memory (it must work after running out of it).
    tensors = {k: v.contiguous() for k, v in student.merged_state_dict(use_ema=use_ema).items()}
    metadata = {
        "format": STUDENT_FORMAT,
        "format_version": str(STUDENT_FORMAT_VERSION),
        "unet_config": json.dumps(_plain_config(student.unet), default=list),
        "timestep": str(student.timestep),
        "schedule": json.dumps(student.schedule),
        "space": json.dumps(student.space.to_dict()),
        "training_summary": json.dumps(summary or {}, sort_keys=True, default=str),
    }
    bridge_checkpoint.save_safetensors_atomic(path, tensors, metadata)


def student_lora_state_dict(student: OneStepStudent, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The student's LoRA (EMA weights if kept) in the kohya layout, float32 on the CPU.

    peft's own state dict (`lora_A` / `lora_B`, diffusers module names) converted by diffusers'
    `convert_state_dict_to_kohya`; the `.alpha` entries carry the adapter's real lora_alpha (diffusers writes the
    rank), so loaders scale by alpha / rank exactly as peft did in training."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    if not student.is_lora:
        raise ValueError("This student has no LoRA (it fine-tuned the whole UNet): only students distilled with "
                         "student_lora_rank > 0 (--student-lora-rank) export a LoRA file; use the full checkpoint.")
    config = student.unet.peft_config["default"]
    if config.use_rslora or config.rank_pattern or config.alpha_pattern or config.use_dora:
        raise ValueError("Only plain LoRA adapters (one rank and alpha, no rsLoRA / DoRA) export to the kohya layout.")
    with student.ema_weights() if use_ema else contextlib.nullcontext():
        peft_sd = get_peft_model_state_dict(student.unet)
        peft_sd = {"unet." + k: v.detach().to("cpu", torch.float32).clone() for k, v in peft_sd.items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    alpha = torch.tensor(float(config.lora_alpha))
    return {k: (alpha.clone() if k.endswith(".alpha") else v).contiguous() for k, v in kohya.items()}


def save_student_lora(path, student: OneStepStudent, summary: dict | None = None, use_ema: bool = True) -> str:
    """Atomic .safetensors LoRA file of a LoRA student (see `student_lora_state_dict`); it applies to the SD1.5
    UNet the student started from (and, like any SD1.5 LoRA, to fine-tunes of it)."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"LoRA files are .safetensors files; got {path!r}.")
    tensors = student_lora_state_dict(student, use_ema=use_ema)
    config = student.unet.peft_config["default"]
    metadata = {
        "format": "pt",
        "exported_by": "cross-space-distillation",
        "csd_kind": "one-step student LoRA (SD1.5 UNet)",
        "csd_lora_rank": str(config.r),
        "csd_lora_alpha": str(config.lora_alpha),
        "csd_student_timestep": str(student.timestep),
        "training_summary": json.dumps(summary or {}, sort_keys=True, default=str),
    }
    bridge_checkpoint.save_safetensors_atomic(path, tensors, metadata)
    return path


def read_student_metadata(path) -> dict:
    """The header of a student checkpoint (format checked), without loading weights."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors") or os.path.isdir(path):
        raise ValueError(f"{path!r} is not a student checkpoint (.safetensors file written by distillation).")
    files.check_safetensors_file(path, what="Student checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{os.path.basename(path)!r} is not a readable safetensors file ({e}).") from None
    if meta.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{os.path.basename(path)!r} is not a one-step student checkpoint (no 'format: "
                         f"{STUDENT_FORMAT}' in its header). For an exported SD1.5 checkpoint use load_sd15.")
    if meta.get("format_version") != str(STUDENT_FORMAT_VERSION):
        raise ValueError(f"{os.path.basename(path)!r} has student format version {meta.get('format_version')}; "
                         f"this version reads {STUDENT_FORMAT_VERSION}.")
    return {"unet_config": json.loads(meta["unet_config"]), "timestep": int(meta["timestep"]),
            "schedule": json.loads(meta["schedule"]), "space": json.loads(meta["space"]),
            "training_summary": json.loads(meta.get("training_summary") or "{}")}


def load_student_unet(path, device="cpu", dtype=torch.float32) -> OneStepStudent:
    """Rebuild the OneStepStudent saved by `save_student_unet` (strict: every key, every shape)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    meta = read_student_metadata(path)
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    unet.load_state_dict(load_file(os.fspath(path)), strict=True)
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return OneStepStudent(unet, space=meta["space"], timestep=meta["timestep"], schedule=meta["schedule"])


def one_step_scheduler():
    """DDIM with trailing spacing and alpha(-1) = 1: one inference step runs the UNet at t = 999 on the unit
    noise and returns x0 = (z - sqrt(1 - a) eps) / sqrt(a), exactly the one-step student's computation.
    (Euler would feed the UNet z * sigma / sqrt(sigma^2 + 1) and differ by ~0.2%.)"""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                         prediction_type="epsilon", steps_offset=1)  # offset: unused by "trailing"; SD1.5's value


def export_diffusers(folder, unet: "UNet2DConditionModel", vae, text_encoder, tokenizer) -> str:
    """A StableDiffusionPipeline folder (safetensors) with the student UNet and the base VAE / CLIP-L."""
    from diffusers import StableDiffusionPipeline

    # The pipeline pads prompts to the tokenizer's model_max_length; one from ComfyUI's bundle claims 8192.
    tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=one_step_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return os.fspath(folder)


def export_single_file(path, unet: "UNet2DConditionModel", vae, text_encoder, dtype=torch.float16) -> str:
    """One SD1.5 checkpoint in the original key layout (model.diffusion_model / first_stage_model /
    cond_stage_model), what ComfyUI's Load Checkpoint and `from_single_file` read. Half precision by default,
    like the released SD1.5 files."""
    from . import convert

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"Export to a .safetensors file; got {path!r}.")
    tensors = {}
    tensors.update(convert.sd15_unet_to_original(unet.state_dict()))
    tensors.update(convert.sd15_vae_to_original(vae.state_dict()))
    tensors.update(convert.sd15_clip_to_original(text_encoder.state_dict()))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "exported_by": "cross-space-distillation"}
    bridge_checkpoint.save_safetensors_atomic(path, tensors, metadata)
    return path


def export_sd15(student: OneStepStudent | str, base, single_file: str | None = None, folder: str | None = None,
                dtype=torch.float16) -> dict[str, str]:
    """Export a student (module or student checkpoint file) with the VAE and CLIP-L of `base` (an SD1.5 single
    file or diffusers folder, loaded offline)."""
    from . import loading

    if single_file is None and folder is None:
        raise ValueError("Nothing to export: give single_file=... and/or folder=...")
    if isinstance(student, (str, os.PathLike)):
        student = load_student_unet(student)
    unet = student.merged_unet(device="cpu") if isinstance(student, OneStepStudent) else student
    # The tokenizer is only needed for the diffusers folder (a single file has none, and may have no tokenizer nearby).
    parts = loading.load_sd15(base, components=("vae", "text_encoder") + (("tokenizer",) if folder else ()))
    out = {}
    if single_file is not None:
        out["single_file"] = export_single_file(single_file, unet, parts.vae, parts.text_encoder, dtype=dtype)
    if folder is not None:
        out["folder"] = export_diffusers(folder, unet, parts.vae, parts.text_encoder, parts.tokenizer)
    return out
