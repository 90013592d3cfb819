"""`python -m training.run bridge`: argument parsing and model assembly for Bridge training."""

from __future__ import annotations

import argparse
import json
import os

from ..models.families import TEACHER_FAMILIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--demo", action="store_true",
                   help="tiny random-init SD1.5-style and SD3.5-style models and a synthetic image set: runs on a "
                        "CPU in about a minute and writes a real Bridge checkpoint (no model files needed)")
    g.add_argument("--student", help="SD1.5 checkpoint (.safetensors single file) or diffusers folder; its VAE is "
                                     "the student VAE")
    g.add_argument("--student-vae", help="separate SD1.5 VAE file (overrides the one in --student)")
    g.add_argument("--teacher-family", choices=TEACHER_FAMILIES, help="which teacher the files are")
    g.add_argument("--teacher", help="teacher diffusers folder, or transformer single file "
                                     "(ComfyUI models/diffusion_models or an all-in-one checkpoint)")
    g.add_argument("--teacher-vae", help="teacher VAE single file (e.g. models/vae/ae.safetensors for Flux)")
    g.add_argument("--clip-l", help="CLIP-L text encoder file (models/text_encoders/clip_l.safetensors)")
    g.add_argument("--clip-g", help="CLIP-G text encoder file (SD3.5)")
    g.add_argument("--t5", help="T5-XXL text encoder file (t5xxl_fp16.safetensors)")
    g.add_argument("--tokenizers", help="folder with tokenizer subfolders (tokenizer, tokenizer_2, tokenizer_3) "
                                        "when the teacher is given as single files")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights dtype for the frozen models (auto: bf16 on CUDA, fp32 on CPU)")

    d = p.add_argument_group("data")
    d.add_argument("--images", help="folder of images (recursive; jpg/png/webp; optional caption .txt beside each)")
    d.add_argument("--out", default=None, help="run folder (checkpoints, metrics.jsonl, validation grids); "
                                               "default runs/bridge-demo with --demo")
    d.add_argument("--cache-dir", help="latent cache folder (default <out>/cache)")
    d.add_argument("--student-res", type=int, help="student image size (default: student native, 512)")
    d.add_argument("--k", type=int, default=2, choices=(1, 2), help="teacher pixels per student pixel (default 2)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the images")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="optimizer steps (default 2000; 150 with --demo)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--attn-weight", type=float, default=0.1, help="weight of the attention-fidelity loss (0: off)")
    t.add_argument("--attn-blocks", help="comma-separated teacher attention modules "
                                         "(default: a few middle blocks of the teacher)")
    t.add_argument("--attn-queries", type=int, default=64, help="image-token queries sampled per block")
    t.add_argument("--width", type=int, help="projector width (channels)")
    t.add_argument("--depth", type=int, help="projector depth (residual blocks)")
    t.add_argument("--tap", default="image", choices=("image", "features"),
                   help="where the projector reads the frozen student decoder: image (the full decode, default) or "
                        "features (the decoder run only up to the teacher's latent grid: several times cheaper)")
    t.add_argument("--val-every", type=int, help="validation metrics + grid every N steps")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--log-every", type=int, default=10, help="metrics.jsonl line every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory "
                                                                          "(student decoder and teacher)")
    t.add_argument("--restart", action="store_true", help="ignore an existing training state in --out and "
                                                          "start over (default: resume)")


def _dtype(name: str, cpu: bool = False):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and not cpu else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def demo_models(seed: int = 0, teacher_family: str | None = None):
    """Tiny random-init models of the real classes: an SD1.5-like student VAE and an SD3.5-like teacher
    (transformer, 16-channel VAE, CLIP-L/G, T5), or a Flux-dev-like one with teacher_family="flux_dev"."""
    import torch

    from ..models import tiny
    from .._bridge import spaces
    from ..bridge_train import BridgeModels
    from ..teachers import make_teacher
    from ..models.text import encode_for_family

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


def load_real_models(student: str, teacher_family: str, teacher: str | None = None, teacher_vae: str | None = None,
                     clip_l: str | None = None, clip_g: str | None = None, t5: str | None = None,
                     tokenizers: str | None = None, student_vae: str | None = None, dtype: str = "auto",
                     cpu: bool = False):
    """Student VAE and teacher (transformer, VAE, text encoders) from local files -> BridgeModels.

    `student` is an SD1.5 single file or diffusers folder (its VAE is used unless `student_vae` is given);
    `teacher` a diffusers folder or a transformer / all-in-one single file. Used by the CLI and the ComfyUI node.
    cpu: load onto the CPU even where CUDA exists (pair it with the trainer config's cpu)."""
    import torch

    from .. import loop
    from ..models import loading
    from .._bridge import spaces
    from ..bridge_train import BridgeModels
    from ..teachers import make_teacher
    from ..models.text import encode_for_family

    if teacher_family not in TEACHER_FAMILIES:
        raise ValueError(f"Unknown teacher family {teacher_family!r}; choose one of {', '.join(TEACHER_FAMILIES)}.")
    torch_dtype = _dtype(dtype, cpu)
    device = loop.default_device(cpu)
    sd15 = loading.load_sd15(student_vae or student, components=("vae",), dtype=torch_dtype, device=device)
    tm = loading.load_teacher_models(teacher_family, transformer=teacher, vae=teacher_vae, clip_l=clip_l,
                                     clip_g=clip_g, t5=t5, tokenizers=tokenizers, dtype=torch_dtype, device=device)
    t = make_teacher(teacher_family, tm.transformer)

    def encode(prompts):
        with torch.no_grad():
            return encode_for_family(teacher_family, prompts, tm.text_encoders, tm.tokenizers)

    def free():
        tm.text_encoders.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return BridgeModels(
        student_vae=sd15.vae.requires_grad_(False), teacher_vae=tm.vae.requires_grad_(False), teacher=t,
        student_space=spaces.get_space("sd15"), teacher_space=t.space, encode_text=encode, free_text_encoders=free,
        description={"student": os.path.basename(student_vae or student), "teacher_family": teacher_family,
                     "teacher": os.path.basename(teacher or ""), "teacher_vae": os.path.basename(teacher_vae or "")},
    )


def real_models(args):
    return load_real_models(args.student, args.teacher_family, teacher=args.teacher, teacher_vae=args.teacher_vae,
                            clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers,
                            student_vae=args.student_vae, dtype=args.dtype)


def _given(value, default):
    """An option's value, or `default` when it was not given (0 is a value, refused by the config's checks)."""
    return default if value is None else value


def config_from_args(args, demo: bool):
    from ..bridge_train import BridgeTrainConfig

    student_res = _given(args.student_res, 64 if demo else 512)
    projector = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    if demo and not projector:
        projector = {"width": 32, "depth": 2}
    steps = _given(args.steps, 150 if demo else 2000)
    return BridgeTrainConfig(
        out_dir=args.out, images=args.images, steps=steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, steps // 10)), grad_clip=args.grad_clip,
        attn_weight=args.attn_weight,
        attn_blocks=[b.strip() for b in args.attn_blocks.split(",")] if args.attn_blocks else None,
        attn_queries=args.attn_queries, val_fraction=args.val_fraction,
        val_every=_given(args.val_every, 50 if demo else 200), ckpt_every=args.ckpt_every, log_every=args.log_every,
        seed=args.seed, k=args.k, student_res=student_res, teacher_res=args.k * student_res, projector=projector,
        tap=args.tap,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def run(args) -> int:
    from .. import data
    from ..bridge_train import BridgeTrainer
    from ..errors import UserError, output_dir

    if args.demo:
        args.out = args.out or os.path.join("runs", "bridge-demo")
    elif not args.images or not args.out or not args.student or not args.teacher_family or not args.teacher:
        raise UserError("Bridge training needs --images FOLDER, --out FOLDER, --student (SD1.5 file or folder), "
                        "--teacher-family and --teacher (or --demo to try it on tiny models).")
    demo_images = args.demo and not args.images
    if demo_images:
        args.images = os.path.join(args.out, "images")
    # Everything cheap first: the options, then the output folder, before images are made or models loaded.
    cfg = config_from_args(args, demo=args.demo)
    cfg.validate()
    output_dir(cfg.out_dir)
    if args.demo:
        if demo_images and not os.path.isdir(args.images):
            data.make_synthetic_images(args.images, n=48, size=256, seed=args.seed)
        models = demo_models(args.seed, args.teacher_family)
    else:
        models = real_models(args)
    result = BridgeTrainer(cfg, models).run()
    print(json.dumps({k: v for k, v in result.items() if k != "last_val"}, indent=2))
    if "last_val" in result:
        print(format_val_table(result["last_val"]))
    print(f"Bridge checkpoint: {result['bridge']}")
    return 0


def format_val_table(val: dict) -> str:
    """Held-out metrics of the Bridge next to the exact round trip, as a small text table."""
    rows = sorted(set(val["val"]["bridge"]) | set(val["val"]["round_trip"]))
    lines = [f"{'held-out metric (step ' + str(val['step']) + ')':<44} {'bridge':>10} {'round trip':>11}"]
    for r in rows:
        b = val["val"]["bridge"].get(r, float("nan"))
        t = val["val"]["round_trip"].get(r, float("nan"))
        lines.append(f"{r:<44} {b:>10.4f} {t:>11.4f}")
    return "\n".join(lines)
