"""A LoRA one-step student against a fully fine-tuned one, at equal training wall time, on the shapes world.

    python -m training.shapes.lora_student --out runs/shapes-lora --seed 0 --threads 1   # writes docs/lora_student.md

One Bridge and cross-space distillations through it, with the default run's settings (or the --<setting>
overrides): the full UNet fine-tune for --distill-steps steps, then LoRA students (rank --rank, one per --lora-lr),
each trained for the full fine-tune's training-loop seconds (however many steps fit). All rows are evaluated by
the judge on the same held-out prompts and evaluation seed. Stages resume from <out> like the default run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from .. import loop

DEFAULT_OUT = os.path.join("runs", "shapes-lora")
DEFAULT_DOC = os.path.join("docs", "lora_student.md")


def compare(out: str, world_dir: str | None = None, seed: int = 0, rank: int = 16,
            lora_lrs: tuple[float, ...] = (1e-4, 1e-3), quick: bool = False, **overrides) -> dict:
    from . import models
    from . import run as shapes_run
    from .evaluate import evaluate_generators

    settings = dict(shapes_run.QUICK if quick else shapes_run.DEFAULTS, **overrides)
    world_dir = world_dir or models.DEFAULT_DIR
    t_start = time.perf_counter()
    world = models.load_shapes_world(world_dir, register=False)
    images = shapes_run.render_images(os.path.join(out, "data", "images"), settings["n_images"], seed)
    bridge, bridge_result = shapes_run.train_bridge(world, os.path.join(out, "bridge"), images, settings, seed)
    if bridge is None:
        raise KeyboardInterrupt("Bridge training stopped; run the same command again to resume")

    students, info = {}, {}
    unet, res = shapes_run.distill_student(world, os.path.join(out, "full"), "cross", settings, seed, bridge=bridge)
    if unet is None:
        raise KeyboardInterrupt("distillation stopped; run the same command again to resume")
    budget = res["train_seconds"]
    students["full"] = unet
    info["full"] = {"label": f"full UNet fine-tune, lr {settings['student_lr']:g}", "steps": res["step"],
                    "train_seconds": res["train_seconds"],
                    "trained_params": sum(p.numel() for p in world.student_unet.parameters())}
    for lr in lora_lrs:
        name = f"lora_r{rank}_lr{lr:g}"
        unet, res = shapes_run.distill_student(world, os.path.join(out, name), "cross",
                                               dict(settings, student_lr=lr, distill_steps=20 * settings["distill_steps"]),
                                               seed, bridge=bridge, student_lora_rank=rank, time_budget_s=budget)
        if unet is None:
            raise KeyboardInterrupt("distillation stopped; run the same command again to resume")
        students[name] = unet
        from safetensors import safe_open

        with safe_open(res["lora"], "pt") as f:
            lora_params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
                              for k in f.keys() if not k.endswith(".alpha"))
        info[name] = {"label": f"LoRA rank {rank} (attention projections), lr {lr:g}", "steps": res["step"],
                      "train_seconds": res["train_seconds"], "trained_params": lora_params}

    rows = {"start": shapes_run.student_generator(world, world.student_unet, settings["student_timestep"])}
    rows.update({name: shapes_run.student_generator(world, u, settings["student_timestep"])
                 for name, u in students.items()})
    evaluation = evaluate_generators(world, rows, n=settings["eval_samples"], seed=seed,
                                     batch_size=settings["eval_batch"], progress=True)
    info["start"] = {"label": f"start: student base, one step at t = {settings['student_timestep']}", "steps": 0,
                     "train_seconds": 0.0, "trained_params": 0}
    report = {"format": "shapes-lora-student", "quick": quick, "world": os.path.abspath(world_dir), "seed": seed,
              "threads": torch.get_num_threads(), "settings": settings, "rank": rank, "lora_lrs": list(lora_lrs),
              "budget_s": budget, "bridge_s": bridge_result["wall_s"], "rows": info, "evaluation": evaluation,
              "total_s": time.perf_counter() - t_start, "machine": platform.processor() or platform.machine()}
    loop.write_json(os.path.join(out, "report.json"), report)
    return report


def markdown(report: dict, command: str) -> str:
    s = report["settings"]
    lines = [
        "# LoRA student vs full fine-tune (shapes world)", "",
        f"Regenerate with `{command}` ({report['total_s'] / 60:.1f} min on this machine, "
        f"{report['threads']} torch thread(s), one seed: {report['seed']}).", "",
        f"Cross-space distillation through one Bridge ({s['bridge_steps']} steps) with the default run's Distiller "
        f"settings otherwise (DMD, batch {s['distill_batch']}, {s['fake_updates']} fake-score updates per step, "
        f"student input timestep t = {s['student_timestep']}). The full fine-tune runs {s['distill_steps']} steps; each LoRA student gets "
        f"the same training-loop wall time ({report['budget_s']:.0f} s) and runs as many steps as fit. Evaluated by "
        f"the judge on {report['evaluation']['prompts']} held-out prompts.", "",
        "| student | trained parameters | steps in the budget | training s | prompt accuracy | Fréchet distance |",
        "|---|---|---|---|---|---|",
    ]
    for name in ["start", *[n for n in report["rows"] if n != "start"]]:
        r, e = report["rows"][name], report["evaluation"][name]
        lines.append(f"| {r['label']} | {r['trained_params']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{e['accuracy']:.3f} | {e.get('fd', float('nan')):.2f} |")
    lines += ["", "One seed only (CPU budget): differences of about ±0.015 in prompt accuracy are within the seed "
                  "spread the three-seed benchmark (docs/shapes_benchmark.md) shows for these rows. Each LoRA run "
                  "stops at the end of the step that reaches the budget, so it may run up to one step longer.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.shapes.lora_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--world", help="built shapes world (default assets/shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the student (default 16)")
    p.add_argument("--lora-lr", type=float, nargs="+", default=[1e-4, 1e-3], help="LoRA learning rates to run")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--doc", default=DEFAULT_DOC, help="Markdown file to write ('' none)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not a result")
    from . import run as shapes_run

    shapes_run.add_setting_arguments(p, shapes_run.DEFAULTS, shapes_run.QUICK)  # distill_steps: the full fine-tune's
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in shapes_run.DEFAULTS if getattr(args, k) is not None}
    report = compare(args.out, args.world, args.seed, args.rank, tuple(args.lora_lr), args.quick, **overrides)
    command = "python -m training.shapes.lora_student " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(report, command.strip())
    print(text)
    if args.doc:
        with open(args.doc, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
