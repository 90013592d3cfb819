"""Student checkpoints, SD1.5 exports (diffusers folder and original-layout single file), headless sampling."""

import pytest
import torch

from training.models.export import (export_diffusers, export_single_file, load_student_unet, read_student_metadata,
                                    save_student_lora, save_student_unet)
from training.models.tiny import tiny_clip_text, tiny_clip_tokenizer, tiny_unet, tiny_vae
from training.student import OneStepStudent


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    student = OneStepStudent(tiny_unet())
    # A "trained" student: move every weight a little so nothing equals the init.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return {"student": student.eval(), "vae": tiny_vae(4).eval(), "text_encoder": tiny_clip_text("L").eval(),
            "tokenizer": tiny_clip_tokenizer()}


def _embed(parts, prompt, n):
    tok = parts["tokenizer"]
    ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return parts["text_encoder"](ids).last_hidden_state.expand(n, -1, -1)


def test_student_checkpoint_keeps_lora_and_ema_merged(tmp_path):
    torch.manual_seed(1)
    student = OneStepStudent(tiny_unet())
    student.add_lora(rank=4)
    student.enable_ema(decay=0.5, warmup=False)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    student.ema_step()
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # live weights now differ from the EMA
    student.eval()
    path = tmp_path / "student_unet.safetensors"
    save_student_unet(path, student, summary={"steps": 7})
    meta = read_student_metadata(path)
    assert meta["timestep"] == 999 and meta["space"]["name"] == "sd15" and meta["training_summary"] == {"steps": 7}
    loaded = load_student_unet(path)
    assert not getattr(loaded.unet, "peft_config", None)
    noise, text = student.make_noise(2, 8), torch.randn(2, 5, 32)
    with torch.no_grad(), student.ema_weights():
        expected = student(noise, text)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noise, text), expected, atol=2e-3, rtol=1e-4)
        assert (loaded(noise, text) - student(noise, text)).abs().max() > 1e-3  # EMA, not the live weights


def test_lora_file_loaded_by_diffusers_reproduces_the_fused_student(parts, tmp_path):
    """The LoRA file of a LoRA student (kohya layout), loaded by diffusers' `load_lora_weights` into the base UNet,
    gives the fused student's UNet output; alpha != rank and EMA weights are carried over."""
    import copy

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from training.models.export import one_step_scheduler

    torch.manual_seed(3)
    base = tiny_unet().eval()
    student = OneStepStudent(copy.deepcopy(base))
    student.add_lora(rank=4, alpha=8)
    student.enable_ema(decay=0.5, warmup=False)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # lora_B starts at zero: make the LoRA do something
    student.ema_step()
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # live weights differ from the EMA the file must hold
    path = save_student_lora(tmp_path / "student_lora.safetensors", student, summary={"steps": 3})
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["csd_lora_rank"] == "4" and f.get_tensor(next(k for k in keys if
                                                                         k.endswith(".alpha"))).item() == 8
    n_modules = sum(1 for n, _ in base.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    assert len(keys) == 3 * n_modules and all(k.startswith("lora_unet_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=copy.deepcopy(base), scheduler=one_step_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    loaded = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    assert loaded == n_modules  # every layer of the file found its module
    fused = student.merged_unet()  # EMA weights, LoRA fused
    noise, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.full((2,), 999)
    with torch.no_grad():
        expected = fused(noise, t, encoder_hidden_states=text).sample
        got = pipe.unet(noise, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert (got - base(noise, t, encoder_hidden_states=text).sample).abs().max() > 1e-2  # the LoRA acts
        live = student.unet(noise, t, encoder_hidden_states=text).sample
        assert (got - live).abs().max() > 1e-4  # EMA, not the live weights

    with pytest.raises(ValueError, match="no LoRA"):
        save_student_lora(tmp_path / "full.safetensors", OneStepStudent(tiny_unet()))


def test_student_checkpoint_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a one-step student checkpoint"):
        load_student_unet(tmp_path / "other.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02junk")
    with pytest.raises(ValueError, match="not a student checkpoint"):
        load_student_unet(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=".safetensors"):
        save_student_unet(tmp_path / "s.pt", OneStepStudent(tiny_unet()))


def test_diffusers_export_gives_the_same_one_step_output(parts, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = export_diffusers(tmp_path / "student", parts["student"].unet, parts["vae"], parts["text_encoder"],
                              parts["tokenizer"])
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    # The stock pipeline, one step, no CFG: the exported scheduler makes it the student's computation.
    out = pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, latents=noise.clone(), height=64, width=64,
               num_images_per_prompt=2, output_type="latent").images
    with torch.no_grad():
        expected = parts["student"].forward_model(noise, _embed(parts, "a red circle", 2))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_diffusers_export_tokenizer_takes_the_encoders_length(parts, tmp_path):
    """A tokenizer from ComfyUI's bundle claims 8192 tokens; the exported pipeline's tokenizer says 77, so diffusers'
    StableDiffusionPipeline (which pads to model_max_length) encodes prompts with the exported folder."""
    from diffusers import StableDiffusionPipeline

    tok = tiny_clip_tokenizer()
    tok.model_max_length = 8192
    folder = export_diffusers(tmp_path / "student", parts["student"].unet, parts["vae"], parts["text_encoder"], tok)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.tokenizer.model_max_length == 77
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["a red cube"], "cpu", 1, False)
    torch.testing.assert_close(embeds, _embed(parts, "a red cube", 1))


def test_single_file_export_loads_back_with_from_single_file(parts, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open


    config = export_diffusers(tmp_path / "config", parts["student"].unet, parts["vae"], parts["text_encoder"],
                              parts["tokenizer"])
    path = export_single_file(tmp_path / "student.safetensors", parts["student"].unet, parts["vae"],
                              parts["text_encoder"], dtype=torch.float32)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.") for k in keys)
    pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True)
    ours = {"unet": parts["student"].unet, "vae": parts["vae"], "text_encoder": parts["text_encoder"]}
    for name, module in ours.items():
        theirs = getattr(pipe, name).state_dict()
        for k, a in module.state_dict().items():
            torch.testing.assert_close(a, theirs[k], msg=f"{name}.{k}")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(OneStepStudent(pipe.unet).forward_model(noise, _embed(parts, "x", 1)),
                                   parts["student"].forward_model(noise, _embed(parts, "x", 1)))


def test_sample_command_writes_the_students_images(parts, tmp_path):
    from PIL import Image

    from training.cli import sample
    from training.run import build_parser

    folder = export_diffusers(tmp_path / "student", parts["student"].unet, parts["vae"], parts["text_encoder"],
                              parts["tokenizer"])
    args = build_parser("sample").parse_args(["sample", "--student", str(folder), "--prompt", "a red circle",
                                              "--prompt", "a blue square", "--seed", "4", "--batch", "2",
                                              "--resolution", "64", "--out", str(tmp_path / "png"), "--device", "cpu"])
    assert sample.run(args) == 0
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert len(files) == 4 and files[0].startswith("000_a_red_circle_seed4")
    image = torch.from_numpy(__import__("numpy").asarray(Image.open(tmp_path / "png" / files[1]))).float() / 255
    # The second image of the first prompt: batch noise from one generator seeded 4, decoded by the SD1.5 VAE.
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = parts["student"](noise, _embed(parts, "a red circle", 2))
        expected = ((parts["vae"].decode(z).sample + 1) / 2).clamp(0, 1)[1].permute(1, 2, 0)
    assert (image - expected).abs().max() < 1.5 / 255


def test_sample_needs_base_for_a_student_checkpoint(parts, tmp_path):
    from training.models.assemble import load_student_for_sampling

    path = tmp_path / "student_unet.safetensors"
    save_student_unet(path, parts["student"])
    with pytest.raises(ValueError, match="--base"):
        load_student_for_sampling(str(path), None, "cpu")
