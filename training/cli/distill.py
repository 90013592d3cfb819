"""`python -m training.run distill`: arguments -> DistillConfig -> models (models/assemble.py) -> Distiller, then the
export of the student as a standard SD1.5 checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

from ..errors import UserError
from ..models.families import default_guidance
from .common import add_memory_argument, add_model_arguments, check_inputs, given, model_files, validate_flags

# What the options offer and default to, spelt out here because the library's modules import torch: `distill --help`
# and the input checks answer before torch loads. tests/test_cli.py checks they are the library's.
LOSSES = ("dmd", "vsd")  # dmd.LOSSES
TIMESTEP_DISTS = ("uniform", "logit_normal", "teacher")  # dmd.TIMESTEP_DISTS
S_MIN, S_MAX = 0.02, 0.98  # dmd.S_MIN, dmd.S_MAX
GRAD_NORMS = ("teacher", "student", "both")  # distill.GRAD_NORMS
OPTIMIZERS = ("adamw", "adamw8bit")  # loop.OPTIMIZERS
DEFAULTS = SimpleNamespace(  # DistillConfig's defaults that the options show
    student_cross_attention_lr=0.0, grad_clip=1.0, grad_norm="teacher", grad_clip_relative=0.0,
    straight_through_clamp=False, regression_n=800, regression_weight=0.0, regression_warmup_steps=2000,
    regression_warmup_lr=1e-5, regression_warmup_cross_attention_lr=1e-4, regression_s0=0.9,
    regression_student_steps=25, regression_student_cfg=7.5, regression_teacher_steps=20, gradient_accumulation=1,
    optimizer="adamw")

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
    t.add_argument("--steps", type=int,
                   help="DMD steps after the regression warm-up (default 2000; 60 with --demo); 0: no DMD, the "
                        "regression warm-up alone (needs pairs and --regression-warmup-steps > 0)")
    t.add_argument("--batch-size", type=int, help="default 4 (2 with --demo)")
    t.add_argument("--loss", default="dmd", choices=LOSSES, help="DMD2-normalised gradient (default) or VSD")
    t.add_argument("--guidance",
                   help="real-score guidance: a number, or LOW,HIGH for a per-sample uniform draw (e.g. 2,8); "
                        "default: the family's (4.5 for SD3.5, true CFG; 3.5 for Flux dev, its guidance embedding)")
    t.add_argument("--fake-guidance", type=float,
                   help="the fake score's guidance, trained and queried with it (default: the family's: 1 = unguided "
                        "for SD3.5 as in DMD2; for Flux dev the real score's own embedding value, so the fake starts "
                        "equal to the real score)")
    t.add_argument("--timesteps", default="uniform", choices=TIMESTEP_DISTS,
                   help="noise-level distribution, mapped into [--s-min, --s-max]")
    t.add_argument("--s-min", type=float, default=S_MIN)
    t.add_argument("--s-max", type=float, default=S_MAX)
    t.add_argument("--student-lr", type=float, default=1e-5)
    t.add_argument("--student-cross-attention-lr", type=float, default=DEFAULTS.student_cross_attention_lr,
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
    t.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip,
                   help="student gradient-norm clip (fixed; see --grad-clip-relative)")
    t.add_argument("--grad-norm", default=DEFAULTS.grad_norm, choices=GRAD_NORMS,
                   help="per-sample gradient normalisation: teacher = DMD2's, in teacher space; student = after the "
                        "pull-back through the Bridge, every sample to the batch's mean norm; both")
    t.add_argument("--grad-clip-relative", type=float, default=DEFAULTS.grad_clip_relative,
                   help="> 0: clip at this factor x the running mean gradient norm instead of --grad-clip")
    t.add_argument("--straight-through-clamp", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS.straight_through_clamp,
                   help="training only: the decoded image's [0,1] clamp passes gradients of saturated pixels")
    r = p.add_argument_group(
        "the recipe: teacher-corrected pairs, a regression warm-up, then DMD (training/pairs.py)",
        "By default a run makes regression pairs from its own prompts, fits the one-step student to them in cheap "
        "regression-only steps, then runs the DMD steps: on the shapes world the pairs are what transfers what only "
        "the teacher knows (background 0.79 with them, 0.18 = chance without; docs/shapes_investigation.md 4, 5.8). "
        "The real-size defaults are argued in README.md (The recipe, by default). --regression-n 0: plain DMD2, no pairs "
        "and no warm-up; --regression-warmup-steps 0: no warm-up; --steps 0: no DMD (regression only).")
    r.add_argument("--regression-n", type=int,
                   help=f"make this many pairs in <out>/pairs.safetensors first (resumable per batch, reused when "
                        f"present; default {DEFAULTS.regression_n}, 16 with --demo; 0: none): the student base's "
                        "own sample of a training prompt, redrawn by the teacher from --regression-s0 through the "
                        "Bridge, back in the student's space. The benchmark's count (800 pairs, 600 captions); 400 "
                        "measured weaker. At real size one pair costs about 1.3 DMD steps at batch 2 (counted FLOPs)")
    r.add_argument("--regression-pairs",
                   help="use this pairs file (made elsewhere, e.g. training.pairs.make_pairs) instead of making them")
    r.add_argument("--regression-weight", type=float, default=DEFAULTS.regression_weight,
                   help="> 0: also a regression term inside every DMD step, its gradient's norm this multiple of the "
                        "distribution-matching one's (default 0: weight 1 measured worse per second than the "
                        "warm-up)")
    r.add_argument("--regression-batch", type=int, default=0, help="pairs per step (default: --batch-size)")
    r.add_argument("--regression-warmup-steps", type=int,
                   help=f"regression-only steps on the pairs before the DMD --steps (default "
                        f"{DEFAULTS.regression_warmup_steps}, 40 with --demo; 0 without pairs): cheap, no teacher "
                        "query (at real size 1.3%% of a DMD step's FLOPs); the benchmark's 2000 (1500 measured "
                        "weaker, 300 too few)")
    r.add_argument("--regression-warmup-lr", type=float, default=DEFAULTS.regression_warmup_lr,
                   help=f"the warm-up's learning rate (default {DEFAULTS.regression_warmup_lr:g}: DMD2's student "
                        "rate and the usual full-UNet SD1.5 fine-tuning rate; about 10x more for a LoRA student)")
    r.add_argument("--regression-warmup-cross-attention-lr", type=float,
                   default=DEFAULTS.regression_warmup_cross_attention_lr,
                   help=f"the warm-up's learning rate of the cross-attention layers (default "
                        f"{DEFAULTS.regression_warmup_cross_attention_lr:g}, 10x the rest as on the shapes world, "
                        "where the prompt is learned only with a higher rate there; 0: --regression-warmup-lr)")
    r.add_argument("--regression-s0", type=float, default=DEFAULTS.regression_s0,
                   help=f"noise level the teacher redraws the student base's sample from (default "
                        f"{DEFAULTS.regression_s0:g}: above ~0.8 is where the teacher decides what the prompt "
                        "asks over the image; below it keeps the base's layout)")
    r.add_argument("--regression-student-steps", type=int, default=DEFAULTS.regression_student_steps,
                   help=f"student base DDIM steps per pair (default {DEFAULTS.regression_student_steps})")
    r.add_argument("--regression-student-cfg", type=float, default=DEFAULTS.regression_student_cfg,
                   help=f"student base CFG (default {DEFAULTS.regression_student_cfg:g})")
    r.add_argument("--regression-teacher-steps", type=int, default=DEFAULTS.regression_teacher_steps,
                   help=f"teacher steps from s0 to 0 (default {DEFAULTS.regression_teacher_steps})")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--sample-every", type=int, help="preview grid every N steps (default 250; 20 with --demo)")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (student UNet, student decoder, teacher): less memory, "
                        "about a third more compute (default: on with CUDA, off on the CPU)")
    t.add_argument("--gradient-accumulation", type=int, default=DEFAULTS.gradient_accumulation,
                   help="run each step's --batch-size as this many micro-batches (the DMD loss still sees the whole "
                        "batch; less memory, a little slower); it must divide the batch size")
    t.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS,
                   help="the student's optimizer: adamw (fused on CUDA) or adamw8bit (bitsandbytes, CUDA: 8-bit "
                        "moments, saves 4.8 GiB on a full SD1.5 UNet)")
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


def _regression(args) -> tuple[int, int]:
    """(pairs to make, warm-up steps): the recipe's defaults, none without pairs; explicit contradictions are errors."""
    if args.regression_n and args.regression_pairs:
        raise UserError("Give --regression-n (make the pairs in the run folder) or --regression-pairs FILE (use a file "
                        "made elsewhere), not both.")
    if args.regression_n is not None and args.regression_n < 0:
        raise UserError(f"--regression-n must be >= 0 (0: no pairs are made), got {args.regression_n}.")
    n = 0 if args.regression_pairs else given(args.regression_n, 16 if args.demo else DEFAULTS.regression_n)
    if not (n or args.regression_pairs):  # no pairs: no warm-up unless asked for, which validate() refuses
        return 0, given(args.regression_warmup_steps, 0)
    return n, given(args.regression_warmup_steps, 40 if args.demo else DEFAULTS.regression_warmup_steps)


def config_from_args(args, prompts: list[str]):
    from ..distill import DistillConfig, read_prompts

    demo = args.demo
    regression_n, warmup_steps = _regression(args)
    return DistillConfig(
        out_dir=args.out, prompts=prompts, negative_prompt=args.negative_prompt,
        val_prompts=read_prompts(args.val_prompts) if args.val_prompts else None,
        val_seeds=_parse_seeds(args.val_seeds),
        steps=given(args.steps, 60 if demo else 2000), batch_size=given(args.batch_size, 2 if demo else 4),
        resolution=given(args.resolution, 64 if demo else 512), loss=args.loss,
        guidance=_parse_guidance(args.guidance or str(default_guidance(args.teacher_family) or 1.0)),
        fake_guidance=args.fake_guidance,
        timesteps=args.timesteps, s_min=args.s_min, s_max=args.s_max, student_lr=args.student_lr,
        student_cross_attention_lr=args.student_cross_attention_lr, student_lora_rank=args.student_lora_rank, ema_decay=args.ema_decay, fake_lr=args.fake_lr,
        fake_rank=args.fake_rank, fake_alpha=args.fake_alpha, fake_updates=args.fake_updates,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_norm=args.grad_norm,
        grad_clip_relative=args.grad_clip_relative, straight_through_clamp=args.straight_through_clamp,
        regression_pairs=args.regression_pairs, regression_weight=args.regression_weight,
        regression_batch=args.regression_batch, regression_warmup_steps=warmup_steps, regression_n=regression_n,
        regression_s0=args.regression_s0, regression_student_steps=args.regression_student_steps,
        regression_student_cfg=args.regression_student_cfg, regression_teacher_steps=args.regression_teacher_steps,
        regression_warmup_lr=args.regression_warmup_lr,
        regression_warmup_cross_attention_lr=args.regression_warmup_cross_attention_lr, log_every=args.log_every,
        sample_every=given(args.sample_every, 20 if demo else 250), ckpt_every=args.ckpt_every, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        gradient_accumulation=args.gradient_accumulation, optimizer=args.optimizer,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def run(args) -> int:
    # Only what is actually missing or wrong: the given paths checked, the options not given named; before torch loads.
    check_inputs(args, () if args.demo else ("--student", "--bridge", "--teacher-family", "--teacher", "--prompts",
                                             "--out"), "Distillation", "or --demo to try it on tiny models")
    from ..distill import Distiller, read_prompts
    from ..errors import output_dir
    from ..models import assemble
    from ..models.export import export_diffusers, export_sd15, export_single_file

    if args.demo:
        args.out = args.out or os.path.join("runs", "distill-demo")
    # Everything cheap first: prompts and options, then the output folder, before any model is loaded.
    prompts = read_prompts(args.prompts) if args.prompts else DEMO_PROMPTS
    cfg = config_from_args(args, prompts)
    validate_flags(cfg, args, {"out_dir": "--out"})
    if args.demo and args.bridge:
        assemble.check_demo_bridge(args.bridge)
    if cfg.regression_pairs:  # a file made elsewhere: checked before any model loads
        from ..pairs import load_pairs

        load_pairs(cfg.regression_pairs, 4, cfg.resolution // 8)
    output_dir(cfg.out_dir)
    from ..memory import preflight_command

    preflight_command(args, cfg, "distill")  # may apply a memory plan to cfg and args
    if args.demo:
        models, base = assemble.demo_distill_models(args.seed, args.bridge)
    else:
        # The text encoders alone first: prompts encoded into the cache, encoders freed, then the big models.
        models = assemble.load_distill(cfg, args.student, args.bridge, args.teacher_family, **model_files(args))
        base = None
    if cfg.pairs_file:
        pairs = cfg.pairs_file if cfg.regression_pairs else f"{cfg.regression_n} pairs made in {cfg.pairs_file}"
        print(f"Plan: regression pairs ({pairs}), {cfg.regression_warmup_steps} regression warm-up steps, then "
              f"{cfg.steps} DMD steps.")
    else:
        print(f"Plan: {cfg.steps} DMD steps, no regression pairs.")
    result = Distiller(cfg, models).run()
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    if not args.no_export and not result.get("stopped_early"):
        out = os.path.join(cfg.out_dir, "student_sd15.safetensors")
        if base is not None:  # demo: the tiny base components are in memory
            unet = models.student.merged_unet(device="cpu")
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
