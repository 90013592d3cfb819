"""The pack inside a real, headless ComfyUI (opt-in: set COMFYUI_PATH to a ComfyUI checkout).

ComfyUI runs as its own process (`main.py --cpu` on 127.0.0.1, a temporary --base-directory), with the pack
linked in as `custom_nodes/cross-space-distillation` (a folder name with hyphens, as users get it from git).
Prompts go through POST /prompt like the web UI's; results come back through SaveLatent files and /history.
Expected values are computed here with diffusers on the same tiny random-init weights.

Tiny models: ComfyUI detects model families by their real sizes. A tiny SD3.5 transformer with 64-wide
attention heads is detected by ComfyUI itself and loaded by the core "Load Diffusion Model" node. Tiny SD1.5
UNets/VAEs and a tiny Flux are not (ComfyUI hard-codes their widths), so a small test-only node pack, written
into the temporary custom_nodes folder, builds them with ComfyUI's own classes: the SD15 / Flux model configs
of comfy.supported_models, ComfyUI's key conversions and detection, strict weight loading, comfy.sd.VAE with a
tiny config. The same pack turns saved tensors into CONDITIONING, since tiny text encoders would need the same
treatment and the nodes under test only see CONDITIONING.

The training nodes load with the library, which reads SD1.5 single files with the pack's shipped real-size configs;
the pack is linked in with tiny configs in place of training/models/configs/sd15, so the templates' student single file
(a tiny one under its real name) goes through the same loading code, with ComfyUI's real bundled tokenizer.

COMFYUI_PYTHON picks the interpreter that runs ComfyUI (default: this one); see docs/comfyui.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH", "")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK = "cross-space-distillation"

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration "
                                           "tests (see docs/comfyui.md)"),
]

FIXTURE_PACK = r'''
"""Test-only nodes: tiny models built with ComfyUI's own classes, and CONDITIONING from saved tensors."""
import json
import torch
import comfy.model_detection, comfy.model_management as mm, comfy.model_patcher, comfy.sd, comfy.supported_models
import comfy.utils
import folder_paths
from safetensors.torch import load_file


def _patcher(model_config, state_dict):
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, "")
    model.diffusion_model.load_state_dict(state_dict, strict=True)  # every weight, exact names and shapes
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _vae(path, config):
    params = json.loads(config)
    vae = comfy.sd.VAE(sd=load_file(path), config={"params": params})
    # ComfyUI reads this from the weights when it detects a VAE itself; its config path keeps the default 4.
    vae.latent_channels = params["ddconfig"]["z_channels"]
    return vae


class TinySD15:
    """Stands in for CheckpointLoaderSimple with an SD1.5 file; the CLIP slot stays empty (its text encodes are
    replaced by saved conditioning)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_path": ("STRING", {}), "vae_path": ("STRING", {}), "vae_config": ("STRING", {})}}
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "csd_tests"

    def load(self, unet_path, vae_path, vae_config):
        diffusers_sd = load_file(unet_path)
        # ComfyUI's own diffusers->LDM key map for this layout, then ComfyUI's own detection of the result.
        layout = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
                  "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}
        keymap = comfy.utils.unet_to_diffusers(layout)
        sd = {keymap[k]: v for k, v in diffusers_sd.items()}
        config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(sd, ""))
        return (_patcher(config, sd), None, _vae(vae_path, vae_config))


class TinyTeacherCheckpoint:
    """Stands in for CheckpointLoaderSimple with an SD3.5 file: the model through ComfyUI's own diffusion-model
    loader (what Load Diffusion Model runs), a tiny VAE, an empty CLIP slot."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {}), "vae_path": ("STRING", {}), "vae_config": ("STRING", {})}}
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "csd_tests"

    def load(self, unet_name, vae_path, vae_config):
        model = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        return (model, None, _vae(vae_path, vae_config))


class TinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_path": ("STRING", {}), "vae_config": ("STRING", {})}}
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "csd_tests"

    def load(self, vae_path, vae_config):
        return (_vae(vae_path, vae_config),)


class TinyFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {}), "axes_dim": ("STRING", {})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "csd_tests"

    def load(self, path, axes_dim):
        sd = comfy.model_detection.convert_diffusers_mmdit(load_file(path), "")
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
        # ComfyUI's Flux detection assumes the real widths; read the tiny ones from the weights.
        hidden = sd["img_in.weight"].shape[0]
        head = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        unet_config.update(hidden_size=hidden, num_heads=hidden // head, context_in_dim=sd["txt_in.weight"].shape[1],
                           axes_dim=json.loads(axes_dim))
        return (_patcher(comfy.supported_models.Flux(unet_config), sd),)


class Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "csd_tests"

    def load(self, path):
        t = load_file(path)
        extra = {"pooled_output": t["pooled"]} if "pooled" in t else {}
        if "guidance" in t:
            extra["guidance"] = float(t["guidance"])
        return ([[t["cond"], extra]],)


class InterruptAt:
    """Passes a string through and arms a one-shot cancel: the first progress update at or past `step` sets
    ComfyUI's interrupt flag, exactly what the queue's Cancel button (POST /interrupt) does, at a known step."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {}), "step": ("INT", {"default": 2, "min": 1, "max": 1000000})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "arm"
    CATEGORY = "csd_tests"

    @classmethod
    def IS_CHANGED(cls, text, step):
        return float("nan")  # armed on every run

    def arm(self, text, step):
        original = comfy.utils.PROGRESS_BAR_HOOK

        def hook(value, total, preview, prompt_id=None, node_id=None):
            if comfy.utils.PROGRESS_BAR_HOOK is hook and value >= step:
                comfy.utils.set_progress_bar_global_hook(original)  # one shot
                mm.interrupt_current_processing(True)
            return original(value, total, preview, prompt_id=prompt_id, node_id=node_id)

        comfy.utils.set_progress_bar_global_hook(hook)
        return (text,)


NODE_CLASS_MAPPINGS = {"CSDTest_TinySD15": TinySD15, "CSDTest_TinyTeacherCheckpoint": TinyTeacherCheckpoint,
                       "CSDTest_TinyVAE": TinyVAE, "CSDTest_TinyFlux": TinyFlux, "CSDTest_Conditioning": Conditioning,
                       "CSDTest_InterruptAt": InterruptAt}
'''

# comfy.sd.VAE config for the tiny 4-channel test VAE (ComfyUI's GroupNorm has 32 groups: widths of 32).
VAE_CONFIG = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}
VAE16_CONFIG = {"embed_dim": 16, "ddconfig": dict(VAE_CONFIG["ddconfig"], z_channels=16)}
FLUX_AXES = [4, 6, 6]


def _load_specs():
    """nodes/specs.py by path (importing the `nodes` package itself needs ComfyUI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("csd_node_specs_it", ROOT / "nodes" / "specs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _save(path: Path, tensors: dict) -> str:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _save_latent(path: Path, samples: torch.Tensor) -> None:
    # The format of ComfyUI's SaveLatent / LoadLatent.
    _save(path, {"latent_tensor": samples, "latent_format_version_0": torch.tensor([])})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = 900) -> dict:  # one training step took minutes on a busy machine
        """Queue an API-format prompt and wait for it; returns the /history entry."""
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prompt refused: {e.read().decode()}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
                return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish; log tail:\n{self.log_tail()}")

    def run_ok(self, prompt: dict) -> dict:
        entry = self.run(prompt)
        assert entry["status"]["status_str"] == "success", f"{_errors(entry)}\n{self.log_tail()}"
        return entry

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def output_latent(self, prefix: str) -> torch.Tensor:
        from safetensors.torch import load_file

        files = sorted((self.base / "output").glob(f"{prefix}*.latent"))
        assert files, f"no {prefix}*.latent in the output folder"
        return load_file(str(files[-1]))["latent_tensor"]


def _errors(entry: dict) -> str:
    return "; ".join(f"{d.get('node_type')}: {d.get('exception_message')}" for ev, d in entry["status"]["messages"]
                     if ev == "execution_error") or str(entry["status"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random-init models of the real classes, saved where ComfyUI (and the fixture pack) read them."""
    from bridge import Bridge, save_bridge
    from training.models.tiny import tiny_flux_transformer, tiny_sd3_transformer, tiny_unet, tiny_vae

    base = tmp_path_factory.mktemp("comfy_base")
    files = base / "tiny"
    torch.manual_seed(0)
    unet = tiny_unet(norm_num_groups=32).eval()
    vae = tiny_vae(4, block_out_channels=(32, 32, 32, 32), norm_num_groups=32).eval()
    other_vae = tiny_vae(4, block_out_channels=(32, 32, 32, 32), norm_num_groups=32).eval()
    # 64-wide heads, hidden = 64 * layers: the shape rule ComfyUI's SD3 detection relies on.
    sd35 = tiny_sd3_transformer("sd35", attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128).eval()
    flux = tiny_flux_transformer(axes_dims_rope=tuple(FLUX_AXES)).eval()
    # ComfyUI's VAE class always has quant convs: the tiny teacher VAE keeps them.
    vae16 = tiny_vae(16, block_out_channels=(32, 32, 32, 32), norm_num_groups=32, use_quant_conv=True,
                     use_post_quant_conv=True)
    bridges = base / "models" / "bridges"
    # Named like the Bridges the reference workflows pick.
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=vae, width=16, depth=1).eval()
    with torch.no_grad():  # a random but not-tiny projector output, so the comparison means something
        for p in bridge.projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_bridge(bridges / "sd15_to_sd35.safetensors", bridge)
    save_bridge(bridges / "sd15_to_flux.safetensors", Bridge.create("sd15", "flux", k=2, student_vae=vae, width=16,
                                                                    depth=1))
    save_bridge(bridges / "tiny_other_vae.safetensors",
                Bridge.create("sd15", "sd3", k=2, student_vae=other_vae, width=16, depth=1))
    # 'features' Bridges: the projector reads the decoder's own activations at the teacher grid.
    feature_bridges = {}
    for k in (1, 2):
        fb = Bridge.create("sd15", "sd3", k=k, student_vae=vae, tap="features", width=16, depth=1).eval()
        with torch.no_grad():
            for p in fb.projector.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_bridge(bridges / f"tiny_features_k{k}.safetensors", fb)
        feature_bridges[k] = fb
    paths = {
        "unet": _save(files / "unet.safetensors", unet.state_dict()),
        "vae": _save(files / "vae.safetensors", vae.state_dict()),
        "vae16": _save(files / "vae16.safetensors", vae16.state_dict()),
        "flux": _save(files / "flux.safetensors", flux.state_dict()),
    }
    _save(base / "models" / "diffusion_models" / "tiny_sd35.safetensors", sd35.state_dict())
    g = torch.Generator().manual_seed(1)
    conds = {
        "sd15": {"cond": torch.randn(1, 7, 32, generator=g)},
        "sd3_pos": {"cond": torch.randn(1, 9, 64, generator=g), "pooled": torch.randn(1, 64, generator=g)},
        "sd3_neg": {"cond": torch.randn(1, 9, 64, generator=g), "pooled": torch.randn(1, 64, generator=g)},
        "flux_pos": {"cond": torch.randn(1, 9, 64, generator=g), "pooled": torch.randn(1, 32, generator=g),
                     "guidance": torch.tensor(3.5)},
        "flux_neg": {"cond": torch.randn(1, 9, 64, generator=g), "pooled": torch.randn(1, 32, generator=g),
                     "guidance": torch.tensor(3.5)},
    }
    for name, tensors in conds.items():
        paths[name] = _save(files / f"{name}.safetensors", tensors)
    sd15_clip = _save_training_models(base, unet, vae, sd35, vae16)
    lora_student = _save_lora_student(base, unet)
    teacher_latent = torch.randn(4, 16, 8, 8, generator=g) * 0.8 + 0.1  # raw teacher-space latents
    _save_latent(base / "input" / "teacher.latent", teacher_latent)
    _save_latent(base / "input" / "student.latent", torch.randn(3, 4, 8, 8, generator=g))
    return dict(base=base, paths=paths, conds=conds, unet=unet, vae=vae, sd35=sd35, flux=flux, bridge=bridge,
                feature_bridges=feature_bridges, teacher_latent=teacher_latent, sd15_clip=sd15_clip,
                lora_student=lora_student)


TRAIN_STUDENT, TRAIN_TEACHER, TRAIN_IMAGES = "tiny_sd15", "tiny_sd35", "it_images"
FOLDER_MARK = " (diffusers folder)"  # how the training nodes list diffusers folders (nodes/specs.py DIFFUSERS_MARK)
SD15_FILE = "v1-5-pruned-emaonly.safetensors"  # the student checkpoint the templates ship with
# ComfyUI's own CLIP tokenizer (what SD1.5 single files are tokenized with): its vocabulary size.
CLIP_VOCAB = 49408
LORA_FILE = "sd15_one_step_sd35.safetensors"  # named like the LoRA workflow 7 picks


def _save_lora_student(base: Path, unet):
    """A LoRA student of the tiny SD1.5 UNet (rank 4, alpha 8, random non-zero weights) written by the library's
    export into models/loras; returns the student (its fused UNet is what ComfyUI must reproduce)."""
    import copy

    from training.models.export import save_student_lora
    from training.student import OneStepStudent

    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    student = OneStepStudent(copy.deepcopy(unet))
    student.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(0.2 * torch.randn_like(p))
    save_student_lora(base / "models" / "loras" / LORA_FILE, student.eval())
    return student


def _save_training_models(base: Path, unet, vae, sd35, vae16):
    """What the training nodes load with the library (diffusers classes, not ComfyUI's): the same tiny SD1.5 UNet/VAE
    and SD3.5 transformer/VAE as diffusers folders in models/diffusers (ComfyUI's folder for them; our loaders read
    a folder's own configs, while single files are read with the shipped real-size configs), with tiny text
    encoders; a folder of captioned images; and the SD1.5 single file of the templates. Returns that file's CLIP."""
    from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)

    from training import data
    from training.models import tiny

    torch.manual_seed(2)
    folders = base / "models" / "diffusers"
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          steps_offset=1, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=tiny.tiny_clip_text("L"), tokenizer=tiny.tiny_clip_tokenizer(),
                            unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folders / TRAIN_STUDENT)
    StableDiffusion3Pipeline(
        transformer=sd35, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae16,
        text_encoder=tiny.tiny_clip_text("L", with_projection=True), tokenizer=tiny.tiny_clip_tokenizer(),
        text_encoder_2=tiny.tiny_clip_text("G"), tokenizer_2=tiny.tiny_clip_tokenizer(),
        text_encoder_3=tiny.tiny_t5_text(), tokenizer_3=tiny.tiny_t5_tokenizer(),
    ).save_pretrained(folders / TRAIN_TEACHER)
    data.make_synthetic_images(base / "input" / TRAIN_IMAGES, n=6, size=128, seed=0)
    return _save_sd15_single_file(base, unet, vae)


def _save_sd15_single_file(base: Path, unet, vae):
    """The tiny SD1.5 model as the single-file checkpoint the templates name (original key layout, no tokenizer: the
    training nodes take ComfyUI's bundled one), and its component configs. The library reads SD1.5 single files with
    the pack's shipped configs (training/models/configs/sd15, real sizes); `_link_pack` puts these in their place."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    from training.models import loading
    from training.models.export import export_single_file

    configs = base / "tiny_configs" / "sd15"
    unet.save_config(configs / "unet")
    vae.save_config(configs / "vae")
    # A tiny CLIP-L over the real CLIP vocabulary, so ComfyUI's real tokenizer drives it; 77 positions as CLIP-L.
    real = CLIPTextConfig.from_pretrained(os.path.join(loading.config_dir("sd15"), "text_encoder"))
    clip = CLIPTextModel(CLIPTextConfig(**{**real.to_dict(), "hidden_size": 32, "intermediate_size": 37,
                                           "num_hidden_layers": 2, "num_attention_heads": 4,
                                           "vocab_size": CLIP_VOCAB})).eval()
    assert clip.config.max_position_embeddings == 77
    clip.config.save_pretrained(configs / "text_encoder")
    shutil.copytree(os.path.join(loading.config_dir("sd15"), "scheduler"), configs / "scheduler")
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    export_single_file(base / "models" / "checkpoints" / SD15_FILE, unet, vae, clip, dtype=torch.float32)
    return clip


def _link_pack(dest: Path, sd15_configs: Path) -> None:
    """The pack in custom_nodes: links into this checkout, except that training/models/configs/sd15 (the configs SD1.5
    single files are read with) holds the tiny model's configs. So the single-file checkpoint of the templates
    loads through exactly the code a real one does."""
    replaced = ROOT / "training" / "models" / "configs" / "sd15"

    def link(src: Path, dst: Path) -> None:
        # Folders on the way to the replaced one are made; everything else is a link into the checkout.
        dst.mkdir()
        for entry in src.iterdir():
            if entry == replaced:
                (dst / entry.name).symlink_to(sd15_configs, target_is_directory=True)
            elif entry in replaced.parents:
                link(entry, dst / entry.name)
            elif entry.name != "__pycache__":
                (dst / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())

    link(ROOT, dest)


def _prepare_base(base: Path) -> None:
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(exist_ok=True)
    if not (nodes_dir / PACK).exists():
        _link_pack(nodes_dir / PACK, base / "tiny_configs" / "sd15")
    (nodes_dir / "csd_it_fixtures").mkdir(exist_ok=True)
    (nodes_dir / "csd_it_fixtures" / "__init__.py").write_text(FIXTURE_PACK)
    for d in ("input", "output", "user", "temp"):
        (base / d).mkdir(exist_ok=True)


def _comfy_cmd(base: Path, *extra: str) -> list[str]:
    return [PYTHON, "main.py", "--cpu", "--base-directory", str(base), "--disable-auto-launch", *extra]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the pack must load from custom_nodes alone
    # ... and find ComfyUI's bundled tokenizers itself (custom_nodes is outside ComfyUI's code, as in ComfyUI Desktop).
    env.pop("COMFYUI_PATH", None)
    return env


@contextlib.contextmanager
def _serve(base: Path, env: dict):
    """ComfyUI on a free port with `base` as its base directory, until the block ends."""
    port = _free_port()
    log = base / "comfyui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_comfy_cmd(base, "--listen", "127.0.0.1", "--port", str(port)), cwd=COMFYUI,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Comfy(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.monotonic() + 900  # a start takes 20 s on a quiet machine, many minutes on a busy one
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.get("/object_info/CSD_LoadBridge")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not start:\n{server.log_tail()}") from None
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def comfy(tiny):
    _prepare_base(tiny["base"])
    with _serve(tiny["base"], _env()) as server:
        yield server


def _lines_about_us(text: str) -> list[str]:
    return [line for line in text.splitlines() if PACK in line or "csd_it_fixtures" in line]


def test_pack_loads_cleanly_in_quick_test(tiny):
    """`main.py --cpu --quick-test-for-ci`: the pack imports; nothing of ours is an error or a warning."""
    base = tiny["base"]
    _prepare_base(base)
    res = subprocess.run(_comfy_cmd(base, "--quick-test-for-ci"), cwd=COMFYUI, capture_output=True, text=True,
                         env=_env(), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    ours = _lines_about_us(out)
    import_lines = [line for line in ours if "seconds" in line and line.rstrip().endswith(PACK)]
    assert import_lines and "IMPORT FAILED" not in import_lines[0], out[-3000:]
    # Any traceback or warning from our files would name the pack folder; only the import-time line may.
    assert all(line in import_lines or "csd_it_fixtures" in line for line in ours), ours


def test_object_info_schemas(comfy):
    specs = _load_specs()
    info = comfy.get("/object_info")
    for spec in specs.ALL:
        node = info[spec.node_id]
        assert node["display_name"] == spec.display_name and node["category"] == spec.category
        assert node["description"] == spec.description
        assert node["input_order"]["required"] == [i.id for i in spec.inputs]
        for name, (typ, opts) in node["input"]["required"].items():
            assert opts.get("tooltip"), f"{spec.node_id}.{name} has no tooltip"
        assert node["output"] == [o.type for o in spec.outputs]
        assert all(node["output_tooltips"]), f"{spec.node_id}: an output without tooltip"
    bridges = info["CSD_LoadBridge"]["input"]["required"]["bridge_name"][1]["options"]
    # Other tests may have published trained Bridges into the folder by now: the list mirrors the folder.
    assert bridges == sorted(p.name for p in (comfy.base / "models" / "bridges").glob("*.safetensors"))
    assert {"sd15_to_flux.safetensors", "sd15_to_sd35.safetensors", "tiny_other_vae.safetensors"} <= set(bridges)
    templates = comfy.get("/workflow_templates")
    assert {p.stem for p in (ROOT / "workflows").glob("*.json")} <= set(templates[PACK])


def _tiny_student(p: dict) -> dict:
    return {"class_type": "CSDTest_TinySD15",
            "inputs": {"unet_path": p["unet"], "vae_path": p["vae"], "vae_config": json.dumps(VAE_CONFIG)}}


def test_one_step_student_and_bridge_project(comfy, tiny):
    p = tiny["paths"]
    prompt = {
        "1": _tiny_student(p),
        "2": {"class_type": "CSDTest_Conditioning", "inputs": {"path": p["sd15"]}},
        "3": {"class_type": "CSD_OneStepSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "seed": 7,
                                                              "width": 64, "height": 48, "batch_size": 3}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "it/student"}},
        "5": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": "sd15_to_sd35.safetensors"}},
        "6": {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["5", 0], "vae": ["1", 2], "latent": ["3", 0],
                                                             "chunk_size": 2}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "it/bridged"}},
    }
    comfy.run_ok(prompt)
    z = comfy.output_latent("it/student")
    assert z.shape == (3, 4, 6, 8)

    # Expected: the library's one-step student (the generator distillation trains) on the noise ComfyUI's
    # KSampler makes for this seed: the node and the trainer agree, so a trained student drops into ComfyUI.
    from training.student import OneStepStudent

    noise = torch.randn((3, 4, 6, 8), generator=torch.manual_seed(7))
    with torch.no_grad():
        expected = OneStepStudent(tiny["unet"])(noise, tiny["conds"]["sd15"]["cond"].expand(3, -1, -1))
    torch.testing.assert_close(z, expected, rtol=1e-3, atol=1e-3)

    bridged = comfy.output_latent("it/bridged")
    assert bridged.shape == (3, 16, 12, 16)  # k = 2 times the student latent
    with torch.no_grad():
        expected = tiny["bridge"](z)  # diffusers decode + projector, in this process
    torch.testing.assert_close(bridged, expected, rtol=1e-3, atol=1e-3)
    assert "different student VAE" not in comfy.log_tail(200)

    # Another Bridge, trained behind another decoder: still runs, with a warning in the log.
    prompt["5"]["inputs"]["bridge_name"] = "tiny_other_vae.safetensors"
    prompt["7"]["inputs"]["filename_prefix"] = "it/other"
    comfy.run_ok(prompt)
    assert "different student VAE" in comfy.log_tail(200)


@pytest.mark.parametrize("tap, k", [("image", 2), ("features", 2), ("features", 1)])
def test_bridge_project_agrees_with_the_library_for_both_taps(comfy, tiny, tap, k):
    """Bridge Project on ComfyUI's own VAE (its LDM-layout decoder: the full decode for 'image', the partial decode to
    the teacher grid for 'features') gives what the library gives with the diffusers VAE of the same weights."""
    from safetensors.torch import load_file

    name = "sd15_to_sd35.safetensors" if tap == "image" else f"tiny_features_k{k}.safetensors"
    prefix = f"it/taps_{tap}_k{k}"
    comfy.run_ok({
        "1": {"class_type": "CSDTest_TinyVAE", "inputs": {"vae_path": tiny["paths"]["vae"],
                                                          "vae_config": json.dumps(VAE_CONFIG)}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "student.latent"}},
        "3": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": name}},
        "4": {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["3", 0], "vae": ["1", 0], "latent": ["2", 0],
                                                             "chunk_size": 2}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
    })
    student_latent = load_file(str(comfy.base / "input" / "student.latent"))["latent_tensor"]
    bridge = tiny["bridge"] if tap == "image" else tiny["feature_bridges"][k]
    assert bridge.tap == tap
    with torch.no_grad():
        expected = bridge(student_latent)
    got = comfy.output_latent(prefix)
    assert got.shape == expected.shape == (3, 16, 8 * k, 8 * k)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_clear_errors_reach_the_user(comfy, tiny):
    """Wrong-space inputs stop the prompt with our message (not a shape error deep inside a model)."""
    p = tiny["paths"]
    bridge_wrong_space = {
        "1": _tiny_student(p),
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "teacher.latent"}},
        "3": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": "sd15_to_sd35.safetensors"}},
        "4": {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["3", 0], "vae": ["1", 2], "latent": ["2", 0],
                                                             "chunk_size": 4}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "it/never"}},
    }
    entry = comfy.run(bridge_wrong_space)
    assert entry["status"]["status_str"] == "error"
    assert "16 channels" in _errors(entry) and "teacher latent" in _errors(entry)

    teacher_vae = dict(bridge_wrong_space, **{
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "student.latent"}},
        "6": {"class_type": "CSDTest_TinyVAE", "inputs": {"vae_path": p["vae16"],
                                                          "vae_config": json.dumps(VAE16_CONFIG)}}})
    teacher_vae["4"] = {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["3", 0], "vae": ["6", 0],
                                                                       "latent": ["2", 0], "chunk_size": 4}}
    entry = comfy.run(teacher_vae)
    assert entry["status"]["status_str"] == "error"
    assert "Connect the student's VAE" in _errors(entry)

    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd35.safetensors", "weight_dtype": "default"}}
    score_student = _score_prompt(loader, p["sd3_pos"], p["sd3_neg"], "0.5", "combined", "it/never")
    score_student["4"]["inputs"]["latent"] = "student.latent"
    entry = comfy.run(score_student)
    assert entry["status"]["status_str"] == "error"
    assert "CSD_TeacherScore" in _errors(entry) and "not student" in _errors(entry)

    select_other_batch = _score_prompt(loader, p["sd3_pos"], p["sd3_neg"], "0.5", "combined", "it/never")
    select_other_batch["9"] = {"class_type": "LoadLatent", "inputs": {"latent": "student.latent"}}
    select_other_batch["6"]["inputs"]["latent"] = ["9", 0]
    entry = comfy.run(select_other_batch)
    assert entry["status"]["status_str"] == "error"
    assert "scores are for 4 samples but the latent batch has 3" in _errors(entry)


def _error(entry: dict) -> dict:
    return next(d for ev, d in entry["status"]["messages"] if ev == "execution_error")


def test_errors_name_the_problem_without_internal_paths(comfy, tiny):
    """ComfyUI shows a failed node as its exception's module-qualified class name and message; the pack's modules are
    named after its folder's path, so its errors must leave as builtin classes. A wrong-size single file says so,
    without diffusers' developer hint (ignore_mismatched_sizes) that would fill the model with random weights."""
    from training.models.export import export_single_file
    from training.models.tiny import tiny_unet

    (comfy.base / "models" / "bridges" / "it_broken.safetensors").write_bytes(b"not a Bridge at all")
    entry = comfy.run({
        "1": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": "it_broken.safetensors"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    err = _error(entry)
    assert err["exception_type"] == "ValueError" and "it_broken.safetensors" in err["exception_message"], err

    wrong = tiny_unet(norm_num_groups=32, block_out_channels=(32, 32))  # not the width of the SD1.5 config
    export_single_file(comfy.base / "models" / "checkpoints" / "it_wrong_size.safetensors", wrong, tiny["vae"],
                       tiny["sd15_clip"])
    prompt = _distill_prompt("it_wrong_size_out", 1, "a red square")
    prompt["1"]["inputs"]["student_checkpoint"] = "it_wrong_size.safetensors"
    err = _error(comfy.run(prompt))
    message = err["exception_message"]
    assert err["exception_type"] == "ValueError", err
    assert "it_wrong_size.safetensors" in message and "does not fit" in message and "expected shape" in message
    assert "ignore_mismatched_sizes" not in message and "low_cpu_mem_usage" not in message
    assert PACK not in err["exception_type"] + message and "custom_nodes" not in message


BLOCK_IMPORTS = r'''
"""Test-only sitecustomize: diffusers and peft cannot be imported, as if never installed in ComfyUI's Python."""
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "peft"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


def test_missing_packages_leave_the_pack_loaded_and_named(tiny, tmp_path):
    """A ComfyUI whose Python lacks diffusers and peft: the pack loads (one line in the log, no import traceback), the
    nodes that need no training libraries work, and the training nodes say which packages to install and how."""
    base = tmp_path / "base"
    base.mkdir()
    for shared in ("models", "input", "tiny_configs"):
        (base / shared).symlink_to(tiny["base"] / shared, target_is_directory=True)
    _prepare_base(base)
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_IMPORTS)
    with _serve(base, dict(_env(), PYTHONPATH=str(tmp_path / "block"))) as server:
        ours = _lines_about_us(server.log.read_text(errors="replace"))
        # The import-time line and our one warning; no traceback through our files (ComfyUI's own may appear).
        loaded = [line for line in ours if "seconds" in line and line.rstrip().endswith(PACK)]
        assert loaded and "IMPORT FAILED" not in loaded[0], ours
        warning = [line for line in ours if line.startswith("Cross-Space Distillation:")]
        assert len(warning) == 1 and "Train Bridge and Distill Student need diffusers, peft" in warning[0], ours
        assert "requirements.txt" in warning[0]
        assert all(line in loaded + warning or "csd_it_fixtures" in line for line in ours), ours

        server.run_ok({
            "1": _tiny_student(tiny["paths"]),
            "2": {"class_type": "LoadLatent", "inputs": {"latent": "student.latent"}},
            "3": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": "sd15_to_sd35.safetensors"}},
            "4": {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["3", 0], "vae": ["1", 2],
                                                                 "latent": ["2", 0], "chunk_size": 4}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "it/nodeps"}}})
        err = _error(server.run(_distill_prompt("it_nodeps", 1, "a red square")))
        message = err["exception_message"]
        assert err["exception_type"] == "RuntimeError", err
        assert "Distill Student needs" in message and "diffusers" in message and "peft" in message
        assert "pip install -r" in message and "requirements.txt" in message and "accelerate" not in message


def _parse_scores(text: str):
    """(sigmas, denoise_error[B], text_alignment[B]) from Teacher Score's table."""
    head, _, *rows = text.splitlines()
    sigmas = [float(s) for s in head.split("sigmas ")[1].split(";")[0].split(", ")]
    err = torch.tensor([float(r.split()[1]) for r in rows])
    align = torch.tensor([float(r.split()[2]) for r in rows])
    return sigmas, err, align


def _score_prompt(model_node: dict, pos: str, neg: str, levels: str, rank_by: str, prefix: str) -> dict:
    return {
        "1": model_node,
        "2": {"class_type": "CSDTest_Conditioning", "inputs": {"path": pos}},
        "3": {"class_type": "CSDTest_Conditioning", "inputs": {"path": neg}},
        "4": {"class_type": "LoadLatent", "inputs": {"latent": "teacher.latent"}},
        "5": {"class_type": "CSD_TeacherScore", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                            "negative": ["3", 0], "latent": ["4", 0],
                                                            "noise_levels": levels, "num_seeds": 2,
                                                            "eval_seed": 5}},
        "6": {"class_type": "CSD_SelectBest", "inputs": {"latent": ["4", 0], "scores": ["5", 0], "count": 2,
                                                          "rank_by": rank_by}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def _check_scores(comfy, entry, prefix, x0_model, velocity, conds, rank_by):
    """Recompute the scores with diffusers at the sigmas ComfyUI used; check the table and the selection."""
    from training.scoring import teacher_scores

    text = entry["outputs"]["8"]["text"][0]
    sigmas, err, align = _parse_scores(text)

    def denoise(x, sigma, which):
        with torch.no_grad():
            return x - sigma.view(-1, 1, 1, 1) * velocity(x, sigma, conds[which])

    expected = teacher_scores(x0_model, denoise, sigmas, [5, 6])
    torch.testing.assert_close(err, expected.denoise_error, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(align, expected.text_alignment, rtol=2e-3, atol=1e-4)
    return sigmas, comfy.output_latent(prefix), expected.select(2, rank_by)


def test_teacher_score_sd35_loaded_by_core_loader(comfy, tiny):
    p = tiny["paths"]
    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd35.safetensors", "weight_dtype": "default"}}
    entry = comfy.run_ok(_score_prompt(loader, p["sd3_pos"], p["sd3_neg"], "0.3, 0.6", "denoise_error", "it/sd35"))
    raw = tiny["teacher_latent"]
    x0 = (raw - 0.0609) * 1.5305  # SD3 model space
    c = tiny["conds"]
    conds = {w: c[f"sd3_{k}"] for w, k in (("positive", "pos"), ("negative", "neg"))}

    def velocity(x, sigma, cond):
        b = x.shape[0]
        return tiny["sd35"](hidden_states=x, encoder_hidden_states=cond["cond"].expand(b, -1, -1),
                            pooled_projections=cond["pooled"].expand(b, -1), timestep=sigma * 1000).sample

    sigmas, best, order = _check_scores(comfy, entry, "it/sd35", x0, velocity, conds, "denoise_error")
    # The teacher's own schedule: SD3's timestep shift of 3.
    assert sigmas == pytest.approx([3 * t / (1 + 2 * t) for t in (0.3, 0.6)], rel=1e-5)
    torch.testing.assert_close(best, raw[order])


def test_teacher_score_flux_with_guidance(comfy, tiny):
    from diffusers import FluxPipeline

    p = tiny["paths"]
    loader = {"class_type": "CSDTest_TinyFlux", "inputs": {"path": p["flux"], "axes_dim": json.dumps(FLUX_AXES)}}
    entry = comfy.run_ok(_score_prompt(loader, p["flux_pos"], p["flux_neg"], "0.4, 0.8", "text_alignment",
                                       "it/flux"))
    raw = tiny["teacher_latent"]
    x0 = (raw - 0.1159) * 0.3611  # Flux model space
    c = tiny["conds"]
    conds = {w: c[f"flux_{k}"] for w, k in (("positive", "pos"), ("negative", "neg"))}

    def velocity(x, sigma, cond):
        # diffusers' own Flux packing helpers: 2x2 patches as tokens, image ids (0, row, col).
        b, ch, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, ch, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = tiny["flux"](hidden_states=packed, timestep=sigma, guidance=torch.full((b,), float(cond["guidance"])),
                           pooled_projections=cond["pooled"].expand(b, -1),
                           encoder_hidden_states=cond["cond"].expand(b, -1, -1),
                           txt_ids=torch.zeros(cond["cond"].shape[1], 3), img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

    sigmas, best, order = _check_scores(comfy, entry, "it/flux", x0, velocity, conds, "text_alignment")
    assert all(0 < s < 1 for s in sigmas)
    torch.testing.assert_close(best, raw[order])


# ---------------------------------------------------------------------------------------------- workflows

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the web UI does on "Queue": UI-format workflow -> API-format prompt (widgets in schema order, a seed's
    extra "control after generate" value skipped, links as [source id, slot], frontend-only notes dropped)."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info or node.get("mode", 0) != 0:
            continue  # MarkdownNote and friends live only in the frontend
        info = object_info[node["type"]]
        specs_ = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        inputs = {}
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, *_ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        values = list(node.get("widgets_values", []))
        for name in order:
            typ, opts = specs_[name][0], (specs_[name][1] if len(specs_[name]) > 1 else {})
            if name in inputs or not (isinstance(typ, list) or typ in WIDGET_TYPES):
                continue
            inputs[name] = values.pop(0)
            if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                values.pop(0)
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def tinyfy(prompt: dict, p: dict) -> dict:
    """Swap the real model files for the tiny ones: loaders -> test loaders, text encodes -> saved conditioning
    of the right family, 64 px student images (CPU time). Everything else runs as the workflow says."""
    family = {}
    for nid, node in list(prompt.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple" and inp["ckpt_name"].startswith("v1-5"):
            prompt[nid] = _tiny_student(p)
            family[nid] = "sd15"
        elif ct == "CheckpointLoaderSimple" and inp["ckpt_name"].startswith("sd3.5"):
            prompt[nid] = {"class_type": "CSDTest_TinyTeacherCheckpoint",
                           "inputs": {"unet_name": "tiny_sd35.safetensors", "vae_path": p["vae16"],
                                      "vae_config": json.dumps(VAE16_CONFIG)}}
            family[nid] = "sd3"
        elif ct == "UNETLoader" and inp["unet_name"].startswith("flux"):
            prompt[nid] = {"class_type": "CSDTest_TinyFlux", "inputs": {"path": p["flux"],
                                                                         "axes_dim": json.dumps(FLUX_AXES)}}
        elif ct == "VAELoader":
            prompt[nid] = {"class_type": "CSDTest_TinyVAE", "inputs": {"vae_path": p["vae16"],
                                                                        "vae_config": json.dumps(VAE16_CONFIG)}}
        elif ct in ("TripleCLIPLoader", "DualCLIPLoader"):
            family[nid] = "sd3" if ct == "TripleCLIPLoader" else "flux"
            del prompt[nid]
        elif ct == "CSD_OneStepSampler":
            inp.update(width=64, height=64)
        elif ct in ("CSD_TrainBridge", "CSD_DistillStudent"):
            # The student as the template ships it: the SD1.5 single file (here a tiny one under its name).
            assert inp["student_checkpoint"] == SD15_FILE, inp["student_checkpoint"]
            inp.update(_tiny_training(inp["teacher_family"]), student_checkpoint=SD15_FILE, steps=1, batch_size=1,
                       output_name=f"it_workflow_{inp['output_name']}")
            # Distill Student runs its default recipe (pairs, regression warm-up, then DMD), in miniature.
            inp.update(images=TRAIN_IMAGES, student_res=64) if ct == "CSD_TrainBridge" else inp.update(
                resolution=64, regression_pairs=2, regression_warmup_steps=2)
    for nid, node in prompt.items():
        if node["class_type"] == "CLIPTextEncode":
            src = node["inputs"]["clip"][0]
            while src in prompt and prompt[src]["class_type"] == "LoraLoader":  # Load LoRA passes the CLIP on
                src = prompt[src]["inputs"]["clip"][0]
            fam = family[src]
            name = {"sd15": "sd15", "flux": "flux_pos"}.get(fam) or ("sd3_neg" if not node["inputs"]["text"] else
                                                                      "sd3_pos")
            prompt[nid] = {"class_type": "CSDTest_Conditioning", "inputs": {"path": p[name]}}
    return prompt


def _check_student_prompts_tokenized_by_comfyui(comfy, tiny, ui: dict) -> None:
    """Workflow 6 on its single-file student: the prompts went through ComfyUI's bundled CLIP tokenizer (whose config
    claims 8192 tokens) into 77-token embeddings of the checkpoint's own CLIP, as the library computes them here."""
    from transformers import CLIPTokenizer

    from training.distill import parse_prompts
    from training.models.text import TextCond, encode_sd15

    bundled = Path(COMFYUI) / "comfy" / "sd1_tokenizer"
    assert json.loads((bundled / "tokenizer_config.json").read_text())["model_max_length"] == 8192
    node = next(n for n in ui.values() if n["type"] == "CSD_DistillStudent")
    widgets = [i.id for i in _load_specs().DISTILL_STUDENT.inputs if i.is_widget]
    run = comfy.base / "output" / "csd_runs" / f"distill_it_workflow_{node['widgets_values'][widgets.index('output_name')]}"
    cached = TextCond.load(run / "cache" / "student.safetensors")
    prompts = parse_prompts(node["widgets_values"][8])
    expected = encode_sd15(prompts, tiny["sd15_clip"], CLIPTokenizer.from_pretrained(bundled))
    assert cached.prompt_embeds.shape == (len(prompts), 77, 32)
    torch.testing.assert_close(cached.prompt_embeds, expected.prompt_embeds, rtol=1e-4, atol=1e-5)


def _tiny_training(family: str) -> dict:
    """The training nodes' model choices for the tiny diffusers folders (the teacher folder holds its own VAE and
    text encoders, so those inputs are (none))."""
    assert family.startswith("sd35"), "only a tiny SD3.5 teacher folder is prepared"
    return dict(student_checkpoint=TRAIN_STUDENT + FOLDER_MARK, teacher_model=TRAIN_TEACHER + FOLDER_MARK,
                teacher_vae="(none)", clip_l="(none)", clip_g="(none)", t5="(none)")


def _images(comfy, entry: dict, node_id: str) -> list:
    from PIL import Image

    out = []
    for im in entry["outputs"][node_id]["images"]:
        folder = comfy.base / im["type"] / im["subfolder"]
        with Image.open(folder / im["filename"]) as f:
            out.append(f.size)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_reference_workflow_runs_on_tiny_models(comfy, tiny, name):
    workflow = json.loads((ROOT / "workflows" / name).read_text())
    info = comfy.get("/object_info")
    ui = {str(n["id"]): n for n in workflow["nodes"]}
    before = len(comfy.log.read_text(errors="replace"))
    entry = comfy.run_ok(tinyfy(ui_to_api(workflow, info), tiny["paths"]))
    if any(n["type"] == "LoraLoader" for n in workflow["nodes"]):
        assert not _unloaded_lora_keys(comfy, before)  # the student LoRA (models/loras/LORA_FILE) loaded whole
    outputs = entry["outputs"]
    image_nodes = [i for i, n in ui.items() if n["type"] in ("SaveImage", "PreviewImage")]
    assert image_nodes and set(image_nodes) <= set(outputs)
    if name.startswith(("5_", "6_")):  # training: the result file is written and its name shown; a preview grid
        folder = "bridges" if name.startswith("5_") else "checkpoints"
        shown = next(o["text"][0] for o in outputs.values() if "text" in o)
        assert shown.startswith("it_workflow_") and (comfy.base / "models" / folder / shown).is_file()
        assert all(_images(comfy, entry, i) for i in image_nodes)
        # Distill Student's recipe in miniature: 2 warm-up steps on the 2 pairs it made, then 1 DMD step.
        assert (f"{'Train Bridge: 1' if name.startswith('5_') else 'Distill Student: 3'} steps (started)" in
                comfy.log_tail(300))
        if name.startswith("6_"):
            _check_student_prompts_tokenized_by_comfyui(comfy, tiny, ui)
            from safetensors import safe_open

            run = next((comfy.base / "output" / "csd_runs").glob("distill_it_workflow_*"))
            with safe_open(str(run / "pairs.safetensors"), "pt") as f:
                assert f.get_slice("noise").get_shape()[0] == 2
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert rows[-1]["step"] == 3 and "fake_loss" in rows[-1] and "warmup" not in rows[-1]  # DMD came last
        return
    for i in image_nodes:
        sizes = _images(comfy, entry, i)
        # Student images are 64 px; everything decoded by a teacher VAE comes from a Bridge (k = 2): 128 px.
        teacher = ui[i].get("title", "").startswith("Bridge") or ui[i]["type"] == "SaveImage" and "handoff" in name
        assert sizes and all(s == ((128, 128) if teacher else (64, 64)) for s in sizes), (ui[i], sizes)
    if name.startswith("1_"):
        assert len(_images(comfy, entry, image_nodes[0])) == 4  # the batch
    if name.startswith("3_"):
        save = next(i for i in image_nodes if ui[i]["type"] == "SaveImage")
        assert len(_images(comfy, entry, save)) == 2  # best 2 of 8
        table = next(o["text"][0] for o in outputs.values() if "text" in o)
        assert len(table.splitlines()) == 2 + 8


# ---------------------------------------------------------------------------------------------- training nodes

# The training nodes' memory inputs at their defaults (the preflight runs as for a user).
MEMORY_DEFAULTS = dict(memory="auto", gradient_checkpointing="auto", gradient_accumulation=1, teacher_storage="auto",
                       teacher_offload=False)


def _train_bridge_prompt(name: str, steps: int, images) -> dict:
    # Reconstruction only (attention fidelity runs in workflow 5's test): the teacher passes are most of the CPU time.
    # The 'features' tap here (workflow 5 trains an 'image' Bridge).
    return {
        "1": {"class_type": "CSD_TrainBridge", "inputs": {
            **_tiny_training("sd35_medium"), "student_vae": "(none)", "teacher_family": "sd35_medium",
            "images": images, "output_name": name, "steps": steps, "batch_size": 2, "lr": 1e-3, "attn_weight": 0.0,
            "student_res": 64, "tap": "features", "train_seed": 0, "resume": True, **MEMORY_DEFAULTS}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }


def _state_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(json.loads(f.metadata()["state"])["extra"]["step"])


def test_training_nodes_in_object_info(comfy):
    info = comfy.get("/object_info")
    for node_id in ("CSD_TrainBridge", "CSD_DistillStudent"):
        node = info[node_id]
        assert node["output_node"] is True and node["category"] == "cross-space/training"
        required = node["input"]["required"]
        assert all(opts.get("tooltip") for _, opts in required.values()), node_id
        extra = ["STRING"] if node_id == "CSD_DistillStudent" else []  # lora_name
        assert node["output"] == ["STRING", "IMAGE", *extra] and all(node["output_tooltips"])
        # Model choices come from ComfyUI's folders, diffusers model folders included; optional files start
        # with (none).
        # Files and diffusers folders side by side, the folders marked as such.
        assert {TRAIN_STUDENT + FOLDER_MARK, SD15_FILE} <= set(required["student_checkpoint"][1]["options"])
        assert TRAIN_TEACHER + FOLDER_MARK in required["teacher_model"][1]["options"]
        assert "tiny_sd35.safetensors" in required["teacher_model"][1]["options"]  # models/diffusion_models
        assert required["clip_g"][1]["options"][0] == "(none)"
    assert "sd15_to_sd35.safetensors" in info["CSD_DistillStudent"]["input"]["required"]["bridge_name"][1]["options"]


def _cancel_at_step_2(comfy, prompt: dict, text: str, run, published) -> None:
    """Queue `prompt` with its text input (node "9") cancelling the queue at step 2: the prompt ends interrupted, the
    run folder holds a training state at step 2 and nothing is published."""
    prompt["9"] = {"class_type": "CSDTest_InterruptAt", "inputs": {"text": text, "step": 2}}
    entry = comfy.run(prompt)
    events = [ev for ev, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, _errors(entry)
    assert _state_step(run / "train_state.safetensors") == 2
    assert not published.exists()


def test_train_bridge_cancel_resume_and_use(comfy, tiny):
    """Cancel after step 2 of 3: the prompt ends as interrupted, the run folder holds a training state at step 2 and
    nothing is published. Queueing again resumes at step 2 and finishes: the Bridge lands in models/bridges, loads
    with the library, and Load Bridge + Bridge Project use it with the decoder it was trained behind."""
    from bridge import load_bridge, read_bridge_metadata

    run = comfy.base / "output" / "csd_runs" / "bridge_it_cancel"
    published = comfy.base / "models" / "bridges" / "it_cancel.safetensors"
    _cancel_at_step_2(comfy, _train_bridge_prompt("it_cancel", 3, ["9", 0]), TRAIN_IMAGES, run, published)

    entry = comfy.run_ok(_train_bridge_prompt("it_cancel", 3, TRAIN_IMAGES))
    assert "3 steps (resumed from 2)" in comfy.log_tail(200)
    assert _state_step(run / "train_state.safetensors") == 3
    assert entry["outputs"]["2"]["text"] == ["it_cancel.safetensors"]
    assert _images(comfy, entry, "3")  # the validation grid
    assert read_bridge_metadata(published)["training_summary"]["steps"] == 3
    trained = load_bridge(published, student_vae=tiny["vae"])
    assert trained.teacher_space.name == "sd3" and trained.k == 2 and trained.tap == "features"

    use = {
        "1": _tiny_student(tiny["paths"]),
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "student.latent"}},
        "3": {"class_type": "CSD_LoadBridge", "inputs": {"bridge_name": "it_cancel.safetensors"}},
        "4": {"class_type": "CSD_BridgeProject", "inputs": {"bridge": ["3", 0], "vae": ["1", 2], "latent": ["2", 0],
                                                             "chunk_size": 4}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "it/trained"}},
    }
    comfy.run_ok(use)
    from safetensors.torch import load_file

    student_latent = load_file(str(comfy.base / "input" / "student.latent"))["latent_tensor"]
    with torch.no_grad():
        expected = trained(student_latent)  # diffusers decode + the trained projector, in this process
    torch.testing.assert_close(comfy.output_latent("it/trained"), expected, rtol=1e-3, atol=1e-3)
    assert "different student VAE" not in comfy.log_tail(200)  # trained behind this very decoder


def _distill_prompt(name: str, steps: int, prompts) -> dict:
    return {
        "1": {"class_type": "CSD_DistillStudent", "inputs": {
            **_tiny_training("sd35_medium"), "bridge_name": "sd15_to_sd35.safetensors", "teacher_family": "sd35_medium",
            "prompts": prompts, "prompts_file": "", "steps": steps, "batch_size": 1, "resolution": 64,
            "student_lr": 1e-5, "student_lora_rank": 0, "fake_lr": 1e-4, "guidance": 4.5, "train_seed": 0,
            "output_name": name, "resume": True, "regression_pairs": 0, "regression_warmup_steps": 0,  # plain DMD
            "fake_guidance": 0.0, "optimizer": "adamw", **MEMORY_DEFAULTS}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }


def test_distill_student_cancel_and_resume(comfy):
    """Cancel after step 2 of 3: interrupted, a training state at step 2 in the run folder, no checkpoint published.
    Queueing again resumes at step 2 and publishes the SD1.5 single-file checkpoint (original key layout)."""
    run = comfy.base / "output" / "csd_runs" / "distill_it_distill_cancel"
    published = comfy.base / "models" / "checkpoints" / "it_distill_cancel.safetensors"
    prompts = "a red square\na blue circle"
    _cancel_at_step_2(comfy, _distill_prompt("it_distill_cancel", 3, ["9", 0]), prompts, run, published)

    entry = comfy.run_ok(_distill_prompt("it_distill_cancel", 3, prompts))
    assert "3 steps (resumed from 2)" in comfy.log_tail(200)
    assert entry["outputs"]["2"]["text"] == ["it_distill_cancel.safetensors"]
    from safetensors import safe_open

    with safe_open(str(published), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("cond_stage_model.") for k in keys)


# ---------------------------------------------------------------------------------------------- the student as a LoRA

def _unloaded_lora_keys(comfy, before: int) -> list[str]:
    """ComfyUI's own complaints, in the log since offset `before`, about LoRA keys its key map did not cover."""
    new = comfy.log.read_text(errors="replace")[before:]
    return [line for line in new.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]


def _lora_sampler_prompt(lora_name: str, cond: str, prefix: str) -> dict:
    """Base SD1.5 model -> ComfyUI's Load LoRA -> One-Step Student Sampler, and the base model alone beside it."""
    p_student = {"class_type": "CSD_OneStepSampler", "inputs": {"model": ["3", 0], "positive": ["2", 0], "seed": 7,
                                                                 "width": 64, "height": 48, "batch_size": 3}}
    return {
        "2": {"class_type": "CSDTest_Conditioning", "inputs": {"path": cond}},
        "3": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "4": p_student,
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"{prefix}/lora"}},
        "6": {"class_type": "CSD_OneStepSampler", "inputs": dict(p_student["inputs"], model=["1", 0])},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}/base"}},
    }


def _one_step(unet, tiny) -> torch.Tensor:
    from training.student import OneStepStudent

    noise = torch.randn((3, 4, 6, 8), generator=torch.manual_seed(7))  # what the sampler draws for seed 7
    with torch.no_grad():
        return OneStepStudent(unet)(noise, tiny["conds"]["sd15"]["cond"].expand(3, -1, -1))


def test_lora_student_through_comfyuis_lora_loader(comfy, tiny):
    """The library's LoRA file (kohya layout) on the base tiny SD1.5 model through ComfyUI's own LoraLoader: every key
    maps (ComfyUI's model_lora_keys_unet; it logs each key it cannot place) and the One-Step Student Sampler gives
    the fused student's output."""
    p = tiny["paths"]
    before = len(comfy.log.read_text(errors="replace"))
    comfy.run_ok({"1": _tiny_student(p), **_lora_sampler_prompt(LORA_FILE, p["sd15"], "it_lora")})
    assert not _unloaded_lora_keys(comfy, before)
    got = comfy.output_latent("it_lora/lora")
    expected = _one_step(tiny["lora_student"].merged_unet(), tiny)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert (got - comfy.output_latent("it_lora/base")).abs().max() > 0.1  # the LoRA changed the model


def test_distill_student_lora_is_published_and_applies_to_the_base_model(comfy, tiny):
    """Distill Student with student_lora_rank > 0 publishes models/loras/<name>.safetensors (and says so in
    lora_name); Load LoRA with it on the base model reproduces the student the trainer saved (LoRA fused)."""
    from training.models.export import load_student_unet

    prompt = _distill_prompt("it_distill_lora", 2, "a red square\na blue circle")
    prompt["1"]["inputs"].update(student_lora_rank=4, student_lr=1e-2)
    prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}
    entry = comfy.run_ok(prompt)
    assert entry["outputs"]["4"]["text"] == ["it_distill_lora.safetensors"]
    assert (comfy.base / "models" / "loras" / "it_distill_lora.safetensors").is_file()
    assert (comfy.base / "models" / "checkpoints" / "it_distill_lora.safetensors").is_file()

    p = tiny["paths"]
    before = len(comfy.log.read_text(errors="replace"))
    comfy.run_ok({"1": _tiny_student(p), **_lora_sampler_prompt("it_distill_lora.safetensors", p["sd15"],
                                                                  "it_distill_lora")})
    assert not _unloaded_lora_keys(comfy, before)
    run = comfy.base / "output" / "csd_runs" / "distill_it_distill_lora"
    fused = load_student_unet(run / "student_unet.safetensors").unet
    got = comfy.output_latent("it_distill_lora/lora")
    torch.testing.assert_close(got, _one_step(fused, tiny), rtol=1e-3, atol=1e-4)
    assert (got - comfy.output_latent("it_distill_lora/base")).abs().max() > 1e-3  # two steps moved the LoRA
