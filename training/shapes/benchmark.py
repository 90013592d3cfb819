"""The shapes-world benchmark: does cross-space distillation transfer knowledge the student lacks?

    python -m training.shapes.benchmark --seeds 0 1 2 --out runs/shapes-benchmark
        # writes docs/shapes_benchmark.md, docs/shapes_benchmark.json and docs/shapes_benchmark_grid.png

The benchmark runs the method at its benchmark schedule (BENCHMARK_DEFAULTS: 800 regression pairs, 2000 warm-up
steps, 300 DMD steps); the default run (`python -m training.run`) is its 10-minute version (run.py's DEFAULTS: 400,
1500, 100), measured by `--regression-n 400 --regression-warmup-steps 1500 --distill-steps 100`.

The world's student base never learnt one attribute (world.json `knowledge_gap`: its training captions carried a
random background word), while the teacher draws it right. Rows, all on the same held-out prompts and evaluation
seeds (one evaluation seed per training seed):
  teacher (its own steps + CFG)     student base (DDIM steps + CFG)     student base, one step (t = 999)
  student base, one step at the distilled students' input timestep (their starting point; if not 999)
  same-space: one-step student distilled from the student base itself (`adapters.EpsFlowTeacher`)
  cross-space: distilled from the teacher through the trained Bridge (the method)
  synthetic-data baseline: teacher samples -> student VAE -> student base fine-tuned on them -> same-space
  regression baselines (no DMD): regression only onto the pairs made through the Bridge, onto pairs made through
             the exact round trip (no Bridge), and one-step regression straight onto teacher samples
  variants: DMD2's GAN term; twice and four times the DMD steps
  ablations: Bridge without attention fidelity; the exact round trip instead of the Bridge; each of the
             distiller's Bridge options switched off (one at a time, and all together = the DMD2 distiller as is)
Held-out captions (BENCHMARK_DEFAULTS held_out_captions: 150 of the world's 600, render.held_out_captions) never
appear in any distillation-stage data (regression pairs, DMD prompts, synthetic samples, Bridge images): the columns
are measured on test prompts among them, and the prompt and gap accuracy on the other captions are reported beside.
Same-space, the synthetic baseline and the regression baselines get the SAME TRAINING WALL TIME as the cross-space row
of their seed (Bridge training + distillation), not the same step count. Learning curves: every distilled row saves
its student every curve_every_s seconds of training; the saved students are scored on held-out prompts and drawn
against training wall time (docs/shapes_benchmark_curves.png, training/shapes/curves.py). Columns: prompt accuracy, accuracy on the attribute the student
base lacks (the headline), mean attribute accuracy, per-attribute accuracy, FD, the within-prompt spread (sample
diversity, real scenes = 1: `diversities`), training wall time; mean ± std.

Each (seed, task) is one task, run in up to --jobs worker processes with --threads torch threads each, in three
phases (Bridges and untrained rows; rows that need the seed's Bridge; rows that need the cross-space row's wall
time); a task's result is saved as <out>/seed<S>/<task>/result.json, so an interrupted benchmark resumes where it
stopped (--fresh starts over). Each seed's sample grid (fixed prompts; rows: the start, same-space, the synthetic
baseline, cross-space, the teacher) is <out>/seed<S>/grid.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

from ..loop import write_json
from .run import DEFAULTS, QUICK, add_setting_arguments, mean_attributes, regression_text

# The benchmark's schedule: the method given the time it needs to show what it learns (docs/shapes_investigation.md
# §4, §5.8: on seed 0 this schedule first reached prompt accuracy 0.33, where the default run's 10-minute schedule
# ends at 0.18). Same-space and the synthetic baseline get the resulting cross-space wall time, as always.
BENCHMARK_DEFAULTS = dict(DEFAULTS, regression_n=800, regression_warmup_steps=2000, distill_steps=300,
                          # 150 of the 600 captions never reach any distillation-stage data (issue 25); the table's
                          # columns are measured on them, the other captions beside (render.held_out_captions).
                          held_out_captions=150,
                          # The learning curve (issue 25): each distilled row's student is saved every
                          # curve_every_s seconds of training and scored on curve_eval_samples held-out prompts.
                          curve_every_s=45.0, curve_eval_samples=150,
                          # Sample diversity (evaluate.sample_diversity): DIVERSITY_K samples of each of the first
                          # diversity_prompts of the table's held-out prompts, per row and seed (0: not measured).
                          diversity_prompts=50)
# --quick: the default run's few steps, with the benchmark's held-out captions (the pipeline as the benchmark runs it).
BENCHMARK_QUICK = dict(QUICK, held_out_captions=BENCHMARK_DEFAULTS["held_out_captions"], curve_every_s=0.05,
                       curve_eval_samples=8, diversity_prompts=4)
# Samples per prompt of the sample-diversity column (what DMD adds over regression, issue 25: a regression onto mean
# targets draws one image per prompt whatever the noise).
DIVERSITY_K = 8
# Rows of each seed's sample grid (those that exist), top to bottom, with their short labels.
GRID_ROWS = {"student_base_start": "start (one step)", "same_space": "same-space", "synthetic": "synthetic baseline",
             "cross_space": "cross-space", "teacher": "teacher"}

# The distiller's Bridge options and their "off" values (DMD2 as is): one ablation row per option that is on.
OPTION_OFF = {
    "grad_norm": {"distill_grad_norm": "teacher"},
    "clip": {"distill_clip_relative": 0.0, "distill_grad_clip": 1.0},
    "timesteps": {"distill_timesteps": "uniform"},
    "straight_through": {"straight_through_clamp": False},
    "regression": {"regression_n": 0},
}
OPTION_LABELS = {
    "grad_norm": "per-sample normalisation in student space",
    "clip": "running-norm gradient clip",
    "timesteps": "the teacher's own noise levels",
    "straight_through": "straight-through clamp",
    "regression": "the teacher-corrected regression pairs",
}
# Variants of the cross-space row (issue 25: closer to the teacher), each through the seed's Bridge with these
# settings changed (same pairs and warm-up; not equal wall time: the table shows each row's time): DMD2's second
# stage (its GAN term, in teacher space), a twice longer DMD, and a four times longer one (what the learning curve
# points at: the cross-space row still rises when its steps end; at about 0.5 s a step it takes about twice the
# row's wall time, the limit: 2.09x measured, docs/shapes_benchmark_variants.md).
VARIANTS = {
    "gan": lambda settings: {"gan_weight": 5e-3},
    "long_dmd": lambda settings: {"distill_steps": 2 * settings["distill_steps"]},
    "dmd_x4": lambda settings: {"distill_steps": 4 * settings["distill_steps"]},
}
VARIANT_LABELS = {
    "gan": "DMD2's GAN term (weight 5e-3 as DMD2's SDXL run; discriminator head on the fake score, in teacher space)",
    "long_dmd": "twice the DMD steps",
    "dmd_x4": "four times the DMD steps",
}
# The Bridge's two taps (bridge/taps.py): the benchmark's cross-space row uses the settings' tap; the other tap gets a
# Bridge of its own (task "bridge_<tap>") and a cross-space row of its own ("cross_space_<tap>").
TAPS = ("image", "features")
# The baselines a user would pick instead of DMD through a Bridge (issue 25), each at the cross-space row's wall time:
# regression only onto the teacher-corrected pairs made through the Bridge, or through the exact round trip (no
# Bridge at all), and one-step regression directly onto teacher samples (noise paired at random).
REGRESSION_ROWS = ("regression_only", "regression_round_trip", "direct_regression")
ROWS = ("teacher", "student_base", "student_base_one_step", "student_base_start", "same_space", "cross_space",
        *(f"cross_space_{t}" for t in TAPS), "synthetic", *REGRESSION_ROWS, *(f"variant_{v}" for v in VARIANTS),
        "cross_space_no_attn",
        "round_trip", *(f"off_{o}" for o in OPTION_OFF), "off_all",
        "student_vae_ceiling")
PRETRAINED = ("teacher", "student_base", "student_base_one_step", "student_base_start", "student_vae_ceiling")
ATTRIBUTES = ("shape", "colour", "background", "position")
DEFAULT_DOC = os.path.join("docs", "shapes_benchmark.md")
# The hand-written analysis of the result (what was tried and why the table looks as it does), linked from the table.
INVESTIGATION = "shapes_investigation.md"


def option_overrides(settings: dict) -> dict[str, dict]:
    """{ablation task: settings overrides} for each distiller option that is on in `settings`, and "off_all"
    (every one off) when more than one is on."""
    on = {name: off for name, off in OPTION_OFF.items() if any(settings[k] != v for k, v in off.items())}
    out = {f"off_{name}": off for name, off in on.items()}
    if len(on) > 1:
        out["off_all"] = {k: v for off in on.values() for k, v in off.items()}
    return out


DEPENDS = {"cross_space": ("bridge",), "same_space": ("cross_space",), "synthetic": ("cross_space",),
           **{row: ("cross_space",) for row in REGRESSION_ROWS}, **{f"cross_space_{t}": (f"bridge_{t}",) for t in TAPS}}
# Rows with a learning curve in the benchmark's figure: those compared at equal wall time (every distilled row saves
# and scores its snapshots; the variants' curves stay in their results, their time axes being their own).
CURVE_ROWS = ("cross_space", "same_space", "synthetic", *REGRESSION_ROWS)


def cross_lr_text(settings: dict) -> str:
    lr = settings.get("student_cross_attention_lr") or 0.0
    return f" (cross-attention layers {lr:g})" if lr else ""


def other_tap(settings: dict) -> str:
    """The tap the benchmark's cross-space row does not use: it gets its own Bridge and cross-space row."""
    return next(t for t in TAPS if t != settings["bridge_tap"])


def phases(settings: dict, tasks: tuple[str, ...] | None = None) -> list[tuple[str, ...]]:
    """Tasks in dependency order: each phase needs only results of the phases before it. tasks: run only these
    (and what they need), e.g. the headline rows first when time is short."""
    other = other_tap(settings)
    order = [("bridge", f"bridge_{other}", "base", "round_trip", "cross_space_no_attn"),
             ("cross_space", f"cross_space_{other}", *option_overrides(settings), *(f"variant_{v}" for v in VARIANTS)),
             ("same_space", "synthetic", *REGRESSION_ROWS)]
    if tasks is None:
        return order
    known = {t for phase in order for t in phase}
    unknown = set(tasks) - known
    if unknown:
        raise ValueError(f"Unknown benchmark tasks {sorted(unknown)}; known with these settings: {', '.join(sorted(known))}.")
    wanted, todo = set(), list(tasks)
    while todo:
        t = todo.pop()
        if t not in wanted:
            wanted.add(t)
            todo += DEPENDS.get(t, ("bridge",) if t.startswith(("off_", "variant_")) else ())
    return [tuple(t for t in phase if t in wanted) for phase in order]


def _result_path(out: str, seed: int, task: str) -> str:
    return os.path.join(out, f"seed{seed}", task, "result.json")


def _load_result(out: str, seed: int, task: str) -> dict:
    with open(_result_path(out, seed, task), encoding="utf-8") as f:
        return json.load(f)


def student_vae_ceiling(world):
    """Diagnostic row: the teacher's samples at 64 px through the student VAE (encode, decode). No student can do
    better than what its own VAE can represent, so this bounds every one-step student from above."""
    import torch.nn.functional as F

    from . import models
    from .trainers import decode_latents, encode_latents

    def run(prompts, generator):
        images = world.decode_teacher(world.sample_teacher(prompts, generator=generator))
        small = F.interpolate(images, size=(models.STUDENT_RESOLUTION,) * 2, mode="area")
        return decode_latents(world.student_vae, encode_latents(world.student_vae, small))

    return run


def _seed_bridge(world, out: str, seed: int, bridge_task: str = "bridge"):
    """(the seed's trained Bridge of task `bridge_task`, its training seconds)."""
    from .._bridge import checkpoint as bridge_checkpoint

    shared = _load_result(out, seed, bridge_task)
    # Located from the benchmark folder, not from the stored path: that one is relative to the working directory of
    # the run that wrote it, and a resumed benchmark may run from elsewhere.
    path = os.path.join(out, f"seed{seed}", bridge_task, os.path.basename(shared["bridge"]))
    return bridge_checkpoint.load_bridge(path, student_vae=world.student_vae), shared["training_s"]["bridge"]


def direct_pairs(world, folder: str, settings: dict, seed: int) -> tuple[str, float]:
    """The direct-regression baseline's pairs: the synthetic baseline's kind of teacher samples (its own sampler, the
    run's teacher CFG, into the student's space), each paired with fresh student noise at random (no noise maps to a
    teacher sample: it is the regression a user would write first). Returns (pairs file, seconds the samples took)."""
    import torch

    from ..pairs import save_pairs
    from . import models
    from . import run as shapes_run

    path = os.path.join(folder, "direct_pairs.safetensors")
    data = shapes_run.synthetic_data(world, os.path.join(folder, "teacher_samples.safetensors"),
                                     settings["synthetic_images"], seed, held_out=settings.get("held_out_captions", 0),
                                     cfg=shapes_run.teacher_cfg(world, settings))
    # Rewritten every time (seeded noise, milliseconds): the pairs always hold the samples just loaded or drawn.
    size = models.STUDENT_RESOLUTION // 8
    noise = torch.randn((len(data["prompts"]), 4, size, size), generator=torch.Generator().manual_seed(400_000 + seed))
    save_pairs(path, noise, data["latents"], data["prompts"], seconds=data["seconds"], kind="direct")
    return path, data["seconds"]


def table_prompts(settings: dict, seed: int, n: int) -> list[str]:
    """The first n of the table's test prompts of `seed`: among the held-out captions when the settings hold some out
    (evaluate.eval_prompt_sets), else the test split's (evaluate.eval_prompts)."""
    from .evaluate import eval_prompt_sets, eval_prompts
    from .render import held_out_captions

    held = held_out_captions(settings.get("held_out_captions", 0))
    return eval_prompt_sets(n, seed, held)["held_out"] if held else eval_prompts(n, seed)


def saved_student(world, out: str, seed: int, task: str, settings: dict):
    """The one-step student the (seed, task) saved, as an evaluation row (run.student_generator); None when the task
    saved none (pretrained rows, Bridges, unfinished tasks)."""
    from ..distill import Distiller
    from ..models.export import load_student_unet
    from . import run as shapes_run

    path = os.path.join(out, f"seed{seed}", task, "distill", Distiller.STUDENT_FILE)
    if not (os.path.exists(_result_path(out, seed, task)) and os.path.exists(path)):
        return None
    return shapes_run.student_generator(world, load_student_unet(path).unet, settings["student_timestep"])


def curve(world, folder: str, unet, offset_s: float, settings: dict, seed: int) -> list[dict]:
    """The row's learning curve: each snapshot its distillation saved (and the final student, at its full time)
    scored on the curve's held-out prompts; [{"s": the row's training seconds, "accuracy", per-attribute accuracies,
    "mean_attributes", "fd"}]. offset_s: the row's seconds before its distillation loop (Bridge, pairs, ...)."""
    from safetensors.torch import load_file

    from . import run as shapes_run
    from .evaluate import evaluate_generators

    n = settings["curve_eval_samples"]
    prompts = table_prompts(settings, seed, n)
    times, runs = {}, {}
    for seconds, path in shapes_run.curve_snapshots(os.path.join(folder, "distill", "curve")):
        snap = copy.deepcopy(world.student_unet)
        snap.load_state_dict(load_file(path))
        times[path] = offset_s + seconds
        runs[path] = shapes_run.student_generator(world, snap.eval(), settings["student_timestep"])
    runs["final"] = shapes_run.student_generator(world, unet, settings["student_timestep"])
    scores = evaluate_generators(world, runs, n=n, seed=seed, batch_size=settings["eval_batch"], prompts=prompts)
    points = []
    for name in runs:
        r = scores[name]
        points.append({"s": times.get(name), "accuracy": r["accuracy"], "fd": r.get("fd"),
                       "mean_attributes": _mean_attributes(r), **{a: r[a] for a in ATTRIBUTES}})
    return points


def _stopped(task: str, seed: int):
    return KeyboardInterrupt(f"{task} seed {seed} stopped; run the benchmark again to resume it")


def run_task(task: str, seed: int, out: str, world_dir: str, settings: dict, threads: int) -> dict:
    """One (seed, task): train what the row needs, evaluate it, save and return its result."""
    import torch

    from . import models
    from . import run as shapes_run
    from .adapters import RoundTripBridge
    from .evaluate import base_generators, evaluate_generators

    torch.set_num_threads(threads)
    world = models.load_shapes_world(world_dir, register=False)
    folder = os.path.join(out, f"seed{seed}", task)
    os.makedirs(folder, exist_ok=True)
    training_s: dict[str, float] = {}
    extra: dict = {}
    images = os.path.join(out, "data", f"seed{seed}")
    ablations = dict(option_overrides(settings), **{f"variant_{v}": o(settings) for v, o in VARIANTS.items()})
    if task == "base":
        rows = dict(base_generators(world), **shapes_run.start_rows(world, settings),
                    student_vae_ceiling=student_vae_ceiling(world))
    elif task == "bridge" or task.startswith("bridge_"):  # a Bridge of the seed, shared by the rows that use it
        tap = task[len("bridge_"):] if task != "bridge" else settings["bridge_tap"]
        bridge, res = shapes_run.train_bridge(world, folder, images, dict(settings, bridge_tap=tap), seed)
        if bridge is None:
            raise _stopped(task, seed)
        result = {"task": task, "seed": seed, "threads": threads, "rows": {}, "bridge": res["bridge"], "tap": tap,
                  "training_s": {"bridge": res["wall_s"]}, "bridge_val": (res.get("last_val") or {}).get("val")}
        write_json(_result_path(out, seed, task), result)
        return result
    else:
        bridge, budget, base_unet, task_settings, pairs = None, 0.0, None, settings, None
        if task in ("cross_space", *ablations) or task.startswith("cross_space_") and task != "cross_space_no_attn":
            bridge_task = "bridge" if task in ("cross_space", *ablations) else "bridge_" + task[len("cross_space_"):]
            bridge, training_s["bridge"] = _seed_bridge(world, out, seed, bridge_task)
            task_settings = dict(settings, **ablations.get(task, {}))
        elif task == "cross_space_no_attn":
            bridge, res = shapes_run.train_bridge(world, os.path.join(folder, "bridge"), images, settings, seed,
                                                  attn_weight=0.0)
            if bridge is None:
                raise _stopped(task, seed)
            training_s["bridge"] = res["wall_s"]
            extra["bridge_val"] = (res.get("last_val") or {}).get("val")
        elif task == "round_trip":
            bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space,
                                     world.k)
        elif task in ("same_space", "synthetic", *REGRESSION_ROWS):
            budget = sum(_load_result(out, seed, "cross_space")["training_s"].values())
            extra["time_budget_s"] = budget
            if task in REGRESSION_ROWS:
                task_settings = dict(settings, distill_steps=0)  # regression only, until the budget is spent
            if task == "regression_only":
                bridge, training_s["bridge"] = _seed_bridge(world, out, seed)
                budget -= training_s["bridge"]
            elif task == "regression_round_trip":
                bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space,
                                         world.teacher_space, world.k)
            elif task == "direct_regression":
                pairs = direct_pairs(world, folder, settings, seed)
                extra["teacher_samples_s"] = pairs[1]  # counted in the distillation's time, as the pairs' are
            elif task == "synthetic":
                data = shapes_run.synthetic_data(world, os.path.join(folder, "synthetic.safetensors"),
                                                 settings["synthetic_images"], seed,
                                                 held_out=settings.get("held_out_captions", 0),
                                                 cfg=shapes_run.teacher_cfg(world, settings))
                base_unet, finetune_s = shapes_run.finetune_student_base(world, os.path.join(folder, "base"), data,
                                                                         settings, seed)
                training_s.update(teacher_samples=data["seconds"], finetune=finetune_s)
                budget = budget - data["seconds"] - finetune_s
                if budget <= 0:  # sampling + fine-tuning alone overran: one distillation step, and say so
                    extra["over_budget_s"] = -budget
                    budget = 1e-6
        else:
            raise ValueError(f"Unknown benchmark task {task!r}.")
        # Direct regression fits its pairs only (no teacher is queried): the same-space models carry no Bridge.
        mode = "same" if task in ("same_space", "synthetic", "direct_regression") else "cross"
        unet, res = shapes_run.distill_student(world, os.path.join(folder, "distill"), mode, task_settings, seed,
                                               bridge=bridge, time_budget_s=budget, base_unet=base_unet,
                                               pairs=pairs,
                                               snapshot_every_s=settings.get("curve_every_s", 0.0))
        if unet is None:
            raise _stopped(task, seed)
        offset = sum(training_s.values()) + res["pairs_s"]
        training_s["distill"] = res["wall_s"]
        extra.update(distill_steps=res["step"], distill_last_metrics=res.get("last_metrics"), guidance=res["guidance"])
        if settings.get("curve_every_s"):
            extra["curve"] = curve(world, folder, unet, offset, settings, seed)
            extra["curve"][-1]["s"] = sum(training_s.values())
        rows = {task: shapes_run.student_generator(world, unet, settings["student_timestep"])}
    from .render import held_out_captions

    evaluation = evaluate_generators(world, rows, n=settings["eval_samples"], seed=seed,
                                     batch_size=settings["eval_batch"],
                                     held_out=held_out_captions(settings.get("held_out_captions", 0)))
    result = {"task": task, "seed": seed, "threads": threads, "rows": {
        name: dict(evaluation[name], training_s=sum(training_s.values()) if training_s else None)
        for name in rows}, "training_s": training_s, **extra}
    write_json(_result_path(out, seed, task), result)
    return result


def diversities(out: str, world, settings: dict, seeds: list[int], results: list[dict]) -> dict[int, dict]:
    """{seed: {row: sample diversity}} of the teacher and of each finished distilled row of the seed (from the
    student its task saved), on the first diversity_prompts of the table's held-out prompts, DIVERSITY_K samples each
    (evaluate.sample_diversity). Cached in <out>/seed<S>/diversity.json: only rows missing there are sampled, so
    folders finished before the column get it on their next report."""
    from .evaluate import base_generators, sample_diversity

    m = settings["diversity_prompts"]
    if not m:
        return {}
    found = {}
    for seed in seeds:
        if not any(r["seed"] == seed for r in results):  # nothing finished (--report-only): nothing to measure
            continue
        path = os.path.join(out, f"seed{seed}", "diversity.json")
        cached = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
        values = cached["rows"] if (cached.get("prompts"), cached.get("k")) == (m, DIVERSITY_K) else {}
        runs = {} if "teacher" in values else {"teacher": base_generators(world)["teacher"]}
        for r in results:
            todo = [row for row in r["rows"] if row not in values and row not in PRETRAINED]
            student = saved_student(world, out, seed, r["task"], settings) if r["seed"] == seed and todo else None
            if student is not None:
                runs.update({row: student for row in todo})
        if runs:
            prompts = table_prompts(settings, seed, settings["eval_samples"])[:m]  # the table's, the first m
            measured = sample_diversity(world, runs, prompts, DIVERSITY_K, seed, settings["eval_batch"])
            values.update({row: v for row, v in measured.items() if row != "reference"})
            write_json(path, {"prompts": m, "k": DIVERSITY_K, "reference": measured["reference"], "rows": values})
        found[seed] = values
    return found


def write_grids(out: str, world, settings: dict, seeds: list[int]) -> dict[int, str]:
    """{seed: <out>/seed<S>/grid.png} for each seed with a finished distilled row: the run's grid prompts x two
    evaluation seeds, one row per GRID_ROWS entry that the seed has (each distilled row from the student its task
    saved). Cheap (a few dozen samples), so made again on every call."""
    from . import run as shapes_run
    from .evaluate import base_generators

    fixed = dict(base_generators(world), **shapes_run.start_rows(world, settings))
    prompts = shapes_run.grid_prompts(settings["grid_prompts"])
    grids = {}
    for seed in seeds:
        rows = {}
        for row, label in GRID_ROWS.items():
            student = fixed.get(row) or saved_student(world, out, seed, row, settings)
            if student is not None:
                rows[label] = student
        if len(rows) > len(fixed):
            grids[seed] = shapes_run.sample_grid(world, os.path.join(out, f"seed{seed}", "grid.png"), rows, prompts,
                                                 list(range(settings["grid_seeds"])))
    return grids


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _mean_attributes(r: dict) -> float:
    return mean_attributes(r)  # the default run's report uses the same


def aggregate(results: list[dict], seeds: list[int]) -> dict:
    """{row: {metric: {"mean", "std", "values"}}} over seeds: accuracy, each attribute, mean_attributes, fd,
    training_s, latency_ms (None where a row has no such figure)."""
    table: dict = {}
    getters = {"accuracy": lambda r: r["accuracy"], **{a: (lambda r, a=a: r[a]) for a in ATTRIBUTES},
               "mean_attributes": _mean_attributes, "fd": lambda r: r.get("fd"),
               "training_s": lambda r: r.get("training_s"), "diversity": lambda r: r.get("diversity"),
               "latency_ms": lambda r: r["seconds_per_image"] * 1000,
               # With held-out captions the figures above are on them; these on the captions distillation saw.
               **{f"seen_{m}": (lambda r, m=m: r["seen"][m] if "seen" in r else None)
                  for m in ("accuracy", *ATTRIBUTES)},
               "seen_mean_attributes": lambda r: _mean_attributes(r["seen"]) if "seen" in r else None}
    for row in ROWS:
        found = [(seed, r["rows"][row]) for seed in seeds for r in results if r["seed"] == seed and row in r["rows"]]
        if not found:
            continue
        entry = {}
        for metric, get in getters.items():
            vals = [get(r) for _, r in found]
            if any(v is None for v in vals):
                entry[metric] = None
                continue
            m, sd = _mean_std(vals)
            entry[metric] = {"mean": m, "std": sd, "values": vals, "seeds": [seed for seed, _ in found]}
        table[row] = entry
    return table


def bridge_quality(results: list[dict], seeds: list[int], settings: dict) -> dict:
    """{name: {metric: {"mean", "std", "values"}}} of the Bridges' held-out validation (latent MSE and PSNR, image
    PSNR after the teacher VAE, attention similarity per teacher block and their mean, training wall time), for
    each tap's Bridge, the Bridge without attention fidelity, and the exact round trip as the reference."""
    sources = {f"bridge_{settings['bridge_tap']}": "bridge", f"bridge_{other_tap(settings)}": f"bridge_{other_tap(settings)}",
               "bridge_no_attn": "cross_space_no_attn"}
    per_name: dict[str, list[dict]] = {}
    for name, task in sources.items():
        for seed in seeds:
            for r in results:
                if r["seed"] == seed and r["task"] == task and r.get("bridge_val"):
                    val = r["bridge_val"]
                    per_name.setdefault(name, []).append(dict(val["bridge"], training_s=r["training_s"]["bridge"]))
                    if task == "bridge":  # the round trip does not depend on the Bridge: one reference per seed
                        per_name.setdefault("round_trip", []).append(dict(val["round_trip"]))
    out = {}
    for name, vals in per_name.items():
        metrics = sorted({k for v in vals for k in v})
        entry = {}
        for v in vals:
            attn = [x for k, x in v.items() if k.startswith("attn_sim/")]
            v["attn_sim_mean"] = sum(attn) / len(attn) if attn else None
        for m in (*metrics, "attn_sim_mean"):
            xs = [v.get(m) for v in vals]
            if any(x is None for x in xs):
                continue
            mean, sd = _mean_std(xs)
            entry[m] = {"mean": mean, "std": sd, "values": xs}
        out[name] = entry
    return out


def json_rows(summary: dict) -> list[dict]:
    """The table as docs/shapes_benchmark.json: one entry per row with its label and every seed's figures."""
    out = []
    for row, entry in summary["table"].items():
        seeds = []
        for i, seed in enumerate(entry["accuracy"]["seeds"] if entry["accuracy"] else []):
            seeds.append({"seed": seed, **{m: (entry[m]["values"][i] if entry.get(m) else None)
                                           for m in ("accuracy", *ATTRIBUTES, "mean_attributes", "fd", "diversity",
                                                     "training_s",
                                                     *(f"seen_{a}" for a in ("accuracy", *ATTRIBUTES,
                                                                             "mean_attributes")))}})
        out.append({"name": row, "label": summary["row_labels"][row],
                    "mean": {m: (entry[m]["mean"] if entry[m] else None) for m in entry},
                    "std": {m: (entry[m]["std"] if entry[m] else None) for m in entry}, "seeds": seeds})
    return out


def _pm(entry, digits: int) -> str:
    if entry is None:
        return "—"
    if len(entry["values"]) == 1:  # one seed: no spread to show
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def findings(table: dict, gap: str | None, n_prompts: int = 300, quality: dict | None = None) -> list[str]:
    """Plain statements comparing the rows the expectation is about (computed, not written by hand). The noise of
    a difference is the seeds' spread; with one seed, the binomial error of an accuracy on n_prompts prompts."""
    out = []

    def spread(e):
        if len(e["values"]) > 1:
            return e["std"]
        return math.sqrt(max(e["mean"] * (1 - e["mean"]), 1e-4) / n_prompts)

    def compare(a, b, what):
        if a not in table or b not in table:
            return
        parts = []
        for metric, name in ((gap, f"{gap} accuracy (the student base's gap)") if gap else (None, None),
                             ("accuracy", "prompt accuracy"), ("mean_attributes", "mean attribute accuracy")):
            if metric is None:
                continue
            ea, eb = table[a][metric], table[b][metric]
            d = ea["mean"] - eb["mean"]
            noise = math.sqrt(spread(ea) ** 2 + spread(eb) ** 2)
            verdict = ("clearly higher" if d > 2 * noise and d > 0.02 else
                       "clearly lower" if -d > 2 * noise and -d > 0.02 else "within noise")
            parts.append(f"{name} {ea['mean']:.3f} vs {eb['mean']:.3f} ({d:+.3f}, {verdict})")
        fa, fb = table[a].get("fd"), table[b].get("fd")
        if fa and fb and len(fa["values"]) > 1 and len(fb["values"]) > 1:  # FD's noise: the seeds' spread only
            d, noise = fa["mean"] - fb["mean"], math.sqrt(fa["std"] ** 2 + fb["std"] ** 2)
            verdict = ("clearly lower, better" if -d > 2 * noise else "clearly higher, worse" if d > 2 * noise
                       else "within noise")
            parts.append(f"FD {fa['mean']:.1f} vs {fb['mean']:.1f} ({d:+.1f}, {verdict})")
        va, vb = table[a].get("diversity"), table[b].get("diversity")
        if va and vb and len(va["values"]) > 1 and len(vb["values"]) > 1:  # its noise: the seeds' spread only
            d, noise = va["mean"] - vb["mean"], math.sqrt(va["std"] ** 2 + vb["std"] ** 2)
            verdict = "clearly higher" if d > 2 * noise else "clearly lower" if -d > 2 * noise else "within noise"
            parts.append(f"within-prompt spread {va['mean']:.2f} vs {vb['mean']:.2f} ({d:+.2f}, {verdict})")
        out.append(f"- {what}: " + "; ".join(parts) + ".")

    compare("cross_space", "same_space", "Cross-space vs same-space distillation (equal wall time)")
    compare("cross_space", "synthetic", "Cross-space vs the synthetic-data baseline (equal wall time)")
    compare("cross_space", "regression_only",
            "What DMD adds: the full method vs regression only onto the same pairs through the Bridge (equal wall time)")
    compare("cross_space", "regression_round_trip",
            "The full method vs regression only onto round-trip pairs (no Bridge; equal wall time)")
    compare("regression_only", "regression_round_trip",
            "What the Bridge adds to the pairs: regression only, pairs through the Bridge vs the exact round trip")
    compare("cross_space", "direct_regression",
            "The full method vs one-step regression directly onto teacher samples (equal wall time)")
    for v, text in VARIANT_LABELS.items():
        compare(f"variant_{v}", "cross_space", f"Cross-space with {text} vs without")
    compare("cross_space", "student_base_start", "Cross-space vs its starting point")
    compare("same_space", "student_base_start", "Same-space vs its starting point")
    compare("cross_space", "cross_space_no_attn", "Bridge with vs without attention fidelity")
    for t in TAPS:
        compare(f"cross_space_{t}", "cross_space", f"Cross-space through the {t}-tap Bridge vs the benchmark's tap")
    q = quality or {}
    if "bridge_features" in q and "bridge_image" in q and "image_psnr" in q["bridge_features"]:
        f, i = q["bridge_features"]["image_psnr"], q["bridge_image"]["image_psnr"]
        d = f["mean"] - i["mean"]
        out.append(f"- Bridge quality, features vs image tap: image PSNR {f['mean']:.2f} vs {i['mean']:.2f} dB "
                   f"({d:+.2f} dB; the target is within 0.3 dB or better: "
                   f"{'met' if d >= -0.3 else 'missed'}); Bridge training {q['bridge_features']['training_s']['mean']:.0f} "
                   f"vs {q['bridge_image']['training_s']['mean']:.0f} s.")
    compare("cross_space", "round_trip", "Trained Bridge vs the exact round trip")
    for o in OPTION_OFF:
        compare("cross_space", f"off_{o}", f"Distiller with vs without {OPTION_LABELS[o]}")
    compare("cross_space", "off_all", "Distiller with its Bridge options vs DMD2 as is")
    compare("cross_space", "teacher", "Cross-space student vs its teacher")
    return out


def curve_markdown(summary: dict) -> list[str]:
    """The learning curves' section: the figure and, per row, its first and last common points."""
    curves, labels, gap = summary.get("curves") or {}, summary["row_labels"], summary.get("gap")
    if not curves:
        return []
    st = summary["settings"]
    # curve_every_s 0: this invocation saved no snapshots; the curves are those of results run with them.
    saved = (f"Each distilled row's student saved every {st['curve_every_s']:g} s of training"
             if st["curve_every_s"] else "The students saved during training by the rows run with snapshots")
    lines = ["", "## Learning curves", "",
             f"{saved} and scored on "
             f"{st['curve_eval_samples']} held-out prompts (fewer than the table's, so its points are noisier); x: the "
             "row's training wall time (Bridge, pairs, teacher samples, fine-tuning included, as in the table); mean "
             "over seeds on the seeds' common time range, ± one standard deviation shaded.", ""]
    if summary.get("curve_png"):
        lines += [f"![learning curves]({summary['curve_png']})", ""]
    lines += [f"| row | seeds | from (s) | to (s) | prompt accuracy | {gap or 'gap'} | mean attribute |",
              "|---|---|---|---|---|---|---|"]
    for row, c in curves.items():
        cells = [f"{c[m]['mean'][0]:.3f} -> {c[m]['mean'][-1]:.3f}" if m in c else "—"
                 for m in ("accuracy", gap, "mean_attributes")]
        lines.append(f"| {labels.get(row, row)} | {len(c['seeds'])} | {c['t'][0]:.0f} | {c['t'][-1]:.0f} | "
                     + " | ".join(cells) + " |")
    return lines


def row_labels(world, settings: dict) -> dict:
    from . import run as shapes_run

    labels = {row: shapes_run.row_label(row, world, settings) for row in ROWS}
    labels["same_space"] = "one-step, distilled same-space (from the student base; equal wall time)"
    labels["synthetic"] = ("synthetic-data baseline: teacher samples -> student VAE -> fine-tuned base -> same-space "
                           "(equal wall time)")
    for o in OPTION_OFF:
        labels[f"off_{o}"] = f"ablation: cross-space without {OPTION_LABELS[o]}"
    labels["off_all"] = "ablation: cross-space with the DMD2 distiller as is (every Bridge option off)"
    for v, text in VARIANT_LABELS.items():
        labels[f"variant_{v}"] = f"cross-space with {text}"
    labels["cross_space"] = f"one-step, distilled cross-space (through the Bridge, {settings['bridge_tap']} tap)"
    labels["regression_only"] = ("baseline: regression only onto the teacher-corrected pairs made through the Bridge, "
                                 "no DMD (equal wall time)")
    labels["regression_round_trip"] = ("baseline: regression only onto pairs made through the exact round trip (no "
                                       "Bridge at all), no DMD (equal wall time)")
    labels["direct_regression"] = ("baseline: one-step regression directly onto teacher samples (noise paired at "
                                   "random; equal wall time)")
    for t in TAPS:
        labels[f"cross_space_{t}"] = f"one-step, distilled cross-space through the {t}-tap Bridge"
    return labels


BRIDGE_LABELS = {"bridge_image": "Bridge, image tap (full decode, the paper's design)",
                 "bridge_features": "Bridge, features tap (decoder stopped at the teacher's grid)",
                 "bridge_no_attn": "Bridge without attention fidelity (benchmark's tap)",
                 "round_trip": "exact round trip E_t(up(D_s(z))) (reference)"}


def bridge_markdown(quality: dict) -> list[str]:
    if not quality:
        return []
    blocks = sorted({m for e in quality.values() for m in e if m.startswith("attn_sim/")})
    lines = ["", "## Bridge quality on held-out images", "",
             "Each seed's Bridges on the 10% of its rendered images held out from Bridge training. Latent MSE/PSNR: "
             "against the teacher VAE's encoding of the image at teacher resolution; image PSNR: after the teacher "
             "VAE's decoder; attention similarity: cosine of the teacher's attention maps on the Bridge's latent vs "
             "on the encoded image, per teacher block.", "",
             "| Bridge | latent MSE | latent PSNR (dB) | image PSNR (dB) | attention similarity (mean) | "
             + " | ".join(b.split("/", 1)[1].replace("transformer_blocks.", "block ").replace(".attn", "")
                          for b in blocks) + " | training wall time (s) |",
             "|---|---|---|---|---|" + "---|" * len(blocks) + "---|"]
    for name in ("bridge_image", "bridge_features", "bridge_no_attn", "round_trip"):
        if name not in quality:
            continue
        e = quality[name]
        cells = [_pm(e.get("latent_mse"), 5), _pm(e.get("latent_psnr"), 2), _pm(e.get("image_psnr"), 2),
                 _pm(e.get("attn_sim_mean"), 4), *(_pm(e.get(b), 4) for b in blocks),
                 _pm(e.get("training_s"), 0) if "training_s" in e else "—"]
        lines.append(f"| {BRIDGE_LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, notes: str | None = None) -> str:
    s = summary
    table, labels, gap = s["table"], s["row_labels"], s.get("gap")
    held = s["settings"].get("held_out_captions", 0)
    seen_head = (f" prompt accuracy, seen captions | {gap or 'gap'}, seen captions |" if held else "")
    diverse = any(e.get("diversity") for e in table.values())  # folders older than the column have none
    lines = [
        "# Shapes-world benchmark" + (" (QUICK: numbers are meaningless)" if s["quick"] else ""),
        "",
        f"Regenerate with `{s['command']}`. World `{os.path.basename(s['world'])}` (version {s.get('world_version')}); "
        f"seeds {s['seeds']} (each seed: its own Bridge and distillation runs and its own evaluation seed); "
        f"{s['settings']['eval_samples']} held-out prompts per seed; {s['jobs']} tasks at once with {s['threads']} CPU "
        f"thread(s) each; benchmark wall time {s['wall_s'] / 60:.1f} min (all its invocations). The same figures, "
        f"per seed: `{s.get('json', 'benchmark.json in the benchmark folder')}`.",
        "",
        (f"**The knowledge gap:** the student base was trained with a random {gap} word in its captions, so it draws "
         f"the {gap} at chance; the teacher was trained on the true captions. Only the teacher can teach it: the "
         f"**{gap}** column is the headline." if gap else "This world has no knowledge gap."),
        "",
    ] + ([f"**Held-out captions:** {held} of the world's captions never appear in any distillation-stage data "
          "(regression pairs, DMD prompts, synthetic samples, Bridge images); every column but the two 'seen "
          f"captions' ones is measured on {s['settings']['eval_samples']} test prompts among them, those two on as "
          "many among the other captions.", ""] if held else []) + [
        f"| row | prompt accuracy | {gap or 'gap'} (headline) | mean attribute | shape / colour / background / position "
        f"| Fréchet distance (judge) |{' within-prompt spread (real scenes = 1) |' if diverse else ''} training wall time "
        f"(s) |{seen_head}",
        "|---|---|---|---|---|---|---|" + ("---|" if diverse else "") + ("---|---|" if held else ""),
    ]
    for row in ROWS:
        if row not in table:
            continue
        e = table[row]
        train = (_pm(e["training_s"], 0) if e["training_s"] else "— (pretrained)" if row in PRETRAINED else "—")
        per_attr = " / ".join(f"{e[a]['mean']:.2f}" for a in ATTRIBUTES)
        n = len(e["accuracy"]["values"])
        label = labels[row] + (f" ({n} of {len(s['seeds'])} seeds)" if n < len(s["seeds"]) else "")
        seen = (f" {_pm(e.get('seen_accuracy'), 3)} | {_pm(e.get('seen_' + gap), 3) if gap else '—'} |"
                if held else "")
        lines.append(f"| {label} | {_pm(e['accuracy'], 3)} | {_pm(e[gap], 3) if gap else '—'} | "
                     f"{_pm(e['mean_attributes'], 3)} | {per_attr} | {_pm(e['fd'], 2)} |"
                     + (f" {_pm(e.get('diversity'), 2)} |" if diverse else "") + f" {train} |{seen}")
    st = s["settings"]
    lines += [
        "",
        "Mean ± standard deviation over seeds (one seed: the value alone; its accuracies then carry about ±0.02-0.03 "
        "of binomial noise on these prompts). Training wall time: Bridge training + distillation; for the "
        "synthetic baseline teacher sampling + fine-tuning + distillation. Same-space and the synthetic baseline train "
        "for the cross-space row's wall time of their seed (a time budget, not a step count).",
    ] + ([
        "",
        f"Within-prompt spread (sample diversity): the mean distance between the judge's features of {DIVERSITY_K} "
        f"samples of one prompt (the row's noise, evaluation seed), over the first {st['diversity_prompts']} held-out "
        f"prompts, divided by the same for {DIVERSITY_K} real renders of each prompt (whose scenes vary only in size "
        "and position). 1: as varied as the world's own scenes of a caption; below 1 the samples collapse towards one "
        "image per prompt (what a mean-seeking regression would do); above 1 they differ more than real scenes do "
        "(some samples with wrong attributes, artefacts). Nearer the teacher's is better; the teacher (its own "
        f"sampling): {_pm(s['teacher_diversity'], 2)}.",
    ] if diverse and s.get("teacher_diversity") else []) + [
        "",
        f"Settings: Bridge {st['bridge_steps']} steps at batch {st['bridge_batch']} on {st['n_images']} rendered "
        f"images (projector width {st['projector_width']}, depth {st['projector_depth']}, attention weight "
        f"{st['attn_weight']}); distillation {st['distill_steps']} student steps at batch {st['distill_batch']}, "
        f"DMD loss, {st['fake_updates']} fake-score updates per step (LoRA rank {st['fake_rank']}, lr "
        f"{st['fake_lr']}), student lr {st['student_lr']}"
        f"{cross_lr_text(st)}, student timestep {st['student_timestep']}"
        + (f", an EMA of the student's weights (decay {st['ema_decay']}) evaluated" if st["ema_decay"] else "")
        + (f", the teachers' CFG {st['guidance']:g} (DMD's real score, the pairs' redraw, the baselines' teacher "
           "samples)" if st.get("guidance") else ", real-score CFG = each teacher's own sampling CFG")
        + f"; distiller options: grad_norm {st['distill_grad_norm']}, timesteps "
        f"{st['distill_timesteps']}, clip {st['distill_grad_clip']} (relative {st['distill_clip_relative']}), "
        f"straight-through clamp {st['straight_through_clamp']}. Synthetic baseline: {st['synthetic_images']} teacher "
        f"samples, {st['synthetic_finetune_steps']} fine-tuning steps at batch {st['synthetic_batch']}, lr "
        f"{st['synthetic_lr']}. " + regression_text(st),
        "",
        "## Findings (computed from the table)",
        "",
    ] + findings(table, gap, s["settings"]["eval_samples"], s.get("bridge_quality"))
    if s.get("grid"):
        st = s["settings"]
        lines += ["", f"Samples of seed {s['grid_seed']}'s students (`{s['grid']}`; columns: {st['grid_prompts']} "
                  f"held-out prompts x evaluation seeds 0-{st['grid_seeds'] - 1}; every seed's grid: "
                  "`<out>/seed<S>/grid.png`):", "", f"![sample grid]({s['grid']})"]
    lines += curve_markdown(s)
    lines += bridge_markdown(s.get("bridge_quality") or {})
    lines += ["", f"Why the table looks as it does, and what was tried: [{INVESTIGATION}]({INVESTIGATION})."]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def benchmark(seeds: list[int], out: str, world_dir: str | None = None, doc: str = DEFAULT_DOC, jobs: int = 2,
              threads: int = 1, quick: bool = False, fresh: bool = False, notes: str | None = None,
              command: str = "python -m training.shapes.benchmark", tasks: tuple[str, ...] | None = None,
              report_only: bool = False, **overrides) -> dict:
    import multiprocessing as mp
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from . import curves as learning_curves
    from . import models
    from . import run as shapes_run

    unknown = set(overrides) - set(BENCHMARK_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; known: {', '.join(BENCHMARK_DEFAULTS)}.")
    if not seeds:
        raise ValueError("Give at least one seed (--seeds 0 1 2).")
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1; got jobs={jobs}, threads={threads}.")
    settings = dict(BENCHMARK_QUICK if quick else BENCHMARK_DEFAULTS, **overrides)
    if not isinstance(settings["diversity_prompts"], int) or settings["diversity_prompts"] < 0:
        raise ValueError(f"diversity_prompts must be an integer >= 0 (0: no diversity column); got "
                         f"{settings['diversity_prompts']!r}.")
    world_dir = world_dir or models.DEFAULT_DIR
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    world = models.load_shapes_world(world_dir, register=False)  # fails early, with the rebuild hint
    settings_path = os.path.join(out, "settings.json")
    identity = {"world": os.path.abspath(world_dir), "settings": settings}
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            stored = json.load(f)
        # Settings added to the benchmark since that folder was made count at their defaults (each new setting's
        # default is "off": what the folder's rows ran with).
        stored["settings"] = dict({k: v for k, v in BENCHMARK_DEFAULTS.items() if k not in stored["settings"]},
                                  **stored["settings"])
        if stored != identity:
            raise ValueError(f"{out} holds results of a benchmark with other settings or another world; use "
                             "another --out or --fresh.")
    write_json(settings_path, identity)

    t0 = time.perf_counter()
    for seed in seeds if not report_only else ():  # rendered once here, so parallel tasks never write one folder
        shapes_run.render_images(os.path.join(out, "data", f"seed{seed}"), settings["n_images"], seed,
                                 held_out=settings.get("held_out_captions", 0))
    results = []
    for number, phase in enumerate(phases(settings, tasks), 1):
        todo = []
        for seed in seeds:
            for task in phase:
                if os.path.exists(_result_path(out, seed, task)):
                    results.append(_load_result(out, seed, task))
                else:
                    todo.append((task, seed))
        if report_only:  # tables from the finished tasks only; rows missing a seed say so
            print(f"[benchmark] phase {number}: {len(todo)} task(s) not run (--report-only)", flush=True)
            continue
        print(f"[benchmark] phase {number}: {len(todo)} task(s) to run with {jobs} job(s)", flush=True)
        if jobs == 1:
            for task, seed in todo:
                print(f"[benchmark] {task} seed {seed}", flush=True)
                results.append(run_task(task, seed, out, world_dir, settings, threads))
        elif todo:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_task, task, seed, out, world_dir, settings, threads): (task, seed)
                           for task, seed in todo}
                for fut in futures:
                    results.append(fut.result())
                    task, seed = futures[fut]
                    print(f"[benchmark] done: {task} seed {seed}", flush=True)
    # Summed over invocations, so a resumed (or re-aggregated) benchmark reports what it cost in all.
    wall_path = os.path.join(out, "wall_s.json")
    wall = 0.0 if report_only else time.perf_counter() - t0
    if os.path.exists(wall_path):
        with open(wall_path, encoding="utf-8") as f:
            wall += float(json.load(f)["wall_s"])
    write_json(wall_path, {"wall_s": wall})

    gap = (world.config.get("knowledge_gap") or {}).get("attribute")
    labels = row_labels(world, settings)
    grids = write_grids(out, world, settings, seeds)
    diversity = diversities(out, world, settings, seeds, results)
    for r in results:  # into the rows' figures (the result files stay as their tasks wrote them)
        for row, figures in r["rows"].items():
            if row in diversity.get(r["seed"], {}):
                figures["diversity"] = diversity[r["seed"]][row]
    teacher = [d["teacher"] for d in diversity.values() if "teacher" in d]
    teacher_mean, teacher_std = _mean_std(teacher) if teacher else (None, None)
    summary = {
        "format": "shapes-benchmark", "version": 2, "quick": quick, "world": os.path.abspath(world_dir),
        "world_version": world.config.get("version"), "gap": gap, "seeds": seeds, "jobs": jobs, "threads": threads,
        "settings": settings, "wall_s": wall, "command": command, "row_labels": labels,
        "table": aggregate(results, seeds), "bridge_quality": bridge_quality(results, seeds, settings),
        "results": results, "grids": {str(seed): path for seed, path in grids.items()},
        "teacher_diversity": {"mean": teacher_mean, "std": teacher_std, "values": teacher} if teacher else None,
        "curves": learning_curves.aggregate(results, seeds, CURVE_ROWS,
                                            metrics=("accuracy", *ATTRIBUTES, "mean_attributes")),
    }
    summary["rows"] = json_rows(summary)
    write_json(os.path.join(out, "benchmark.json"), summary)
    if doc:  # the JSON and the first seed's grid go beside the table, named after it
        doc_dir, stem = os.path.dirname(os.path.abspath(doc)), os.path.splitext(os.path.basename(doc))[0]
        os.makedirs(doc_dir, exist_ok=True)
        summary["json"] = stem + ".json"
        if grids:
            summary["grid"], summary["grid_seed"] = stem + "_grid.png", min(grids)
            shutil.copyfile(grids[min(grids)], os.path.join(doc_dir, summary["grid"]))
        if summary["curves"]:
            summary["curve_png"] = stem + "_curves.png"
            learning_curves.draw(summary["curves"], labels, os.path.join(doc_dir, summary["curve_png"]),
                                 metrics=("accuracy", gap or "mean_attributes", "mean_attributes"), gap=gap)
    text = markdown(summary, notes)
    if doc:
        with open(doc, "w", encoding="utf-8") as f:
            f.write(text)
        write_json(os.path.join(doc_dir, summary["json"]),
                   {k: summary[k] for k in ("format", "version", "world_version", "gap", "seeds", "settings",
                                            "wall_s", "command", "rows", "bridge_quality", "curves",
                                            "teacher_diversity")})
    print(text, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    from . import models

    parser = argparse.ArgumentParser(prog="python -m training.shapes.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training/evaluation seeds")
    parser.add_argument("--out", default=os.path.join("runs", "shapes-benchmark"), help="benchmark folder")
    parser.add_argument("--world", default=models.DEFAULT_DIR, help="built shapes world (default assets/shapes)")
    parser.add_argument("--doc", default=DEFAULT_DOC, help=f"Markdown table to write (default {DEFAULT_DOC}; '' none)")
    parser.add_argument("--notes", help="Markdown file appended to the document (e.g. an analysis of the result)")
    parser.add_argument("--jobs", type=int, default=2, help="tasks at once in worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per task (default 1)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from the tasks already finished in --out")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="run only these tasks (and the ones they need), e.g. --tasks base cross_space same_space "
                             "synthetic; a later call without --tasks adds the rest")
    add_setting_arguments(parser, BENCHMARK_DEFAULTS, BENCHMARK_QUICK, extra_help={
        "curve_every_s": ("learning curve", "seconds of training between saved students (0: no curve)"),
        "curve_eval_samples": ("learning curve", "held-out prompts each saved student is scored on"),
        "diversity_prompts": ("evaluation", f"held-out prompts of the sample-diversity column ({DIVERSITY_K} "
                                            "samples each; 0: no column)")})
    args = parser.parse_args(argv)
    notes = None
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            notes = f.read()
    overrides = {k: getattr(args, k) for k in BENCHMARK_DEFAULTS if getattr(args, k) is not None}
    command = "python -m training.shapes.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    benchmark(args.seeds, args.out, args.world, doc=args.doc, jobs=args.jobs, threads=args.threads, quick=args.quick,
              fresh=args.fresh, notes=notes, command=command.strip(), tasks=tuple(args.tasks) if args.tasks else None,
              report_only=args.report_only, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
