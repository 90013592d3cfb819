"""`python -m training.run bridge`: arguments -> BridgeTrainConfig -> models (models/assemble.py) -> BridgeTrainer."""

from __future__ import annotations

import argparse
import json
import os

from .common import add_memory_argument, add_model_arguments, check_inputs, given, model_files, validate_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(
        p, demo_help="tiny random-init SD1.5-style and SD3.5-style models and a synthetic image set: runs on a CPU in "
                     "about a minute and writes a real Bridge checkpoint (no model files needed)",
        student_help="SD1.5 checkpoint (.safetensors single file) or diffusers folder; its VAE is the student VAE")

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
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="trade compute for memory (student decoder and teacher; default: on with CUDA, off on the "
                        "CPU)")
    t.add_argument("--gradient-accumulation", type=int, default=1,
                   help="run each step's --batch-size as this many micro-batches (same losses and gradient, less "
                        "memory, a little slower); it must divide the batch size")
    t.add_argument("--restart", action="store_true", help="ignore an existing training state in --out and "
                                                          "start over (default: resume)")
    add_memory_argument(t)


def config_from_args(args, demo: bool):
    from ..bridge_train import BridgeTrainConfig

    student_res = given(args.student_res, 64 if demo else 512)
    projector = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    if demo and not projector:
        projector = {"width": 32, "depth": 2}
    steps = given(args.steps, 150 if demo else 2000)
    return BridgeTrainConfig(
        out_dir=args.out, images=args.images, steps=steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, steps // 10)), grad_clip=args.grad_clip,
        attn_weight=args.attn_weight,
        attn_blocks=[b.strip() for b in args.attn_blocks.split(",")] if args.attn_blocks else None,
        attn_queries=args.attn_queries, val_fraction=args.val_fraction,
        val_every=given(args.val_every, 50 if demo else 200), ckpt_every=args.ckpt_every, log_every=args.log_every,
        seed=args.seed, k=args.k, student_res=student_res, teacher_res=args.k * student_res, projector=projector,
        tap=args.tap,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        gradient_accumulation=args.gradient_accumulation,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def run(args) -> int:
    # Only what is actually missing or wrong: the given paths checked, the options not given named; before the
    # imports below load torch.
    check_inputs(args, () if args.demo else ("--images", "--out", "--student", "--teacher-family", "--teacher"),
                 "Bridge training", "or --demo to try it on tiny models")
    from .. import data
    from ..bridge_train import BridgeTrainer
    from ..errors import output_dir
    from ..models import assemble

    if args.demo:
        args.out = args.out or os.path.join("runs", "bridge-demo")
    demo_images = args.demo and not args.images
    if demo_images:
        args.images = os.path.join(args.out, "images")
    # Everything cheap first: the options, then the output folder, before images are made or models loaded.
    cfg = config_from_args(args, demo=args.demo)
    validate_flags(cfg, args, {"out_dir": "--out"})
    output_dir(cfg.out_dir)
    from ..memory import preflight_command

    preflight_command(args, cfg, "bridge")  # may apply a memory plan to cfg and args
    if args.demo:
        if demo_images and not os.path.isdir(args.images):
            data.make_synthetic_images_once(args.images, n=48, size=256, seed=args.seed)
        models = assemble.demo_bridge_models(args.seed, args.teacher_family)
        trainer = BridgeTrainer(cfg, models)
    else:
        # VAEs and text encoders first: images and captions encoded, encoders freed, then the teacher transformer.
        trainer = assemble.bridge_trainer(cfg, args.student, args.teacher_family, **model_files(args))
    result = trainer.run()
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
