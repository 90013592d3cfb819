"""The default run's settings and command line, without torch: `python -m training.run shapes --help` and every
check of its input answer in a fraction of a second, before torch and the models load (training/shapes/run.py runs
them).

DEFAULTS is the default run's schedule, QUICK the smoke-test one; SETTINGS_HELP says what each setting does (one
`--help` line, grouped by stage), SETTING_LIMITS and `setting_choices` what each accepts; `parse_args` parses and
checks a command line, naming each problem by the flag the user typed.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "assets", "shapes")  # the shipped world (models.DEFAULT_DIR)
DEFAULT_OUT = os.path.join("runs", "shapes")

DEFAULTS = dict(
    n_images=1200,  # rendered training images for the Bridge (10% held out for its validation)
    bridge_steps=400, bridge_batch=16, bridge_lr=1e-3, attn_weight=0.1, attn_queries=64,
    projector_width=64, projector_depth=2,
    bridge_tap="image",  # where the Bridge reads the student decoder: image (full decode) or features (bridge/taps.py)
    # 100 DMD steps after the regression warm-up below (300 without it): what fits the default run's 10 minutes.
    distill_steps=100, distill_batch=16, student_lr=2e-5, student_cross_attention_lr=0.0, fake_lr=1e-3, fake_rank=16,
    fake_updates=2, distill_s_min=0.02,
    # The regression pairs (training/pairs.py, DistillConfig.regression_*): this many teacher-corrected pairs (0: off),
    # made before the distillation and counted in its wall time (the teacher redraws the student base's own samples
    # from noise level regression_s0), fitted by regression-only warm-up steps before the DMD steps (a regression
    # term inside each DMD step, regression_weight > 0, measured worse per second: docs/shapes_investigation.md §5.8).
    # Without them no distillation in this budget learns the background (§5.1-5.7).
    regression_n=400, regression_weight=0.0, regression_s0=0.9, regression_batch=16,
    regression_warmup_steps=1500, regression_warmup_lr=1e-4, regression_warmup_cross_attention_lr=1e-3,
    # The distiller's options for the Bridge's Jacobian (DistillConfig; docs/shapes_investigation.md): DMD2's
    # normaliser and then equal per-sample weight in student space, a clip that cuts only outliers (2x the running
    # norm; the fixed 1.0 was active on every step), the teacher's own noise levels (it saw s < 0.2 in 0.7% of its
    # training, DMD's uniform draw puts 19% there) and a straight-through clamp. Each is an ablation row of the
    # benchmark.
    distill_timesteps="teacher", distill_grad_norm="both", distill_grad_clip=1.0, distill_clip_relative=2.0,
    straight_through_clamp=True,
    # DMD2's GAN term in teacher space (DistillConfig.gan_*): generator weight (0: off), discriminator weight, and
    # how many real rendered scenes (none with a held-out caption) its discriminator sees, encoded by the teacher VAE.
    gan_weight=0.0, gan_disc_weight=1e-2, gan_real_images=800,
    # The one-step student's input timestep. SD1.5 practice is 999, but there x0 = (z - 0.998 eps) / 0.068 amplifies
    # the tiny UNet's eps errors ~15x: in the same budget it fits even paired targets far worse than at 700
    # (`python -m training.shapes.probe`), and DMD only improves it from 700 (docs/shapes_investigation.md). 500 lifts
    # a 1500-DMD-step student (shapes_benchmark_t500.md) but measured worse at this run's 100 DMD steps (§5.9).
    student_timestep=700,
    # > 0: the student is an exponential moving average of its weights with this decay (DistillConfig.ema_decay,
    # over the warm-up and the DMD steps; what is evaluated and saved); 0: the raw weights.
    ema_decay=0.0,
    guidance=0.0,  # the teacher's CFG wherever the distillation stage asks it; 0: its own sampling CFG (world.json)
    eval_samples=300, eval_batch=100, grid_prompts=6, grid_seeds=2,
    # The pretrained rows of the report come from the world's build report (False) or are measured again (True).
    measure_reference_rows=False,
    # --same-space-row: also distil same-space from the student base (same steps, not equal time), for comparison;
    # off by default because it takes the default run past its 10-minute budget on 2 cores (measured: ~11 min).
    same_space_row=False,
    # The synthetic-data baseline (benchmark): teacher samples -> student VAE -> fine-tune the student base on them
    # (multi-step objective) -> same-space distillation, all in the cross-space row's wall time.
    synthetic_images=800, synthetic_finetune_steps=200, synthetic_batch=64, synthetic_lr=2e-4,
    # > 0: this many of the world's captions (render.held_out_captions) never appear in distillation-stage data
    # (pairs, DMD prompts, synthetic samples, Bridge images); the benchmark measures on them (issue 25). The default
    # run keeps every caption (0).
    held_out_captions=0,
)
# The same pipeline with a handful of steps: checks everything end to end, not quality.
QUICK = dict(DEFAULTS, n_images=24, bridge_steps=4, bridge_batch=4, distill_steps=3, distill_batch=2, fake_updates=1,
             projector_width=16, projector_depth=1, eval_samples=8, eval_batch=8, grid_prompts=2, grid_seeds=2,
             synthetic_images=8, synthetic_finetune_steps=2, synthetic_batch=4, regression_n=8, regression_batch=2,
             regression_warmup_steps=2, gan_real_images=8)

# One line per setting for `--help`, grouped by stage (group, what it does), and what each accepts: the bounds of
# errors.number_problem (integers for the int settings) or the choices of a text setting. Checked, named as the flag
# the user types, before anything runs (`setting_problems`).
SETTINGS_HELP = {
    "n_images": ("data", "captioned training images rendered for the Bridge (10% held out for its validation)"),
    "bridge_steps": ("Bridge training", "optimizer steps of the Bridge"),
    "bridge_batch": ("Bridge training", "images per Bridge step"),
    "bridge_lr": ("Bridge training", "peak learning rate (warm-up over the first 10% of steps, then cosine)"),
    "attn_weight": ("Bridge training", "weight of attention fidelity through the frozen teacher (0: reconstruction "
                                       "only)"),
    "attn_queries": ("Bridge training", "image-token queries sampled per teacher attention block for that loss"),
    "projector_width": ("Bridge training", "channels of the Bridge's projector"),
    "projector_depth": ("Bridge training", "residual blocks of the Bridge's projector"),
    "bridge_tap": ("Bridge training", "where the Bridge reads the student decoder: image (full decode) or features "
                                      "(cheaper)"),
    "regression_n": ("regression pairs and warm-up", "teacher-corrected pairs made before the distillation (0: none, "
                                                     "and no warm-up)"),
    "regression_s0": ("regression pairs and warm-up", "noise level the teacher redraws the student base's samples "
                                                      "from, in (0, 1]"),
    "regression_batch": ("regression pairs and warm-up", "pairs per regression step"),
    "regression_warmup_steps": ("regression pairs and warm-up", "regression-only steps on the pairs before the DMD "
                                                                "steps (cheap: no teacher)"),
    "regression_warmup_lr": ("regression pairs and warm-up", "the warm-up's learning rate"),
    "regression_warmup_cross_attention_lr": ("regression pairs and warm-up", "the warm-up's learning rate of the "
                                             "cross-attention layers (0: --regression-warmup-lr)"),
    "regression_weight": ("regression pairs and warm-up", "a regression term in each DMD step, x the DMD gradient's "
                                                          "norm (0: off)"),
    "distill_steps": ("distillation (DMD)", "DMD steps of the one-step student, after the warm-up"),
    "distill_batch": ("distillation (DMD)", "samples per DMD step"),
    "student_lr": ("distillation (DMD)", "the student's learning rate"),
    "student_cross_attention_lr": ("distillation (DMD)", "the student's cross-attention learning rate (0: "
                                                         "--student-lr)"),
    "fake_lr": ("distillation (DMD)", "learning rate of the fake score (a LoRA on the teacher)"),
    "fake_rank": ("distillation (DMD)", "LoRA rank of the fake score"),
    "fake_updates": ("distillation (DMD)", "fake-score updates per student step"),
    "distill_s_min": ("distillation (DMD)", "lowest noise level DMD draws, in [0, 0.98)"),
    "distill_timesteps": ("distillation (DMD)", "how DMD draws noise levels: teacher (the teacher's own), uniform or "
                                                "logit_normal"),
    "distill_grad_norm": ("distillation (DMD)", "gradient normaliser: teacher (DMD2's), student (equal weight per "
                                                "sample) or both"),
    "distill_grad_clip": ("distillation (DMD)", "clip of the student's gradient norm (used when the relative clip "
                                                "is 0)"),
    "distill_clip_relative": ("distillation (DMD)", "clip at this many times the running gradient norm (0: the "
                                                    "fixed --distill-grad-clip)"),
    "straight_through_clamp": ("distillation (DMD)", "clamp the decoded student image straight-through (saturated "
                                                     "pixels keep their gradient)"),
    "gan_weight": ("distillation (DMD)", "DMD2's GAN term on the student (0: off; DMD2 uses 5e-3)"),
    "gan_disc_weight": ("distillation (DMD)", "the GAN discriminator's loss weight beside the fake score's"),
    "gan_real_images": ("distillation (DMD)", "real rendered scenes the GAN discriminator sees"),
    "student_timestep": ("distillation (DMD)", "the one-step student's input timestep, 1-999 (SD1.5 practice: 999)"),
    "ema_decay": ("distillation (DMD)", "decay of an EMA of the student's weights, evaluated and saved instead "
                                        "of them (0: off)"),
    "guidance": ("distillation (DMD)", "the teacher's CFG in DMD's real score, the pairs' redraw and the "
                                       "baselines' teacher samples (0: its own sampling CFG)"),
    "eval_samples": ("evaluation", "judged samples per row (held-out prompts)"),
    "eval_batch": ("evaluation", "evaluation batch (also the latency's batch)"),
    "grid_prompts": ("evaluation", "prompts (columns) in grid.png"),
    "grid_seeds": ("evaluation", "seeds per prompt in grid.png"),
    "measure_reference_rows": ("evaluation", "measure the pretrained rows again instead of taking the world's build "
                                             "report (about a minute)"),
    "same_space_row": ("evaluation", "also distil a same-space student for comparison (past the run's time)"),
    "synthetic_images": ("benchmark only: synthetic-data baseline", "teacher samples for the baseline"),
    "synthetic_finetune_steps": ("benchmark only: synthetic-data baseline", "fine-tune steps on them"),
    "synthetic_batch": ("benchmark only: synthetic-data baseline", "fine-tune batch"),
    "synthetic_lr": ("benchmark only: synthetic-data baseline", "fine-tune learning rate"),
    "held_out_captions": ("evaluation", "captions kept out of every distillation input and evaluated on (0: none; "
                                        "the benchmark holds out 150)"),
}
_AT_LEAST_1 = dict(low=1)
SETTING_LIMITS = {
    "n_images": dict(low=10),  # 10% are held out: at least one validation image
    "gan_weight": dict(low=0), "gan_disc_weight": dict(low=0),
    "attn_weight": dict(low=0), "regression_n": dict(low=0), "regression_warmup_steps": dict(low=0),
    "held_out_captions": dict(low=0, high=500),
    "regression_weight": dict(low=0), "regression_warmup_cross_attention_lr": dict(low=0),
    "student_cross_attention_lr": dict(low=0), "distill_clip_relative": dict(low=0), "guidance": dict(low=0),
    "regression_s0": dict(low=0, low_open=True, high=1), "distill_s_min": dict(low=0, high=0.979),
    "student_timestep": dict(low=1, high=999), "ema_decay": dict(low=0, high=0.9999),
    **{k: dict(low=0, low_open=True) for k in ("bridge_lr", "student_lr", "fake_lr", "regression_warmup_lr",
                                                 "distill_grad_clip", "synthetic_lr")},
}


def setting_choices() -> dict:
    """The text settings' choices: the library's (BridgeTrainConfig.tap, dmd.TIMESTEP_DISTS, distill.GRAD_NORMS),
    spelt out because this module must not import torch (tests/test_shapes_run.py checks that they agree)."""
    return {"bridge_tap": ("image", "features"), "distill_timesteps": ("uniform", "logit_normal", "teacher"),
            "distill_grad_norm": ("teacher", "student", "both")}


def setting_problems(settings: dict) -> list[str]:
    """What is wrong with `settings` (DEFAULTS' keys), each named as its flag (--bridge-steps), before anything
    runs: a config built from a bad value would fail only after the images are rendered."""
    from ..errors import number_problem

    choices = setting_choices()
    problems = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        default = DEFAULTS[key]
        if key in choices:
            if value not in choices[key]:
                problems.append(f"{flag} must be one of {', '.join(choices[key])}, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                problems.append(f"{flag} must be true or false, got {value!r}")
        else:
            limits = SETTING_LIMITS.get(key, _AT_LEAST_1)
            problems.append(number_problem(flag, value, integer=isinstance(default, int), **limits))
    return [p for p in problems if p]

# The thread policy (measured, docs/shapes_investigation.md §8 and README): torch's default, one thread per core, is
# fastest on an idle machine, but when other work competes for the cores its OpenMP threads spin-wait against it and
# a stage can run several times slower than on 1 thread. So the run takes 1 thread when the 1-minute load average
# (the other work, before this run starts) is at least BUSY_LOAD, else torch's default; --threads N decides instead.
BUSY_LOAD = 0.5
THREADS_HELP = ("Threads: torch's default (one per core) when the machine is idle; 1 when other work is running (load "
                f"average >= {BUSY_LOAD:g} at the start), where more threads spin-wait against it and run several "
                "times slower. --threads N (or OMP_NUM_THREADS) chooses instead; a resumed run chooses again.")


def add_setting_arguments(parser: argparse.ArgumentParser, defaults: dict, quick: dict,
                          extra_help: dict | None = None) -> None:
    """--<setting> overrides for every entry of `defaults` (shared with the benchmark), one help line each, grouped
    by stage (SETTINGS_HELP, plus `extra_help` for settings of the caller's own); booleans as --<setting> /
    --no-<setting>."""
    helps = dict(SETTINGS_HELP, **(extra_help or {}))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for stage, _ in SETTINGS_HELP.values():  # the stages in the run's order
        if stage not in groups:
            groups[stage] = parser.add_argument_group(f"settings: {stage}")
    choices = setting_choices()
    for key, value in defaults.items():
        stage, text = helps.get(key, ("other settings", ""))
        if stage not in groups:
            groups[stage] = parser.add_argument_group(f"settings: {stage}")
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(type=type(value))
        if not isinstance(value, bool):
            # A choice's help names the choices; N an integer, X a number.
            kind["metavar"] = "NAME" if key in choices else "N" if isinstance(value, int) else "X"
        shown = f"default {value}" + ("" if quick[key] == value else f"; --quick {quick[key]}")
        help_line = f"{text} ({shown})".replace("%", "%%")  # argparse formats help with %
        groups[stage].add_argument(f"--{key.replace('_', '-')}", default=None, help=help_line, **kind)


# The expected time of the default run, measured (README.md and training/run.py say the same).
EXPECTED_TIME = "about 6-9 minutes on 2 CPU cores (measured on 2026-12-07 on this project's 2-core, 24 GiB machine: 6 min 11 s idle on 2 threads, 8 min 37 s on 1 thread beside the test suite running)"


def path_problems(out: str, world_dir: str) -> list[str]:
    """What is wrong with the run folder and the world folder, named by their flags (nothing is created)."""
    problems = []
    if not os.path.isdir(world_dir):
        problems.append(f"--world {world_dir!r} is not a folder (build one with `python -m training.shapes.pretrain "
                        "--out FOLDER`, or leave --world out for the shipped assets/shapes)")
    if os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"--out {out!r} is a file; choose a folder")
    return problems


def build_parser(prog: str = "python -m training.shapes.run") -> argparse.ArgumentParser:
    import ast

    # The description is run.py's docstring, read without importing run.py (and with it torch).
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    parser = argparse.ArgumentParser(
        prog=prog, description=doc,
        # Wide enough for the longest flag, so each setting's help starts on its own line.
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=46),
        usage="%(prog)s [--out FOLDER] [--threads N] [--quick] [--fresh] [--SETTING VALUE ...]",
        epilog=f"Expected time of the default run: {EXPECTED_TIME}. " + THREADS_HELP)
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="FOLDER", help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument("--world", default=DEFAULT_WORLD, metavar="FOLDER",
                        help="built shapes world (default: the shipped assets/shapes; rebuild it with "
                             "`python -m training.shapes.pretrain --out assets/shapes`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and evaluation (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --out first (default: resume the run found there, e.g. after Ctrl-C)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: chosen from the machine's load, see below)")
    add_setting_arguments(parser, DEFAULTS, QUICK)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "python -m training.shapes.run") -> argparse.Namespace:
    """The command line parsed and checked: every problem (settings, --threads, --seed, --world, --out) in one
    UserError naming the flags, before anything is written or torch loads."""
    from ..errors import UserError, number_problem, seed_problem

    args = build_parser(prog).parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS,
                    **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    problems = setting_problems(settings)
    if args.threads is not None:
        problems.append(number_problem("--threads", args.threads, low=1, integer=True))
    problems.append(seed_problem("--seed", args.seed))
    problems += path_problems(args.out, args.world)
    problems = [p for p in problems if p]
    if problems:
        raise UserError("; ".join(problems) + ".")
    return args
