"""Tiny configs of the real model classes, with random init: for tests, demos and CPU benchmarks.

These are the *same* diffusers / transformers classes the real checkpoints load into, only narrow and
shallow. VAEs keep 4 blocks so they downsample by 8 like the real ones (diffusers' own tiny test VAEs
do not). Text models come with offline tokenizers built from a small byte-level vocabulary.
"""

from __future__ import annotations

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

TINY_UNET = dict(
    sample_size=8,
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

# Text widths are chosen so the pieces fit together like the real ones:
# SD3: prompt embeds = [CLIP-L | CLIP-G] hidden states padded to the T5 width, pooled = [L | G] pooled.
# Flux: prompt embeds = T5 hidden states, pooled = CLIP-L pooled.
TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=32, max_position_embeddings=77)
TINY_CLIP_G = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=32, max_position_embeddings=77)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)

TINY_SD3 = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # T5 width
    caption_projection_dim=32,
    pooled_projection_dim=64,  # CLIP-L pooled + CLIP-G pooled
    pos_embed_max_size=32,
)
# SD3.5 (Medium) adds dual attention in the first blocks and RMS q/k norm.
TINY_SD35 = dict(TINY_SD3, dual_attention_layers=(0,), qk_norm="rms_norm")

TINY_FLUX = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,  # T5 width
    pooled_projection_dim=32,  # CLIP-L pooled
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def tiny_vae(latent_channels: int = 4, **overrides):
    from diffusers import AutoencoderKL

    scaling = {4: 0.18215, 16: 1.5305}.get(latent_channels, 1.0)
    cfg = dict(TINY_VAE, latent_channels=latent_channels, scaling_factor=scaling)
    if latent_channels == 16:
        # SD3/Flux VAEs have a shift and no quant convs.
        cfg.update(shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    cfg.update(overrides)
    return AutoencoderKL(**cfg)


def tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**dict(TINY_UNET, **overrides))


def tiny_sd3_transformer(variant: str = "sd35", **overrides):
    from diffusers import SD3Transformer2DModel

    base = {"sd3": TINY_SD3, "sd35": TINY_SD35}[variant]
    return SD3Transformer2DModel(**dict(base, **overrides))


def tiny_flux_transformer(**overrides):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**dict(TINY_FLUX, **overrides))


def _byte_vocab() -> dict[str, int]:
    """CLIP-style byte-level vocabulary without merges: every byte is a token (as is every byte + '</w>')."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def tiny_clip_tokenizer():
    """A real CLIPTokenizer over a byte-level vocabulary (no merges), built in memory."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """A T5TokenizerFast over a character-level vocabulary built in memory (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=128, extra_ids=0)


def tiny_clip_text(kind: str = "L", with_projection: bool | None = None):
    """CLIP-L style (CLIPTextModel) or CLIP-G style (CLIPTextModelWithProjection) tiny text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = TINY_CLIP_L if kind == "L" else TINY_CLIP_G
    vocab_size = len(_byte_vocab())
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1, **base)
    if with_projection is None:
        with_projection = kind != "L"
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def tiny_t5_text():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=3 + 95, **TINY_T5))
