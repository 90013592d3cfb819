"""Teachers (SD3/SD3.5, Flux), their flow conventions, fake LoRA adapter, and text encoding
(training/models/text.py)."""

import math

import pytest
import torch

from training.models import tiny
from training.models.text import TextCond, encode_flux, encode_for_family, encode_sd3, encode_sd15
from training.teachers import (FluxTeacher, SD3Teacher, add_noise, eps_from_v, flux_image_ids, flux_mu, flux_shift,
                               make_teacher, pack_flux, sd3_shift, unpack_flux, x0_from_v)

PROMPTS = ["a red cube", "two blue spheres on green grass"]


def _sd3(variant="sd35"):
    torch.manual_seed(0)
    return tiny.tiny_sd3_transformer(variant).eval()


def _flux(**kw):
    torch.manual_seed(0)
    return tiny.tiny_flux_transformer(**kw).eval()


def _cond(b, pooled_dim, tokens=7, width=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, tokens, width, generator=g), torch.randn(b, pooled_dim, generator=g))


# ---------------------------------------------------------------------------------------------- TextCond

def test_textcond_rows_tiling_and_safetensors_round_trip(tmp_path):
    c = _cond(3, 5)
    sub = c.index([2, 0])
    assert torch.equal(sub.prompt_embeds, c.prompt_embeds[[2, 0]]) and torch.equal(sub.pooled, c.pooled[[2, 0]])
    assert len(c.index(torch.tensor([1]))) == 1
    rep = c.index([1]).repeat(4)
    assert len(rep) == 4 and torch.equal(rep.prompt_embeds[3], c.prompt_embeds[1])
    with pytest.raises(ValueError, match="single prompt"):
        c.repeat(2)
    both = TextCond.cat([c, sub])
    assert len(both) == 5 and torch.equal(both.pooled[3:], sub.pooled)

    d = c.to_tensors(prefix="text.")
    assert set(d) == {"text.prompt_embeds", "text.pooled"}
    assert torch.equal(TextCond.from_tensors(d, prefix="text.").pooled, c.pooled)
    no_pool = TextCond(c.prompt_embeds)
    assert set(no_pool.to_tensors()) == {"prompt_embeds"} and TextCond.from_tensors(no_pool.to_tensors()).pooled is None

    c.save(tmp_path / "c.safetensors")
    back = TextCond.load(tmp_path / "c.safetensors")
    assert torch.equal(back.prompt_embeds, c.prompt_embeds) and torch.equal(back.pooled, c.pooled)
    assert back.to(dtype=torch.float16).prompt_embeds.dtype == torch.float16
    with pytest.raises(ValueError, match="not found"):
        TextCond.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="batch, tokens, width"):
        TextCond(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="pooled"):
        TextCond(torch.zeros(2, 3, 4), torch.zeros(3, 4))


def test_encoders_match_the_diffusers_pipelines():
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    torch.manual_seed(0)
    # The SD3 pipeline reads CLIP-L's pooled output as output[0]: a CLIPTextModelWithProjection, as in SD3 repos.
    clip_l, clip_g, t5 = tiny.tiny_clip_text("L", with_projection=True), tiny.tiny_clip_text("G"), tiny.tiny_t5_text()
    tok_l, tok_g, tok_t5 = tiny.tiny_clip_tokenizer(), tiny.tiny_clip_tokenizer(), tiny.tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip_l, tokenizer=tok_l,
                                    text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=32)
    c = encode_sd3(PROMPTS, clip_l, clip_g, t5, tok_l, tok_g, tok_t5, max_t5_len=32)
    assert c.prompt_embeds.shape == (2, 77 + 32, 64) and c.pooled.shape == (2, 64)
    assert torch.equal(c.prompt_embeds, pe) and torch.equal(c.pooled, pooled)
    via_family = encode_for_family("sd35_large", PROMPTS, {"clip_l": clip_l, "clip_g": clip_g, "t5": t5},
                                   {"clip_l": tok_l, "clip_g": tok_g, "t5": tok_t5}, max_t5_len=32)
    assert torch.equal(via_family.prompt_embeds, c.prompt_embeds)

    clip_plain = tiny.tiny_clip_text("L")
    fpipe = FluxPipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip_plain, tokenizer=tok_l,
                         text_encoder_2=t5, tokenizer_2=tok_t5)
    with torch.no_grad():
        pe, pooled, _ = fpipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=24)
    c = encode_flux(PROMPTS, clip_plain, t5, tok_l, tok_t5, max_t5_len=24)
    assert c.prompt_embeds.shape == (2, 24, 64) and c.pooled.shape == (2, 32)
    assert torch.equal(c.prompt_embeds, pe) and torch.equal(c.pooled, pooled)

    spipe = StableDiffusionPipeline(vae=None, text_encoder=clip_plain, tokenizer=tok_l, unet=None, scheduler=None,
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        pe, _ = spipe.encode_prompt(PROMPTS, "cpu", 1, False)
    c = encode_sd15(PROMPTS, clip_plain, tok_l)
    assert c.pooled is None and torch.equal(c.prompt_embeds, pe)

    with pytest.raises(ValueError, match="clip_g"):
        encode_for_family("sd3", PROMPTS, {"clip_l": clip_l, "t5": t5}, {"clip_l": tok_l, "t5": tok_t5})
    with pytest.raises(ValueError, match="Unknown teacher family"):
        encode_for_family("sdxl", PROMPTS, {}, {})


def test_prompts_take_the_encoders_length_not_the_tokenizers_claim(tmp_path, monkeypatch):
    """ComfyUI's bundled tokenizers claim model_max_length 8192: found through COMFYUI_PATH (the fallback for single
    files), they still give 77 CLIP tokens and the family's T5 length, the same embeddings as 77-token tokenizers."""
    from training.models import loading

    def bundled(claim):  # the tokenizers of a ComfyUI checkout whose configs claim `claim` tokens
        comfy = tmp_path / f"ComfyUI_{claim}"
        for sub in (("sd1_tokenizer",), ("text_encoders", "t5_tokenizer")):
            tok = tiny.tiny_clip_tokenizer() if sub[0] == "sd1_tokenizer" else tiny.tiny_t5_tokenizer()
            tok.model_max_length = claim
            tok.save_pretrained(comfy.joinpath("comfy", *sub))
        monkeypatch.setenv("COMFYUI_PATH", str(comfy))
        return {k: loading.load_tokenizer(k) for k in ("clip_l", "clip_g", "t5")}

    claimed, good = bundled(8192), bundled(77)
    assert all(t.model_max_length == 8192 for t in claimed.values())

    torch.manual_seed(0)
    clip_l, clip_g, t5 = tiny.tiny_clip_text("L", with_projection=True), tiny.tiny_clip_text("G"), tiny.tiny_t5_text()
    clip_plain = tiny.tiny_clip_text("L")
    prompts = [*PROMPTS, "a very long prompt " * 30]  # past 77 tokens: truncated, not an error

    c = encode_sd15(prompts, clip_plain, claimed["clip_l"])
    assert c.prompt_embeds.shape == (3, 77, 32)
    assert torch.equal(c.prompt_embeds, encode_sd15(prompts, clip_plain, good["clip_l"]).prompt_embeds)
    c = encode_sd3(prompts, clip_l, clip_g, t5, claimed["clip_l"], claimed["clip_g"], claimed["t5"], max_t5_len=32)
    assert c.prompt_embeds.shape == (3, 77 + 32, 64)
    expected = encode_sd3(prompts, clip_l, clip_g, t5, good["clip_l"], good["clip_g"], good["t5"], max_t5_len=32)
    assert torch.equal(c.prompt_embeds, expected.prompt_embeds) and torch.equal(c.pooled, expected.pooled)
    # Flux without an explicit length: the family's own (flux_schnell: 256 T5 tokens).
    c = encode_for_family("flux_schnell", prompts, {"clip_l": clip_plain, "t5": t5}, claimed)
    assert c.prompt_embeds.shape == (3, 256, 64)
    expected = encode_flux(prompts, clip_plain, t5, good["clip_l"], good["t5"], max_t5_len=256)
    assert torch.equal(c.prompt_embeds, expected.prompt_embeds) and torch.equal(c.pooled, expected.pooled)


# ---------------------------------------------------------------------------------------------- flow math

def test_rectified_flow_conversions():
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    s = torch.tensor([0.1, 0.5, 0.9])
    x_s = add_noise(x0, n, s)
    torch.testing.assert_close(x_s[1], 0.5 * x0[1] + 0.5 * n[1])
    v = n - x0
    torch.testing.assert_close(x0_from_v(x_s, s, v), x0)
    torch.testing.assert_close(eps_from_v(x_s, s, v), n)
    torch.testing.assert_close(add_noise(x0, n, 0.25), 0.75 * x0 + 0.25 * n)  # scalar s


def test_flux_packing_matches_the_pipeline_helpers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    packed = pack_flux(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_flux(packed, 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), x)
    ids = flux_image_ids(3, 4)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0, 1, 1]  # token 5 = row 1, col 1
    with pytest.raises(ValueError, match="even"):
        pack_flux(torch.zeros(1, 16, 5, 4))


def test_timestep_distributions_follow_sd3_and_flux_shifts():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    torch.testing.assert_close(sd3_shift(plain), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas)
    s = torch.linspace(0.05, 0.95, 7)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(flux_shift(s, 0.8), sched.time_shift(0.8, 1.0, s))
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)

    teacher = SD3Teacher(_sd3())
    u = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(3)))
    drawn = teacher.sample_s(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, 3 * u / (1 + 2 * u))
    assert drawn.median().item() == pytest.approx(0.75, abs=0.03)  # shift(0.5) = 0.75
    clipped = teacher.sample_s(1000, generator=torch.Generator().manual_seed(3), s_min=0.2, s_max=0.9)
    assert clipped.min() >= 0.2 and clipped.max() <= 0.9

    flux = FluxTeacher(_flux())
    for res, tokens in ((1024, 4096), (512, 1024)):
        mu = 0.5 + (tokens - 256) * 0.65 / 3840
        drawn = flux.sample_s(1000, generator=torch.Generator().manual_seed(3), resolution=res)
        torch.testing.assert_close(drawn, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    assert flux.sample_s(4).shape == (4,)


# ---------------------------------------------------------------------------------------------- model calls

def test_sd3_teacher_timestep_convention_and_true_cfg():
    model = _sd3()
    teacher = make_teacher("sd35_medium", model)
    assert isinstance(teacher, SD3Teacher) and teacher.space.name == "sd3" and teacher.guidance == 4.5
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    cond, neg = _cond(2, 64), _cond(1, 64, seed=7)
    with torch.no_grad():
        direct = model(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled, return_dict=False)[0]
        v = teacher.velocity(x, s, cond)
        assert torch.equal(v, direct)
        assert torch.equal(teacher.predict_x0(x, s, cond), x - s.view(-1, 1, 1, 1) * v)  # neg None: conditional
        assert torch.equal(teacher.predict_x0(x, s, cond, neg_cond=neg, guidance=1.0), teacher.predict_x0(x, s, cond))
        x0_c = teacher.predict_x0(x, s, cond)
        x0_n = teacher.predict_x0(x, s, neg.repeat(2))
        gs = torch.tensor([2.0, 6.0])
        guided = teacher.predict_x0(x, s, cond, neg_cond=neg, guidance=gs)
        torch.testing.assert_close(guided, x0_n + gs.view(-1, 1, 1, 1) * (x0_c - x0_n), atol=1e-4, rtol=1e-4)
        default = teacher.predict_x0(x, s, cond, neg_cond=neg)  # family default 4.5
        torch.testing.assert_close(default, x0_n + 4.5 * (x0_c - x0_n), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pooled"):
        teacher.velocity(x, s, TextCond(cond.prompt_embeds))
    with pytest.raises(ValueError, match="Unknown teacher family"):
        make_teacher("sdxl", model)


def test_flux_teacher_packing_guidance_embedding_and_schnell():
    from diffusers import FluxPipeline

    model = _flux()
    teacher = make_teacher("flux_dev", model)
    assert isinstance(teacher, FluxTeacher) and teacher.space.name == "flux" and teacher.guidance == 3.5
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    cond = _cond(2, 32)
    with torch.no_grad():
        out = model(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 8), timestep=s,
                    guidance=torch.full((2,), 3.5), pooled_projections=cond.pooled,
                    encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(7, 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                    return_dict=False)[0]
        v_direct = FluxPipeline._unpack_latents(out, 64, 64, 8)
        assert torch.equal(teacher.velocity(x, s, cond), v_direct)
        torch.testing.assert_close(teacher.predict_x0(x, s, cond), x - s.view(-1, 1, 1, 1) * v_direct)
        per_sample = teacher.predict_x0(x, s, cond, guidance=torch.tensor([1.0, 5.0]))
        one = teacher.predict_x0(x[:1], s[:1], cond.index([0]), guidance=1.0)
        assert not torch.allclose(one, teacher.predict_x0(x[:1], s[:1], cond.index([0])))  # the embedding matters
        torch.testing.assert_close(per_sample[:1], one, atol=1e-5, rtol=1e-5)

    schnell_model = _flux(guidance_embeds=False)
    schnell = make_teacher("flux_schnell", schnell_model)
    assert schnell.guidance is None
    with torch.no_grad():
        assert torch.equal(schnell.predict_x0(x, s, cond, guidance=7.0), schnell.predict_x0(x, s, cond))
    with pytest.raises(ValueError, match="guidance_embeds"):
        make_teacher("flux_schnell", model)
    with pytest.raises(ValueError, match="guidance_embeds"):
        make_teacher("flux_dev", schnell_model)


@pytest.mark.parametrize("family", ["sd35_medium", "flux_dev"])
def test_fake_adapter_is_off_outside_fake_and_trains_only_lora(family):
    model = _sd3() if family.startswith("sd3") else _flux()
    teacher = make_teacher(family, model)
    with pytest.raises(ValueError, match="add_fake_adapter"):
        teacher.fake_parameters()
    pooled = 64 if family.startswith("sd3") else 32
    g = torch.Generator().manual_seed(0)
    x, s, cond = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.4, 0.6]), _cond(2, pooled)
    with torch.no_grad():
        original = teacher.velocity(x, s, cond)
    teacher.add_fake_adapter(rank=4, alpha=4)
    lora = teacher.fake_parameters()
    assert lora and all(not p.requires_grad for p in lora)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, s, cond), original)
        for p in lora:  # LoRA B starts at zero; perturb everything so the adapter changes the output
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        assert torch.equal(teacher.velocity(x, s, cond), original)  # disabled: the real teacher
    with teacher.fake():
        assert all(p.requires_grad for p in lora)
        v_fake = teacher.velocity(x, s, cond)
        assert not torch.allclose(v_fake, original, atol=1e-4)
        v_fake.square().mean().backward()
    assert all(p.grad is not None for p in lora)
    # (the last SD3 block's text queries feed nothing, so only the image-stream LoRA must have non-zero gradients)
    image_lora = [p for n, p in model.named_parameters() if "lora_" in n and any(k in n for k in (".to_q.", ".to_v."))]
    assert image_lora and all(p.grad.abs().sum() > 0 for p in image_lora)
    lora_ids = {id(p) for p in lora}
    assert all(p.grad is None for p in model.parameters() if id(p) not in lora_ids)
    assert all(not p.requires_grad for p in lora)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, s, cond), original)
    with pytest.raises(ValueError, match="already"):
        teacher.add_fake_adapter(rank=4)


def test_gradient_checkpointing_passes_through_with_equal_gradients():
    g = torch.Generator().manual_seed(0)
    x, s, cond = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), _cond(1, 64)
    grads = []
    for ckpt in (False, True):
        teacher = SD3Teacher(_sd3())
        if ckpt:
            teacher.enable_gradient_checkpointing()
            assert teacher.model.gradient_checkpointing
        xi = x.clone().requires_grad_(True)
        teacher.velocity(xi, s, cond).square().mean().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_fake_guidance_default_makes_the_zero_init_fake_the_real_score():
    """The property the fake guidance default rests on (teachers.fake_guidance_for): at initialisation (LoRA zero) the
    fake equals the real score, so where the student equals the teacher the DMD gradient is zero.
    Flux dev: guidance is an embedding; the fake queried at the real score's embedding (the default) is the real
    score exactly, per sample; queried unguided (embedding 1, DMD2's choice for CFG teachers) it is not, and the
    gradient on the teacher's own samples would be the embedding difference, not the student's error.
    SD3.5: the default fake is the conditional prediction, and trained that way (velocity is conditional)."""
    from training import dmd
    from training.teachers import fake_guidance_for

    g = torch.Generator().manual_seed(0)
    flux = make_teacher("flux_dev", _flux())
    flux.add_fake_adapter(rank=4)
    x = torch.randn(2, 16, 8, 8, generator=g)
    s, cond = torch.tensor([0.4, 0.8]), _cond(2, 32)
    real_g = torch.tensor([2.0, 6.0])  # a per-sample guidance range draw
    fake_g = fake_guidance_for("flux_dev", None, real_g)
    assert fake_g is real_g
    with torch.no_grad():
        x0_real = flux.predict_x0(x, s, cond, guidance=real_g)
        with flux.fake():
            x0_fake = flux.predict_x0(x, s, cond, guidance=fake_g)
            x0_unguided = flux.predict_x0(x, s, cond, guidance=1.0)
    assert torch.equal(x0_fake, x0_real)
    _, grad = dmd.distribution_matching_loss("dmd", x, x0_real, x0_fake, s)
    assert grad.abs().max() == 0
    _, grad = dmd.distribution_matching_loss("dmd", x, x0_real, x0_unguided, s)
    assert grad.abs().max() > 1e-3
    # Trained as queried: the fake update's velocity takes the same embedding.
    with torch.no_grad(), flux.fake():
        assert torch.allclose(x0_fake, x - s.view(-1, 1, 1, 1) * flux.velocity(x, s, cond, guidance=fake_g))
    # SD3.5 (true CFG): unguided fake = the conditional prediction, unless fake_guidance says otherwise.
    assert fake_guidance_for("sd35_medium", None, 4.5) == 1.0 and fake_guidance_for("sd35_medium", 2.0, 4.5) == 2.0
    assert fake_guidance_for("flux_dev", 1.0, real_g) == 1.0


def test_family_defaults_and_adversarial_teacher_warnings():
    from training.models import families
    from training.teachers import DEFAULT_GUIDANCE

    assert families.default_guidance("flux_dev") == 3.5 and families.default_guidance("sd35_large") == 4.5
    assert families.default_guidance(None) == 4.5 and families.default_guidance("flux_schnell") is None
    assert all(DEFAULT_GUIDANCE[f] == families.default_guidance(f) for f in families.TEACHER_FAMILIES)
    warning = families.adversarial_teacher_warning("flux_schnell", "flux1-schnell.safetensors")
    assert "adversarially distilled" in warning
    assert "SD3.5 Large Turbo" in families.adversarial_teacher_warning("sd35_large", "/m/sd3.5_large_turbo.safetensors")
    assert families.adversarial_teacher_warning("sd35_large", "sd3.5_large.safetensors") is None
    assert families.adversarial_teacher_warning("flux_dev", "flux1-dev-turbo-lora-merged.safetensors") is None
