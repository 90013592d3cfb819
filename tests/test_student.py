import pytest
import torch

from bridge.spaces import get_space
from training.models.tiny import tiny_unet
from training.student import OneStepStudent, alphas_cumprod, eps_to_x0, x0_to_eps


def _student(**kw):
    return OneStepStudent(tiny_unet(**kw))


def _text(b=2):
    return torch.randn(b, 5, 32)


def test_sd15_schedule_numbers():
    a = alphas_cumprod()
    assert a.shape == (1000,)
    assert a[999].item() == pytest.approx(0.0047, abs=1e-4)
    # ComfyUI's sigma_max for SD1.5: the one-step sample starts there.
    assert ((1 - a[999]) / a[999]).sqrt().item() == pytest.approx(14.6146, abs=1e-3)


def test_eps_x0_round_trip_and_matches_ddpm_noising():
    from diffusers import DDPMScheduler

    from training.student import SD15_SCHEDULE

    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.full((3,), 999)
    z_t = DDPMScheduler(**SD15_SCHEDULE).add_noise(x0, eps, t)
    a = alphas_cumprod()[999]
    torch.testing.assert_close(eps_to_x0(z_t, eps, a), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_to_eps(z_t, x0, a), eps, atol=1e-5, rtol=1e-5)


def test_output_is_raw_latent_of_eps_conversion():
    s = _student().eval()
    noise, text = s.make_noise(2, 8), _text()
    with torch.no_grad():
        raw = s(noise, text)
        eps = s.unet(noise, 999, encoder_hidden_states=text).sample
    assert raw.shape == (2, 4, 8, 8) and raw.dtype == torch.float32
    x0 = eps_to_x0(noise, eps, alphas_cumprod()[999])
    # Raw = model space / 0.18215 (SD1.5 has no shift).
    torch.testing.assert_close(raw, x0 / 0.18215, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(get_space("sd15").to_model(raw), x0, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_unet_weight():
    s = _student()
    s(s.make_noise(2, 8), _text()).square().mean().backward()
    params = s.trainable_parameters()
    assert len(params) == len(list(s.unet.parameters()))
    assert all(p.grad is not None for p in params)
    assert s.unet.conv_in.weight.grad.abs().sum() > 0


def test_lora_trains_only_adapter_and_fuses_to_same_output():
    s = _student()
    s.add_lora(rank=4)
    params = s.trainable_parameters()
    assert params and all("lora_" in n for n, p in s.unet.named_parameters() if p.requires_grad)
    assert len(params) == sum(p.requires_grad for p in s.unet.parameters())
    s(s.make_noise(2, 8), _text()).square().mean().backward()
    assert all(p.grad is not None for p in params)
    # peft's "gaussian" init: B = 0, so only B gets a non-zero gradient on the first step.
    assert all(p.grad.abs().sum() > 0 for n, p in s.unet.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in s.unet.named_parameters() if "lora_" not in n)
    # Make the adapter non-trivial, then fuse: a plain UNet with the same one-step output.
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    s.eval()
    noise, text = s.make_noise(2, 8), _text()
    merged = s.merged_unet()
    assert not getattr(merged, "peft_config", None)
    with torch.no_grad():
        torch.testing.assert_close(OneStepStudent(merged)(noise, text), s(noise, text), atol=2e-3, rtol=1e-4)
    assert s.is_lora  # the training copy keeps its adapter


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cross_attention_group_gets_its_own_learning_rate(lora):
    """parameter_groups: the prompt-reading layers (attn2) in a group of their own; one AdamW step with the rest's
    rate at 0 changes exactly the cross-attention weights."""
    s = _student()
    if lora:
        s.add_lora(rank=4)
    trainable = s.trainable_parameters()
    assert s.parameter_groups(1e-5) == [{"params": trainable, "lr": 1e-5}]  # off: one group, as before
    cross, rest = s.parameter_groups(0.0, cross_attention_lr=1e-2)
    assert cross["lr"] == 1e-2 and rest["lr"] == 0.0
    assert len(cross["params"]) + len(rest["params"]) == len(trainable) and cross["params"] and rest["params"]
    names = {id(p): n for n, p in s.unet.named_parameters()}
    assert all(".attn2." in names[id(p)] for p in cross["params"])
    assert not any(".attn2." in names[id(p)] for p in rest["params"])
    before = {n: p.detach().clone() for n, p in s.unet.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([cross, rest], weight_decay=0.0)
    s(s.make_noise(2, 8), _text()).square().mean().backward()
    opt.step()
    moved = {n for n, p in s.unet.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved and all(".attn2." in n for n in moved)


def test_cross_attention_rate_needs_cross_attention_layers():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
                                layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",),
                                up_block_types=("UpBlock2D",), mid_block_type=None, cross_attention_dim=32)
    with pytest.raises(ValueError, match="no trainable cross-attention"):
        OneStepStudent(unet).parameter_groups(1e-5, cross_attention_lr=1e-3)


def test_ema_tracks_and_swaps_weights():
    s = _student()
    s.enable_ema(decay=0.5, warmup=False)
    p = s.unet.conv_in.weight
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    s.ema_step()  # diffusers' EMA decay is 0 on the first step (a copy), then (1 + k) / (10 + k), capped
    with torch.no_grad():
        p.add_(1.0)
    s.ema_step()
    d = 2 / 11
    assert s.ema.cur_decay_value == pytest.approx(d)
    expected = d * (before + 1) + (1 - d) * (before + 2)
    with s.ema_weights():
        torch.testing.assert_close(s.unet.conv_in.weight, expected)
    torch.testing.assert_close(p.detach(), before + 2)  # restored
    # The shadow module saves and restores the EMA in place.
    state = {k: v.clone() for k, v in s.ema_state_module().state_dict().items()}
    s.ema_step()
    s.ema_state_module().load_state_dict(state)
    with s.ema_weights():
        torch.testing.assert_close(s.unet.conv_in.weight, expected)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(1)
    a = _student()
    b = OneStepStudent(tiny_unet())
    b.load_state_dict(a.state_dict())
    b.enable_gradient_checkpointing()
    noise, text = a.make_noise(2, 8), _text()
    a(noise, text).square().mean().backward()
    b(noise, text).square().mean().backward()
    torch.testing.assert_close(a.unet.conv_in.weight.grad, b.unet.conv_in.weight.grad, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="epsilon-prediction"):
        OneStepStudent(_v_unet())
    with pytest.raises(ValueError, match="channels"):
        OneStepStudent(tiny_unet(in_channels=16, out_channels=16))
    s = _student()
    with pytest.raises(ValueError, match=r"\[B,4,h,w\]"):
        s(torch.randn(2, 16, 8, 8), _text())
    with pytest.raises(ValueError, match="B = 2"):
        s(s.make_noise(2, 8), _text(3))
    with pytest.raises(ValueError, match="multiple of 8"):
        s.latent_size(500)
    assert s.latent_size() == 64


def _v_unet():
    u = tiny_unet()
    u.register_to_config(prediction_type="v_prediction")
    return u
