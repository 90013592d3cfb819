"""Rebuild the whole shapes world from scratch, deterministically, and measure it.

    python -m training.shapes.pretrain --out assets/shapes            # the shipped world (about an hour)
    python -m training.shapes.pretrain --out /tmp/world --quick       # a seconds-long smoke run

Stages (each timed in report.json): text encoders, judge, student VAE, teacher VAE, latent datasets and
latent-space numbers, teacher (rectified flow), student base (SD1.5 schedule), evaluation of the *saved*
weights (reloaded, so the numbers are those of what ships). Same seed + same thread count => same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

DEFAULTS = dict(
    judge_steps=300, judge_batch=128,
    vae_steps=800, vae_batch=16, kl_weight=1e-5,
    n_train=12000,
    teacher_steps=2500, teacher_batch=128, teacher_lr=1e-3,
    student_steps=1500, student_batch=128, student_lr=1e-3,
    teacher_cfg=4.0, teacher_shift=1.0, teacher_sampling_steps=20,
    student_cfg=4.0, student_sampling_steps=25,
    eval_samples=500,
)
# Same models, a handful of steps: checks the pipeline end to end, not quality.
QUICK = dict(DEFAULTS, judge_steps=2, judge_batch=16, vae_steps=2, vae_batch=4, n_train=32, teacher_steps=2,
             teacher_batch=8, student_steps=2, student_batch=8, teacher_sampling_steps=2, student_sampling_steps=2,
             eval_samples=8)


@contextlib.contextmanager
def _stage(report: dict, name: str, log):
    log(f"== {name}")
    t0 = time.perf_counter()
    yield
    report["timings_s"][name] = round(time.perf_counter() - t0, 2)
    log(f"== {name} done in {report['timings_s'][name]:.1f}s")


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pretrain(out: str, quick: bool = False, seed: int = 0, threads: int = 1, log=print, **overrides) -> dict:
    """Build every component into `out`, evaluate the saved world, write world.json and report.json."""
    import diffusers
    import torch
    import transformers

    from .. import _bridge
    from . import models, text
    from .evaluate import evaluate_world
    from .judge import prompt_accuracy, train_judge
    from .render import render, sample_scenes
    from .trainers import (decode_latents, encode_latents, latent_statistics, psnr, train_student, train_teacher,
                           train_vae)

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown pretrain settings {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
    cfg = dict(QUICK if quick else DEFAULTS, **overrides)
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    report = {"quick": quick, "seed": seed, "threads": threads, "settings": cfg, "timings_s": {},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "diffusers": diffusers.__version__, "transformers": transformers.__version__}}
    t_start = time.perf_counter()
    n_eval_check = 16 if quick else 500

    with _stage(report, "text_encoders", log):
        tokenizer = text.build_tokenizer()
        teacher_text, student_text = text.build_text_encoder("teacher"), text.build_text_encoder("student")
        models.save_component(out, "teacher_text_encoder", teacher_text)
        models.save_component(out, "student_text_encoder", student_text)

    with _stage(report, "judge", log):
        judge = train_judge(steps=cfg["judge_steps"], batch_size=cfg["judge_batch"], seed=seed, log=log)
        models.save_component(out, "judge", judge)
        held_out = sample_scenes(n_eval_check, "test", seed)
        report["judge"] = {
            f"accuracy_{r}px": prompt_accuracy(judge, render(held_out, r), held_out.captions())["accuracy"]
            for r in (64, 128)
        }
        report["judge"]["parameters"] = _count(judge)

    spaces = {}
    vaes = {}
    for who, build, res, crop in (("student", models.build_student_vae, models.STUDENT_RESOLUTION, None),
                                  ("teacher", models.build_teacher_vae, models.TEACHER_RESOLUTION, 64)):
        with _stage(report, f"{who}_vae", log):
            torch.manual_seed(seed)
            vae = train_vae(build(), res, cfg["vae_steps"], batch_size=cfg["vae_batch"], kl_weight=cfg["kl_weight"],
                            crop=crop, seed=seed + (0 if who == "student" else 1), log=log)
            vaes[who] = vae

    with _stage(report, "latents", log):
        scenes = sample_scenes(cfg["n_train"], "train", seed=seed + 7)
        captions = scenes.captions()
        unique = sorted(set(captions))  # each distinct caption is encoded once
        lookup = {c: i for i, c in enumerate(unique)}
        caption_index = torch.tensor([lookup[c] for c in captions])
        latents = {}
        held_out = sample_scenes(n_eval_check, "test", seed)
        for who, res in (("student", models.STUDENT_RESOLUTION), ("teacher", models.TEACHER_RESOLUTION)):
            vae = vaes[who]
            # Saving rounds the weights to the shipped precision; everything below uses the saved weights.
            models.save_component(out, f"{who}_vae", vae)
            raw = torch.cat([encode_latents(vae, render(scenes[i : i + 1000], res))
                             for i in range(0, len(scenes), 1000)])
            scale, shift = latent_statistics(raw)
            space = _bridge.spaces.LatentSpace(f"shapes_{who}", vae.config.latent_channels, 8, round(scale, 5),
                                               round(shift, 5), res)
            spaces[who] = space
            latents[who] = space.to_model(raw)
            images = render(held_out, res)
            report[f"{who}_vae"] = {
                "psnr_db": round(psnr(decode_latents(vae, encode_latents(vae, images)), images), 2),
                "parameters": _count(vae), "space": space.to_dict(),
            }
        teacher_embeds, teacher_pooled = text.encode_teacher(unique, tokenizer, teacher_text)
        empty_t, empty_tp = text.encode_teacher([""], tokenizer, teacher_text)
        student_hidden = text.encode_student(unique, tokenizer, student_text)
        empty_s = text.encode_student([""], tokenizer, student_text)

    with _stage(report, "teacher", log):
        torch.manual_seed(seed)
        transformer = train_teacher(models.build_teacher_transformer(), latents["teacher"], caption_index,
                                    teacher_embeds, teacher_pooled, empty_t, empty_tp, cfg["teacher_steps"],
                                    batch_size=cfg["teacher_batch"], lr=cfg["teacher_lr"], seed=seed + 2, log=log)
        models.save_component(out, "teacher_transformer", transformer)
        report["teacher"] = {"parameters": _count(transformer)}

    with _stage(report, "student_base", log):
        torch.manual_seed(seed)
        unet = train_student(models.build_student_unet(), latents["student"], caption_index, student_hidden,
                             empty_s, models.STUDENT_SCHEDULE, cfg["student_steps"], batch_size=cfg["student_batch"],
                             lr=cfg["student_lr"], seed=seed + 3, log=log)
        models.save_component(out, "student_unet", unet)
        report["student_base"] = {"parameters": _count(unet)}

    world_config = {
        "format": "shapes-world",
        "version": 1,
        "k": models.K,
        "student_space": spaces["student"].to_dict(),
        "teacher_space": spaces["teacher"].to_dict(),
        "student_resolution": models.STUDENT_RESOLUTION,
        "teacher_resolution": models.TEACHER_RESOLUTION,
        "teacher_training": {"objective": "rectified_flow", "timesteps": "logit_normal", "logit_mean": 0.0,
                             "logit_std": 1.0, "timestep_scale": 1000, "caption_dropout": 0.1},
        "teacher_sampling": {"sampler": "euler", "steps": cfg["teacher_sampling_steps"], "cfg": cfg["teacher_cfg"],
                             "shift": cfg["teacher_shift"]},
        "student_schedule": dict(models.STUDENT_SCHEDULE),
        "student_sampling": {"sampler": "ddim_trailing", "steps": cfg["student_sampling_steps"],
                             "cfg": cfg["student_cfg"]},
        "text": {"max_length": text.MAX_LENGTH, "teacher": "CLIPTextModelWithProjection last_hidden_state + text_embeds",
                 "student": "CLIPTextModel last_hidden_state", "empty_prompt": ""},
        "quick": quick,
        "seed": seed,
    }
    _write_json(os.path.join(out, "world.json"), world_config)

    with _stage(report, "evaluation", log):
        world = models.load_shapes_world(out, register=False)
        report["evaluation"] = evaluate_world(world, n=cfg["eval_samples"], seed=seed)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    _write_json(os.path.join(out, "report.json"), report)
    log(_summary(report))
    return report


def _summary(report: dict) -> str:
    ev = report["evaluation"]
    lines = ["shapes world built" + (" (QUICK: numbers are meaningless)" if report["quick"] else "")]
    lines.append(f"  judge accuracy on held-out renders: {report['judge']}")
    for who in ("student", "teacher"):
        lines.append(f"  {who} VAE PSNR {report[f'{who}_vae']['psnr_db']} dB, space {report[f'{who}_vae']['space']}")
    for name in ("teacher", "student_base", "student_base_one_step"):
        r = ev[name]
        lines.append(f"  {name}: prompt accuracy {r['accuracy']:.3f}, FD {r.get('fd', float('nan')):.2f}, "
                     f"{r['seconds_per_image'] * 1000:.1f} ms/image")
    lines.append("  timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())
                 + f"; total {report['total_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.shapes.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the world into (e.g. assets/shapes)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not a world")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; results are reproducible for a fixed thread count)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"override {key} (default {value}, quick {QUICK[key]})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    pretrain(args.out, quick=args.quick, seed=args.seed, threads=args.threads, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
