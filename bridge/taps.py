"""Where the Bridge's projector reads the frozen student decoder (its "tap").

    image     the full decode: image01 [B,3,8h,8w], the paper's design
    features  the decoder run only up to the last stage whose output lies on the teacher's latent grid
              (k*h x k*w): for SD1.5 and k = 2 the output of up block 1's resnets, 512 ch at 2h x 2w; for k = 1
              that of up block 0's resnets, 512 ch at h x w. The stages after it (most of the decoder's FLOPs
              and activation memory at 512 px) are skipped.

Two decoder layouts run the same partial decode: diffusers' AutoencoderKL (`decoder.up_blocks`, lowest
resolution first, each with `resnets` and optional `upsamplers`) and the original LDM layout ComfyUI uses
(`decoder.up[i]` built in reverse, highest resolution first, each with `block`, `attn` and optional
`upsample`). Nothing here imports ComfyUI: the ComfyUI node passes its VAE's `first_stage_model` in.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

TAPS = ("image", "features")


def check_tap(tap) -> str:
    if tap not in TAPS:
        raise ValueError(f"Bridge tap must be one of {', '.join(TAPS)}; got {tap!r}. 'image' reads the fully decoded "
                         "image, 'features' the decoder's features at the teacher's latent grid.")
    return tap


def _layout_error(what: str) -> ValueError:
    return ValueError(f"The Bridge's 'features' tap needs an AutoencoderKL-family decoder (diffusers up_blocks with "
                      f"resnets/upsamplers, or the original LDM layout); {what}. Use tap 'image' with this VAE.")


# ---------------------------------------------------------------------------------------------- diffusers layout

def _diffusers_plan(decoder, k: int) -> tuple[int, int]:
    """(index of the up block whose resnets end on the teacher grid, their output channels)."""
    blocks = getattr(decoder, "up_blocks", None)
    if blocks is None or getattr(decoder, "mid_block", None) is None:
        raise _layout_error(f"{type(decoder).__name__} has no up_blocks/mid_block")
    scale, found = 1, None
    for i, block in enumerate(blocks):
        if not hasattr(block, "resnets"):
            raise _layout_error(f"up block {i} ({type(block).__name__}) has no resnets")
        if scale == k:
            found = i  # the last block that runs at the teacher grid
        if getattr(block, "upsamplers", None):
            scale *= 2
    if found is None:
        raise _layout_error(f"the decoder never reaches {k}x the latent size")
    return found, blocks[found].resnets[-1].out_channels


def feature_channels(vae, k: int) -> int:
    """Channels of the 'features' tap of a diffusers AutoencoderKL for this k (512 for SD1.5's decoder)."""
    return _diffusers_plan(vae.decoder, k)[1]


def _run(fn, h, checkpointed: bool):
    return checkpoint(fn, h, use_reentrant=False) if checkpointed else fn(h)


def decode_features(vae, z_raw: torch.Tensor, k: int) -> torch.Tensor:
    """Raw latent [B,C,h,w] -> decoder features [B,C_f,k*h,k*w] (diffusers AutoencoderKL, its own dtype).

    The same layers, in the same order, as `vae.decode` up to the tap; gradient checkpointing follows the decoder's
    own setting (`vae.enable_gradient_checkpointing()`), per block as diffusers does it."""
    decoder = vae.decoder
    stop, _ = _diffusers_plan(decoder, k)
    ckpt = bool(getattr(decoder, "gradient_checkpointing", False)) and torch.is_grad_enabled()
    h = z_raw.to(vae.dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        h = vae.post_quant_conv(h)
    h = decoder.conv_in(h)
    h = _run(lambda x: decoder.mid_block(x, None), h, ckpt)
    for block in decoder.up_blocks[:stop]:
        h = _run(lambda x, b=block: b(x, None), h, ckpt)

    def resnets(x):
        for resnet in decoder.up_blocks[stop].resnets:
            x = resnet(x, None)
        return x

    return _run(resnets, h, ckpt)


# ---------------------------------------------------------------------------------------------- LDM layout (ComfyUI)

def _ldm_plan(decoder, k: int) -> tuple[int, int]:
    """(LDM level index whose resnets end on the teacher grid, their output channels). Levels run from
    len(up) - 1 (lowest resolution) down to 0; every level but 0 ends with an upsample."""
    up = getattr(decoder, "up", None)
    if up is None or getattr(decoder, "mid", None) is None:
        raise _layout_error(f"{type(decoder).__name__} has no up/mid (original LDM layout)")
    scale, found = 1, None
    for level in reversed(range(len(up))):
        if scale == k:
            found = level
        if hasattr(up[level], "upsample"):
            scale *= 2
    if found is None:
        raise _layout_error(f"the decoder never reaches {k}x the latent size")
    return found, up[found].block[-1].out_channels


def ldm_feature_channels(first_stage_model, k: int) -> int:
    return _ldm_plan(first_stage_model.decoder, k)[1]


def ldm_decode_features(first_stage_model, z_raw: torch.Tensor, k: int) -> torch.Tensor:
    """The same partial decode on an original-layout autoencoder (ComfyUI's `VAE.first_stage_model`): post_quant_conv
    when it has one, then the decoder's conv_in, mid block and up levels to the tap, as its `Decoder.forward` runs
    them. z_raw must already be on the model's device and in its dtype."""
    decoder = first_stage_model.decoder
    stop, _ = _ldm_plan(decoder, k)
    h = z_raw
    if getattr(first_stage_model, "post_quant_conv", None) is not None:
        h = first_stage_model.post_quant_conv(h)
    h = decoder.conv_in(h)
    h = decoder.mid.block_1(h, None)
    h = decoder.mid.attn_1(h)
    h = decoder.mid.block_2(h, None)
    for level in reversed(range(stop, len(decoder.up))):
        up = decoder.up[level]
        for i, block in enumerate(up.block):
            h = block(h, None)
            if len(up.attn) > 0:
                h = up.attn[i](h)
        if level != stop:
            h = up.upsample(h)
    return h
