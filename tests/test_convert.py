"""diffusers -> original SD1.5 key layout: round trips through diffusers' own single-file loader, and the
key names of the real SD1.5 checkpoint (checked on the real-size models built on the meta device)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from training.models import convert
from training.models.loading import config_dir
from training.models.tiny import tiny_clip_text, tiny_unet, tiny_vae


def sd15_like_unet():
    """SD1.5's block structure (3 CrossAttnDown + Down, 2 layers per block), narrow."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)


def _save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("make", [tiny_unet, sd15_like_unet], ids=["tiny_unet", "sd15_structure"])
def test_unet_round_trip_through_from_single_file(make, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = _perturbed(make())
    unet.save_config(tmp_path / "cfg" / "unet")
    path = _save(convert.sd15_unet_to_original(unet.state_dict()), tmp_path / "unet.safetensors")
    back = UNet2DConditionModel.from_single_file(path, config=str(tmp_path / "cfg"), subfolder="unet",
                                                 local_files_only=True)
    ours, theirs = unet.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 5, 32)
    with torch.no_grad():
        # Equal weights; the outputs may differ in the last bits (different memory layout of the loaded tensors).
        torch.testing.assert_close(back(x, t, text).sample, unet(x, t, text).sample, atol=1e-5, rtol=1e-5)


def test_vae_round_trip_through_from_single_file(tmp_path):
    from diffusers import AutoencoderKL

    vae = _perturbed(tiny_vae(4))
    vae.save_config(tmp_path / "cfg" / "vae")
    tensors = convert.sd15_vae_to_original(vae.state_dict())
    # LDM's attention is 1x1 convolutions: the converted q weight is 4-D.
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    path = _save(tensors, tmp_path / "vae.safetensors")
    back = AutoencoderKL.from_single_file(path, config=str(tmp_path / "cfg"), subfolder="vae", local_files_only=True)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(z).sample, vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_clip_keys_get_the_text_model_level_back():
    clip = tiny_clip_text("L")
    out = convert.sd15_clip_to_original(clip.state_dict())
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in out
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in out
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in out)
    assert len(out) == len([k for k in clip.state_dict() if not k.endswith("position_ids")])


def test_real_sd15_sizes_give_the_original_checkpoint_key_names():
    """The real SD1.5 UNet/VAE (meta device) convert to the key names of the released v1-5 checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    def build(cls, sub):
        with open(os.path.join(config_dir("sd15"), sub, "config.json")) as f:
            cfg = json.load(f)
        with torch.device("meta"):
            return cls.from_config(cfg)

    unet = convert.sd15_unet_to_original(build(UNet2DConditionModel, "unet").state_dict())
    p = "model.diffusion_model."
    for k in ["input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight",
              "input_blocks.11.0.out_layers.3.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
              "middle_block.2.emb_layers.1.bias", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "output_blocks.8.2.conv.bias", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
              "time_embed.2.weight", "out.2.bias"]:
        assert p + k in unet, k
    assert CHECKPOINT_KEY_NAMES["v1"] in unet  # what diffusers looks for to call a file SD1.x
    assert len(unet) == 686  # the UNet tensor count of the released v1-5 checkpoint

    vae = convert.sd15_vae_to_original(build(AutoencoderKL, "vae").state_dict())
    p = "first_stage_model."
    for k in ["encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
              "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
              "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm2.bias", "decoder.mid.block_2.conv1.weight",
              "quant_conv.weight", "post_quant_conv.bias", "decoder.norm_out.weight"]:
        assert p + k in vae, k
    assert p + "decoder.up.0.upsample.conv.weight" not in vae
    assert tuple(vae[p + "decoder.mid.attn_1.k.weight"].shape) == (512, 512, 1, 1)
    assert len(vae) == 248


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="SDXL-like"):
        convert.sd15_unet_to_original({"add_embedding.linear_1.weight": torch.zeros(1),
                                       "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Not a diffusers UNet2DConditionModel"):
        convert.sd15_unet_to_original(tiny_vae(4).state_dict())
    sd = tiny_unet().state_dict()
    sd["extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra_head.weight"):
        convert.sd15_unet_to_original(sd)
    with pytest.raises(ValueError, match="Not a diffusers AutoencoderKL"):
        convert.sd15_vae_to_original(tiny_unet().state_dict())
    with pytest.raises(ValueError, match="Not a CLIP text model"):
        convert.sd15_clip_to_original({"foo.weight": torch.zeros(1)})
