"""The one place that assembles the models a command or a node trains or samples with: student, teacher and Bridge,
from local files or as the tiny demo world, into the bundles the trainers take (BridgeModels, DistillModels) and the
sampler's student. Used by the commands (training/cli/) and the ComfyUI training nodes alike.

Nothing heavy at import time (the commands read TEACHER_FAMILIES while building their parsers): torch, diffusers and
the loaders are imported inside the functions.
"""

from __future__ import annotations

import os

from .families import TEACHER_FAMILIES

__all__ = ["TEACHER_FAMILIES", "torch_dtype", "demo_bridge_models", "load_bridge_models", "check_demo_bridge",
           "demo_distill_models", "load_distill_models", "load_distill", "distill_description",
           "encode_distill_prompts", "load_bridge_teacher",
           "load_student_for_sampling"]

# Where `python -m training.run bridge --demo` writes its Bridge, which the distillation demo then uses.
DEMO_BRIDGE = os.path.join("runs", "bridge-demo", "bridge.safetensors")


def torch_dtype(name: str, cpu: bool = False):
    """--dtype as a torch dtype: auto is bf16 on CUDA (unless `cpu`), fp32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and not cpu else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------- Bridge training

def demo_bridge_models(seed: int = 0, teacher_family: str | None = None):
    """Tiny random-init models of the real classes: an SD1.5-like student VAE and an SD3.5-like teacher
    (transformer, 16-channel VAE, CLIP-L/G, T5), or a Flux-dev-like one with teacher_family="flux_dev"."""
    import torch

    from .._bridge import spaces
    from ..bridge_train import BridgeModels
    from ..teachers import make_teacher
    from . import tiny
    from .text import encode_for_family

    family = teacher_family or "sd35_medium"
    flux = family.startswith("flux")
    if family not in ("sd35_medium", "flux_dev"):
        raise ValueError(f"The tiny demo teacher is sd35_medium or flux_dev, not {family!r}.")
    torch.manual_seed(seed)
    student_vae = tiny.tiny_vae(4).eval().requires_grad_(False)
    teacher_vae = tiny.tiny_vae(16).eval().requires_grad_(False)
    transformer = (tiny.tiny_flux_transformer() if flux else tiny.tiny_sd3_transformer("sd35")).eval()
    text = {"clip_l": tiny.tiny_clip_text("L"), "t5": tiny.tiny_t5_text()}
    toks = {"clip_l": tiny.tiny_clip_tokenizer(), "t5": tiny.tiny_t5_tokenizer()}
    if not flux:
        text["clip_g"], toks["clip_g"] = tiny.tiny_clip_text("G"), tiny.tiny_clip_tokenizer()
    teacher = make_teacher(family, transformer.requires_grad_(False))

    def encode(prompts):
        return encode_for_family(family, prompts, text, toks, max_t5_len=32)

    return BridgeModels(
        student_vae=student_vae, teacher_vae=teacher_vae, teacher=teacher, student_space=spaces.get_space("sd15"),
        teacher_space=teacher.space, encode_text=encode, free_text_encoders=text.clear,
        description={"demo": True, "seed": seed, "student": "tiny sd15-like", "teacher": f"tiny {family}-like"},
    )


def load_bridge_models(student: str, teacher_family: str, teacher: str | None = None, teacher_vae: str | None = None,
                       clip_l: str | None = None, clip_g: str | None = None, t5: str | None = None,
                       tokenizers: str | None = None, student_vae: str | None = None, dtype: str = "auto",
                       cpu: bool = False, teacher_storage: str = "auto", teacher_offload: bool = False,
                       text_encoders: bool = True, teacher_model: bool = True):
    """Student VAE and teacher (transformer, VAE, text encoders) from local files -> BridgeModels.

    `student` is an SD1.5 single file or diffusers folder (its VAE is used unless `student_vae` is given);
    `teacher` a diffusers folder or a transformer / all-in-one single file. Used by the CLI and the ComfyUI node.
    cpu: load onto the CPU even where CUDA exists (pair it with the trainer config's cpu).
    teacher_storage: the frozen transformer's weights in "fp8" (float8_e4m3fn, computed in `dtype`: bf16 on CUDA,
    fp32 on the CPU), "bf16" (in `dtype`; an fp8 file is upcast) or "auto" (fp8 exactly when the file is: an e4m3fn
    file is kept as it is). teacher_offload: keep the transformer on the CPU, each layer brought to the GPU for its
    forward (the last resort: slower; a no-op on a CPU-only run). text_encoders=False: the teacher's text encoders
    are not loaded (prompts already encoded; encode_text then raises). teacher_model=False: the teacher transformer
    is not loaded (BridgeModels.teacher None) so the data set is encoded with the VAEs and text encoders alone; set
    it from `load_bridge_teacher` once the text encoders are freed (the bridge command does)."""
    import torch

    from .. import loop
    from .._bridge import spaces
    from ..bridge_train import BridgeModels
    from ..teachers import make_teacher
    from . import loading
    from .text import encode_for_family

    if teacher_family not in TEACHER_FAMILIES:
        raise ValueError(f"Unknown teacher family {teacher_family!r}; choose one of {', '.join(TEACHER_FAMILIES)}.")
    weights_dtype = torch_dtype(dtype, cpu)
    device = loop.default_device(cpu)
    sd15 = loading.load_sd15(student_vae or student, components=("vae",), dtype=weights_dtype, device=device)
    if teacher_offload and device == "cpu":
        print("note: --teacher-offload does nothing on the CPU (the teacher is in host memory already).")
    tm = loading.load_teacher_models(teacher_family, transformer=teacher, vae=teacher_vae, clip_l=clip_l,
                                     clip_g=clip_g, t5=t5, tokenizers=tokenizers, dtype=weights_dtype, device=device,
                                     storage=teacher_storage, offload=teacher_offload, text_encoders=text_encoders,
                                     parts=("transformer", "vae", "text") if teacher_model else ("vae", "text"))
    t = make_teacher(teacher_family, tm.transformer) if teacher_model else None

    def encode(prompts):
        with torch.no_grad():
            return encode_for_family(teacher_family, prompts, tm.text_encoders, tm.tokenizers)

    def free():
        tm.text_encoders.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return BridgeModels(
        student_vae=sd15.vae.requires_grad_(False), teacher_vae=tm.vae.requires_grad_(False), teacher=t,
        student_space=spaces.get_space("sd15"),
        teacher_space=t.space if t is not None else spaces.get_space("flux" if teacher_family.startswith("flux")
                                                                     else "sd3"),
        encode_text=encode, free_text_encoders=free,
        description={"student": os.path.basename(student_vae or student), "teacher_family": teacher_family,
                     "teacher": os.path.basename(teacher or ""), "teacher_vae": os.path.basename(teacher_vae or "")},
    )


def load_bridge_teacher(teacher_family: str, teacher: str, dtype: str = "auto", cpu: bool = False,
                        teacher_storage: str = "auto", teacher_offload: bool = False, **_files):
    """The teacher transformer alone, as a Teacher (for `load_bridge_models(..., teacher_model=False)`): loaded after
    the images and captions are encoded and the text encoders freed. Other model-file keywords are accepted and
    unused (the command passes the same ones to both)."""
    from .. import loop
    from ..teachers import make_teacher
    from . import loading

    device = loop.default_device(cpu)
    tm = loading.load_teacher_models(teacher_family, transformer=teacher, dtype=torch_dtype(dtype, cpu),
                                     device=device, storage=teacher_storage, offload=teacher_offload,
                                     parts=("transformer",))
    return make_teacher(teacher_family, tm.transformer)


def bridge_trainer(config, student: str, teacher_family: str, progress=None, stop=None, **files):
    """A BridgeTrainer on local files, loaded in the order that keeps the peak low (the bridge command and the Train
    Bridge node): the VAEs and text encoders first, the images and captions encoded into the latent cache and the
    encoders freed, then the teacher transformer alone. `files`: the keywords of `load_bridge_models`."""
    from ..bridge_train import BridgeTrainer

    models = load_bridge_models(student, teacher_family, teacher_model=False, **files)
    trainer = BridgeTrainer(config, models, progress=progress, stop=stop)
    trainer.prepare_data()
    models.teacher = load_bridge_teacher(teacher_family, **files)
    return trainer  # its run() finds the cache fresh


# ---------------------------------------------------------------------------------------------- distillation

def check_demo_bridge(path: str) -> None:
    """A Bridge given to the distillation demo must exist (a typo must not train against an untrained Bridge)."""
    from ..errors import UserError

    if not os.path.isfile(path):
        what = "is a dangling symbolic link" if os.path.islink(path) else (
            "is not a file" if os.path.exists(path) else "does not exist")
        raise UserError(f"The Bridge {path!r} (--bridge) {what}: give a trained Bridge .safetensors file, or leave "
                        "--bridge out to use the demo Bridge of `python -m training.run bridge --demo`.")


def demo_distill_models(seed: int = 0, bridge_path: str | None = None):
    """The tiny world of `bridge --demo` (same seed: same student VAE, teacher and text encoders) plus a tiny
    SD1.5-style UNet and CLIP-L for the student -> (DistillModels, the in-memory base components for the export).
    Uses the demo Bridge when it exists, else a fresh one; a `bridge_path` that is given must exist."""
    import warnings

    import torch

    from .._bridge import checkpoint as bridge_checkpoint
    from .._bridge import model as bridge_model
    from ..distill import DistillModels
    from ..student import OneStepStudent
    from . import tiny
    from .text import encode_sd15

    if bridge_path is not None:
        check_demo_bridge(bridge_path)
    world = demo_bridge_models(seed)
    bridge_path = bridge_path or DEMO_BRIDGE
    if os.path.exists(bridge_path):
        bridge = bridge_checkpoint.load_bridge(bridge_path, student_vae=world.student_vae)
    else:
        warnings.warn(f"No demo Bridge at {bridge_path}: using an untrained one. Run `python -m training.run "
                      "bridge --demo` first for a trained Bridge.", stacklevel=2)
        torch.manual_seed(seed)
        bridge = bridge_model.Bridge.create("sd15", "sd3", k=2, student_vae=world.student_vae, width=32, depth=2)
    torch.manual_seed(seed + 1)
    unet = tiny.tiny_unet()
    clip, tok = tiny.tiny_clip_text("L").eval(), tiny.tiny_clip_tokenizer()
    encoders = {"clip": clip}

    def free():
        world.free_text_encoders()
        encoders.clear()

    models = DistillModels(
        student=OneStepStudent(unet), bridge=bridge, teacher=world.teacher, teacher_vae=world.teacher_vae,
        encode_teacher=world.encode_text, encode_student=lambda prompts: encode_sd15(prompts, encoders["clip"], tok),
        free_text_encoders=free, description={**world.description, "student_unet": "tiny sd15-like",
                                              "bridge": os.path.abspath(bridge_path) if os.path.exists(bridge_path)
                                              else "untrained"},
    )
    return models, {"vae": world.student_vae, "text_encoder": clip, "tokenizer": tok}


def load_distill_models(student: str, bridge: str, teacher_family: str, teacher: str | None = None,
                        teacher_vae: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
                        t5: str | None = None, tokenizers: str | None = None, dtype: str = "auto",
                        student_vae: str | None = None, cpu: bool = False, teacher_storage: str = "auto",
                        teacher_offload: bool = False, encoders=None):
    """Student UNet + CLIP-L from the SD1.5 file `student`, the Bridge file, and the teacher (transformer, VAE, text
    encoders) from local files, as the CLI and the ComfyUI node take them -> DistillModels. Unlike
    `demo_distill_models` there are no in-memory base components: the export reads them from `student`.
    teacher_storage, teacher_offload: see `load_bridge_models`. encoders: (encode_teacher, encode_student) to use
    instead of loading any text encoder, e.g. distill.cached_encoders after `encode_distill_prompts` encoded the
    prompts with the encoders alone and freed them."""
    import torch

    from .. import loop
    from .._bridge import checkpoint as bridge_checkpoint
    from ..distill import DistillModels
    from ..student import OneStepStudent
    from . import loading
    from .text import encode_sd15

    _check_distill_files(bridge, teacher_family, teacher)
    # Student VAE, teacher, teacher VAE, teacher text encoders: the same loader as Bridge training.
    world = load_bridge_models(student, teacher_family, teacher=teacher, teacher_vae=teacher_vae, clip_l=clip_l,
                               clip_g=clip_g, t5=t5, tokenizers=tokenizers, student_vae=student_vae, dtype=dtype,
                               cpu=cpu, teacher_storage=teacher_storage, teacher_offload=teacher_offload,
                               text_encoders=encoders is None)
    device = loop.default_device(cpu)
    sd15 = loading.load_sd15(student, components=("unet", "text_encoder", "tokenizer") if encoders is None else
                             ("unet",), dtype=torch.float32, device=device, tokenizer=tokenizers)
    bridge_module = bridge_checkpoint.load_bridge(bridge, student_vae=world.student_vae, device=device)
    description = distill_description(student, bridge, teacher_family, teacher, teacher_vae, student_vae)
    if encoders is not None:
        return DistillModels(
            student=OneStepStudent(sd15.unet), bridge=bridge_module, teacher=world.teacher,
            teacher_vae=world.teacher_vae, encode_teacher=encoders[0], encode_student=encoders[1],
            description=description)
    # The closures below hold the CLIP-L only through `text`, which free() clears (the loaded bundle `sd15` would
    # keep it alive for the whole run): the UNet and the tokenizer are taken out of it here.
    text = {"clip": sd15.text_encoder.to(world.student_vae.dtype).eval()}
    unet, tokenizer = sd15.unet, sd15.tokenizer
    del sd15

    def free():
        world.free_text_encoders()
        text.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return DistillModels(
        student=OneStepStudent(unet), bridge=bridge_module, teacher=world.teacher, teacher_vae=world.teacher_vae,
        encode_teacher=world.encode_text,
        encode_student=lambda prompts: encode_sd15(prompts, text["clip"], tokenizer),
        free_text_encoders=free, description=description,
    )


def _check_distill_files(bridge: str, teacher_family: str, teacher: str | None) -> None:
    """The Bridge and the teacher a distillation needs, checked before anything is loaded or encoded."""
    from .._bridge import checkpoint as bridge_checkpoint

    if not bridge:
        raise ValueError("Distillation needs a trained Bridge (.safetensors from the student's VAE into the teacher's "
                         "space); train one first (`python -m training.run bridge ...` or the Train Bridge node).")
    if not teacher:
        raise ValueError("Distillation needs the teacher model file or diffusers folder (teacher=...).")
    # Both teacher spaces have 16 channels, so a Bridge for the other teacher would run and train nonsense.
    bridge_space = bridge_checkpoint.read_bridge_metadata(bridge)["teacher_space"]["name"]
    family_space = "flux" if teacher_family.startswith("flux") else "sd3"
    if bridge_space != family_space:
        raise ValueError(f"The Bridge {os.path.basename(bridge)!r} maps into the {bridge_space} latent space but the "
                         f"{teacher_family} teacher works in {family_space}; use a Bridge trained for this teacher.")


def load_distill(config, student: str, bridge: str, teacher_family: str, **files):
    """What the distill command (and the Distill Student node) call: `encode_distill_prompts` (the text encoders
    alone, prompts encoded into the run's cache, encoders freed), then `load_distill_models` with no text encoder.
    `files`: the keywords of `load_distill_models` (teacher, teacher_vae, clip_l, ..., dtype, cpu, teacher_storage,
    teacher_offload). -> DistillModels."""
    encoders = encode_distill_prompts(config, student, bridge, teacher_family, **files)
    return load_distill_models(student, bridge, teacher_family, encoders=encoders, **files)


def distill_description(student: str, bridge: str, teacher_family: str, teacher: str | None = None,
                        teacher_vae: str | None = None, student_vae: str | None = None) -> dict:
    """What a distillation loads, by file name (the summary's "models", and part of the embedding cache's key), known
    before anything is loaded."""
    return {"student": os.path.basename(student_vae or student), "teacher_family": teacher_family,
            "teacher": os.path.basename(teacher or ""), "teacher_vae": os.path.basename(teacher_vae or ""),
            "bridge": os.path.basename(bridge)}


def encode_distill_prompts(config, student: str, bridge: str, teacher_family: str, teacher: str | None = None,
                           teacher_vae: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
                           t5: str | None = None, tokenizers: str | None = None, dtype: str = "auto",
                           student_vae: str | None = None, cpu: bool = False, **_memory):
    """Before the teacher, the student and the Bridge are loaded: load the text encoders alone (the teacher's CLIP /
    T5 and the student's CLIP-L), encode the run's prompts in chunks into its embedding cache (unless it is fresh),
    and free the encoders, so they never share the GPU (or host RAM) with the big models. The main process encodes,
    the others wait. Returns (encode_teacher, encode_student) reading the cache, for `load_distill_models(...,
    encoders=...)`. Keywords as `load_distill_models` (its memory options are accepted and unused here)."""
    import gc

    import torch
    from accelerate import PartialState

    from .. import loop
    from ..distill import cached_encoders, text_cache_is_fresh, text_cache_key, text_store_dtype, write_text_cache
    from . import loading
    from .text import encode_for_family, encode_sd15

    config.validate()
    _check_distill_files(bridge, teacher_family, teacher)
    pair_prompts = []
    if config.regression_pairs and os.path.exists(config.regression_pairs):
        from ..pairs import load_pairs

        # the pairs' prompts, as the Distiller reads them
        pair_prompts = sorted(set(load_pairs(config.regression_pairs, 4, config.resolution // 8)[2]))
    description = distill_description(student, bridge, teacher_family, teacher, teacher_vae, student_vae)
    key = text_cache_key(config, description, pair_prompts)
    cache_dir = config.cache_dir or os.path.join(config.out_dir, "cache")
    state = PartialState(cpu=cpu)
    if state.is_main_process and not text_cache_is_fresh(cache_dir, key, bool(pair_prompts)):
        weights_dtype, device = torch_dtype(dtype, cpu), loop.default_device(cpu)
        enc, toks = loading.load_teacher_text_encoders(teacher_family, transformer=teacher, clip_l=clip_l,
                                                       clip_g=clip_g, t5=t5, tokenizers=tokenizers,
                                                       dtype=weights_dtype, device=device)
        sd15 = loading.load_sd15(student, components=("text_encoder", "tokenizer"), dtype=weights_dtype,
                                 device=device, tokenizer=tokenizers)

        def encode_teacher(prompts):
            with torch.no_grad():
                return encode_for_family(teacher_family, prompts, enc, toks)

        def encode_student(prompts):
            return encode_sd15(prompts, sd15.text_encoder, sd15.tokenizer)

        write_text_cache(config, cache_dir, key, encode_teacher, encode_student, pair_prompts,
                         dtype=text_store_dtype(config))
        enc.clear()
        del sd15, encode_teacher, encode_student
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    return cached_encoders(config, cache_dir)


# ---------------------------------------------------------------------------------------------- sampling

def load_student_for_sampling(student_path: str, base: str | None, device, dtype=None):
    """(OneStepStudent, vae, text_encoder, tokenizer) from an exported SD1.5 model or a student checkpoint
    (student_unet.safetensors, which needs `base`: the SD1.5 model whose VAE and CLIP-L it was distilled with).
    dtype: default float32."""
    import torch

    from ..student import OneStepStudent
    from .export import STUDENT_FORMAT, load_student_unet

    dtype = torch.float32 if dtype is None else dtype
    if not os.path.exists(student_path):
        raise ValueError(f"Student not found: {student_path!r}.")
    is_ckpt = False
    if os.path.isfile(student_path) and student_path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        from .._bridge import files
        from ..errors import UserError

        files.check_safetensors_file(student_path, what="Student")
        try:
            with safe_open(student_path, framework="pt") as f:
                is_ckpt = (f.metadata() or {}).get("format") == STUDENT_FORMAT
        except (SafetensorError, OSError) as e:
            raise UserError(f"The student {student_path!r} (--student) is not a readable safetensors file (truncated "
                            f"or corrupt? {e}): give the student checkpoint or exported SD1.5 file again.") from None
    if is_ckpt and not base:
        raise ValueError(f"{os.path.basename(student_path)!r} is a student checkpoint (UNet only): give --base, "
                         "the SD1.5 model whose VAE and CLIP-L it was distilled with.")
    from . import loading

    if is_ckpt:
        student = load_student_unet(student_path, device=device, dtype=dtype)
        parts = loading.load_sd15(base, components=("vae", "text_encoder", "tokenizer"), dtype=dtype, device=device)
    else:
        parts = loading.load_sd15(student_path, components=("unet", "vae", "text_encoder", "tokenizer"), dtype=dtype,
                                  device=device)
        student = OneStepStudent(parts.unet.eval())
    return student.eval(), parts.vae.eval(), parts.text_encoder.eval(), parts.tokenizer
