"""Offline loading of SD1.5 (student) and SD3.5 / Flux (teacher) components from local files.

Sources, as users keep them:
- a diffusers folder (model_index.json + component subfolders): its own configs and tokenizers are used;
- single files from ComfyUI's models folders: `checkpoints/` (all-in-one), `diffusion_models/` or `unet/`
  (UNet / transformer only), `vae/`, `text_encoders/` or `clip/` (clip_l, clip_g, t5xxl in transformers
  layout). Diffusion models and VAEs go through diffusers' `from_single_file` with a LOCAL config (the ones
  shipped in `training/models/configs/`), text encoders are built from the shipped config and filled strictly.

Nothing is ever fetched: everything works with HF_HUB_OFFLINE=1. Pickle files are refused, never unpickled.
Tokenizers come from the diffusers folder, an explicit path, or a ComfyUI checkout's bundled tokenizer folders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .._bridge import files
from .families import TEACHER_FAMILIES

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILY_ALIASES = {"sd3": "sd35_medium", "sd35": "sd35_medium", "flux": "flux_dev"}
SD15_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Where all-in-one checkpoints keep their text encoders (SD1.5; SD3/SD3.5/Flux as ComfyUI saves them).
TEXT_PREFIXES = {
    "clip_l": ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer."),
    "clip_g": ("text_encoders.clip_g.transformer.",),
    "t5": ("text_encoders.t5xxl.transformer.",),
}
# Pipeline subfolders per family, and which text encoder each holds.
FAMILY_TEXT = {
    "sd35": {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
             "t5": ("text_encoder_3", "tokenizer_3")},
    "flux": {"clip_l": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")},
}
PIPELINES = {"sd15": ("StableDiffusionPipeline",), "sd35": ("StableDiffusion3Pipeline",), "flux": ("FluxPipeline",)}
KIND_NAMES = {
    "sd15_checkpoint": "an SD1.5 all-in-one checkpoint", "sd15_unet": "an SD1.5 UNet",
    "sd2_checkpoint": "an SD2.x checkpoint", "sd2_unet": "an SD2.x UNet",
    "sdxl_checkpoint": "an SDXL checkpoint", "sdxl_unet": "an SDXL UNet",
    "sd3_checkpoint": "an SD3/SD3.5 all-in-one checkpoint", "sd3_transformer": "an SD3/SD3.5 transformer",
    "flux_checkpoint": "a Flux all-in-one checkpoint", "flux_transformer": "a Flux transformer",
    "vae_4ch": "a 4-channel VAE (SD1.5/SDXL)", "vae_16ch": "a 16-channel VAE (SD3/Flux)",
    "clip_l": "a CLIP-L text encoder", "clip_g": "a CLIP-G text encoder", "clip": "a CLIP text encoder",
    "t5": "a T5 text encoder", "unknown": "not a model file this project knows",
}


class ModelLoadError(ValueError):
    """A model file or folder cannot be used: the message names the problem and the fix."""


@dataclass
class SD15Models:
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None


@dataclass
class TeacherModels:
    family: str
    transformer: Any = None
    vae: Any = None
    text_encoders: dict = field(default_factory=dict)  # "clip_l" / "clip_g" / "t5" -> model
    tokenizers: dict = field(default_factory=dict)  # same keys -> tokenizer


# ---------------------------------------------------------------------------------------------- small helpers

def config_dir(family: str) -> str:
    """The shipped diffusers-format config folder of a family ("sd15" or a teacher family)."""
    family = "sd15" if family == "sd15" else canonical_family(family)
    return os.path.join(CONFIG_ROOT, family)


def canonical_family(family: str) -> str:
    name = FAMILY_ALIASES.get(family, family)
    if name not in TEACHER_FAMILIES:
        raise ModelLoadError(f"Unknown teacher family {family!r}; choose one of {', '.join(TEACHER_FAMILIES)}.")
    return name


def _group(family: str) -> str:
    return "flux" if family.startswith("flux") else "sd35"


def _torch_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use one of {', '.join(names)} or a torch.dtype.")
    return names[dtype]


def _check_path(path, what: str) -> str:
    if path is None:
        raise ModelLoadError(f"No {what} given.")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{what} not found: {path!r}. Check the path (ComfyUI keeps models under "
                             f"models/checkpoints, diffusion_models, unet, vae, text_encoders, clip).")
    if os.path.isdir(path):
        return path
    return files.check_safetensors_file(path, ModelLoadError, what=what)


class _Header:
    """Keys and shapes of a safetensors file, read from its header only (cheap, no tensor data)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        files.check_safetensors_file(path, ModelLoadError, what="Model file")
        try:
            with safe_open(path, framework="pt") as f:
                self.keys = list(f.keys())
                self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in self.keys}
                self.dtypes = {k: f.get_slice(k).get_dtype() for k in self.keys}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(f"{os.path.basename(path)!r} is not a readable safetensors file (truncated or "
                                 f"corrupt? re-download it): {e}") from e

    def shape(self, key):
        return self._shapes.get(key)

    def find(self, suffix: str, prefix: str = ""):
        """The first key that starts with `prefix` and ends with `suffix`."""
        return next((k for k in self.keys if k.startswith(prefix) and k.endswith(suffix)), None)

    def has(self, fragment: str, prefix: str = "") -> bool:
        return any(k.startswith(prefix) and fragment in k for k in self.keys)


def _read(path: str, keep=lambda k: True, rename=lambda k: k) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {rename(k): f.get_tensor(k) for k in f.keys() if keep(k)}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise ModelLoadError(f"Reading {os.path.basename(path)!r} failed (truncated or corrupt file?): {e}") from e


# ------------------------------------------------------------------------------------------- kind detection

def _diffusion_kind(h: _Header, prefix: str) -> str | None:
    """UNet / transformer family of the diffusion model stored under `prefix`, or None."""
    if h.has("double_blocks.", prefix) or h.has("single_transformer_blocks.", prefix):
        return "flux"
    if h.has("joint_blocks.", prefix) or (h.has("transformer_blocks.", prefix) and h.has("context_embedder.", prefix)
                                          and not h.has("down_blocks.", prefix)):
        return "sd3"
    if h.has("input_blocks.", prefix) or h.has("time_embedding.linear_1.", prefix):
        if h.has("label_emb.", prefix) or h.has("add_embedding.", prefix):
            return "sdxl"
        k = h.find("attn2.to_k.weight", prefix)
        return "sd2" if k and h.shape(k)[-1] == 1024 else "sd15"
    return None


def _vae_channels(h: _Header, prefix: str) -> int | None:
    k = prefix + "decoder.conv_in.weight"
    return h.shape(k)[1] if h.shape(k) else None


def _text_kind(h: _Header) -> str | None:
    if h.find("encoder.block.0.layer.0.SelfAttention.q.weight"):
        return "t5"
    k = h.find("embeddings.token_embedding.weight")
    if k:
        return {768: "clip_l", 1280: "clip_g"}.get(h.shape(k)[1], "clip")
    return None


def _kind_of(h: _Header) -> str:
    vae_prefix = next((p for p in VAE_PREFIXES if h.has("decoder.conv_in.weight", p)), None)
    dm = _diffusion_kind(h, UNET_PREFIX)
    if dm and vae_prefix:
        return f"{dm}_checkpoint"
    dm = dm or _diffusion_kind(h, "")
    if dm:
        return f"{dm}_{'transformer' if dm in ('sd3', 'flux') else 'unet'}"
    if vae_prefix is not None or h.shape("decoder.conv_in.weight"):
        return f"vae_{_vae_channels(h, vae_prefix or '')}ch"
    return _text_kind(h) or "unknown"


def detect_file_kind(path) -> str:
    """What a single .safetensors file holds, from the key names and shapes in its header.

    One of: sd15_checkpoint, sd15_unet, sd2_checkpoint, sd2_unet, sdxl_checkpoint, sdxl_unet, sd3_checkpoint,
    sd3_transformer, flux_checkpoint, flux_transformer, vae_4ch, vae_16ch (other channel counts: vae_<n>ch),
    clip_l, clip_g, clip (other width), t5, unknown. Folders: sd15_folder, sd35_folder, flux_folder."""
    path = _check_path(path, "Model file")
    if os.path.isdir(path):
        return _folder_group(path) + "_folder"
    return _kind_of(_Header(path))


def _variant(h: _Header, prefix: str) -> str | None:
    """sd35_large / sd35_medium / sd3_medium / flux_dev / flux_schnell when the file says so, else None
    (tiny test models are too small to tell the SD3 variants apart)."""
    if _diffusion_kind(h, prefix) == "flux":
        guided = h.has("guidance_in.", prefix) or h.has("guidance_embedder.", prefix)
        return "flux_dev" if guided else "flux_schnell"
    k = prefix + "context_embedder.weight"
    width = h.shape(k)[0] if h.shape(k) else None
    if width == 2432:
        return "sd35_large"
    if width == 1536:
        return "sd35_medium" if (h.has("x_block.attn2.", prefix) or h.has(".attn2.to_q.", prefix)) else "sd3_medium"
    return None


def _variant_from_config(cfg: dict) -> str | None:
    if cfg.get("_class_name") == "FluxTransformer2DModel":
        return "flux_dev" if cfg.get("guidance_embeds") else "flux_schnell"
    width = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    if width == 2432:
        return "sd35_large"
    if width == 1536:
        return "sd35_medium" if cfg.get("dual_attention_layers") else "sd3_medium"
    return None


def _check_variant(found: str | None, family: str, where: str):
    names = {"sd35_large": "an SD3.5 Large transformer", "sd35_medium": "an SD3.5 Medium transformer",
             "sd3_medium": "an SD3 Medium transformer (not 3.5: no dual attention, no q/k norm)",
             "flux_dev": "a Flux dev transformer (guidance embedding)",
             "flux_schnell": "a Flux schnell transformer (no guidance embedding)"}
    if found is not None and found != family:
        hint = f"--teacher-family {found}" if found in TEACHER_FAMILIES else "an SD3.5 Medium or Large model"
        raise ModelLoadError(f"{where} is {names[found]}, but teacher family {family} was given; use {hint}.")


# ------------------------------------------------------------------------ teacher memory: fp8 storage, offload

FP8 = torch.float8_e4m3fn
TEACHER_STORAGE = ("auto", "bf16", "fp8")
_FP8_NAMES = ("F8_E4M3",)  # safetensors' name of float8_e4m3fn


def _is_fp8_header(h: _Header, prefix: str = "") -> bool:
    """Whether the diffusion model under `prefix` is stored in e4m3fn (ComfyUI's flux1-dev-fp8, sd3.5 fp8 files)."""
    return any(k.startswith(prefix) and d in _FP8_NAMES for k, d in h.dtypes.items())


def teacher_file_is_fp8(path) -> bool:
    """An fp8 (e4m3fn) teacher: a transformer / all-in-one file, or a diffusers folder whose transformer/ is one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        sub = os.path.join(path, "transformer")
        names = sorted(n for n in os.listdir(sub) if n.endswith(".safetensors")) if os.path.isdir(sub) else []
        return any(_is_fp8_header(_Header(os.path.join(sub, n))) for n in names)
    h = _Header(path)
    return _is_fp8_header(h, UNET_PREFIX if h.has("", UNET_PREFIX) else "")


def resolve_teacher_storage(storage: str, path) -> str:
    """"fp8" or "bf16" (= the weights dtype, --dtype) for `--teacher-storage` (auto: fp8 exactly when the file is)."""
    if storage not in TEACHER_STORAGE:
        raise ModelLoadError(f"Unknown teacher storage {storage!r} (--teacher-storage); choose one of "
                             f"{', '.join(TEACHER_STORAGE)}.")
    if storage == "auto":
        return "fp8" if path is not None and teacher_file_is_fp8(path) else "bf16"
    return storage


def _has_cast_hook(module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


def store_fp8(model, compute_dtype: torch.dtype):
    """Keep a frozen diffusers model's weights in float8_e4m3fn and compute each layer in `compute_dtype` (diffusers'
    layerwise casting hooks). Layers diffusers leaves uncast by default (norms, embedders, its skip patterns) are
    computed in `compute_dtype`, except linear layers that are fp8 already (an fp8 file): those stay fp8 too, as
    upcasting them would add memory and no precision. Returns the model."""
    from diffusers.hooks import apply_layerwise_casting_hook

    model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if _has_cast_hook(module):
            continue
        own = [t for _, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
               if t.is_floating_point()]
        if any(t.dtype == FP8 for t in own) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            apply_layerwise_casting_hook(module, FP8, compute_dtype, non_blocking=False)
        elif not any(k in name for k in keep_fp32):
            for t in own:
                if t.dtype != compute_dtype:
                    t.data = t.data.to(compute_dtype)
    return model


def offload_blocks(model, device, cpu_too: bool = False) -> bool:
    """Keep a frozen diffusers model on the CPU and bring each layer to `device` only for its forward (diffusers'
    group offloading, CUDA streams prefetching the next layer). False, and nothing done, where `device` is the CPU.

    Leaf level, not block level, because the fake-score LoRA is added later inside the blocks and trains: a block
    group would move the LoRA weights to the CPU after each forward (with streams: back to a stale pinned copy),
    away from their gradients and optimizer state. At leaf level only the layers present now are hooked; the LoRA
    layers peft adds later stay on `device` (Teacher.add_fake_adapter puts them there). Apply it after
    `store_fp8`: the offload hook must wrap the casting hook (it onloads the fp8 weights before they are cast).
    cpu_too: install the hooks even for the CPU (tests: the same code path, with nothing to move)."""
    device = torch.device(device)
    if device.type == "cpu" and not cpu_too:
        return False
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level",
                               use_stream=device.type == "cuda")
    return True


def _fp8_single_file(cls, tensors: dict, path: str, config: str, subfolder: str, compute_dtype, what: str):
    """A diffusers model from a single file whose weights are (partly) e4m3fn, fp8 tensors kept as they are: built on
    the meta device, filled by assignment (diffusers' own key conversion), never upcast; then `store_fp8`."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import (
        SINGLE_FILE_LOADABLE_CLASSES,
        _should_convert_state_dict_to_diffusers,
    )

    if not os.path.isfile(os.path.join(config, subfolder, "config.json")):
        raise ModelLoadError(f"No {subfolder}/config.json in the config folder {config!r}.")
    cfg = cls.load_config(config, subfolder=subfolder, local_files_only=True)
    with init_empty_weights():  # parameters on meta, buffers (e.g. SD3's pos_embed) real
        model = cls.from_config(cfg)
    expected = model.state_dict()
    try:
        if _should_convert_state_dict_to_diffusers(expected, tensors):
            convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
            tensors = convert(checkpoint=tensors, config=cfg)
        sd = {k: v if v.dtype == FP8 or not v.is_floating_point() else v.to(compute_dtype)
              for k, v in tensors.items() if k in expected}
        model.load_state_dict(sd, strict=False, assign=True)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{os.path.basename(path)!r} does not fit the {what} config{_config_name(config)}: "
                             f"{_reason(e)} Is it the right model, and the full-size file?") from e
    _no_meta(model, what, path)
    for b in model.buffers():  # buffers built at init (SD3's pos_embed) follow the compute dtype, as torch_dtype would
        if b.is_floating_point() and b.dtype != compute_dtype:
            b.data = b.data.to(compute_dtype)
    return store_fp8(model.eval(), compute_dtype)


def _wrong_kind(path: str, kind: str, wanted: str) -> ModelLoadError:
    return ModelLoadError(f"{os.path.basename(path)!r} is {KIND_NAMES.get(kind, kind)}, but {wanted} was expected "
                          f"here.")


# ------------------------------------------------------------------------------------------------ folders

def _model_index(folder: str) -> dict | None:
    from ..errors import UserError, read_json_object

    p = os.path.join(folder, "model_index.json")
    if not os.path.isfile(p):
        return None
    try:
        return read_json_object(p, "The diffusers index", "restore the folder's model_index.json (a JSON object "
                                "with _class_name and the components), or give a single .safetensors file")
    except UserError as e:
        raise ModelLoadError(str(e)) from None


def _folder_group(folder: str) -> str:
    index = _model_index(folder)
    if index is None:
        raise ModelLoadError(f"{folder!r} is a folder without model_index.json, so it is not a diffusers pipeline "
                             f"folder; give the pipeline folder or a single .safetensors file.")
    cls = index.get("_class_name", "")
    for group, names in PIPELINES.items():
        if cls in names:
            return group
    raise ModelLoadError(f"{folder!r} holds a {cls or 'unknown'} pipeline; expected one of "
                         f"{', '.join(n for names in PIPELINES.values() for n in names)}.")


def _reason(e: Exception) -> str:
    """A library error's message without its hints for developers (`ignore_mismatched_sizes=True`,
    `low_cpu_mem_usage`, issue links): the fix for a wrong-size file is the right file, not random weights."""
    text = re.sub(r"^Cannot load .*? because ", "", str(e))  # diffusers names the in-memory weights ''
    parts = re.split(r"(?<=\.)\s+|\n+", text)
    return " ".join(p.strip() for p in parts if p.strip() and not any(h in p for h in _DEV_HINTS))


def _config_name(config: str) -> str:
    """' in <folder>' for a user's config folder; the shipped ones are named by what they are, not by their path."""
    shipped = os.path.relpath(os.path.abspath(config), CONFIG_ROOT)
    if shipped.startswith(".."):
        return f" in {config!r}"
    return f" (the pack's training/models/configs/{shipped.replace(os.sep, '/')}: the real model's sizes)"


_DEV_HINTS = ("ignore_mismatched_sizes", "low_cpu_mem_usage", "github.com/")


def check_weights_folder(folder: str) -> None:
    """A diffusers/transformers component folder loads from its safetensors weights only: refuse one whose
    weights are pickles (`*.bin`, `*.pt`, ...; diffusers and transformers would unpickle them) and check every
    safetensors file in it like a single file (no pipes, no pickles in disguise)."""
    names = sorted(os.listdir(folder))
    weights = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.lower().endswith(files.PICKLE_SUFFIXES)]
    if pickles and not weights:
        raise ModelLoadError(
            f"{folder!r} holds its weights as PyTorch pickles ({', '.join(pickles[:3])}), which this project never "
            "loads (unpickling can run arbitrary code). Convert the folder once on a machine where you trust it, "
            "e.g. for a diffusers model: python -c \"from diffusers import AutoModel; "
            f"AutoModel.from_pretrained({folder!r}).save_pretrained({folder!r}, safe_serialization=True)\" "
            "(a text encoder: AutoModel from transformers), then delete the pickle files; or download the "
            "safetensors release.")
    for n in weights:
        files.check_safetensors_file(os.path.join(folder, n), ModelLoadError, what="Model file")


def _from_folder(cls, folder: str, subfolder: str, dtype, device):
    if not os.path.isdir(os.path.join(folder, subfolder)):
        raise ModelLoadError(f"The diffusers folder {folder!r} has no {subfolder}/ subfolder.")
    check_weights_folder(os.path.join(folder, subfolder))
    try:
        # use_safetensors: without it diffusers/transformers fall back to *.bin through torch's unpickler.
        model = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, local_files_only=True,
                                    use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Loading {subfolder}/ from {folder!r} failed: {_reason(e)}") from e
    # Weights missing from the folder's files are left on the "meta" device by diffusers, without an error.
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ModelLoadError(f"The diffusers folder {folder!r} has an incomplete {subfolder}/: {len(missing)} weights are "
                             f"missing from its files (first: {', '.join(missing[:3])}). Restore or re-download "
                             f"{subfolder}/.")
    return model.to(device) if device is not None else model


# ------------------------------------------------------------------------------- diffusers single files

def _no_meta(model, what: str, path: str):
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ModelLoadError(f"{os.path.basename(path)!r} does not hold a complete {what}: {len(missing)} weights are "
                             f"missing (first: {', '.join(missing[:5])}). Is it the right file and model size?")


def _single_file(cls, tensors: dict, path: str, config: str, subfolder: str, dtype, device, what: str):
    if not tensors:
        raise ModelLoadError(f"{os.path.basename(path)!r} holds no {what} weights.")
    if not os.path.isfile(os.path.join(config, subfolder, "config.json")):
        raise ModelLoadError(f"No {subfolder}/config.json in the config folder {config!r}.")
    try:
        model = cls.from_single_file(tensors, config=config, subfolder=subfolder, torch_dtype=dtype,
                                     local_files_only=True)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{os.path.basename(path)!r} does not fit the {what} config{_config_name(config)}: "
                             f"{_reason(e)} Is it the right model, and the full-size file?") from e
    _no_meta(model, what, path)
    return model.to(device) if device is not None else model


def _vae_from_file(path: str, h: _Header, config: str, dtype, device, channels: int | None = None):
    from diffusers import AutoencoderKL

    prefix = next((p for p in VAE_PREFIXES if h.has("decoder.conv_in.weight", p)), "")
    found = _vae_channels(h, prefix)
    if found is None:
        raise _wrong_kind(path, _kind_of(h), "a VAE (or a checkpoint that contains one)")
    if channels is not None and found != channels:
        space = "SD1.5" if channels == 4 else "SD3/Flux"
        raise ModelLoadError(f"{os.path.basename(path)!r} holds a {found}-channel VAE, but the {space} VAE has "
                             f"{channels} channels; give the matching VAE file.")
    tensors = _read(path, keep=lambda k: k.startswith(prefix) if prefix else True)
    return _single_file(AutoencoderKL, tensors, path, config, "vae", dtype, device, "VAE")


# ------------------------------------------------------------------------------------------- text encoders

_IGNORED_TEXT_KEYS = ("position_ids", "logit_scale")


def _text_encoder_from_tensors(tensors: dict, path: str, config: str, subfolder: str, dtype, device):
    """Build the transformers model from `config/subfolder` and fill it strictly from `tensors` (any prefix,
    with or without `text_model.`)."""
    import transformers
    from accelerate import init_empty_weights

    cfg_path = os.path.join(config, subfolder)
    try:
        cfg = transformers.AutoConfig.from_pretrained(cfg_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"No usable text-encoder config in {cfg_path!r}: {e}") from e
    arch = (cfg.architectures or ["CLIPTextModel" if cfg.model_type.startswith("clip") else "T5EncoderModel"])[0]
    cls = getattr(transformers, arch)
    with init_empty_weights():  # parameters on the meta device; buffers real
        model = cls(cfg)
    expected = model.state_dict()
    is_t5 = arch.startswith("T5")
    marker = "encoder.final_layer_norm.weight" if is_t5 else "embeddings.token_embedding.weight"
    found = next((k for k in tensors if k.endswith(marker)), None)
    if found is None:
        kind = "T5 encoder" if is_t5 else "CLIP text model"
        raise ModelLoadError(f"{os.path.basename(path)!r} holds no {kind} weights (no *{marker}); is it the right "
                             f"file? Text encoders are expected in transformers layout.")
    prefix = found[: -len(marker)]
    prefix = prefix.removesuffix("text_model.")  # keep text_projection

    def canon(k):  # the name without `text_model.` (transformers 5.x CLIPTextModel keys have none)
        return k.removeprefix("text_model.")

    index = {canon(k): k for k in expected}
    sd, unexpected = {}, []
    # One tensor at a time, straight to its device and dtype, the source dropped at once: a T5 file is never held
    # twice in host RAM (a file already in `dtype` on the CPU is not copied at all: the weights stay the mapped file).
    for k in list(tensors):
        v = tensors.pop(k)
        if not k.startswith(prefix):
            continue
        name = canon(k[len(prefix):])
        if name in index:
            sd[index[name]] = v.to(device=device, dtype=dtype) if v.is_floating_point() else v
        elif name.endswith(_IGNORED_TEXT_KEYS) or name == "text_projection.weight":
            continue  # constant buffers; a projection that CLIPTextModel (SD1.5, Flux) does not use
        else:
            unexpected.append(k)
    if is_t5:  # the input embedding is stored once, under either name
        for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
            if a in expected and a not in sd and b in sd:
                sd[a] = sd[b]
    # SD3's CLIP-L files (768 -> 768) often lack the projection; diffusers and ComfyUI use the identity then.
    if "text_projection.weight" in expected and "text_projection.weight" not in sd and cfg.hidden_size == 768 \
            and cfg.projection_dim == 768:
        sd["text_projection.weight"] = torch.eye(768, dtype=dtype)
    missing = [k for k in expected if k not in sd and not k.endswith(_IGNORED_TEXT_KEYS)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{os.path.basename(path)!r} does not match the {arch} config{_config_name(cfg_path)}: "
            f"{len(missing)} missing keys (first: {', '.join(missing[:5]) or '-'}), {len(unexpected)} unexpected keys "
            f"(first: {', '.join(unexpected[:5]) or '-'}). Give the right text encoder file (transformers layout).")
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{os.path.basename(path)!r} has weights of the wrong shape for {arch}"
                             f"{_config_name(cfg_path)}: "
                             f"{e}") from e
    if is_t5 and hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.to(dtype=dtype).eval()
    return model.to(device) if device is not None else model


def _text_encoder_from_file(path, kind: str, config: str, subfolder: str, dtype, device):
    path = _check_path(path, f"{kind} text encoder")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a folder; give the {kind} .safetensors file, or the diffusers pipeline "
                             f"folder as folder=...")
    h = _Header(path)
    found = _text_kind(h)
    if found is None:
        raise _wrong_kind(path, _kind_of(h), f"a {kind} text encoder")
    if found != kind and not (found == "clip" and kind.startswith("clip")):
        raise _wrong_kind(path, found, f"a {kind} text encoder")
    prefixes = TEXT_PREFIXES[kind]
    keep = (lambda k: k.startswith(prefixes)) if any(k.startswith(prefixes) for k in h.keys) else (lambda k: True)
    return _text_encoder_from_tensors(_read(path, keep=keep), path, config, subfolder, dtype, device)


# ----------------------------------------------------------------------------------------------- tokenizers

def find_comfyui() -> str | None:
    """The ComfyUI root: env COMFYUI_PATH, else the first ancestor of this file with comfy/sd1_tokenizer
    (the pack lives in ComfyUI/custom_nodes/<pack>/)."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [env] if env else []
    here = os.path.dirname(os.path.abspath(__file__))
    while True:
        candidates.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return next((c for c in candidates if c and os.path.isdir(os.path.join(c, "comfy", "sd1_tokenizer"))), None)


_COMFY_TOKENIZER = {"clip_l": ("comfy", "sd1_tokenizer"), "clip_g": ("comfy", "sd1_tokenizer"),
                    "t5": ("comfy", "text_encoders", "t5_tokenizer")}


def _has_tokenizer_files(path: str, kind: str) -> bool:
    if not os.path.isdir(path):
        return False
    files = set(os.listdir(path))
    if kind == "t5":
        return bool(files & {"tokenizer.json", "spiece.model"})
    return "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files


def _tokenizer_from_dir(path: str, kind: str):
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast

    try:
        if kind == "t5":
            # tokenizer.json is the exact tokenizer (whatever its model); spiece.model needs the T5 class.
            cls = PreTrainedTokenizerFast if os.path.isfile(os.path.join(path, "tokenizer.json")) else T5TokenizerFast
            return cls.from_pretrained(path, local_files_only=True)
        if kind == "clip_g":
            # SD3's CLIP-G pads with "!" (id 0), not with the end token like CLIP-L.
            return CLIPTokenizer.from_pretrained(path, local_files_only=True, pad_token="!")
        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"The tokenizer folder {path!r} could not be read: {e}") from e


def load_tokenizer(kind: str, source=None, folder: str | None = None, subfolder: str | None = None):
    """Tokenizer for "clip_l", "clip_g" or "t5", first found of: the diffusers `folder`'s `subfolder`; `source`
    (a tokenizer object, a dict by kind, or a path: a tokenizer folder, a folder with `<kind>/` or diffusers
    `tokenizer*` subfolders, or a ComfyUI root); a ComfyUI checkout's bundled tokenizers."""
    if folder is not None and subfolder and _has_tokenizer_files(os.path.join(folder, subfolder), kind):
        return _tokenizer_from_dir(os.path.join(folder, subfolder), kind)
    if isinstance(source, dict):
        source = source.get(kind)
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source  # an already built tokenizer
    roots = [os.fspath(source)] if source is not None else []
    if source is not None and not os.path.isdir(roots[0]):
        raise ModelLoadError(f"Tokenizer folder not found: {roots[0]!r}.")
    comfy = find_comfyui()
    if comfy:
        roots.append(comfy)
    for root in roots:
        for sub in ("", kind, subfolder or "", os.path.join(*_COMFY_TOKENIZER[kind])):
            candidate = os.path.join(root, sub) if sub else root
            if _has_tokenizer_files(candidate, kind):
                return _tokenizer_from_dir(candidate, kind)
    raise ModelLoadError(
        f"No {kind} tokenizer found. Give a diffusers folder that has one, a tokenizer folder (--tokenizers / "
        f"tokenizer=...: a folder with the tokenizer files, or with {kind}/ inside), or set COMFYUI_PATH to a "
        f"ComfyUI checkout (its {'/'.join(_COMFY_TOKENIZER[kind])} folder is used).")


# -------------------------------------------------------------------------------------------------- SD1.5

def load_vae(path, family: str = "sd15", dtype=None, device=None, config: str | None = None) -> AutoencoderKL:
    """One VAE (student "sd15" or a teacher family) from a VAE file, an all-in-one checkpoint or a diffusers folder
    (pipeline folder with vae/, or a VAE folder with config.json)."""
    from diffusers import AutoencoderKL

    dtype = _torch_dtype(dtype)
    channels = 4 if family == "sd15" else 16
    path = _check_path(path, "VAE")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            folder, sub = os.path.dirname(path.rstrip(os.sep)), os.path.basename(path.rstrip(os.sep))
        else:
            folder, sub = path, "vae"
        vae = _from_folder(AutoencoderKL, folder, sub, dtype, device)
        if vae.config.latent_channels != channels:
            raise ModelLoadError(f"{path!r} holds a {vae.config.latent_channels}-channel VAE; the {family} VAE has "
                                 f"{channels} channels.")
        return vae
    return _vae_from_file(path, _Header(path), config or config_dir(family), dtype, device, channels)


def load_sd15(path, components=("unet", "vae", "text_encoder", "tokenizer"), dtype=None, device=None,
              tokenizer=None, config: str | None = None) -> SD15Models:
    """SD1.5 components from a diffusers folder or a single file (all-in-one checkpoint; a UNet-only file for
    "unet"; a VAE file for "vae"). `tokenizer`: a tokenizer or a path (see `load_tokenizer`); `config`: a
    folder with unet/, vae/, text_encoder/ configs for single files (default: the shipped SD1.5 configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unknown = set(components) - set(SD15_COMPONENTS)
    if unknown:
        raise ModelLoadError(f"Unknown SD1.5 component(s) {sorted(unknown)}; choose from {', '.join(SD15_COMPONENTS)}.")
    dtype = _torch_dtype(dtype)
    path = _check_path(path, "SD1.5 model")
    out = SD15Models()
    if os.path.isdir(path):
        group = _folder_group(path)
        if group != "sd15":
            raise ModelLoadError(f"{path!r} is a {PIPELINES[group][0]} folder, not an SD1.5 one.")
        from transformers import CLIPTextModel

        if "unet" in components:
            out.unet = _from_folder(UNet2DConditionModel, path, "unet", dtype, device)
        if "vae" in components:
            out.vae = _from_folder(AutoencoderKL, path, "vae", dtype, device)
        if "text_encoder" in components:
            out.text_encoder = _from_folder(CLIPTextModel, path, "text_encoder", dtype, device)
        if "tokenizer" in components:
            out.tokenizer = load_tokenizer("clip_l", tokenizer, folder=path, subfolder="tokenizer")
        if "scheduler" in components:
            out.scheduler = _scheduler(path)
        return out

    config = config or config_dir("sd15")
    h = _Header(path)
    kind = _kind_of(h)
    allowed = {"sd15_checkpoint"} | ({"sd15_unet"} if set(components) <= {"unet", "tokenizer", "scheduler"} else set())
    allowed |= {"vae_4ch"} if set(components) <= {"vae", "tokenizer", "scheduler"} else set()
    if kind not in allowed:
        need = "an SD1.5 all-in-one checkpoint" + (" (or a UNet file)" if components == ("unet",) else "")
        raise _wrong_kind(path, kind, need + f" for {', '.join(components)}")
    if "unet" in components:
        # diffusers' converter reads original-layout UNets under model.diffusion_model. only; diffusers-layout
        # files load as they are.
        if h.has("input_blocks.", UNET_PREFIX):
            tensors = _read(path, keep=lambda k: k.startswith(UNET_PREFIX))
        elif h.has("input_blocks."):
            tensors = _read(path, rename=lambda k: UNET_PREFIX + k)
        else:
            tensors = _read(path, rename=lambda k: k.removeprefix(UNET_PREFIX))
        out.unet = _single_file(UNet2DConditionModel, tensors, path, config, "unet", dtype, device, "SD1.5 UNet")
    if "vae" in components:
        out.vae = _vae_from_file(path, h, config, dtype, device, channels=4)
    if "text_encoder" in components:
        tensors = _read(path, keep=lambda k: k.startswith(TEXT_PREFIXES["clip_l"]))
        if not tensors:
            raise ModelLoadError(f"{os.path.basename(path)!r} has no CLIP-L text encoder (cond_stage_model.*).")
        out.text_encoder = _text_encoder_from_tensors(tensors, path, config, "text_encoder", dtype, device)
    if "tokenizer" in components:
        out.tokenizer = load_tokenizer("clip_l", tokenizer, subfolder="tokenizer")
    if "scheduler" in components:
        out.scheduler = _scheduler(config)
    return out


def _scheduler(folder: str):
    import diffusers

    p = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(p):
        p = os.path.join(config_dir("sd15"), "scheduler", "scheduler_config.json")
    with open(p) as f:
        cfg = json.load(f)
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


# ------------------------------------------------------------------------------------------------ teachers

def load_teacher_models(family: str, transformer=None, vae=None, clip_l=None, clip_g=None, t5=None, folder=None,
                        tokenizers=None, dtype=None, device=None, config: str | None = None,
                        text_encoders: bool = True, storage: str = "bf16", offload: bool = False,
                        parts=("transformer", "vae", "text")) -> TeacherModels:
    """Teacher transformer, VAE, text encoders and tokenizers for `family` (sd35_medium, sd35_large, flux_dev,
    flux_schnell; "sd3" means sd35_medium).

    `folder`: a diffusers pipeline folder (default source of every component). `transformer`: a transformer or
    all-in-one single file (or a diffusers folder, same as folder=). `vae`, `clip_l`, `clip_g`, `t5`: single files
    that override the folder / all-in-one contents. `tokenizers`: see `load_tokenizer`. `config`: a folder of
    component configs for single files (default: the shipped configs of the family). `text_encoders=False`
    skips text encoders and tokenizers (prompt embeddings already cached; `load_teacher_text_encoders` loads them
    alone). `parts`: which of "transformer", "vae", "text" to load (the others stay None / empty), e.g. the VAE and
    text encoders first to encode a data set, the transformer after they are freed.

    Memory (the frozen transformer only): `storage` "fp8" keeps its weights in float8_e4m3fn, computed in `dtype`
    (an e4m3fn file is loaded as it is, never upcast), "bf16" in `dtype` (an fp8 file is upcast), "auto" fp8
    exactly when the file is; `offload` keeps it on the CPU, each layer brought to `device` for its forward (a no-op
    where `device` is the CPU; see `offload_blocks`)."""
    family = canonical_family(family)
    group = _group(family)
    dtype = _torch_dtype(dtype)
    if transformer is not None and os.path.isdir(os.fspath(transformer)):
        folder, transformer = (folder or os.fspath(transformer)), None
    if folder is None and transformer is None:
        raise ModelLoadError(f"The {family} teacher needs its transformer: give a diffusers folder (folder=...) or a "
                             f"transformer / all-in-one .safetensors file (transformer=...).")
    out = TeacherModels(family=family)
    config = config or config_dir(family)
    aio = None  # the all-in-one checkpoint, when the transformer file is one

    if folder is not None:
        folder = _check_path(folder, "Teacher folder")
        found = _folder_group(folder)
        if found != group:
            raise ModelLoadError(f"{folder!r} is a {PIPELINES[found][0]} folder, but teacher family {family} was given.")
    if transformer is not None and _kind_of(_Header(_check_path(transformer, "Teacher transformer"))).endswith(
            "_checkpoint"):
        aio = os.fspath(transformer)
    if "transformer" in parts:
        storage = resolve_teacher_storage(storage, transformer if transformer is not None else folder)
        # fp8 or offload: built on the CPU first (cast, then hooked), moved to `device` afterwards or never.
        t_device = device if storage != "fp8" and not offload else None
        if transformer is not None:
            out.transformer = _transformer_from_file(_check_path(transformer, "Teacher transformer"), family, config,
                                                     dtype, t_device, fp8=storage == "fp8")
        else:
            out.transformer = _transformer_from_folder(folder, family, dtype, t_device)
        if storage == "fp8" and not any(_has_cast_hook(m) for m in out.transformer.modules()):
            store_fp8(out.transformer, dtype)  # a bf16/fp16/fp32 file or folder: cast layer by layer
        if t_device is None and device is not None and not (offload and offload_blocks(out.transformer, device)):
            out.transformer.to(device)

    # VAE: explicit file > folder > the all-in-one checkpoint.
    if "vae" not in parts:
        pass
    elif vae is not None:
        out.vae = load_vae(vae, family, dtype, device, config=config)
    elif folder is not None:
        out.vae = load_vae(folder, family, dtype, device)
    elif aio is not None:
        out.vae = load_vae(aio, family, dtype, device, config=config)
    else:
        raise ModelLoadError(f"The {family} teacher needs its VAE: the transformer file has none, so give vae=... "
                             f"(models/vae/{'ae' if group == 'flux' else 'sd3.5 vae'}.safetensors) or a diffusers "
                             f"folder.")

    if text_encoders and "text" in parts:
        out.text_encoders, out.tokenizers = load_teacher_text_encoders(
            family, transformer=transformer, clip_l=clip_l, clip_g=clip_g, t5=t5, folder=folder,
            tokenizers=tokenizers, dtype=dtype, device=device, config=config)
    return out


def load_teacher_text_encoders(family: str, transformer=None, clip_l=None, clip_g=None, t5=None, folder=None,
                               tokenizers=None, dtype=None, device=None, config: str | None = None):
    """The teacher's text encoders and tokenizers alone ({kind: model}, {kind: tokenizer}), from the same sources as
    `load_teacher_models` (explicit files > the diffusers folder > the all-in-one transformer file), without loading
    the transformer or the VAE: prompts are encoded before the big models are loaded (and the encoders freed)."""
    family = canonical_family(family)
    group = _group(family)
    dtype = _torch_dtype(dtype)
    config = config or config_dir(family)
    if transformer is not None and os.path.isdir(os.fspath(transformer)):
        folder, transformer = (folder or os.fspath(transformer)), None
    if folder is not None:
        folder = _check_path(folder, "Teacher folder")
    aio = None
    if transformer is not None:
        path = _check_path(transformer, "Teacher transformer")
        aio = path if _kind_of(_Header(path)).endswith("_checkpoint") else None
    encoders, toks = {}, {}
    files = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    for kind, (sub, tok_sub) in FAMILY_TEXT[group].items():
        if files[kind] is not None:
            encoders[kind] = _text_encoder_from_file(files[kind], kind, config, sub, dtype, device)
        elif folder is not None:
            encoders[kind] = _text_from_folder(folder, sub, dtype, device)
        elif aio is not None and _Header(aio).has("", TEXT_PREFIXES[kind][-1]):
            tensors = _read(aio, keep=lambda k, p=TEXT_PREFIXES[kind][-1]: k.startswith(p))
            encoders[kind] = _text_encoder_from_tensors(tensors, aio, config, sub, dtype, device)
        else:
            raise ModelLoadError(f"The {family} teacher needs the {kind} text encoder: give {kind}=... (ComfyUI "
                                 f"models/text_encoders/{'t5xxl_fp16' if kind == 't5' else kind}.safetensors) or a "
                                 f"diffusers folder.")
        toks[kind] = load_tokenizer(kind, tokenizers, folder=folder, subfolder=tok_sub)
    return encoders, toks


def _transformer_cls(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return FluxTransformer2DModel if family.startswith("flux") else SD3Transformer2DModel


def _transformer_from_folder(folder: str, family: str, dtype, device):
    p = os.path.join(folder, "transformer", "config.json")
    if os.path.isfile(p):
        with open(p) as f:
            _check_variant(_variant_from_config(json.load(f)), family, f"The transformer in {folder!r}")
    return _from_folder(_transformer_cls(family), folder, "transformer", dtype, device)


def _transformer_from_file(path: str, family: str, config: str, dtype, device, fp8: bool = False):
    if os.path.isdir(path):
        return _transformer_from_folder(path, family, dtype, device)
    h = _Header(path)
    kind = _kind_of(h)
    want = "flux" if family.startswith("flux") else "sd3"
    if not kind.startswith(want + "_"):
        raise ModelLoadError(f"{os.path.basename(path)!r} is {KIND_NAMES.get(kind, kind)}, but teacher family "
                             f"{family} was given (it needs {'a Flux' if want == 'flux' else 'an SD3.5'} transformer "
                             f"or all-in-one checkpoint).")
    prefix = UNET_PREFIX if h.has("", UNET_PREFIX) else ""
    _check_variant(_variant(h, prefix), family, repr(os.path.basename(path)))
    # The converters accept the original keys with or without the prefix; diffusers-layout keys must lose it.
    tensors = _read(path, keep=lambda k: k.startswith(prefix), rename=lambda k: k[len(prefix):])
    if fp8 and _is_fp8_header(h, prefix):  # kept in e4m3fn as stored: never upcast in host RAM
        return _fp8_single_file(_transformer_cls(family), tensors, path, config, "transformer", dtype,
                                f"{family} transformer")
    return _single_file(_transformer_cls(family), tensors, path, config, "transformer", dtype, device,
                        f"{family} transformer")


def _text_from_folder(folder: str, sub: str, dtype, device):
    import transformers

    p = os.path.join(folder, sub, "config.json")
    if not os.path.isfile(p):
        raise ModelLoadError(f"The diffusers folder {folder!r} has no {sub}/ (give the text encoder file instead).")
    with open(p) as f:
        arch = (json.load(f).get("architectures") or ["CLIPTextModel"])[0]
    return _from_folder(getattr(transformers, arch), folder, sub, dtype, device).eval()
