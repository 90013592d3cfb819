import pytest
import torch
import torch.nn.functional as F

from bridge.model import Bridge, exact_round_trip
from bridge.projector import Projector, ProjectorConfig
from bridge.spaces import SPACES, LatentSpace
from training.models.tiny import tiny_vae

SMALL = dict(width=32, depth=2)  # keeps the tests fast; the default size is checked separately


@pytest.fixture(scope="module")
def student_vae():
    torch.manual_seed(0)
    return tiny_vae(4)  # x8: 64 px image <-> 8x8 latent


def make(student_vae, k=2, **kw):
    return Bridge.create("sd15", "sd3", k=k, student_vae=student_vae, **{**SMALL, **kw})


@pytest.mark.parametrize("k", [1, 2])
def test_shapes_for_k(student_vae, k):
    bridge = make(student_vae, k=k)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        image = bridge.decode_student(z)
        assert image.shape == (2, 3, 64, 64) and image.min() >= 0 and image.max() <= 1
        assert bridge.project_image(image).shape == (2, 16, 8 * k, 8 * k)
        raw, model = bridge(z), bridge.forward_model(z)
    assert raw.shape == model.shape == (2, 16, 8 * k, 8 * k)
    # forward returns raw latents, forward_model the teacher's model space: one conversion apart.
    assert torch.allclose(SPACES["sd3"].to_model(raw), model, atol=1e-5)
    # Non-square latents work too.
    with torch.no_grad():
        assert bridge(torch.randn(1, 4, 8, 16)).shape == (1, 16, 8 * k, 16 * k)


def test_decode_student_matches_comfyui_style_decoding(student_vae):
    bridge = make(student_vae)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = ((student_vae.decode(z).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(bridge.decode_student(z), expected)


def test_gradients_reach_projector_and_input_latent_not_the_decoder(student_vae):
    bridge = make(student_vae)
    bridge.train()
    assert not student_vae.training  # the frozen VAE stays in inference mode
    z = (torch.randn(2, 4, 8, 8) * 0.5).requires_grad_(True)
    target = torch.randn(2, 16, 16, 16)
    F.mse_loss(bridge.forward_model(z), target).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    proj_grads = [p.grad for p in bridge.projector.parameters()]
    assert all(g is not None for g in proj_grads)
    assert all(g.abs().sum() > 0 for g in proj_grads)
    assert all(not p.requires_grad and p.grad is None for p in student_vae.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(student_vae):
    torch.manual_seed(1)
    plain = make(student_vae)
    z = torch.randn(1, 4, 8, 8)
    grads = []
    for checkpointing in (False, True):
        bridge = Bridge(plain.projector, "sd15", "sd3", 2, student_vae=student_vae)
        if checkpointing:
            bridge.enable_gradient_checkpointing()
        bridge.projector.zero_grad()
        zz = z.clone().requires_grad_(True)
        bridge.forward_model(zz).square().mean().backward()
        grads.append((zz.grad.clone(), bridge.projector.proj_in.weight.grad.clone()))
    student_vae.disable_gradient_checkpointing()
    plain.projector.disable_gradient_checkpointing()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_wrong_latent_channels_name_expected_and_got(student_vae):
    bridge = make(student_vae)
    with pytest.raises(ValueError, match=r"expects SD1\.5 latents \(4 channels\); got 16 channels — did you pass a "
                                         r"teacher latent\?"):
        bridge(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="got 3 channels — did you pass an image"):
        bridge(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"latents \[B,4,h,w\]; got \(4, 8, 8\)"):
        bridge(torch.randn(4, 8, 8))


def test_unusable_image_sizes_and_layouts(student_vae):
    bridge = make(student_vae, k=2)  # projector downsample 4
    with pytest.raises(ValueError, match=r"Image size 62x64 is not usable.*divisible by 4.*60x64"):
        bridge.project_image(torch.rand(1, 3, 62, 64))
    with pytest.raises(ValueError, match=r"ComfyUI IMAGE \[B,H,W,3\]: use image.movedim\(-1, 1\)"):
        bridge.project_image(torch.rand(1, 64, 64, 3))
    with pytest.raises(ValueError, match="3 channels; got 4 channels — did you pass a latent"):
        bridge.project_image(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        bridge.project_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    k1 = make(student_vae, k=1)  # downsample 8
    with pytest.raises(ValueError, match="divisible by 8"):
        k1.project_image(torch.rand(1, 3, 36, 64))


def test_bad_construction_is_refused(student_vae):
    with pytest.raises(ValueError, match="k .* must be 1 or 2; got 3"):
        Bridge.create("sd15", "sd3", k=3)
    wrong = Projector(ProjectorConfig(out_channels=4, downsample=4, **SMALL))
    with pytest.raises(ValueError, match="out_channels is 4, but SD3/SD3.5 latents have 16 channels"):
        Bridge(wrong, "sd15", "sd3", 2)
    with pytest.raises(ValueError, match="downsample is 8, but SD1.5 .* at k=2 needs 4"):
        Bridge(Projector(ProjectorConfig(out_channels=16, downsample=8, **SMALL)), "sd15", "sd3", 2)
    with pytest.raises(ValueError, match="student VAE has 16 latent channels"):
        Bridge.create("sd15", "sd3", 2, student_vae=tiny_vae(16), **SMALL)
    with pytest.raises(ValueError, match="no student VAE"):
        Bridge.create("sd15", "sd3", 2, **SMALL)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="ProjectorConfig.width must be >= 1"):
        ProjectorConfig(width=0)
    with pytest.raises(ValueError, match="Unknown projector config fields"):
        ProjectorConfig.from_dict({"width": 32, "heads": 4})


def test_projector_config_round_trip_and_custom_spaces():
    cfg = ProjectorConfig(out_channels=8, downsample=4, width=24, depth=1, stem_channels=0, norm_groups=32)
    assert ProjectorConfig.from_dict(cfg.to_dict()) == cfg
    custom = LatentSpace("custom8_test", 8, 8, 1.0, 0.0, 128)  # a teacher space with 8 channels
    bridge = Bridge(Projector(cfg), "sd15", custom, 2)  # width 24: GroupNorm uses gcd(32, 24) groups
    assert bridge.project_image(torch.rand(1, 3, 16, 16)).shape == (1, 8, 4, 4)


def test_default_projector_fits_the_budget_against_the_real_sd15_decoder():
    """<= 5 M parameters and <= 15 % of the SD1.5 VAE decoder's FLOPs (sd15 -> sd3, k = 2). Both scale
    linearly with the pixel count, so the ratio at 128 px equals the ratio at 512 px."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from training.bench.bridge import SD15_VAE_CONFIG

    with torch.device("meta"):  # real config, no memory, no compute: FLOPs come from shapes
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        bridge = Bridge.create("sd15", "sd3", k=2, student_vae=vae)
    n_params = sum(p.numel() for p in bridge.projector.parameters())
    assert n_params <= 5_000_000
    z = torch.zeros(1, 4, 16, 16, device="meta")
    with FlopCounterMode(display=False) as counter:
        image = vae.decode(z).sample
    decoder_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = bridge.projector(torch.zeros(1, 3, 128, 128, device="meta"))
    projector_flops = counter.get_total_flops()
    assert image.shape == (1, 3, 128, 128) and out.shape == (1, 16, 32, 32)
    assert decoder_flops > 1e11  # sanity: ~2.5 TFLOP at 512 px / 16
    assert projector_flops <= 0.15 * decoder_flops
    # 512 px -> 128x128: the k = 2 teacher grid for SD1.5 at 512 px.
    assert bridge.projector(torch.zeros(1, 3, 512, 512, device="meta")).shape == (1, 16, 128, 128)


def test_exact_round_trip_shapes(student_vae):
    teacher_vae = tiny_vae(16)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert exact_round_trip(z, student_vae, teacher_vae, k=2).shape == (1, 16, 16, 16)
        assert exact_round_trip(z, student_vae, teacher_vae, k=1, upsample="bilinear").shape == (1, 16, 8, 8)


def test_benchmark_produces_a_table_at_tiny_size(tmp_path):
    from training.bench import bridge as bench_bridge
    from training.models.tiny import TINY_VAE

    rows = bench_bridge.run_benchmark(
        sizes=(4,), devices=("cpu",), repeats=1, log=lambda _: None,
        student_config=dict(TINY_VAE, latent_channels=4),
        teacher_config=dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
        projector_kwargs=SMALL)
    assert [r["method"] for r in rows] == ["features", "image", "round_trip"]
    for r in rows:
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["flops_fwd_bwd"] > r["flops_fwd"] > 0
        assert r["params"] > r["own_params"] > 0
    by = {r["method"]: r for r in rows}
    # The features Bridge runs a prefix of the decoder the image Bridge runs in full.
    assert by["features"]["flops_fwd"] < by["image"]["flops_fwd"]
    assert by["features"]["params"] - by["features"]["own_params"] < by["image"]["params"] - by["image"]["own_params"]
    table = bench_bridge.format_table(rows)
    assert "round trip / features" in table and "round trip / image" in table and "4x4 -> 8x8" in table
    lines = bench_bridge.summary(rows)
    assert len(lines) == 2 and "features bridge: forward+backward" in lines[0] and "target >= 6x" in lines[0]


def test_benchmark_cli_refuses_bad_arguments(capsys):
    from training.bench import bridge as bench_bridge

    for argv in (["--sizes", "32,x"], ["--sizes", "0"], ["--repeats", "0"], ["--paths", "image,pixels"]):
        with pytest.raises(SystemExit) as e:
            bench_bridge.main(argv)
        assert e.value.code == 2
    assert "--sizes must be comma-separated integers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the 'features' tap

def _tapped_output(vae, z, block):
    """What the full decode computes at the end of up block `block`'s resnets (a hook on the real forward)."""
    seen = {}
    hook = vae.decoder.up_blocks[block].resnets[-1].register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        vae.decode(z)
    hook.remove()
    return seen["o"]


@pytest.mark.parametrize("k, block", [(1, 0), (2, 1)])
def test_features_tap_is_the_decoders_own_activation_on_the_teacher_grid(student_vae, k, block):
    bridge = make(student_vae, k=k, tap="features")
    c = bridge.projector.config
    assert (c.in_channels, c.downsample, c.input_norm, c.stem_channels) == (32, 1, 1, 0)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        feats = bridge.decode_features(z)
        assert feats.shape == (2, 32, 8 * k, 8 * k)
        torch.testing.assert_close(feats, _tapped_output(student_vae, z, block))
        assert bridge(z).shape == bridge.forward_model(z).shape == (2, 16, 8 * k, 8 * k)
        torch.testing.assert_close(bridge(z), bridge.project_features(feats))
        assert bridge(torch.randn(1, 4, 8, 16)).shape == (1, 16, 8 * k, 16 * k)


def test_features_tap_gradients_and_checkpointing(student_vae):
    torch.manual_seed(2)
    plain = make(student_vae, tap="features")
    z = torch.randn(1, 4, 8, 8) * 0.5
    # As in Bridge training: cached latents need no gradient, only the projector does.
    plain.forward_model(z).square().mean().backward()
    assert all(p.grad is not None for p in plain.projector.parameters())
    grads = []
    for checkpointing in (False, True):
        bridge = Bridge(plain.projector, "sd15", "sd3", 2, student_vae=student_vae, tap="features")
        if checkpointing:
            bridge.enable_gradient_checkpointing()
        bridge.projector.zero_grad()
        zz = z.clone().requires_grad_(True)
        bridge.forward_model(zz).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge.projector.parameters())
        grads.append((zz.grad.clone(), bridge.projector.proj_in.weight.grad.clone()))
    student_vae.disable_gradient_checkpointing()
    plain.projector.disable_gradient_checkpointing()
    assert grads[0][0].abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in student_vae.parameters())
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_features_tap_refuses_what_does_not_fit(student_vae):
    with pytest.raises(ValueError, match="sizes its projector for the student decoder's channels: pass student_vae"):
        Bridge.create("sd15", "sd3", 2, tap="features", **SMALL)
    with pytest.raises(ValueError, match="tap must be one of image, features; got 'pixels'"):
        Bridge.create("sd15", "sd3", 2, student_vae=student_vae, tap="pixels")
    wider = tiny_vae(4, block_out_channels=(16, 16, 64, 32))  # 64 channels at the k = 2 tap
    bridge = make(student_vae, tap="features")
    with pytest.raises(ValueError, match="reads 32 decoder channels at the teacher grid, but this student VAE's "
                                         "decoder has 64 there"):
        Bridge(bridge.projector, "sd15", "sd3", 2, student_vae=wider, tap="features")
    with pytest.raises(ValueError, match="reads RGB images"):
        Bridge(bridge.projector, "sd15", "sd3", 2, tap="image")
    image_bridge = make(student_vae)
    with pytest.raises(ValueError, match="input_norm is 0, but it reads decoder features"):
        Bridge(image_bridge.projector, "sd15", "sd3", 2, tap="features")
    with pytest.raises(ValueError, match=r"tap 'features'\), not its image: use project_features"):
        bridge.project_image(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"reads decoder features \[B,32,H,W\]; got \(1, 16, 16, 16\)"):
        bridge.project_features(torch.rand(1, 16, 16, 16))


def test_features_tap_on_the_real_sd15_decoder_skips_the_expensive_stages():
    """Real SD1.5 decoder (meta device): 512 channels at 128 x 128 for a 64 x 64 latent (k = 2), at 64 x 64 for
    k = 1, and the features Bridge costs a small fraction of the image Bridge's FLOPs."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from training.bench.bridge import SD15_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        bridges = {(tap, k): Bridge.create("sd15", "sd3", k=k, student_vae=vae, tap=tap)
                   for tap in ("image", "features") for k in (1, 2)}
    z = torch.zeros(1, 4, 64, 64, device="meta")
    assert bridges["features", 2].decode_features(z).shape == (1, 512, 128, 128)
    assert bridges["features", 1].decode_features(z).shape == (1, 512, 64, 64)
    flops = {}
    for key, bridge in bridges.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = bridge.forward_model(z)
        flops[key] = counter.get_total_flops()
        assert out.shape == (1, 16, 64 * key[1], 64 * key[1])
    assert flops["features", 2] < 0.5 * flops["image", 2]
    assert flops["features", 1] < flops["features", 2]
