"""`python -m training.run distill`: arguments -> DistillConfig -> models (models/assemble.py) -> Distiller, then the
export of the student as a standard SD1.5 checkpoint."""

from __future__ import annotations

import argparse
import json
import os

from .. import dmd
from ..distill import GRAD_NORMS, DistillConfig, Distiller, read_prompts
from ..errors import UserError
from .common import add_memory_argument, add_model_arguments, given, model_files

DEMO_PROMPTS = [
    "a red circle on a blue background", "a green square on a white background, top left",
    "a yellow triangle on a black background", "a blue star on an orange background, bottom right",
    "a purple circle on a grey background, center", "a white square on a red background",
    "an orange triangle on a green background, top right", "a black star on a yellow background",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = add_model_arguments(
        p, demo_help="tiny random-init models (the same tiny SD1.5/SD3.5 world as `bridge --demo`, whose Bridge it "
                     "uses when present) and built-in prompts: runs on a CPU in a minute or two",
        student_help="SD1.5 checkpoint (.safetensors single file) or diffusers folder: the student starts from its "
                     "UNet; its VAE and CLIP-L are the student's",
        dtype_help="dtype of the frozen models (auto: bf16 on CUDA, fp32 on CPU); the student trains in fp32")
    g.add_argument("--bridge", help="trained Bridge (.safetensors) from the student's VAE into the teacher's space")

    d = p.add_argument_group("prompts and output")
    d.add_argument("--prompts", help="text file, one prompt per line ('#' lines are comments)")
    d.add_argument("--negative-prompt", default="", help="negative prompt for the teacher's guidance (SD3/SD3.5)")
    d.add_argument("--val-prompts", help="text file of preview prompts (default: the first 4 prompts)")
    d.add_argument("--val-seeds", default="0,1", help="comma-separated preview seeds (default 0,1)")
    d.add_argument("--out", help="run folder (student checkpoint, training state, metrics.jsonl, samples/); "
                                 "default runs/distill-demo with --demo")
    d.add_argument("--cache-dir", help="embedding cache folder (default <out>/cache)")
    d.add_argument("--resolution", type=int, help="student image size (default 512; 64 with --demo)")
    d.add_argument("--no-export", action="store_true",
                   help="skip writing the standard SD1.5 checkpoint (student_sd15.safetensors) at the end")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="student steps (default 2000; 60 with --demo)")
    t.add_argument("--batch-size", type=int, help="default 4 (2 with --demo)")
    t.add_argument("--loss", default="dmd", choices=dmd.LOSSES, help="DMD2-normalised gradient (default) or VSD")
    t.add_argument("--guidance",
                   help="real-score guidance: a number, or LOW,HIGH for a per-sample uniform draw (e.g. 2,8); "
                        "default 4.5 for SD3.5 (true CFG), 3.5 for Flux (guidance embedding)")
    t.add_argument("--timesteps", default="uniform", choices=dmd.TIMESTEP_DISTS,
                   help="noise-level distribution, mapped into [--s-min, --s-max]")
    t.add_argument("--s-min", type=float, default=dmd.S_MIN)
    t.add_argument("--s-max", type=float, default=dmd.S_MAX)
    t.add_argument("--student-lr", type=float, default=1e-5)
    t.add_argument("--student-cross-attention-lr", type=float, default=DistillConfig.student_cross_attention_lr,
                   help="> 0: learning rate of the student's cross-attention layers (attn2, the ones that read the "
                        "prompt); the rest keeps --student-lr")
    t.add_argument("--student-lora-rank", type=int, default=0,
                   help="train a LoRA of this rank on the UNet's attention projections (0: the whole UNet); the run "
                        "then also writes <out>/student_lora.safetensors, a LoRA for ComfyUI's LoraLoader / "
                        "diffusers' load_lora_weights on the base SD1.5 checkpoint")
    t.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the student weights (0: off)")
    t.add_argument("--fake-lr", type=float, default=1e-4)
    t.add_argument("--fake-rank", type=int, default=64, help="rank of the fake-score LoRA on the teacher")
    t.add_argument("--fake-alpha", type=float, help="LoRA alpha of the fake score (default = rank)")
    t.add_argument("--fake-updates", type=int, default=5, help="fake-score steps per student step")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=DistillConfig.grad_clip,
                   help="student gradient-norm clip (fixed; see --grad-clip-relative)")
    t.add_argument("--grad-norm", default=DistillConfig.grad_norm, choices=GRAD_NORMS,
                   help="per-sample gradient normalisation: teacher = DMD2's, in teacher space; student = after the "
                        "pull-back through the Bridge, every sample to the batch's mean norm; both")
    t.add_argument("--grad-clip-relative", type=float, default=DistillConfig.grad_clip_relative,
                   help="> 0: clip at this factor x the running mean gradient norm instead of --grad-clip")
    t.add_argument("--straight-through-clamp", action=argparse.BooleanOptionalAction,
                   default=DistillConfig.straight_through_clamp,
                   help="training only: the decoded image's [0,1] clamp passes gradients of saturated pixels")
    r = p.add_argument_group("regression term (teacher-corrected pairs, training/pairs.py)")
    r.add_argument("--regression-n", type=int, default=0,
                   help="> 0: first make this many pairs in <out>/pairs.safetensors (reused when present): the student "
                        "base's own sample, redrawn by the teacher from --regression-s0 through the Bridge, back in "
                        "the student's space; then train with the regression term on them")
    r.add_argument("--regression-pairs", help="train with the regression term on this pairs file (made elsewhere)")
    r.add_argument("--regression-weight", type=float, default=DistillConfig.regression_weight,
                   help="the regression gradient's norm as a multiple of the distribution-matching one's (default 1)")
    r.add_argument("--regression-batch", type=int, default=0, help="pairs per step (default: --batch-size)")
    r.add_argument("--regression-warmup-steps", type=int, default=0,
                   help="regression-only steps before the distillation's --steps (cheap: no teacher queries)")
    r.add_argument("--regression-warmup-lr", type=float, default=DistillConfig.regression_warmup_lr)
    r.add_argument("--regression-warmup-cross-attention-lr", type=float,
                   default=DistillConfig.regression_warmup_cross_attention_lr,
                   help="> 0: the warm-up's learning rate of the cross-attention layers (default: --regression-warmup-lr)")
    r.add_argument("--regression-s0", type=float, default=0.9,
                   help="noise level the teacher redraws the student base's sample from (default 0.9)")
    r.add_argument("--regression-student-steps", type=int, default=25, help="student base DDIM steps (default 25)")
    r.add_argument("--regression-student-cfg", type=float, default=7.5, help="student base CFG (default 7.5)")
    r.add_argument("--regression-teacher-steps", type=int, default=20, help="teacher steps from s0 (default 20)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--sample-every", type=int, help="preview grid every N steps (default 250; 20 with --demo)")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (student UNet, student decoder, teacher)")
    t.add_argument("--restart", action="store_true", help="start over instead of resuming from --out")
    add_memory_argument(t)


def _parse_seeds(text: str, option: str = "--val-seeds") -> list[int]:
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"{option} must be comma-separated integer seeds, e.g. 0,1; got {text!r}.")
    return seeds


def _parse_guidance(text: str):
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--guidance must be a number or LOW,HIGH; got {text!r}.") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts
    raise ValueError(f"--guidance must be a number or LOW,HIGH; got {text!r}.")


def _pairs_path(args) -> str | None:
    if args.regression_n and args.regression_pairs:
        raise UserError("Give --regression-n (make the pairs in the run folder) or --regression-pairs FILE (use a file "
                        "made elsewhere), not both.")
    if args.regression_n < 0:
        raise UserError(f"--regression-n must be >= 0 (0: no pairs are made), got {args.regression_n}.")
    if args.regression_n:
        return os.path.join(args.out, "pairs.safetensors")
    return args.regression_pairs


def make_run_pairs(args, cfg: DistillConfig, models) -> None:
    """The --regression-n pairs, made once in the run folder (a resumed run reuses them) from the models' base."""
    from ..pairs import make_pairs

    if not args.regression_n or os.path.exists(cfg.regression_pairs):
        return
    print(f"Making {args.regression_n} regression pairs in {cfg.regression_pairs} ...")
    make_pairs(models, cfg.prompts, args.regression_n, cfg.regression_pairs, resolution=cfg.resolution,
               s0=args.regression_s0, student_steps=args.regression_student_steps,
               student_cfg=args.regression_student_cfg, teacher_steps=args.regression_teacher_steps,
               guidance=cfg.guidance_arg if not isinstance(cfg.guidance_arg, tuple) else sum(cfg.guidance_arg) / 2,
               negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size, seed=cfg.seed,
               device=models.student.unet.device)


def config_from_args(args, prompts: list[str]) -> DistillConfig:
    demo = args.demo
    return DistillConfig(
        out_dir=args.out, prompts=prompts, negative_prompt=args.negative_prompt,
        val_prompts=read_prompts(args.val_prompts) if args.val_prompts else None,
        val_seeds=_parse_seeds(args.val_seeds),
        steps=given(args.steps, 60 if demo else 2000), batch_size=given(args.batch_size, 2 if demo else 4),
        resolution=given(args.resolution, 64 if demo else 512), loss=args.loss,
        guidance=_parse_guidance(args.guidance or ("3.5" if (args.teacher_family or "").startswith("flux") else "4.5")),
        timesteps=args.timesteps, s_min=args.s_min, s_max=args.s_max, student_lr=args.student_lr,
        student_cross_attention_lr=args.student_cross_attention_lr, student_lora_rank=args.student_lora_rank, ema_decay=args.ema_decay, fake_lr=args.fake_lr,
        fake_rank=args.fake_rank, fake_alpha=args.fake_alpha, fake_updates=args.fake_updates,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_norm=args.grad_norm,
        grad_clip_relative=args.grad_clip_relative, straight_through_clamp=args.straight_through_clamp,
        regression_pairs=_pairs_path(args), regression_weight=args.regression_weight,
        regression_batch=args.regression_batch, regression_warmup_steps=args.regression_warmup_steps,
        regression_warmup_lr=args.regression_warmup_lr,
        regression_warmup_cross_attention_lr=args.regression_warmup_cross_attention_lr, log_every=args.log_every,
        sample_every=given(args.sample_every, 20 if demo else 250), ckpt_every=args.ckpt_every, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def run(args) -> int:
    from ..errors import output_dir
    from ..models import assemble
    from ..models.export import export_diffusers, export_sd15, export_single_file

    if args.demo:
        args.out = args.out or os.path.join("runs", "distill-demo")
    else:
        missing = [opt for opt, value in (("--student", args.student), ("--bridge", args.bridge),
                                          ("--teacher-family", args.teacher_family), ("--teacher", args.teacher),
                                          ("--prompts", args.prompts), ("--out", args.out)) if not value]
        if missing:
            raise UserError(f"Distillation needs {', '.join(missing)}: the SD1.5 --student, a trained --bridge, the "
                            "teacher (--teacher-family, --teacher, text encoders), --prompts FILE and --out FOLDER "
                            "(or --demo to try it on tiny models).")
    # Everything cheap first: prompts and options, then the output folder, before any model is loaded.
    prompts = read_prompts(args.prompts) if args.prompts else DEMO_PROMPTS
    cfg = config_from_args(args, prompts)
    cfg.validate()
    if args.demo and args.bridge:
        assemble.check_demo_bridge(args.bridge)
    if cfg.regression_pairs and not args.regression_n:  # a file made elsewhere: checked before any model loads
        from ..pairs import load_pairs

        load_pairs(cfg.regression_pairs, 4, cfg.resolution // 8)
    output_dir(cfg.out_dir)
    from ..memory import preflight_command

    preflight_command(args, cfg, "distill")  # may apply a memory plan to cfg and args
    if args.demo:
        models, base = assemble.demo_distill_models(args.seed, args.bridge)
    else:
        models = assemble.load_distill_models(args.student, args.bridge, args.teacher_family, **model_files(args))
        base = None
    make_run_pairs(args, cfg, models)
    result = Distiller(cfg, models).run()
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    if not args.no_export and not result.get("stopped_early"):
        out = os.path.join(cfg.out_dir, "student_sd15.safetensors")
        if base is not None:  # demo: the tiny base components are in memory
            unet = models.student.merged_unet()
            export_single_file(out, unet, base["vae"], base["text_encoder"])
            export_diffusers(os.path.join(cfg.out_dir, "student_sd15"), unet, base["vae"], base["text_encoder"],
                             base["tokenizer"])
        else:
            export_sd15(models.student, args.student, single_file=out)
        print(f"SD1.5 checkpoint: {out}")
    print(f"Student checkpoint: {result['student']}")
    if result.get("lora"):
        print(f"Student LoRA (kohya layout, for the base SD1.5 model): {result['lora']}")
    return 0
