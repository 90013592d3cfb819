"""diffusers -> original (LDM) key layout for SD1.5: UNet, VAE and CLIP-L text encoder.

This is the inverse of what diffusers' single-file loader does (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` in `diffusers.loaders.single_file_utils`), so a
trained student can be written as one standard SD1.5 checkpoint that ComfyUI's Load Checkpoint and
`from_single_file` both read. The block indices are derived from the state dict itself (number of blocks and
layers per block), the fixed top-level names come from diffusers' own `DIFFUSERS_TO_LDM_MAPPING`, so any
UNet/VAE with SD1.5's block structure converts, the tiny test models included.
"""

from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Inside a ResnetBlock2D: diffusers name -> LDM ResBlock name (inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# Inside the VAE mid-block attention (inverse of update_vae_attentions_ldm_to_diffusers).
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _diffusers_mapping(part: str) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING[part]


def _count(keys, pattern: str) -> int:
    """1 + the largest index matched by `pattern` (one group) among `keys`; 0 when nothing matches."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _rename_first(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _unknown(kind: str, keys: list[str]) -> ValueError:
    return ValueError(f"Cannot convert this {kind} to the SD1.5 single-file layout: {len(keys)} keys have no "
                      f"original-layout name (first: {', '.join(sorted(keys)[:5])}). Only SD1.5-structured "
                      f"diffusers {kind}s convert.")


def _map_keys(sd: dict, fixed: dict, prefix: str, rename, what: str) -> dict:
    """Every key renamed by `fixed` (exact names) or `rename(key, value) -> (new name, value) | None`, under
    `prefix`; the keys neither knows are one error."""
    out, unknown = {}, []
    for key, value in sd.items():
        mapped = (fixed[key], value) if key in fixed else rename(key, value)
        if mapped is None:
            unknown.append(key)
        else:
            out[prefix + mapped[0]] = mapped[1]
    if unknown:
        raise _unknown(what, unknown)
    return out


def sd15_unet_to_original(sd: dict) -> dict:
    """UNet2DConditionModel state dict (diffusers names) -> `model.diffusion_model.*` (LDM names)."""
    keys = list(sd)
    fixed = _diffusers_mapping("unet")["layers"]
    if any(k.startswith(("class_embedding.", "add_embedding.")) for k in keys):
        raise ValueError("This UNet has class/added-condition embeddings (SDXL-like); only SD1.5 UNets convert.")
    layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    if layers == 0:
        raise ValueError("Not a diffusers UNet2DConditionModel state dict (no down_blocks.0.resnets.* keys).")
    n_up = _count(keys, r"up_blocks\.(\d+)\.")
    # Output blocks with attention carry their upsampler at index 2, the others at index 1.
    up_has_attn = {b: any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys) for b in range(n_up)}

    def rename(key, value):
        new = None
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = 1 + b * (layers + 1) + j
            new = (f"input_blocks.{i}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"input_blocks.{i}.1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (layers + 1)}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m.group(1))}.{_rename_first(m.group(2), _UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = b * (layers + 1) + j
            new = (f"output_blocks.{i}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"output_blocks.{i}.1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m.group(1))
            new = f"output_blocks.{b * (layers + 1) + layers}.{2 if up_has_attn[b] else 1}.conv.{m.group(2)}"
        return None if new is None else (new, value)

    return _map_keys(sd, fixed, UNET_PREFIX, rename, "UNet")


def sd15_vae_to_original(sd: dict) -> dict:
    """AutoencoderKL state dict (diffusers names) -> `first_stage_model.*` (LDM names)."""
    keys = list(sd)
    fixed = _diffusers_mapping("vae")
    n_up = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    if n_up == 0:
        raise ValueError("Not a diffusers AutoencoderKL state dict (no decoder.up_blocks.* keys).")

    def rename(key, value):
        new = None
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_rename_first(m.group(3), {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # diffusers counts decoder blocks from the bottleneck up, LDM from the output down.
            new = (f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}."
                   f"{_rename_first(m.group(3), {'conv_shortcut': 'nin_shortcut'})}")
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_rename_first(m.group(3), {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m.group(1)}.mid.attn_1.{_rename_first(m.group(2), _VAE_ATTN)}"
            # LDM's attention uses 1x1 convolutions where diffusers has linear layers.
            if value.ndim == 2:
                value = value[:, :, None, None]
        return None if new is None else (new, value)

    return _map_keys(sd, fixed, VAE_PREFIX, rename, "VAE")


def sd15_clip_to_original(sd: dict) -> dict:
    """CLIPTextModel state dict -> `cond_stage_model.transformer.text_model.*`.

    transformers 5.x dropped the `text_model.` level from CLIPTextModel keys; the original layout keeps it."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a constant buffer, rebuilt by every loader
        name = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_PREFIX + name] = value
    if not any(k.endswith("embeddings.token_embedding.weight") for k in out):
        raise ValueError("Not a CLIP text model state dict (no embeddings.token_embedding.weight).")
    return out
