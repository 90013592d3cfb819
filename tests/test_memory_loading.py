"""Loading for memory (issue 23): the frozen teacher stored in fp8 (an e4m3fn file kept as it is), offloaded layer by
layer, the fake-score LoRA training on top of both; text encoders loaded alone. Tiny models of the real classes."""

import pytest
import torch
from safetensors.torch import save_file

from training.models import loading, tiny
from training.models.text import TextCond
from training.teachers import is_offloaded, make_teacher

FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _no_comfyui(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


def _model(family):
    torch.manual_seed(0)
    m = tiny.tiny_sd3_transformer("sd35") if family.startswith("sd3") else tiny.tiny_flux_transformer()
    with torch.no_grad():  # weights of a trained scale, so fp8 rounding is a small relative error
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval().requires_grad_(False)


def _inputs(family, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    pooled = 64 if family.startswith("sd3") else 32
    cond = TextCond(torch.randn(b, 7, 64, generator=g), torch.randn(b, pooled, generator=g))
    return torch.randn(b, 16, 8, 8, generator=g), torch.tensor([0.3, 0.7][:b]), cond


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _fp8_file(model, path):
    """What ComfyUI's fp8 files hold: matrices in e4m3fn, vectors (biases, norm scales) in bf16."""
    sd = {k: (v.to(FP8) if v.ndim >= 2 else v.to(torch.bfloat16)).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tmp = tmp_path_factory.mktemp("flux8")
    model = _model("flux_dev")
    torch.manual_seed(3)
    vae, clip, t5 = tiny.tiny_vae(16), tiny.tiny_clip_text("L"), tiny.tiny_t5_text()
    FluxPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                 tokenizer=tiny.tiny_clip_tokenizer(), text_encoder_2=t5,
                 tokenizer_2=tiny.tiny_t5_tokenizer()).save_pretrained(tmp / "flux")
    files = {"fp8": _fp8_file(model, tmp / "flux1-dev-fp8.safetensors"),
             "bf16": str(tmp / "flux1-dev.safetensors"), "vae": str(tmp / "ae.safetensors"),
             "clip_l": str(tmp / "clip_l.safetensors"), "t5": str(tmp / "t5.safetensors")}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, files["bf16"])
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, files["vae"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, files["clip_l"])
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              files["t5"])
    return {"model": model, "files": files, "config": str(tmp / "flux"),
            "toks": {"clip_l": tiny.tiny_clip_tokenizer(), "t5": tiny.tiny_t5_tokenizer()}}


# ------------------------------------------------------------------------------------------------ fp8 storage

def test_fp8_file_is_loaded_as_it_is_never_upcast(flux_files):
    f = flux_files["files"]
    assert loading.teacher_file_is_fp8(f["fp8"]) and not loading.teacher_file_is_fp8(f["bf16"])
    assert loading.resolve_teacher_storage("auto", f["fp8"]) == "fp8"
    assert loading.resolve_teacher_storage("auto", f["bf16"]) == "bf16"
    with pytest.raises(loading.ModelLoadError, match="--teacher-storage"):
        loading.resolve_teacher_storage("int4", f["fp8"])
    tm = loading.load_teacher_models("flux_dev", transformer=f["fp8"], vae=f["vae"], config=flux_files["config"],
                                     text_encoders=False, dtype="fp32", storage="auto")
    model = tm.transformer
    from safetensors import safe_open

    with safe_open(f["fp8"], framework="pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    params = dict(model.named_parameters())
    # Every matrix of the file is an fp8 parameter with the file's exact bytes: no bf16/fp32 copy of them exists.
    # Vectors (biases, norm scales; bf16 in the file) are stored with their layer: fp8 in a layerwise-cast layer
    # (diffusers casts the whole layer), the compute dtype elsewhere.
    assert sum(v.dtype == FP8 for v in stored.values()) == sum(v.ndim >= 2 for v in stored.values())
    for k, v in stored.items():
        if v.dtype == FP8:
            assert params[k].dtype == FP8, k
            assert torch.equal(params[k].view(torch.uint8), v.view(torch.uint8)), k
    assert all(p.ndim == 1 for p in model.parameters() if p.dtype != FP8)
    assert {p.dtype for p in model.parameters()} == {FP8, torch.float32}
    assert model.dtype == torch.float32  # diffusers reports the compute dtype


@pytest.mark.parametrize("family", ["sd35_medium", "flux_dev"])
def test_fp8_teacher_predicts_within_fp8_error_and_its_fake_lora_trains(family):
    reference = make_teacher(family, _model(family))
    teacher = make_teacher(family, loading.store_fp8(_model(family), torch.float32))
    assert {p.dtype for n, p in teacher.model.named_parameters() if n.endswith("to_q.weight")} == {FP8}
    x, s, cond = _inputs(family)
    with torch.no_grad():
        v_ref, v8 = reference.velocity(x, s, cond), teacher.velocity(x, s, cond)
    assert v8.dtype == torch.float32
    assert 0 < _rel(v8, v_ref) < 0.1  # fp8 rounding (3 mantissa bits), not garbage, not unchanged
    for t in (reference, teacher):
        t.add_fake_adapter(rank=4)
    lora = teacher.fake_parameters()
    assert all(p.dtype == torch.float32 for p in lora)  # trainable, not the base's fp8
    with torch.no_grad():  # zero-init: the fake is the real teacher
        with teacher.fake():
            assert torch.equal(teacher.velocity(x, s, cond), v8)
    before = [p.detach().clone() for p in lora]
    opt = torch.optim.AdamW(lora, lr=1e-3)
    target = torch.randn_like(x)
    losses = []
    for _ in range(3):  # flow-matching-like fake updates
        with teacher.fake():
            loss = (teacher.velocity(x, s, cond) - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))
    assert losses[-1] < losses[0]
    # The same LoRA values on the full-precision teacher give the same fake prediction, within fp8 error.
    with torch.no_grad():
        for p_ref, p in zip(reference.fake_parameters(), lora):
            p_ref.copy_(p)
        with reference.fake(), teacher.fake():
            assert _rel(teacher.velocity(x, s, cond), reference.velocity(x, s, cond)) < 0.1
        assert torch.equal(teacher.velocity(x, s, cond), v8)  # adapter off: the frozen fp8 teacher


def test_bf16_file_stored_fp8_and_fp8_file_upcast_on_request(flux_files):
    f, cfg = flux_files["files"], flux_files["config"]
    tm = loading.load_teacher_models("flux_dev", transformer=f["bf16"], vae=f["vae"], config=cfg,
                                     text_encoders=False, dtype="fp32", storage="fp8")
    assert tm.transformer.transformer_blocks[0].attn.to_q.weight.dtype == FP8
    tm = loading.load_teacher_models("flux_dev", transformer=f["fp8"], vae=f["vae"], config=cfg,
                                     text_encoders=False, dtype="fp32", storage="bf16")
    assert {p.dtype for p in tm.transformer.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ offload

@pytest.mark.parametrize("fp8", [False, True])
def test_offloaded_teacher_predicts_the_same_and_its_fake_lora_trains(fp8):
    family = "flux_dev"
    plain = make_teacher(family, _model(family))
    model = _model(family)
    if fp8:
        loading.store_fp8(model, torch.float32)
        plain = make_teacher(family, loading.store_fp8(_model(family), torch.float32))
    assert not loading.offload_blocks(model, "cpu")  # nothing to gain on a CPU: a no-op
    assert not is_offloaded(model)
    assert loading.offload_blocks(model, "cpu", cpu_too=True)  # the hooks, with onload = offload = the CPU
    assert is_offloaded(model)
    teacher = make_teacher(family, model)
    x, s, cond = _inputs(family)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, s, cond), plain.velocity(x, s, cond))
    model.to("cpu")  # what Distiller.setup would do: diffusers refuses to move an offloaded model (a warning)
    for t in (plain, teacher):
        torch.manual_seed(5)  # the same LoRA A init for both
        t.add_fake_adapter(rank=4)
    target = torch.randn_like(x)
    for t in (plain, teacher):
        opt = torch.optim.AdamW(t.fake_parameters(), lr=1e-3)
        for _ in range(2):
            with t.fake():
                (t.velocity(x, s, cond) - target).square().mean().backward()
                opt.step()
                opt.zero_grad()
    # The offloaded teacher's LoRA trained exactly like the plain one's; the frozen teacher is unchanged.
    for a, b in zip(plain.fake_parameters(), teacher.fake_parameters()):
        assert torch.equal(a, b)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, s, cond), plain.velocity(x, s, cond))
        with teacher.fake(), plain.fake():
            assert torch.equal(teacher.velocity(x, s, cond), plain.velocity(x, s, cond))


def test_load_teacher_models_offload_is_a_no_op_on_the_cpu(flux_files):
    f = flux_files["files"]
    tm = loading.load_teacher_models("flux_dev", transformer=f["fp8"], vae=f["vae"], config=flux_files["config"],
                                     text_encoders=False, dtype="fp32", storage="auto", offload=True, device="cpu")
    assert not is_offloaded(tm.transformer) and tm.transformer.device.type == "cpu"


# ------------------------------------------------------------------------------------------------ text encoders

def test_text_encoders_load_alone_and_match_the_full_loader(flux_files):
    f, cfg, toks = flux_files["files"], flux_files["config"], flux_files["toks"]
    encoders, tokenizers = loading.load_teacher_text_encoders("flux_dev", transformer=f["fp8"], clip_l=f["clip_l"],
                                                               t5=f["t5"], tokenizers=toks, config=cfg)
    assert set(encoders) == set(tokenizers) == {"clip_l", "t5"}
    full = loading.load_teacher_models("flux_dev", transformer=f["bf16"], vae=f["vae"], clip_l=f["clip_l"],
                                       t5=f["t5"], tokenizers=toks, config=cfg)
    for kind, enc in encoders.items():
        a, b = enc.state_dict(), full.text_encoders[kind].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The diffusers folder works the same way (its transformer is never read).
    encoders, _ = loading.load_teacher_text_encoders("flux_dev", folder=cfg)
    assert set(encoders) == {"clip_l", "t5"}


def test_text_encoder_in_its_own_dtype_is_not_copied(tmp_path):
    """A text encoder file already in the requested dtype becomes the model's weights without a copy (the tensors
    read from the file are assigned), so it is never held twice in host RAM; another dtype: one tensor at a time."""
    enc = tiny.tiny_t5_text()
    (tmp_path / "text_encoder_2").mkdir()
    enc.config.save_pretrained(tmp_path / "text_encoder_2")
    tensors = {k: v.clone() for k, v in enc.state_dict().items() if k != "encoder.embed_tokens.weight"}
    ptrs = {k: v.data_ptr() for k, v in tensors.items()}
    model = loading._text_encoder_from_tensors(dict(tensors), "t5.safetensors", str(tmp_path), "text_encoder_2",
                                               torch.float32, None)
    same = {k: p.data_ptr() for k, p in model.named_parameters() if k in ptrs}
    assert same and same == {k: ptrs[k] for k in same}
    bf16 = loading._text_encoder_from_tensors(dict(tensors), "t5.safetensors", str(tmp_path), "text_encoder_2",
                                              torch.bfloat16, None)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ prompts first

def test_text_store_streams_chunks_and_reads_rows_lazily(tmp_path):
    from training.models.text import TextStore, write_text_store

    g = torch.Generator().manual_seed(0)
    data = TextCond(torch.randn(7, 5, 6, generator=g), torch.randn(7, 3, generator=g))
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return data.index([int(p) for p in prompts])

    path = tmp_path / "teacher.safetensors"
    assert write_text_store(path, encode, [str(i) for i in range(7)], chunk=3) == 7
    assert [len(c) for c in calls] == [3, 3, 1]
    whole = TextCond.load(path)  # a standard safetensors TextCond file
    assert torch.equal(whole.prompt_embeds, data.prompt_embeds) and torch.equal(whole.pooled, data.pooled)
    store = TextStore(path)
    rows = store.index(torch.tensor([6, 0, 6]))
    assert len(store) == 7 and torch.equal(rows.prompt_embeds, data.prompt_embeds[[6, 0, 6]])
    assert torch.equal(rows.pooled, data.pooled[[6, 0, 6]])
    write_text_store(path, encode, [str(i) for i in range(7)], chunk=4, dtype=torch.bfloat16)
    assert TextCond.load(path).prompt_embeds.dtype == torch.bfloat16
    assert TextStore(path).index([1]).prompt_embeds.dtype == torch.float32  # what the models take
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.safetensors"]  # no temporaries left


@pytest.fixture(scope="module")
def distill_files(tmp_path_factory):
    """A tiny SD1.5 and a tiny SD3.5 as diffusers folders, and a Bridge file between them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    from bridge.checkpoint import save_bridge
    from bridge.model import Bridge

    tmp = tmp_path_factory.mktemp("distill_files")
    torch.manual_seed(0)
    vae = tiny.tiny_vae(4)
    StableDiffusionPipeline(unet=tiny.tiny_unet(), vae=vae, text_encoder=tiny.tiny_clip_text("L"),
                            tokenizer=tiny.tiny_clip_tokenizer(),
                            scheduler=loading._scheduler(loading.config_dir("sd15")), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp / "sd15")
    StableDiffusion3Pipeline(
        transformer=tiny.tiny_sd3_transformer("sd35"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny.tiny_vae(16), text_encoder=tiny.tiny_clip_text("L", with_projection=True),
        tokenizer=tiny.tiny_clip_tokenizer(), text_encoder_2=tiny.tiny_clip_text("G"),
        tokenizer_2=tiny.tiny_clip_tokenizer(), text_encoder_3=tiny.tiny_t5_text(),
        tokenizer_3=tiny.tiny_t5_tokenizer()).save_pretrained(tmp / "sd35")
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=vae, width=32, depth=1, stem_channels=8, norm_groups=8)
    save_bridge(str(tmp / "bridge.safetensors"), bridge)
    return {"student": str(tmp / "sd15"), "teacher": str(tmp / "sd35"), "bridge": str(tmp / "bridge.safetensors")}


def test_prompts_are_encoded_with_the_encoders_alone_before_the_models_load(tmp_path, distill_files, monkeypatch):
    """encode_distill_prompts loads only the text encoders, encodes in chunks into the cache and frees them; the
    models then load without any text encoder, and the Distiller finds the cache fresh (no encoding, no encoder)."""
    import gc
    import os
    import weakref

    from training.distill import DistillConfig, Distiller
    from training.models import assemble, text
    from training.models.text import TextStore, encode_for_family

    events, encoders = [], []
    real = {n: getattr(loading, n) for n in ("load_teacher_text_encoders", "load_teacher_models", "load_sd15")}

    def spy(name):
        def f(*a, **kw):
            out = real[name](*a, **kw)
            events.append((name, kw.get("components"), kw.get("text_encoders", True)))
            if name == "load_teacher_text_encoders":
                encoders.extend(weakref.ref(m) for m in out[0].values())
            elif name == "load_sd15" and out.text_encoder is not None:
                encoders.append(weakref.ref(out.text_encoder))
            return out
        return f

    for n in real:
        monkeypatch.setattr(loading, n, spy(n))
    monkeypatch.setattr(text, "ENCODE_CHUNK", 2)
    prompts = ["a red cube", "a blue ball", "two cats", "a tree", "the sea"]
    cfg = DistillConfig(out_dir=str(tmp_path / "run"), prompts=prompts, steps=1, batch_size=2, resolution=16,
                        fake_updates=1, fake_rank=4, sample_every=1000, ckpt_every=1000, cpu=True,
                        negative_prompt="blurry", regression_n=0, regression_warmup_steps=0)  # plain DMD: one step
    files = dict(student=distill_files["student"], bridge=distill_files["bridge"], teacher_family="sd35_medium",
                 teacher=distill_files["teacher"], dtype="fp32", cpu=True)
    enc_teacher, enc_student = assemble.encode_distill_prompts(cfg, **files)
    gc.collect()
    assert [e[0] for e in events] == ["load_teacher_text_encoders", "load_sd15"]
    assert events[1][1] == ("text_encoder", "tokenizer")
    assert len(encoders) == 4 and all(r() is None for r in encoders)  # CLIP-L, CLIP-G, T5, student CLIP-L: freed
    cache = tmp_path / "run" / "cache"
    stamp = (cache / "cache.json").read_text()
    # The chunked cache holds what one batch through the encoders gives.
    enc, toks = real["load_teacher_text_encoders"]("sd35_medium", folder=distill_files["teacher"], dtype="fp32")
    once = encode_for_family("sd35_medium", prompts, enc, toks)
    assert torch.allclose(TextStore(cache / "teacher.safetensors").load().prompt_embeds, once.prompt_embeds, atol=1e-5)
    assert torch.allclose(enc_teacher(["two cats", "blurry"]).pooled, TextCond.cat(
        [once.index([2]), encode_for_family("sd35_medium", ["blurry"], enc, toks)]).pooled, atol=1e-5)
    with pytest.raises(ValueError, match="not in the embedding cache"):
        enc_student(["never seen"])
    events.clear()
    models = assemble.load_distill_models(encoders=(enc_teacher, enc_student), **files)
    assert ("load_teacher_models", None, False) in events and ("load_sd15", ("unet",), True) in events
    assert "load_teacher_text_encoders" not in [e[0] for e in events]
    mtime = os.path.getmtime(cache / "teacher.safetensors")
    result = Distiller(cfg, models).run()
    assert result["step"] == 1 and (cache / "cache.json").read_text() == stamp
    assert os.path.getmtime(cache / "teacher.safetensors") == mtime  # fresh: not encoded again
    # A second call finds the cache fresh and loads no encoder at all; load_distill is both steps in one call.
    events.clear()
    models = assemble.load_distill(cfg, **files)
    assert [e[:2] for e in events] == [("load_sd15", ("vae",)), ("load_teacher_models", None), ("load_sd15", ("unet",))]
    assert torch.equal(models.encode_student(["a tree"]).prompt_embeds, enc_student(["a tree"]).prompt_embeds)
    # A Bridge for another teacher is refused before anything is loaded or encoded.
    events.clear()
    with pytest.raises(ValueError, match="maps into the sd3 latent space"):
        assemble.load_distill(cfg, **dict(files, teacher_family="flux_dev"))
    assert events == []


def test_bridge_command_encodes_its_data_before_the_teacher_transformer_loads(tmp_path, distill_files, monkeypatch):
    """`bridge`: VAEs and text encoders first, images and captions encoded, the encoders freed, and only then the
    teacher transformer; the run then trains from the cache it finds fresh."""
    import gc
    import weakref

    from training import data
    from training.run import main

    events, encoders = [], []
    real_models, real_text = loading.load_teacher_models, loading.load_teacher_text_encoders
    real_cache = data.build_latent_cache

    def load_models(*a, **kw):
        if "transformer" in kw.get("parts", ()):
            gc.collect()
            events.append(("transformer", all(r() is None for r in encoders)))
        return real_models(*a, **kw)

    def load_text(*a, **kw):
        out = real_text(*a, **kw)
        encoders.extend(weakref.ref(m) for m in out[0].values())
        events.append(("text encoders", len(out[0])))
        return out

    def cache(*a, **kw):
        built = real_cache(*a, **kw)
        events.append(("cache", built))
        return built

    monkeypatch.setattr(loading, "load_teacher_models", load_models)
    monkeypatch.setattr(loading, "load_teacher_text_encoders", load_text)
    monkeypatch.setattr(data, "build_latent_cache", cache)
    data.make_synthetic_images_once(str(tmp_path / "images"), n=6, size=64, seed=0)
    assert main(["bridge", "--student", distill_files["student"], "--teacher-family", "sd35_medium",
                 "--teacher", distill_files["teacher"], "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "run"), "--steps", "2", "--student-res", "32", "--width", "16", "--depth",
                 "1", "--batch-size", "2", "--val-fraction", "0.34", "--val-every", "1000", "--dtype", "fp32",
                 "--attn-queries", "4"]) == 0
    assert events == [("text encoders", 3), ("cache", True), ("cache", True), ("transformer", True),
                      ("cache", False), ("cache", False)]
    assert (tmp_path / "run" / "bridge.safetensors").is_file()


_RSS_SCRIPT = r"""
import gc, json, os, sys
import diffusers, torch, transformers  # imported before the baseline
from diffusers import FluxTransformer2DModel
from training.models import loading


def status(field):  # kB -> bytes, from the kernel's accounting of this process
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


folder, storage = sys.argv[1], sys.argv[2]
path = os.path.join(folder, "flux-mid-fp8.safetensors")
base = status("VmRSS")
tm = loading.load_teacher_models("flux_dev", transformer=path, vae=None, config=folder, dtype="bf16",
                                 storage=storage, parts=("transformer",))
gc.collect()
rise = status("VmHWM") - base  # the peak resident set while loading, over what was resident before
print(json.dumps({"rise": rise, "file": os.path.getsize(path),
                  "fp8": sum(p.numel() for p in tm.transformer.parameters() if p.dtype == torch.float8_e4m3fn)}))
"""


def test_an_fp8_file_adds_at_most_its_size_to_host_memory(tmp_path):
    """Peak host memory (the process's peak resident set, VmHWM, in a fresh process) while loading a mid-size fp8 Flux
    file: with storage auto the file's weights are used as they are (at most the file's size, the mapped pages);
    upcasting it to bf16 (storage bf16, what the loader did before) adds a bf16 copy on top (over twice the file's
    size)."""
    import json
    import os
    import subprocess
    import sys

    from diffusers import FluxTransformer2DModel

    # A mid-size Flux (about 110 M parameters) saved as ComfyUI's fp8 files are: matrices e4m3fn, vectors bf16.
    cfg = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
               num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    model.save_config(tmp_path / "transformer")
    g = torch.Generator().manual_seed(0)
    save_file({k: (0.02 * torch.randn(v.shape, generator=g)).to(FP8 if v.ndim >= 2 else torch.bfloat16)
               for k, v in model.state_dict().items()}, str(tmp_path / "flux-mid-fp8.safetensors"))
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())

    def run(storage):
        out = subprocess.run([sys.executable, str(script), str(tmp_path), storage], env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    kept, upcast = run("auto"), run("bf16")
    assert kept["fp8"] > 0 and upcast["fp8"] == 0
    assert kept["rise"] < 1.1 * kept["file"], kept
    assert upcast["rise"] > 2 * upcast["file"], upcast
    print(f"fp8 file {kept['file'] / 2**20:.0f} MiB: peak RSS +{kept['rise'] / 2**20:.0f} MiB kept as fp8, "
          f"+{upcast['rise'] / 2**20:.0f} MiB upcast to bf16")


def test_sd35_fp8_file_in_bf16_compute(tmp_path):
    """SD3.5 from an fp8 file with bf16 compute (as on CUDA): the buffers built at init (pos_embed) follow the
    compute dtype, and the prediction is the fp32 teacher's within fp8 + bf16 rounding."""
    model = _model("sd35_medium")
    model.save_config(tmp_path / "transformer")
    path = _fp8_file(model, tmp_path / "sd3.5_medium_fp8.safetensors")
    fp8 = loading._transformer_from_file(path, "sd35_medium", str(tmp_path), torch.bfloat16, None, fp8=True)
    assert fp8.dtype == torch.bfloat16 and {b.dtype for b in fp8.buffers() if b.is_floating_point()} == {
        torch.bfloat16}
    x, s, cond = _inputs("sd35_medium")
    with torch.no_grad():
        v8 = make_teacher("sd35_medium", fp8).velocity(x, s, cond)
        v = make_teacher("sd35_medium", model).velocity(x, s, cond)
    assert v8.dtype == torch.float32 and 0 < _rel(v8, v) < 0.1


def test_distill_command_with_regression_pairs_runs_on_cached_embeddings(tmp_path, distill_files, monkeypatch):
    """The distill command on real files: prompts encoded first, the text encoders never loaded again; making the
    regression pairs (student CFG with the negative prompt, teacher guidance) reads the cache, and the Distiller's
    cache, stale once the pairs' prompts are known, is rewritten from the cache too."""
    from training.run import main

    loads = []
    real = loading.load_teacher_text_encoders
    monkeypatch.setattr(loading, "load_teacher_text_encoders",
                        lambda *a, **kw: loads.append(1) or real(*a, **kw))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\ntwo cats\n")
    out = tmp_path / "run"
    assert main(["distill", "--student", distill_files["student"], "--bridge", distill_files["bridge"],
                 "--teacher-family", "sd35_medium", "--teacher", distill_files["teacher"], "--prompts", str(prompts),
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--resolution", "16", "--fake-updates", "1",
                 "--fake-rank", "4", "--regression-n", "2", "--regression-student-steps", "2",
                 "--regression-teacher-steps", "2", "--regression-warmup-steps", "2", "--negative-prompt", "blurry",
                 "--dtype", "fp32", "--no-export"]) == 0
    assert loads == [1]
    assert (out / "pairs.safetensors").is_file() and (out / "cache" / "pairs_student.safetensors").is_file()
    assert (out / "student_unet.safetensors").is_file()
