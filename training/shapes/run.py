"""The default run: the whole method on the shapes world, on a CPU (2 cores; README says how long it takes).

    python -m training.run                        # = python -m training.shapes.run (all defaults)
    python -m training.shapes.run --out runs/shapes --world assets/shapes --seed 0
    python -m training.shapes.run --quick         # a seconds-long smoke run (numbers meaningless)

1. data: renders a captioned training set (PNG + .txt captions) into <out>/data/images;
2. Bridge: trains shapes_student (8x8x4 raw latents) -> shapes_teacher (16x16x16), k = 2, with the library's
   BridgeTrainer: latent reconstruction + attention fidelity through the frozen shapes teacher;
3. distillation: the one-step student (a copy of the student base UNet, run once at `student_timestep`) is
   distilled cross-space with the library's Distiller: its samples go through the frozen Bridge into the teacher's
   space, where the DMD2 gradient is computed (fake score: a LoRA on the teacher), with the distiller's options for
   the Bridge's Jacobian; with --same-space-row also a same-space student from the student base (same steps);
4. evaluation with the judge on held-out prompts and evaluation seeds: teacher (its 20 steps + CFG), student base
   (25 DDIM steps + CFG), student base one-step, both distilled one-step students; the attribute the student base
   lacks (world.json knowledge_gap) is reported on its own.

Writes <out>/bridge.safetensors, <out>/student_unet.safetensors (+ the trainers' own folders bridge/, distill/,
distill_same/), <out>/grid.png (columns: fixed prompts x seeds; rows: student one-step before, after cross-space,
same-space, teacher) and <out>/report.md + report.json with every figure measured in this run. Ctrl-C saves the
current stage; the same command resumes it (--fresh starts over). The benchmark
(`python -m training.shapes.benchmark`) reuses these pieces for its table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import sys
import time
from typing import TYPE_CHECKING

import torch

from .. import loop
# The settings and the command line live in settings.py (no torch there); the benchmark and tests import them here.
from .settings import (  # noqa: F401
    BUSY_LOAD, DEFAULT_OUT, DEFAULTS, EXPECTED_TIME, QUICK, THREADS_HELP, add_setting_arguments, parse_args,
    path_problems, setting_problems,
)

if TYPE_CHECKING:
    from .models import ShapesWorld

ROW_LABELS = {
    "teacher": "teacher ({steps} steps, CFG {cfg:g})",
    "student_base": "student base ({steps} steps, CFG {cfg:g})",
    "student_base_one_step": "student base, one step",
    "student_base_start": "student base, one step at t = {student_timestep} (the distillation's start)",
    "same_space": "one-step, distilled same-space (from the student base, same steps)",
    "cross_space": "one-step, distilled cross-space (through the Bridge)",
    "cross_space_no_attn": "ablation: Bridge without attention fidelity",
    "round_trip": "ablation: exact round trip E_t(up(D_s(z))) instead of the Bridge",
    "student_vae_ceiling": "diagnostic: teacher samples through the student VAE at 64 px (student-space ceiling)",
}


def _log(msg: str) -> None:
    print(f"[shapes] {msg}", flush=True)




# ---------------------------------------------------------------------------------------------- data

def render_images(folder: str, n: int, seed: int = 0, held_out: int = 0) -> str:
    """n captioned train-split scenes as 128 px PNGs with .txt captions (what BridgeTrainer reads), none of the
    `held_out` held-out captions among them.

    Deterministic in (n, seed, held_out); a folder that already holds exactly this set is kept."""
    from PIL import Image
    from tqdm.auto import tqdm

    from . import models
    from .render import held_out_captions, render, sample_scenes_outside

    stamp = os.path.join(folder, "dataset.json")
    info = {"n": n, "seed": seed, "resolution": models.TEACHER_RESOLUTION, "split": "train"}
    if held_out:
        info["held_out_captions"] = held_out
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == info:
                return folder
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    # A stream the world's own training never used.
    scenes = sample_scenes_outside(n, "train", 100_000 + seed, set(held_out_captions(held_out)))
    captions = scenes.captions()
    for start in tqdm(range(0, n, 200), desc="render data", unit_scale=200):
        images = render(scenes[start : start + 200], models.TEACHER_RESOLUTION)
        pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for i, arr in enumerate(pixels):
            name = os.path.join(folder, f"{start + i:05d}")
            Image.fromarray(arr).save(name + ".png")
            with open(name + ".txt", "w", encoding="utf-8") as f:
                f.write(captions[start + i] + "\n")
    loop.write_json(stamp, info)
    return folder


def training_prompts(held_out: int = 0) -> list[str]:
    """Distillation prompts: every caption of the world (the teacher knows all of them) but the `held_out` ones."""
    from .render import all_captions, held_out_captions

    excluded = set(held_out_captions(held_out))
    return [c for c in all_captions() if c not in excluded]


def grid_prompts(n: int) -> list[str]:
    """Fixed prompts of the sample grids: held-out test-split captions."""
    from .evaluate import eval_prompts

    return eval_prompts(n, seed=123)


# ---------------------------------------------------------------------------------------------- text

def teacher_text(world: "ShapesWorld"):
    """prompts -> TextCond(prompt_embeds [B,16,64], pooled [B,64]) from the teacher's text encoder."""
    from ..models.text import TextCond

    def encode(prompts: list[str]):
        embeds, pooled = world.encode_teacher_prompts(prompts)
        return TextCond(prompt_embeds=embeds, pooled=pooled)

    return encode


def student_text(world: "ShapesWorld"):
    """prompts -> TextCond(prompt_embeds = student hidden states [B,16,32])."""
    from ..models.text import TextCond

    return lambda prompts: TextCond(prompt_embeds=world.encode_student_prompts(prompts))


def shapes_teacher(world: "ShapesWorld", own_copy: bool = False):
    """The shapes transformer behind the library's SD3 teacher interface (own_copy: for a fake adapter)."""
    from ..teachers import SD3Teacher

    transformer = copy.deepcopy(world.teacher_transformer) if own_copy else world.teacher_transformer
    return SD3Teacher(transformer, space=world.teacher_space, guidance=world.config["teacher_sampling"]["cfg"])


def teacher_cfg(world: "ShapesWorld", settings: dict) -> float:
    return float(settings["guidance"] or world.config["teacher_sampling"]["cfg"])


# ---------------------------------------------------------------------------------------------- stage 1: Bridge

def train_bridge(world: "ShapesWorld", out_dir: str, images: str, settings: dict, seed: int = 0,
                 attn_weight: float | None = None) -> tuple[torch.nn.Module | None, dict]:
    """BridgeTrainer on the rendered images, resuming a stopped run in out_dir; returns (the trained Bridge with the
    student VAE, result), or (None, result) when it was stopped (Ctrl-C) before the end."""
    from .._bridge import checkpoint as bridge_checkpoint
    from ..bridge_train import BridgeModels, BridgeTrainConfig, BridgeTrainer
    from . import models

    steps = settings["bridge_steps"]
    cfg = BridgeTrainConfig(
        out_dir=out_dir, images=images, steps=steps, batch_size=settings["bridge_batch"], lr=settings["bridge_lr"],
        warmup_steps=max(1, steps // 10), attn_weight=settings["attn_weight"] if attn_weight is None else attn_weight,
        attn_queries=settings["attn_queries"], val_every=steps, ckpt_every=max(1, steps // 5), log_every=max(1, steps // 50),
        seed=seed, k=world.k, student_res=models.STUDENT_RESOLUTION, teacher_res=models.TEACHER_RESOLUTION,
        projector={"width": settings["projector_width"], "depth": settings["projector_depth"]},
        tap=settings["bridge_tap"], mixed_precision="no", resume=True,
        gradient_checkpointing=False,  # tiny models: on CUDA too, memory is no concern and recomputing only slows it
    )
    bridge_models = BridgeModels(
        student_vae=world.student_vae, teacher_vae=world.teacher_vae, teacher=shapes_teacher(world),
        student_space=world.student_space, teacher_space=world.teacher_space, encode_text=teacher_text(world),
        description={"world": os.path.abspath(world.folder), "student": "shapes student VAE",
                     "teacher": "shapes SD3.5-style transformer"},
    )
    t0 = time.perf_counter()
    result = BridgeTrainer(cfg, bridge_models).run()
    # This invocation's set-up plus the training loop's seconds over all invocations (a resumed run included).
    result["wall_s"] = time.perf_counter() - t0 - result["seconds"] + result["train_seconds"]
    if result.get("stopped_early"):
        return None, result
    bridge = bridge_checkpoint.load_bridge(result["bridge"], student_vae=world.student_vae)
    return bridge, result


# ---------------------------------------------------------------------------------------------- stage 2: distillation

def distill_models(world: "ShapesWorld", mode: str, bridge=None, student_timestep: int = 999, base_unet=None):
    """DistillModels for `mode`: "cross" (shapes teacher through `bridge`: the trained Bridge or a RoundTripBridge)
    or "same" (the student base as an eps-as-flow teacher in the student's own space, identity "Bridge").
    The student is a fresh trainable copy of the student base UNet (or of `base_unet`, e.g. the synthetic-data
    baseline's fine-tuned base, which is then also the same-space teacher); teachers get their own copies."""
    from ..distill import DistillModels
    from ..student import OneStepStudent
    from .adapters import EpsFlowTeacher, IdentityBridge

    schedule = world.config["student_schedule"]
    base = world.student_unet if base_unet is None else base_unet
    unet = copy.deepcopy(base).requires_grad_(True)
    student = OneStepStudent(unet, space=world.student_space, schedule=schedule, timestep=student_timestep)
    if mode == "cross":
        if bridge is None:
            raise ValueError('Cross-space distillation needs a Bridge (the trained one or a RoundTripBridge).')
        teacher, encode_teacher, teacher_vae = shapes_teacher(world, own_copy=True), teacher_text(world), world.teacher_vae
    elif mode == "same":
        teacher = EpsFlowTeacher(copy.deepcopy(base), world.student_space, schedule)
        bridge, encode_teacher, teacher_vae = IdentityBridge(world.student_space, world.student_vae), student_text(world), None
    else:
        raise ValueError(f"Unknown distillation mode {mode!r}; use 'cross' or 'same'.")
    return DistillModels(student=student, bridge=bridge, teacher=teacher, encode_teacher=encode_teacher,
                         encode_student=student_text(world), teacher_vae=teacher_vae,
                         description={"world": os.path.abspath(world.folder), "mode": mode,
                                      "bridge": type(bridge).__name__, "teacher": teacher.family})


def distill_student(world: "ShapesWorld", out_dir: str, mode: str, settings: dict, seed: int = 0,
                    bridge=None, time_budget_s: float = 0.0, base_unet=None, student_lora_rank: int = 0,
                    pairs: tuple[str, float] | None = None,
                    snapshot_every_s: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """Distiller run, resuming a stopped run in out_dir; returns (the distilled UNet, merged and frozen, result),
    or (None, result) when it was stopped (Ctrl-C) before the end.

    time_budget_s > 0: train for that many seconds of training time instead of distill_steps steps (comparisons
    at equal wall time); with distill_steps 0 (regression only) the regression runs until the budget is spent.
    student_lora_rank > 0 trains a LoRA student. pairs: (path, seconds to make) of a pairs file made elsewhere, used
    instead of the run's own teacher-corrected pairs (its seconds count in the row's time as theirs do).
    snapshot_every_s > 0: the student's weights are saved every that many seconds of training time to
    <out_dir>/curve/ (`curve_snapshots`: the points of a learning curve; a few milliseconds each at this size)."""
    from ..distill import DistillConfig, Distiller
    from . import models

    dm = distill_models(world, mode, bridge, settings["student_timestep"], base_unet=base_unet)
    if mode == "same":
        guidance = float(settings["guidance"] or world.config["student_sampling"]["cfg"])
        s_max = min(0.98, dm.teacher.s_max)  # the UNet's schedule ends at t = 999 (s ~ 0.936)
    else:
        guidance, s_max = teacher_cfg(world, settings), 0.98
    pairs_path, pairs_s = pairs or (None, 0.0)
    if pairs is None and settings["regression_n"]:
        pairs_path, pairs_s = regression_pairs(world, dm, os.path.join(out_dir, "pairs.safetensors"), settings,
                                               guidance, seed)
    if time_budget_s and pairs_path:
        time_budget_s = max(1.0, time_budget_s - pairs_s)  # the pairs are part of the row's wall time
    real_latents, real_s = None, 0.0
    if settings["gan_weight"]:
        real_latents, real_s = gan_real_latents(world, os.path.join(out_dir, "real_latents.safetensors"),
                                                settings["gan_real_images"], seed, settings["held_out_captions"])
        pairs_s += real_s  # part of the row's wall time, as the pairs are
        if time_budget_s:
            time_budget_s = max(1.0, time_budget_s - real_s)
    steps = settings["distill_steps"]
    warmup = settings["regression_warmup_steps"] if pairs_path else 0
    if time_budget_s:  # caps only: the time budget ends the run (in the regression when there is no DMD)
        steps, warmup = (100 * steps, warmup) if steps else (0, 100 * warmup)
    cfg = DistillConfig(
        out_dir=out_dir, prompts=training_prompts(settings["held_out_captions"]), negative_prompt="", val_prompts=grid_prompts(4),
        val_seeds=[0, 1], steps=steps, batch_size=settings["distill_batch"], resolution=models.STUDENT_RESOLUTION,
        loss="dmd", guidance=guidance, timesteps=settings["distill_timesteps"],
        s_min=settings["distill_s_min"], s_max=s_max, student_lr=settings["student_lr"],
        student_cross_attention_lr=settings["student_cross_attention_lr"], fake_lr=settings["fake_lr"], fake_rank=settings["fake_rank"], fake_updates=settings["fake_updates"],
        grad_norm=settings["distill_grad_norm"], grad_clip=settings["distill_grad_clip"],
        grad_clip_relative=settings["distill_clip_relative"], straight_through_clamp=settings["straight_through_clamp"],
        student_lora_rank=student_lora_rank, ema_decay=settings["ema_decay"],
        regression_pairs=pairs_path, regression_weight=settings["regression_weight"],
        regression_batch=settings["regression_batch"], regression_warmup_steps=warmup,
        regression_warmup_lr=settings["regression_warmup_lr"],
        regression_warmup_cross_attention_lr=settings["regression_warmup_cross_attention_lr"],
        regression_n=0,  # the pairs are made above (their own seed and batch, counted in the row's time), or none
        gan_weight=settings["gan_weight"], gan_disc_weight=settings["gan_disc_weight"],
        gan_real_latents=real_latents,
        log_every=max(1, (settings["distill_steps"] or settings["regression_warmup_steps"]) // 50),
        sample_every=warmup + steps,
        ckpt_every=max(1, (warmup + settings["distill_steps"]) // 5), seed=seed, mixed_precision="no", resume=True,
        max_train_seconds=time_budget_s,
        gradient_checkpointing=False,  # tiny models: on CUDA too, memory is no concern and recomputing only slows it
    )
    t0 = time.perf_counter()
    progress = None
    if snapshot_every_s:
        progress = loop.ProgressReporter(warmup + steps, desc="distill",
                                         callback=_snapshots(os.path.join(out_dir, "curve"), snapshot_every_s,
                                                             lambda: distiller))
    distiller = Distiller(cfg, dm, progress=progress)
    result = distiller.run()
    # This invocation's set-up plus the training loop's seconds over all invocations (a resumed run included).
    result["wall_s"] = time.perf_counter() - t0 - result["seconds"] + result["train_seconds"] + pairs_s
    result["pairs_s"] = pairs_s
    result["guidance"] = guidance
    if result.get("stopped_early"):
        return None, result
    return dm.student.merged_unet(), result


def _snapshots(folder: str, every_s: float, distiller):
    """A ProgressReporter callback saving the student's weights (its EMA where it has one, as the final student)
    whenever another `every_s` seconds of training time have passed: `curve/<seconds>.safetensors`, atomically, with
    the step. Resumes after the last snapshot a stopped run saved."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    done = [s for s, _ in curve_snapshots(folder)]
    state = {"next": (done[-1] // every_s + 1) * every_s if done else every_s}

    def callback(step, total, metrics, preview):
        d = distiller()
        seconds = d.clock.seconds()
        if seconds < state["next"]:
            return
        state["next"] = (seconds // every_s + 1) * every_s
        path = os.path.join(folder, f"{seconds:09.2f}.safetensors")
        tensors = {k: v.detach().cpu().contiguous() for k, v in d.m.student.merged_state_dict().items()}
        save_file(tensors, path + ".tmp", metadata={"train_s": json.dumps(seconds), "step": json.dumps(step)})
        os.replace(path + ".tmp", path)

    return callback


def curve_snapshots(folder: str) -> list[tuple[float, str]]:
    """[(training seconds, path)] of the student snapshots `distill_student(snapshot_every_s=...)` saved, in order."""
    if not os.path.isdir(folder):
        return []
    return sorted((float(name[: -len(".safetensors")]), os.path.join(folder, name)) for name in os.listdir(folder)
                  if name.endswith(".safetensors"))


def gan_real_latents(world: "ShapesWorld", path: str, n: int, seed: int = 0, held_out: int = 0) -> tuple[str, float]:
    """The GAN term's real samples: n freshly rendered train-split scenes (no held-out caption among them) at the
    teacher's resolution, encoded by the teacher VAE into its model space (DistillConfig.gan_real_latents). Made
    once (reused when present). Returns (path, seconds it took)."""
    from ..distill import save_real_latents
    from . import models
    from .render import held_out_captions, render, sample_scenes_outside
    from .trainers import encode_latents

    stamp = path + ".json"
    if not os.path.exists(stamp):
        t0 = time.perf_counter()
        scenes = sample_scenes_outside(n, "train", 500_000 + seed, set(held_out_captions(held_out)))
        with torch.no_grad():
            raw = torch.cat([encode_latents(world.teacher_vae, render(scenes[i : i + 200], models.TEACHER_RESOLUTION))
                             for i in range(0, n, 200)])
        save_real_latents(path, world.teacher_space.to_model(raw))
        loop.write_json(stamp, {"n": n, "seconds": time.perf_counter() - t0})  # last: present only when complete
    with open(stamp, encoding="utf-8") as f:
        return path, float(json.load(f)["seconds"])


def regression_pairs(world: "ShapesWorld", dm, path: str, settings: dict, guidance: float, seed: int):
    """The run's teacher-corrected regression pairs (training/pairs.py) at `path`, made once (a resumed run reuses
    them): the student base's own sampler and CFG, the teacher's steps. Returns (path, seconds it took to make)."""
    from safetensors import safe_open

    from ..pairs import make_pairs
    from . import models

    if not os.path.exists(path):
        _log(f"making {settings['regression_n']} regression pairs (student base -> Bridge -> teacher from "
             f"s = {settings['regression_s0']:g} -> student space)")
        sampling = world.config["student_sampling"]
        make_pairs(dm, training_prompts(settings["held_out_captions"]), settings["regression_n"], path,
                   resolution=models.STUDENT_RESOLUTION,
                   s0=settings["regression_s0"], student_steps=sampling["steps"], student_cfg=sampling["cfg"],
                   teacher_steps=max(1, round(world.config["teacher_sampling"]["steps"] * settings["regression_s0"])),
                   guidance=guidance, batch_size=100, seed=300_000 + seed)
    with safe_open(path, framework="pt") as f:
        return path, float(json.loads(f.metadata()["seconds"]))


# ---------------------------------------------------------------------------------------------- synthetic-data baseline

def synthetic_data(world: "ShapesWorld", path: str, n: int, seed: int = 0, held_out: int = 0,
                   cfg: float | None = None) -> dict:
    """The baseline a user would pick instead of a Bridge: n teacher samples (its own sampler; its own CFG, or `cfg`:
    the run's `teacher_cfg`, so a baseline's teacher is asked as the distillation's is) of random prompts,
    decoded, resized to the student's resolution, encoded with the student VAE (model space). Saved to `path`
    (complete or absent), reused when present and drawn at the same CFG. Returns {"latents", "prompts", "seconds"}."""
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from . import models
    from .render import all_captions
    from .trainers import encode_latents

    own_cfg = world.config["teacher_sampling"]["cfg"]
    cfg = own_cfg if cfg is None else float(cfg)
    if os.path.exists(path):
        with open(path + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("cfg", own_cfg) == cfg:  # older files were drawn at the teacher's own CFG
            return {"latents": load_file(path)["latents"], "prompts": meta["prompts"], "seconds": meta["seconds"]}
    t0 = time.perf_counter()
    captions = training_prompts(held_out) if held_out else all_captions()  # never a held-out caption
    g = torch.Generator().manual_seed(200_000 + seed)
    prompts = [captions[int(i)] for i in torch.randint(len(captions), (n,), generator=g)]
    latents = []
    for i in range(0, n, 100):
        images = world.decode_teacher(world.sample_teacher(prompts[i : i + 100], generator=g, cfg=cfg))
        small = F.interpolate(images, size=(models.STUDENT_RESOLUTION,) * 2, mode="area")
        latents.append(world.student_space.to_model(encode_latents(world.student_vae, small)))
    seconds = time.perf_counter() - t0
    tmp = path + ".tmp"
    save_file({"latents": torch.cat(latents).contiguous()}, tmp)
    loop.write_json(path + ".json", {"prompts": prompts, "seconds": seconds, "cfg": cfg})
    os.replace(tmp, path)  # last: the data counts as present only when both files are
    return {"latents": torch.cat(latents), "prompts": prompts, "seconds": seconds}


def finetune_student_base(world: "ShapesWorld", folder: str, data: dict, settings: dict, seed: int = 0):
    """The student base fine-tuned on the synthetic pairs (caption, latent) with its own multi-step objective
    (`trainers.train_student`, SD1.5 schedule). Saved in `folder`, reused when present. Returns (unet, seconds)."""
    from diffusers import UNet2DConditionModel

    from .trainers import train_student

    stamp = os.path.join(folder, "finetune.json")
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            seconds = json.load(f)["seconds"]
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval(), seconds
    t0 = time.perf_counter()
    prompts = data["prompts"]
    unique = sorted(set(prompts))
    index = torch.tensor([unique.index(p) for p in prompts])
    hidden = world.encode_student_prompts(unique)
    empty = world.encode_student_prompts([""])
    unet = train_student(copy.deepcopy(world.student_unet).requires_grad_(True), data["latents"], index, hidden, empty,
                         world.config["student_schedule"], settings["synthetic_finetune_steps"],
                         batch_size=settings["synthetic_batch"], lr=settings["synthetic_lr"], seed=seed, log=None)
    seconds = time.perf_counter() - t0
    unet.save_pretrained(folder)
    loop.write_json(stamp, {"seconds": seconds})  # last: the fine-tune counts as done only with its stamp
    return unet, seconds


# ---------------------------------------------------------------------------------------------- stage 3: evaluation

def student_generator(world: "ShapesWorld", unet, timestep: int = 999):
    """A one-step student UNet (input timestep `timestep`) as an evaluation row. It draws its noise as
    `world.sample_student` does, so at 999 it is the one-step student base's sampler, noise for noise."""
    from ..student import OneStepStudent
    from . import models

    student = OneStepStudent(unet, space=world.student_space, schedule=world.config["student_schedule"],
                             timestep=timestep)

    @torch.no_grad()
    def run(prompts, generator):
        noise = torch.randn((len(prompts), 4, models.STUDENT_RESOLUTION // 8, models.STUDENT_RESOLUTION // 8),
                            generator=generator)
        return world.decode_student(student.forward_model(noise, world.encode_student_prompts(prompts)))

    return run


def sample_grid(world: "ShapesWorld", path: str, rows: dict, prompts: list[str], seeds: list[int]) -> str:
    """PNG grid: one column per (prompt, seed), one row per generator (label: row name)."""
    from .evaluate import eval_generator

    images = []
    for run in rows.values():
        cols = [run(prompts, eval_generator(seed)) for seed in seeds]  # [P] images per seed
        images.append(torch.stack(cols, dim=1).flatten(0, 1))  # column order: prompt-major, then seed
    return loop.save_image_grid(images, path, labels=list(rows))


def world_reference_rows(world_dir: str) -> dict:
    """The pretrained rows (teacher, student base, one-step base) as the world's build measured them (its
    report.json: the saved weights, evaluation seed 0), each with its prompt count; {} when the world has no report.
    They do not change with a run's training, and measuring them again costs the default run about a minute."""
    path = os.path.join(world_dir, "report.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        ev = json.load(f).get("evaluation") or {}
    return {name: dict(ev[name], prompts=ev["prompts"]) for name in ("teacher", "student_base",
                                                                     "student_base_one_step") if name in ev}


def row_label(name: str, world: "ShapesWorld", settings: dict | None = None) -> str:
    t, s = world.config["teacher_sampling"], world.config["student_sampling"]
    spec = {"teacher": t, "student_base": s, "student_base_start": settings or DEFAULTS}.get(name, {})
    return ROW_LABELS.get(name, name).format(**spec)


def start_rows(world: "ShapesWorld", settings: dict) -> dict:
    """The one-step student base at the distillation's input timestep, when that is not the usual 999."""
    ts = settings["student_timestep"]
    return {} if ts == 999 else {"student_base_start": student_generator(world, world.student_unet, ts)}


# ---------------------------------------------------------------------------------------------- report

def regression_text(settings: dict) -> str:
    """One sentence on the regression term's settings ('' when it is off)."""
    if not settings.get("regression_n"):
        return ""
    warm = settings["regression_warmup_steps"]
    parts = [f"{settings['regression_n']} teacher-corrected regression pairs (the student base's samples redrawn by "
             f"the teacher from noise level {settings['regression_s0']:g} through the Bridge, training/pairs.py)"]
    if warm:
        parts.append(f"{warm} regression-only warm-up steps at batch {settings['regression_batch']} (lr "
                     f"{settings['regression_warmup_lr']:g}, cross-attention "
                     f"{settings['regression_warmup_cross_attention_lr'] or settings['regression_warmup_lr']:g}) "
                     "before the distillation steps")
    if settings["regression_weight"]:
        parts.append(f"a regression term at {settings['regression_weight']:g}x the DMD gradient's norm in each "
                     "distillation step")
    return "Regression: " + "; ".join(parts) + "; the pairs' making counts in the training wall time."


ATTRIBUTES = ("shape", "colour", "background", "position")


def mean_attributes(r: dict) -> float:
    """The mean of the per-attribute accuracies of an evaluation row (the README's "mean attribute")."""
    return sum(r[a] for a in ATTRIBUTES) / len(ATTRIBUTES)


def _fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def threads_text(report: dict) -> str:
    """'2 CPU threads' or, where invocations differed, the threads of each stage ('bridge_training 2 then 1, ...')."""
    per_stage = report.get("stage_threads") or {}
    counts = {n for ts in per_stage.values() for n in ts} or {report["threads"]}
    if len(counts) == 1:
        return f"{counts.pop()} CPU thread(s)"
    return "CPU threads per stage: " + ", ".join(f"{k} {' then '.join(map(str, v))}" for k, v in per_stage.items())


def report_markdown(report: dict) -> str:
    ev = report["evaluation"]
    lines = [
        "# Shapes world: default run" + (" (QUICK: numbers are meaningless)" if report["quick"] else ""),
        "",
        f"World `{report['world']}`, seed {report['seed']}, {threads_text(report)}, "
        f"{ev['prompts']} held-out prompts (evaluation seed {ev['seed']}). Every figure below was measured in this "
        "run, except the pretrained rows marked [the world's build report] (its saved weights, measured when the "
        "world was built; `--measure-reference-rows` measures them again).",
        "",
    ]
    gap = report.get("gap")
    if gap:
        lines += [f"The student base never learnt the **{gap}** (its training captions carried a random {gap} word); "
                  f"the teacher draws it right. The {gap} column shows whether distillation taught it.", ""]
    lines += [
        f"| row | prompt accuracy | {gap or 'gap'} accuracy | Fréchet distance (judge) | training wall time (s) | "
        "latency (ms/image) |",
        "|---|---|---|---|---|---|",
    ]
    for name in report["rows"]:
        r = ev[name]
        train = report["training_s"].get(name)
        lines.append(f"| {report['row_labels'][name]} | {_fmt(r['accuracy'])} | {_fmt(r[gap]) if gap else '—'} | "
                     f"{_fmt(r.get('fd'), 2)} | {_fmt(train, 0) if train is not None else '— (pretrained)'} | "
                     f"{r['seconds_per_image'] * 1000:.2f} |")
    t = report["timings_s"]
    lines += [
        "",
        "Training wall time of the cross-space row = Bridge training + distillation. Latency: wall time of "
        f"generation + decoding per image at batch {report['settings']['eval_batch']}. "
        + regression_text(report["settings"]),
        "",
        "Per-attribute accuracy (shape / colour / background / position):",
        "",
    ]
    for name in report["rows"]:
        r = ev[name]
        lines.append(f"- {name}: {r['shape']:.3f} / {r['colour']:.3f} / {r['background']:.3f} / {r['position']:.3f} "
                     f"(mean attribute {mean_attributes(r):.3f})")
    val = (report.get("bridge", {}).get("last_val") or {}).get("val", {})
    if val:
        lines += ["", "Bridge on held-out images (teacher model space; image PSNR after the teacher VAE):", "",
                  "| | latent MSE | image PSNR (dB) |", "|---|---|---|"]
        for name in ("bridge", "round_trip"):
            if name in val:
                lines.append(f"| {name.replace('_', ' ')} | {val[name]['latent_mse']:.4f} | "
                             f"{val[name]['image_psnr']:.2f} |")
    lines += [
        "",
        "Stage timings (s" + (f", summed over the run's {report['invocations']} invocations" if
                              report.get("invocations", 1) > 1 else "") + "): "
        + ", ".join(f"{k} {v:.0f}" for k, v in t.items()),
        "",
        f"Sample grid: `grid.png` (rows: {', '.join(report['grid']['rows'])}; columns: each prompt x seeds "
        f"{report['grid']['seeds']}):",
        "",
    ]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(report["grid"]["prompts"])]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _stopped(out: str, stage: str, result: dict) -> dict:
    _log(f"stopped during {stage} at step {result['step']} (saved); run the same command again to resume {out}")
    return {"stopped_early": True, "stage": stage, "step": result["step"]}


# ------------------------------------------------------------------------------------- threads and stage times

def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads for this run, why): `requested` (--threads), else OMP_NUM_THREADS when set, else by the load
    average (THREADS_HELP)."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = torch.get_num_threads()  # torch's default: one per physical core
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= BUSY_LOAD:
        return 1, (f"other work is running (load average {load:.1f}), where {cores} threads would spin-wait "
                   "against it")
    return cores, f"torch's default, one per core: the machine is idle (load average {load:.1f})"


class StageLedger:
    """Wall time and threads of each stage, per invocation of the run, kept in <out>/stages.json so that a resumed
    run's report sums its parts: a stage's time is the sum over the invocations that spent time in it."""

    def __init__(self, out: str, threads: int):
        self.path = os.path.join(out, "stages.json")
        self.invocations = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.invocations = json.load(f)["invocations"]
        self.current = {"threads": threads, "stages": {}, "total": 0.0}
        self.invocations.append(self.current)
        self.t_start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times the block as stage `name` of this invocation, whether it ends, stops (Ctrl-C) or fails."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.current["stages"][name] = self.current["stages"].get(name, 0.0) + time.perf_counter() - t0
            self.current["total"] = time.perf_counter() - self.t_start
            loop.write_json(self.path, {"invocations": self.invocations})

    def timings(self) -> dict:
        """{stage: seconds summed over the invocations, ..., "total": the invocations' totals summed}."""
        out: dict[str, float] = {}
        for inv in self.invocations:
            for name, seconds in inv["stages"].items():
                out[name] = out.get(name, 0.0) + seconds
        out["total"] = sum(inv["total"] for inv in self.invocations)
        return out

    def threads(self) -> dict:
        """{stage: [threads of each invocation that ran it]}."""
        out: dict[str, list[int]] = {}
        for inv in self.invocations:
            for name in inv["stages"]:
                out.setdefault(name, []).append(inv["threads"])
        return out


def run(out: str = DEFAULT_OUT, world_dir: str | None = None, seed: int = 0, quick: bool = False,
        fresh: bool = False, threads: int | None = None, **overrides) -> dict:
    """The default run (see the module docstring); returns the report dict (also written as report.json), or
    {"stopped_early": True, ...} after Ctrl-C (the stage saved its state: the same call resumes it).
    threads: torch CPU threads for the run (None: `choose_threads`, by the machine's load)."""
    from . import models
    from .evaluate import base_generators, evaluate_generators

    from ..errors import UserError

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
    settings = dict(QUICK if quick else DEFAULTS, **overrides)
    world_dir = world_dir or models.DEFAULT_DIR
    # Everything cheap first, before a file is written: the settings, the world folder, the run folder.
    problems = setting_problems(settings) + path_problems(out, world_dir)
    if problems:
        raise UserError("; ".join(problems) + ".")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    # A run folder resumes only the run it was started for.
    identity = {"world": os.path.abspath(world_dir), "seed": seed, "quick": quick, "settings": settings}
    identity_path = os.path.join(out, "run.json")
    if os.path.exists(identity_path):
        with open(identity_path, encoding="utf-8") as f:
            if json.load(f) != identity:
                raise ValueError(f"{out} holds a run with another world, seed or settings; pass another --out, or "
                                 "--fresh to start over there.")
    loop.write_json(identity_path, identity)
    n_threads, why = choose_threads(threads)
    torch.set_num_threads(n_threads)
    _log(f"{n_threads} CPU thread{'s' if n_threads > 1 else ''} ({why}); --threads N chooses. Expected time of the "
         f"default run: {EXPECTED_TIME}")
    ledger = StageLedger(out, n_threads)

    _log(f"loading the shapes world from {world_dir}")
    with ledger.stage("loading"):
        world = models.load_shapes_world(world_dir, register=False)

    _log("1/4 rendering the Bridge's training images")
    with ledger.stage("data"):
        images = render_images(os.path.join(out, "data", "images"), settings["n_images"], seed)

    _log("2/4 training the Bridge (reconstruction + attention fidelity)")
    with ledger.stage("bridge_training"):
        bridge, bridge_result = train_bridge(world, os.path.join(out, "bridge"), images, settings, seed)
    if bridge is None:
        return _stopped(out, "Bridge training", bridge_result)
    shutil.copyfile(bridge_result["bridge"], os.path.join(out, "bridge.safetensors"))

    _log("3/4 distilling the one-step student cross-space through the Bridge")
    with ledger.stage("distillation"):
        student_unet, distill_result = distill_student(world, os.path.join(out, "distill"), "cross", settings, seed,
                                                       bridge=bridge)
    if student_unet is None:
        return _stopped(out, "distillation", distill_result)
    shutil.copyfile(distill_result["student"], os.path.join(out, "student_unet.safetensors"))

    same_unet, same_result = None, None
    if settings["same_space_row"]:
        _log("3b/4 distilling a same-space one-step student from the student base, for comparison")
        with ledger.stage("same_space_distillation"):
            same_unet, same_result = distill_student(world, os.path.join(out, "distill_same"), "same", settings,
                                                     seed)
        if same_unet is None:
            return _stopped(out, "same-space distillation", same_result)

    _log("4/4 evaluating with the judge")
    with ledger.stage("evaluation"):
        rows = dict(base_generators(world), **start_rows(world, settings),
                    cross_space=student_generator(world, student_unet, settings["student_timestep"]))
        if same_unet is not None:
            rows["same_space"] = student_generator(world, same_unet, settings["student_timestep"])
        reference = {} if settings["measure_reference_rows"] else world_reference_rows(world_dir)
        evaluation = evaluate_generators(world, {k: v for k, v in rows.items() if k not in reference},
                                         n=settings["eval_samples"], seed=seed, batch_size=settings["eval_batch"],
                                         progress=True)
        evaluation.update(reference)
        prompts = grid_prompts(settings["grid_prompts"])
        seeds = list(range(settings["grid_seeds"]))
        before = rows.get("student_base_start", rows["student_base_one_step"])  # the distillation's start
        grid_rows = {"one-step before": before, "one-step after (cross-space)": rows["cross_space"],
                     **({"one-step same-space": rows["same_space"]} if "same_space" in rows else {}),
                     "teacher": rows["teacher"]}
        sample_grid(world, os.path.join(out, "grid.png"), grid_rows, prompts, seeds)
    for name in rows:
        evaluation[name]["mean_attributes"] = mean_attributes(evaluation[name])
    # Summed over every invocation of this run (a resumed run's times are the sum of its parts).
    timings = ledger.timings()
    stage_threads = ledger.threads()

    report = {
        "format": "shapes-run", "quick": quick, "world": os.path.abspath(world_dir), "seed": seed,
        "threads": n_threads, "stage_threads": stage_threads, "invocations": len(ledger.invocations),
        "settings": settings, "timings_s": timings,
        "rows": list(rows), "row_labels": {name: row_label(name, world, settings) + (
            f" [the world's build report, {reference[name]['prompts']} prompts]" if name in reference else "")
            for name in rows},
        "training_s": {"cross_space": timings["bridge_training"] + timings["distillation"],
                       **({"same_space": timings["same_space_distillation"]} if same_result else {})},
        "gap": (world.config.get("knowledge_gap") or {}).get("attribute"),
        "evaluation": evaluation,
        "bridge": {"path": "bridge.safetensors", "steps": bridge_result["step"],
                   "resumed_from": bridge_result["resumed_from"],
                   "last_val": bridge_result.get("last_val")},
        "student": {"path": "student_unet.safetensors", "steps": distill_result["step"],
                    "resumed_from": distill_result["resumed_from"],
                    "guidance": distill_result["guidance"], "last_metrics": distill_result.get("last_metrics")},
        "grid": {"path": "grid.png", "rows": list(grid_rows), "prompts": prompts, "seeds": seeds},
        "versions": _versions(),
    }
    loop.write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(report))
    _log(f"done in {timings['total']:.0f}s" + (f" over {len(ledger.invocations)} invocations"
                                                  if len(ledger.invocations) > 1 else "")
         + f": {os.path.join(out, 'report.md')}")
    for name in rows:
        r = evaluation[name]
        _log(f"  {report['row_labels'][name]}: prompt accuracy {r['accuracy']:.3f}, FD {r.get('fd', float('nan')):.2f}")
    return report


def run_args(args: argparse.Namespace) -> int:
    """Run from parsed and checked arguments (settings.parse_args); the exit code."""
    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    report = run(args.out, args.world, seed=args.seed, quick=args.quick, fresh=args.fresh, threads=args.threads,
                 **overrides)
    return 130 if report.get("stopped_early") else 0  # 130: the shell's code for an interrupted command


def main(argv: list[str] | None = None, prog: str = "python -m training.shapes.run") -> int:
    return run_args(parse_args(argv, prog))


if __name__ == "__main__":
    from ..run import main as cli_main

    sys.exit(cli_main(["shapes", *sys.argv[1:]]))  # the command line's boundary: bad input is one `error:` line
