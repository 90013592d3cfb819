"""Offline model loading: shipped configs, SD1.5 / SD3.5 / Flux from diffusers folders and single files (tiny
models of the real classes), tokenizer resolution, kind detection and the refused inputs."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from training.models import convert, loading
from training.models.loading import (
    ModelLoadError,
    detect_file_kind,
    load_sd15,
    load_teacher_models,
    load_vae,
)
from training.models.tiny import (
    tiny_clip_text,
    tiny_clip_tokenizer,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_t5_text,
    tiny_t5_tokenizer,
    tiny_unet,
    tiny_vae,
)


@pytest.fixture(autouse=True)
def _no_comfyui(monkeypatch):
    # Tokenizer lookup must not find a developer's ComfyUI checkout.
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


def _save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _seeded(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------------------ configs

# Parameter counts (millions) of the real models; the SD3 transformers' pos_embed is a buffer, not counted.
REAL_SIZES = {
    "sd15/unet": 859.5, "sd15/vae": 83.7, "sd15/text_encoder": 123.1,
    "sd35_medium/transformer": 2243.2, "sd35_large/transformer": 8056.6, "flux_dev/transformer": 11901.4,
    "flux_schnell/transformer": 11891.2, "sd35_medium/vae": 83.8, "flux_dev/vae": 83.8,
    "sd35_medium/text_encoder": 123.7, "sd35_large/text_encoder_2": 694.7, "sd35_large/text_encoder_3": 4762.3,
    "flux_schnell/text_encoder": 123.1, "flux_dev/text_encoder_2": 4762.3,
}


def _build_meta(folder):
    import diffusers
    import transformers

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        if "_class_name" in cfg:
            return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        tcfg = transformers.AutoConfig.from_pretrained(folder)
        return getattr(transformers, tcfg.architectures[0])(tcfg)


def test_every_shipped_config_builds_on_meta_with_the_real_size():
    folders = sorted(os.path.relpath(os.path.dirname(os.path.join(r, f)), loading.CONFIG_ROOT)
                     for r, _, fs in os.walk(loading.CONFIG_ROOT) for f in fs if f == "config.json")
    assert len(folders) == 21 and set(REAL_SIZES) <= set(folders)
    for rel in folders:
        model = _build_meta(os.path.join(loading.CONFIG_ROOT, rel))
        n = sum(p.numel() for p in model.parameters()) / 1e6
        if rel in REAL_SIZES:
            assert n == pytest.approx(REAL_SIZES[rel], abs=0.1), rel
    for fam, scale, shift in (("sd35_large", 1.5305, 0.0609), ("flux_schnell", 0.3611, 0.1159)):
        with open(os.path.join(loading.config_dir(fam), "vae", "config.json")) as f:
            cfg = json.load(f)
        assert (cfg["latent_channels"], cfg["scaling_factor"], cfg["shift_factor"]) == (16, scale, shift)
        assert cfg["use_quant_conv"] is False
    with open(os.path.join(loading.config_dir("flux_schnell"), "transformer", "config.json")) as f:
        assert json.load(f)["guidance_embeds"] is False


# -------------------------------------------------------------------------------------------------- SD1.5

@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("sd15")
    parts = {"unet": _seeded(tiny_unet(), 1), "vae": _seeded(tiny_vae(4), 2),
             "text_encoder": _seeded(tiny_clip_text("L"), 3), "tokenizer": tiny_clip_tokenizer()}
    sched = loading._scheduler(loading.config_dir("sd15"))
    StableDiffusionPipeline(**parts, scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp / "folder")
    unet_sd = convert.sd15_unet_to_original(parts["unet"].state_dict())
    vae_sd = convert.sd15_vae_to_original(parts["vae"].state_dict())
    files = {
        "checkpoint": _save({**unet_sd, **vae_sd, **convert.sd15_clip_to_original(parts["text_encoder"].state_dict())},
                            tmp / "sd15.safetensors"),
        # ComfyUI's unet/ and vae/ folders: one model, original layout, no prefix.
        "unet": _save({k[len("model.diffusion_model."):]: v for k, v in unet_sd.items()}, tmp / "unet.safetensors"),
        "vae": _save({k[len("first_stage_model."):]: v for k, v in vae_sd.items()}, tmp / "vae.safetensors"),
    }
    return {"parts": parts, "folder": str(tmp / "folder"), "files": files, "tmp": tmp}


def test_sd15_folder_and_single_file_load_the_same_weights(sd15):
    p = sd15["parts"]
    a = load_sd15(sd15["folder"], components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    b = load_sd15(sd15["files"]["checkpoint"], components=("unet", "vae", "text_encoder", "tokenizer"),
                  tokenizer=p["tokenizer"], config=sd15["folder"])
    for loaded in (a, b):
        for name in ("unet", "vae", "text_encoder"):
            _assert_same_weights(p[name], getattr(loaded, name))
        assert loaded.tokenizer("a red circle").input_ids == p["tokenizer"]("a red circle").input_ids
    assert a.scheduler.config.beta_schedule == "scaled_linear" and a.scheduler.config.beta_end == 0.012
    assert b.unet.dtype == torch.float32
    half = load_sd15(sd15["files"]["checkpoint"], components=("vae",), dtype="fp16", config=sd15["folder"])
    assert half.vae.dtype == torch.float16 and half.unet is None and half.text_encoder is None


def test_sd15_component_files_and_wrong_kinds(sd15):
    p, files, cfg = sd15["parts"], sd15["files"], sd15["folder"]
    _assert_same_weights(p["unet"], load_sd15(files["unet"], components=("unet",), config=cfg).unet)
    _assert_same_weights(p["vae"], load_sd15(files["vae"], components=("vae",), config=cfg).vae)
    _assert_same_weights(p["vae"], load_vae(files["vae"], "sd15", config=cfg))
    _assert_same_weights(p["vae"], load_vae(files["checkpoint"], "sd15", config=cfg))
    _assert_same_weights(p["vae"], load_vae(sd15["folder"], "sd15"))
    with pytest.raises(ModelLoadError, match="is a 4-channel VAE .* but an SD1.5 all-in-one checkpoint"):
        load_sd15(files["vae"], components=("unet", "vae"), config=cfg)
    with pytest.raises(ModelLoadError, match="holds a 4-channel VAE, but the SD3/Flux VAE has 16"):
        load_vae(files["vae"], "sd35_medium", config=cfg)
    with pytest.raises(ModelLoadError, match="Unknown SD1.5 component"):
        load_sd15(files["checkpoint"], components=("unet", "refiner"))
    # Real SD1.5 configs with a tiny file: a clear size error, not a half-random model, and without diffusers' hint
    # for developers (ignore_mismatched_sizes: random weights in place of the file's).
    with pytest.raises(ModelLoadError, match="sd15.safetensors.*does not fit.*expected shape") as e:
        load_sd15(files["checkpoint"], components=("vae",))
    assert "ignore_mismatched_sizes" not in str(e.value) and "github" not in str(e.value)


def test_tokenizer_resolution_and_its_error(sd15, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="No clip_l tokenizer found.*COMFYUI_PATH"):
        load_sd15(sd15["files"]["checkpoint"], components=("tokenizer",), config=sd15["folder"])
    # An explicit path: a diffusers folder works (its tokenizer/ subfolder).
    tok = load_sd15(sd15["files"]["checkpoint"], components=("tokenizer",), tokenizer=sd15["folder"]).tokenizer
    assert tok("abc").input_ids == sd15["parts"]["tokenizer"]("abc").input_ids
    # A ComfyUI checkout's bundled tokenizer folders.
    comfy = tmp_path / "ComfyUI"
    tiny_clip_tokenizer().save_pretrained(comfy / "comfy" / "sd1_tokenizer")
    tiny_t5_tokenizer().save_pretrained(comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert loading.find_comfyui() == str(comfy)
    assert loading.load_tokenizer("clip_l").pad_token == "<|endoftext|>"
    assert loading.load_tokenizer("clip_g").pad_token == "!"  # SD3's CLIP-G pads with "!"
    t5 = loading.load_tokenizer("t5")
    assert t5("ab").input_ids == tiny_t5_tokenizer()("ab").input_ids
    with pytest.raises(ModelLoadError, match="Tokenizer folder not found"):
        loading.load_tokenizer("t5", str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------ teachers

@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tmp = tmp_path_factory.mktemp("sd35")
    parts = {"transformer": _seeded(tiny_sd3_transformer("sd35"), 4), "vae": _seeded(tiny_vae(16), 5),
             "clip_l": _seeded(tiny_clip_text("L", with_projection=True), 6), "clip_g": _seeded(tiny_clip_text("G"), 7),
             "t5": _seeded(tiny_t5_text(), 8)}
    toks = {"clip_l": tiny_clip_tokenizer(), "clip_g": tiny_clip_tokenizer(), "t5": tiny_t5_tokenizer()}
    StableDiffusion3Pipeline(
        transformer=parts["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=parts["vae"],
        text_encoder=parts["clip_l"], tokenizer=toks["clip_l"], text_encoder_2=parts["clip_g"],
        tokenizer_2=toks["clip_g"], text_encoder_3=parts["t5"], tokenizer_3=toks["t5"]).save_pretrained(tmp / "folder")
    vae_sd = convert.sd15_vae_to_original(parts["vae"].state_dict())  # the LDM VAE layout is the same for 16 ch
    t5_sd = {k: v for k, v in parts["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "transformer": _save(parts["transformer"].state_dict(), tmp / "sd35_transformer.safetensors"),
        "vae": _save({k[len("first_stage_model."):]: v for k, v in vae_sd.items()}, tmp / "sd35_vae.safetensors"),
        "clip_l": _save(parts["clip_l"].state_dict(), tmp / "clip_l.safetensors"),
        # clip_g without the `text_model.` level, t5 with `shared.weight` only: both occur in the wild.
        "clip_g": _save({k.removeprefix("text_model."): v for k, v in parts["clip_g"].state_dict().items()},
                        tmp / "clip_g.safetensors"),
        "t5": _save(t5_sd, tmp / "t5xxl_fp16.safetensors"),
        "aio": _save({**{"model.diffusion_model." + k: v for k, v in parts["transformer"].state_dict().items()},
                      **vae_sd,
                      **{"text_encoders.clip_l.transformer." + k: v for k, v in parts["clip_l"].state_dict().items()},
                      **{"text_encoders.clip_g.transformer." + k: v for k, v in parts["clip_g"].state_dict().items()},
                      **{"text_encoders.t5xxl.transformer." + k: v for k, v in t5_sd.items()}},
                     tmp / "sd3.5_medium_incl_clips.safetensors"),
    }
    return {"parts": parts, "toks": toks, "folder": str(tmp / "folder"), "files": files, "tmp": tmp}


def _assert_teacher(tm, parts):
    _assert_same_weights(parts["transformer"], tm.transformer)
    _assert_same_weights(parts["vae"], tm.vae)
    for kind, enc in tm.text_encoders.items():
        _assert_same_weights(parts[kind], enc)
    assert set(tm.tokenizers) == set(tm.text_encoders)


def test_sd35_teacher_from_folder_files_and_all_in_one(sd35):
    p, f, toks = sd35["parts"], sd35["files"], sd35["toks"]
    tm = load_teacher_models("sd35_medium", folder=sd35["folder"])
    _assert_teacher(tm, p)
    assert set(tm.text_encoders) == {"clip_l", "clip_g", "t5"} and tm.tokenizers["clip_g"] is not None
    tm = load_teacher_models("sd3", transformer=f["transformer"], vae=f["vae"], clip_l=f["clip_l"],
                             clip_g=f["clip_g"], t5=f["t5"], tokenizers=toks, config=sd35["folder"])
    _assert_teacher(tm, p)
    assert tm.family == "sd35_medium"
    tm = load_teacher_models("sd35_medium", transformer=f["aio"], tokenizers=toks, config=sd35["folder"],
                             dtype="bf16")
    assert tm.transformer.dtype == torch.bfloat16 and tm.text_encoders["t5"].dtype == torch.bfloat16
    tm = load_teacher_models("sd35_medium", transformer=f["aio"], tokenizers=toks, config=sd35["folder"])
    _assert_teacher(tm, p)
    with torch.no_grad():  # the T5 input embedding is tied to `shared` after loading from a shared-only file
        assert tm.text_encoders["t5"].get_input_embeddings().weight.data_ptr() == \
            tm.text_encoders["t5"].shared.weight.data_ptr()
    assert detect_file_kind(f["aio"]) == "sd3_checkpoint" and detect_file_kind(f["transformer"]) == "sd3_transformer"
    assert detect_file_kind(f["vae"]) == "vae_16ch" and detect_file_kind(f["t5"]) == "t5"
    assert detect_file_kind(f["clip_l"]) == "clip" and detect_file_kind(sd35["folder"]) == "sd35_folder"


def test_teacher_missing_parts_and_strict_text_encoders(sd35):
    f, toks, cfg = sd35["files"], sd35["toks"], sd35["folder"]
    with pytest.raises(ModelLoadError, match="needs its VAE"):
        load_teacher_models("sd35_medium", transformer=f["transformer"], config=cfg)
    with pytest.raises(ModelLoadError, match="needs the clip_g text encoder: give clip_g="):
        load_teacher_models("sd35_medium", transformer=f["transformer"], vae=f["vae"], clip_l=f["clip_l"],
                            t5=f["t5"], tokenizers=toks, config=cfg)
    tm = load_teacher_models("sd35_medium", transformer=f["transformer"], vae=f["vae"], config=cfg,
                             text_encoders=False)
    assert tm.text_encoders == {} and tm.vae is not None
    with pytest.raises(ModelLoadError, match="is a CLIP text encoder, but a t5 text encoder was expected"):
        load_teacher_models("sd35_medium", transformer=f["transformer"], vae=f["vae"], clip_l=f["clip_l"],
                            clip_g=f["clip_g"], t5=f["clip_g"], tokenizers=toks, config=cfg)
    # A text encoder file that lacks a layer: strict, with the missing keys named.
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(f["clip_l"]).items() if ".layers.1." not in k}
    broken = _save(sd, sd35["tmp"] / "clip_l_broken.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing keys \(first: text_model.encoder.layers.1"):
        load_teacher_models("sd35_medium", transformer=f["transformer"], vae=f["vae"], clip_l=broken,
                            clip_g=f["clip_g"], t5=f["t5"], tokenizers=toks, config=cfg)


def test_flux_teacher_from_folder_and_diffusers_layout_files(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    parts = {"transformer": _seeded(tiny_flux_transformer(), 9), "vae": _seeded(tiny_vae(16), 10),
             "clip_l": _seeded(tiny_clip_text("L"), 11), "t5": _seeded(tiny_t5_text(), 12)}
    toks = {"clip_l": tiny_clip_tokenizer(), "t5": tiny_t5_tokenizer()}
    FluxPipeline(transformer=parts["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(), vae=parts["vae"],
                 text_encoder=parts["clip_l"], tokenizer=toks["clip_l"], text_encoder_2=parts["t5"],
                 tokenizer_2=toks["t5"]).save_pretrained(tmp_path / "flux")
    _assert_teacher(load_teacher_models("flux_dev", transformer=str(tmp_path / "flux")), parts)
    files = {k: _save({n: v for n, v in m.state_dict().items() if n != "encoder.embed_tokens.weight"},
                      tmp_path / f"{k}.safetensors") for k, m in parts.items()}
    tm = load_teacher_models("flux_dev", transformer=files["transformer"], vae=files["vae"], clip_l=files["clip_l"],
                             t5=files["t5"], tokenizers=toks, config=str(tmp_path / "flux"))
    _assert_teacher(tm, parts)
    assert set(tm.text_encoders) == {"clip_l", "t5"}
    assert detect_file_kind(files["transformer"]) == "flux_transformer"
    # Wrong family for the file / the folder; the schnell config has no guidance embedding.
    with pytest.raises(ModelLoadError, match="is a Flux transformer, but teacher family sd35_large was given"):
        load_teacher_models("sd35_large", transformer=files["transformer"], vae=files["vae"])
    with pytest.raises(ModelLoadError, match="is a FluxPipeline folder, but teacher family sd35_medium"):
        load_teacher_models("sd35_medium", folder=str(tmp_path / "flux"))
    with pytest.raises(ModelLoadError, match="Flux dev transformer .* use --teacher-family flux_dev"):
        load_teacher_models("flux_schnell", folder=str(tmp_path / "flux"))
    with pytest.raises(ModelLoadError, match="Unknown teacher family 'flux_pro'"):
        load_teacher_models("flux_pro", folder=str(tmp_path / "flux"))


def test_variants_are_told_apart_from_the_header(tmp_path):
    """Real-size variants from key names and shapes alone (files with a few stand-in tensors)."""
    schnell = _save({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1),
                     "model.diffusion_model.img_in.weight": torch.zeros(1)}, tmp_path / "schnell.safetensors")
    with pytest.raises(ModelLoadError, match="Flux schnell transformer .* use --teacher-family flux_schnell"):
        load_teacher_models("flux_dev", transformer=schnell)
    large = _save({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1),
                   "context_embedder.weight": torch.zeros(2432, 1)}, tmp_path / "large.safetensors")
    with pytest.raises(ModelLoadError, match="SD3.5 Large transformer, but teacher family sd35_medium"):
        load_teacher_models("sd35_medium", transformer=large)
    sd3 = _save({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1),
                 "context_embedder.weight": torch.zeros(1536, 1)}, tmp_path / "sd3_medium.safetensors")
    with pytest.raises(ModelLoadError, match="SD3 Medium transformer \\(not 3.5"):
        load_teacher_models("sd35_medium", transformer=sd3)
    unet = _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                  "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
                  "first_stage_model.decoder.conv_in.weight": torch.zeros(1, 4, 1, 1)}, tmp_path / "xl.safetensors")
    assert detect_file_kind(unet) == "sdxl_checkpoint"
    with pytest.raises(ModelLoadError, match="is an SDXL checkpoint, but an SD1.5 all-in-one checkpoint"):
        load_sd15(unet)


def test_missing_pickle_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_sd15(tmp_path / "nope.safetensors")
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    ckpt.write_bytes(b"\x80\x02junk")
    with pytest.raises(ModelLoadError, match="pickle.*never unpickles.*Convert it to .safetensors"):
        load_sd15(ckpt)
    disguised = tmp_path / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, disguised)
    with pytest.raises(ModelLoadError, match="pickle.*detected from its content"):
        detect_file_kind(disguised)
    good = _save({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "vae.safetensors")
    with open(good, "rb") as fh:
        data = fh.read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_vae(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        detect_file_kind(garbage)
    assert detect_file_kind(good) == "vae_4ch"
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        load_sd15(tmp_path)
