"""Rebuild the whole shapes world from scratch, deterministically, and measure it.

    python -m training.shapes.pretrain --out assets/shapes            # the shipped world (about an hour)
    python -m training.shapes.pretrain --out /tmp/world --quick       # a seconds-long smoke run
    python -m training.shapes.pretrain --out assets/shapes --only teacher_phase3 student_base
                                                                     # rerun some stages of a built world

Stages (each timed in report.json): text encoders, judge, student VAE, teacher VAE, latent datasets and
latent-space numbers, teacher (rectified flow, three phases: a cosine cycle from scratch, then two more
lower-rate cosine cycles, each from the *saved* weights of the phase before), student base (SD1.5 schedule),
evaluation of the *saved* weights (reloaded, so the numbers are those of what ships). Same seed + same thread
count => same weights.

The knowledge gap (world version 2): the student base is trained on captions whose background word is replaced
by a random colour (`student_caption_noise`), so it draws the background at chance while the teacher, trained on
the true captions, gets it right -- the way SD1.5 lacks SD3.5's prompt following. Only distillation from the
teacher can teach the one-step student that attribute.

--only reruns the named stages on a built world and keeps every other component: each stage starts from saved
weights and its own seed exactly as in a full rebuild, so both paths give the same world.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DEFAULTS = dict(
    judge_steps=300, judge_batch=128,
    student_vae_steps=4000, teacher_vae_steps=2000, vae_batch=8, kl_weight=1e-5,
    n_train=12000,
    teacher_steps=3000, teacher_batch=128, teacher_lr=1e-3, teacher_train_shift=3.0,
    # The first cycle ends with the loss still falling and shapes half-learned (circle vs square); a second,
    # lower-rate cycle from its weights is what brings the teacher above 90% prompt accuracy.
    teacher_finetune_steps=3000, teacher_finetune_lr=3e-4,
    # A third cycle (world version 2): after two the teacher drew shapes less reliably than the student base
    # (0.95 vs 0.98); the teacher must be at least as good on every attribute.
    teacher_phase3_steps=3000, teacher_phase3_lr=3e-4,
    student_steps=3000, student_batch=128, student_lr=1e-3,
    # The student base's knowledge gap: this caption attribute's word is replaced by a random value in its
    # training captions ("" = none, the version-1 world).
    student_caption_noise="background",
    # CFG 0 = chosen per model from CFG_CHOICES on validation prompts (the same procedure for both).
    teacher_cfg=0.0, teacher_shift=1.0, teacher_sampling_steps=20,
    student_cfg=0.0, student_sampling_steps=25,
    eval_samples=500,
)
CFG_CHOICES = (1.5, 2.0, 3.0, 4.0, 6.0)
SAMPLING_KEYS = {"teacher_cfg", "teacher_shift", "teacher_sampling_steps", "student_cfg", "student_sampling_steps",
                 "eval_samples"}
WORLD_VERSION = 2
# Stages --only can rerun, and the settings each one owns (a kept stage's settings must match the built world's).
STAGE_SETTINGS = {
    "teacher_phase1": ("teacher_steps", "teacher_lr"),
    "teacher_phase2": ("teacher_finetune_steps", "teacher_finetune_lr"),
    "teacher_phase3": ("teacher_phase3_steps", "teacher_phase3_lr"),
    "student_base": ("student_steps", "student_batch", "student_lr", "student_caption_noise"),
}
TEACHER_PHASES = ("teacher_phase1", "teacher_phase2", "teacher_phase3")
# Same models, a handful of steps: checks the pipeline end to end, not quality.
QUICK = dict(DEFAULTS, judge_steps=2, judge_batch=16, student_vae_steps=2, teacher_vae_steps=2, vae_batch=4, n_train=32, teacher_steps=2, teacher_finetune_steps=2,
             teacher_phase3_steps=2, teacher_batch=8, student_steps=2, student_batch=8, teacher_sampling_steps=2, student_sampling_steps=2,
             teacher_cfg=4.0, student_cfg=4.0, eval_samples=8)




def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _log(name: str):
    return lambda msg: print(f"[{name}] {msg}", flush=True)


# ---- stages: top-level functions, so they can run in worker processes; each saves what it trains ----

def _setup(threads: int, seed: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def stage_judge(out: str, cfg: dict, seed: int, threads: int) -> dict:
    from . import models
    from .judge import prompt_accuracy, train_judge
    from .render import render, sample_scenes

    _setup(threads, seed)
    t0 = time.perf_counter()
    judge = train_judge(steps=cfg["judge_steps"], batch_size=cfg["judge_batch"], seed=seed, log=_log("judge"))
    models.save_component(out, "judge", judge)
    held_out = sample_scenes(cfg["eval_samples"], "test", seed)
    result = {f"accuracy_{r}px": prompt_accuracy(judge, render(held_out, r), held_out.captions())["accuracy"]
              for r in (64, 128)}
    return dict(result, parameters=_count(judge), seconds=time.perf_counter() - t0)


def stage_vae(out: str, who: str, cfg: dict, seed: int, threads: int) -> dict:
    from . import models
    from .trainers import train_vae

    _setup(threads, seed)
    t0 = time.perf_counter()
    if who == "student":
        vae, res, crop = models.build_student_vae(), models.STUDENT_RESOLUTION, None
    else:  # the 128 px VAE learns from 64 px crops of 128 px renders (a quarter of the cost)
        vae, res, crop = models.build_teacher_vae(), models.TEACHER_RESOLUTION, 64
    vae = train_vae(vae, res, cfg[f"{who}_vae_steps"], batch_size=cfg["vae_batch"], kl_weight=cfg["kl_weight"], crop=crop,
                    seed=seed, log=_log(f"{who}_vae"))
    models.save_component(out, f"{who}_vae", vae)
    return {"parameters": _count(vae), "seconds": time.perf_counter() - t0}


def stage_teacher(out: str, data_path: str, cfg: dict, seed: int, threads: int,
                  phases: tuple[str, ...] = TEACHER_PHASES) -> dict:
    """Run the given teacher phases in order, each saved. Phase 1 starts from scratch; every later phase starts
    from the *saved* weights of the one before (float16-rounded, exactly what `--only` starts from) with its own
    seed, so rerunning a phase on a built world gives what a full rebuild gives."""
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from . import models
    from .trainers import train_teacher

    d = load_file(data_path)
    args = (d["teacher_latents"], d["caption_index"], d["teacher_embeds"], d["teacher_pooled"],
            d["teacher_empty_embeds"], d["teacher_empty_pooled"])
    common = dict(batch_size=cfg["teacher_batch"], shift=cfg["teacher_train_shift"])
    seconds, transformer = {}, None
    for phase in phases:
        steps_key, lr_key = STAGE_SETTINGS[phase]
        number = TEACHER_PHASES.index(phase)
        if cfg[steps_key] <= 0:
            continue
        phase_seed = seed + 100 * number
        _setup(threads, phase_seed)
        t0 = time.perf_counter()
        if number == 0:
            transformer = models.build_teacher_transformer()
        else:
            transformer = SD3Transformer2DModel.from_pretrained(os.path.join(out, "teacher_transformer"),
                                                                torch_dtype=torch.float32, use_safetensors=True)
        transformer = train_teacher(transformer, *args, cfg[steps_key], lr=cfg[lr_key], seed=phase_seed,
                                    log=_log(phase.replace("_", " ")), **common)
        models.save_component(out, "teacher_transformer", transformer)
        seconds[phase] = time.perf_counter() - t0
    if transformer is None:
        transformer = SD3Transformer2DModel.from_pretrained(os.path.join(out, "teacher_transformer"),
                                                            use_safetensors=True)
    return {"parameters": _count(transformer), "phase_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "seconds": sum(seconds.values())}


def stage_student(out: str, data_path: str, cfg: dict, seed: int, threads: int) -> dict:
    from safetensors.torch import load_file

    from . import models
    from .trainers import train_student

    _setup(threads, seed)
    t0 = time.perf_counter()
    d = load_file(data_path)
    unet = train_student(models.build_student_unet(), d["student_latents"], d["student_caption_index"],
                         d["student_hidden"], d["student_empty_hidden"], models.STUDENT_SCHEDULE, cfg["student_steps"],
                         batch_size=cfg["student_batch"], lr=cfg["student_lr"], seed=seed, log=_log("student_base"))
    models.save_component(out, "student_unet", unet)
    return {"parameters": _count(unet), "seconds": time.perf_counter() - t0}


def _check_noise_attribute(attribute: str) -> None:
    from .render import ATTRIBUTES

    if attribute not in ATTRIBUTES:
        raise ValueError(f"student_caption_noise must be one of {', '.join(ATTRIBUTES)} or '' (none); "
                         f"got {attribute!r}.")


def noisy_captions(scenes, attribute: str, seed: int) -> list[str]:
    """The scenes' captions with `attribute`'s word replaced by a uniformly random valid value, drawn
    independently of the image (so the word carries no information about it). A background stays different
    from the shape's colour, as every caption of the world does."""
    import torch

    from .render import ATTRIBUTES, caption_of

    _check_noise_attribute(attribute)
    g = torch.Generator().manual_seed(seed)
    values = ATTRIBUTES[attribute]
    out = []
    for i in range(len(scenes)):
        a = scenes.attributes(i)
        choices = [v for v in values if not (
            (attribute == "background" and v == a["colour"]) or (attribute == "colour" and v == a["background"]))]
        a[attribute] = choices[int(torch.randint(len(choices), (1,), generator=g))]
        out.append(caption_of(a))
    return out


def _run_group(report: dict, group: str, jobs: int, tasks: dict) -> dict:
    """Run {name: (fn, args)} with up to `jobs` worker processes (1: in this process); record timings."""
    t0 = time.perf_counter()
    if jobs <= 1:
        results = {name: fn(*args) for name, (fn, args) in tasks.items()}
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {name: pool.submit(fn, *args) for name, (fn, args) in tasks.items()}
            results = {name: f.result() for name, f in futures.items()}
    for name, r in results.items():
        report["timings_s"][name] = round(r.pop("seconds"), 1)
    report["wall_s"][group] = round(time.perf_counter() - t0, 1)
    return results


def _previous_seconds(previous: dict, name: str) -> float:
    """A kept stage's time from the built world's report (a version-1 report timed the teacher's phases as
    continued.first_phase_teacher_s and timings_s.teacher)."""
    t = previous.get("timings_s", {})
    if name in t:
        return t[name]
    if name == "teacher_phase1" and "continued" in previous:
        return previous["continued"]["first_phase_teacher_s"]
    if name == "teacher_phase2" and "teacher" in t:
        return t["teacher"]
    return 0.0


def pretrain(out: str, quick: bool = False, seed: int = 0, threads: int = 1, jobs: int = 2, log=print,
             only: tuple[str, ...] = (), **overrides) -> dict:
    """Build every component into `out`, evaluate the saved world, write world.json and report.json.

    Every stage runs with `threads` torch threads and its own seed, in up to `jobs` processes at once; the
    weights depend on (seed, threads) only, not on `jobs`. only: `out` holds a built world; rerun just these
    stages (names of STAGE_SETTINGS) and the evaluation, keep the rest."""
    import tempfile

    import diffusers
    import torch
    import transformers
    from safetensors.torch import save_file

    from .. import _bridge
    from ..loop import write_json
    from . import models, text
    from .evaluate import evaluate_world, select_cfg
    from .render import render, sample_scenes
    from .trainers import decode_latents, encode_latents, latent_statistics, psnr

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown pretrain settings {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
    if threads < 1 or jobs < 1:
        raise ValueError(f"threads and jobs must be >= 1; got threads={threads}, jobs={jobs}.")
    bad = set(only) - set(STAGE_SETTINGS)
    if bad:
        raise ValueError(f"Unknown stages {sorted(bad)} for --only; choose from {', '.join(STAGE_SETTINGS)}.")
    cfg = dict(QUICK if quick else DEFAULTS, **overrides)
    if cfg["student_caption_noise"]:
        _check_noise_attribute(cfg["student_caption_noise"])  # before any stage runs
    _setup(threads, seed)
    previous = {}
    teacher_phases = TEACHER_PHASES
    if only:
        models._check_folder(out)
        with open(os.path.join(out, "report.json")) as f:
            previous = json.load(f)
        rerun = {k for stage in only for k in STAGE_SETTINGS[stage]}
        changed = {k: (previous["settings"].get(k), cfg[k]) for k in cfg
                   if k not in rerun and k not in SAMPLING_KEYS and previous["settings"].get(k) != cfg[k]}
        if changed or (previous["seed"], previous["threads"]) != (seed, threads):
            raise ValueError(f"--only needs the settings, seed and threads {out!r} was built with for every stage it "
                             f"keeps; differences (built, now): "
                             f"{changed or {'seed/threads': ((previous['seed'], previous['threads']), (seed, threads))}}. "
                             "Pass the same ones, or rebuild from scratch.")
        teacher_phases = tuple(p for p in TEACHER_PHASES if p in only)
        if teacher_phases and teacher_phases != TEACHER_PHASES[TEACHER_PHASES.index(teacher_phases[0]):]:
            raise ValueError(f"--only {' '.join(teacher_phases)}: a teacher phase starts from the one before, so "
                             "rerun every phase after the first one named too.")
    os.makedirs(out, exist_ok=True)
    report = {"quick": quick, "seed": seed, "threads": threads, "jobs": jobs, "settings": cfg, "timings_s": {},
              "wall_s": {}, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                         "diffusers": diffusers.__version__, "transformers": transformers.__version__}}
    if only:
        report["rebuilt_stages"] = list(only)
    t_start = time.perf_counter()

    log("== text encoders (frozen, seeded random init)")
    t0 = time.perf_counter()
    tokenizer = text.build_tokenizer()
    teacher_text, student_text = text.build_text_encoder("teacher"), text.build_text_encoder("student")
    models.save_component(out, "teacher_text_encoder", teacher_text)
    models.save_component(out, "student_text_encoder", student_text)
    report["timings_s"]["text_encoders"] = round(time.perf_counter() - t0, 1)

    if only:  # kept from the build: their numbers too
        res = {name: {k: v for k, v in previous[name].items() if k != "seconds"}
               for name in ("teacher_vae", "student_vae", "judge")}
        report["timings_s"].update({n: previous["timings_s"][n] for n in ("teacher_vae", "student_vae", "judge")})
        report["wall_s"]["judge_and_vaes"] = previous["wall_s"]["judge_and_vaes"]
    else:
        log("== judge, student VAE, teacher VAE")
        res = _run_group(report, "judge_and_vaes", jobs, {
            "teacher_vae": (stage_vae, (out, "teacher", cfg, seed + 1, threads)),
            "student_vae": (stage_vae, (out, "student", cfg, seed, threads)),
            "judge": (stage_judge, (out, cfg, seed, threads)),
        })
    report["judge"] = res["judge"]

    log("== latent datasets and latent-space numbers")
    t0 = time.perf_counter()
    from diffusers import AutoencoderKL

    scenes = sample_scenes(cfg["n_train"], "train", seed=seed + 7)
    captions = scenes.captions()
    student_captions = (noisy_captions(scenes, cfg["student_caption_noise"], seed + 11)
                        if cfg["student_caption_noise"] else captions)
    data = {}
    tables = {}
    for who, caps in (("teacher", captions), ("student", student_captions)):
        unique = sorted(set(caps))  # each distinct caption is encoded once
        lookup = {c: i for i, c in enumerate(unique)}
        data["caption_index" if who == "teacher" else "student_caption_index"] = torch.tensor([lookup[c] for c in caps])
        tables[who] = unique
    spaces = {}
    held_out = sample_scenes(cfg["eval_samples"], "test", seed)
    for who, res_px in (("student", models.STUDENT_RESOLUTION), ("teacher", models.TEACHER_RESOLUTION)):
        vae = AutoencoderKL.from_pretrained(os.path.join(out, f"{who}_vae"), torch_dtype=torch.float32,
                                            use_safetensors=True).eval()
        raw = torch.cat([encode_latents(vae, render(scenes[i : i + 500], res_px))
                         for i in range(0, len(scenes), 500)])
        scale, shift = latent_statistics(raw)
        space = _bridge.spaces.LatentSpace(f"shapes_{who}", vae.config.latent_channels, 8, round(scale, 5),
                                           round(shift, 5), res_px)
        spaces[who] = space
        data[f"{who}_latents"] = space.to_model(raw)
        images = render(held_out, res_px)
        report[f"{who}_vae"] = dict(res[f"{who}_vae"], space=space.to_dict(),  # (re)measured either way
                                    psnr_db=round(psnr(decode_latents(vae, encode_latents(vae, images)), images), 2))
    data["teacher_embeds"], data["teacher_pooled"] = text.encode_teacher(tables["teacher"], tokenizer, teacher_text)
    data["teacher_empty_embeds"], data["teacher_empty_pooled"] = text.encode_teacher([""], tokenizer, teacher_text)
    data["student_hidden"] = text.encode_student(tables["student"], tokenizer, student_text)
    data["student_empty_hidden"] = text.encode_student([""], tokenizer, student_text)
    report["timings_s"]["latents"] = round(time.perf_counter() - t0, 1)

    log("== teacher (rectified flow) and student base (SD1.5 schedule)")
    rerun_student = not only or "student_base" in only
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.safetensors")
        save_file({k: v.contiguous() for k, v in data.items()}, data_path)
        tasks = {}
        if teacher_phases:
            tasks["teacher"] = (stage_teacher, (out, data_path, cfg, seed + 2, threads, teacher_phases))
        if rerun_student:
            tasks["student_base"] = (stage_student, (out, data_path, cfg, seed + 3, threads))
        res = _run_group(report, "diffusion_models", jobs, tasks) if tasks else {}
    phase_seconds = res.get("teacher", {}).pop("phase_seconds", {})
    report["timings_s"].pop("teacher", None)
    for phase in TEACHER_PHASES:
        report["timings_s"][phase] = phase_seconds.get(phase, _previous_seconds(previous, phase))
    report["teacher"] = res["teacher"] if "teacher" in res else previous["teacher"]
    if not rerun_student:
        report["timings_s"]["student_base"] = previous["timings_s"]["student_base"]
    report["student_base"] = res["student_base"] if rerun_student else previous["student_base"]

    world_config = {
        "format": "shapes-world",
        "version": WORLD_VERSION,
        "k": models.K,
        "student_space": spaces["student"].to_dict(),
        "teacher_space": spaces["teacher"].to_dict(),
        "student_resolution": models.STUDENT_RESOLUTION,
        "teacher_resolution": models.TEACHER_RESOLUTION,
        "teacher_training": {"objective": "rectified_flow", "timesteps": "logit_normal", "logit_mean": 0.0,
                             "logit_std": 1.0, "shift": cfg["teacher_train_shift"], "timestep_scale": 1000,
                             "caption_dropout": 0.1},
        "teacher_sampling": {"sampler": "euler", "steps": cfg["teacher_sampling_steps"], "cfg": cfg["teacher_cfg"],
                             "shift": cfg["teacher_shift"]},
        "student_schedule": dict(models.STUDENT_SCHEDULE),
        "student_sampling": {"sampler": "ddim_trailing", "steps": cfg["student_sampling_steps"],
                             "cfg": cfg["student_cfg"]},
        # What the student base was not taught (its captions' word for it was random): the headline attribute.
        "knowledge_gap": {"attribute": cfg["student_caption_noise"] or None,
                          "how": "the student base's training captions carry a random value for this attribute; "
                                 "the teacher's carry the true one"},
        "text": {"max_length": text.MAX_LENGTH,
                 "teacher": "CLIPTextModelWithProjection: last_hidden_state + text_embeds (pooled)",
                 "student": "CLIPTextModel: last_hidden_state", "empty_prompt": ""},
        "quick": quick,
        "seed": seed,
    }
    write_json(os.path.join(out, "world.json"), world_config)

    log("== evaluation of the saved world")
    t0 = time.perf_counter()
    torch.set_num_threads(max(threads, jobs))  # nothing else runs now
    world = models.load_shapes_world(out, register=False)
    for who in ("teacher", "student"):
        if not cfg[f"{who}_cfg"]:
            best, scores = select_cfg(world, who, CFG_CHOICES, n=min(100, cfg["eval_samples"]), seed=seed)
            report.setdefault("cfg_selection", {})[who] = {"chosen": best, "validation": scores}
            log(f"  {who} CFG {best} (validation accuracy by CFG: "
                + ", ".join(f"{c}: {s['accuracy']:.2f}" for c, s in scores.items()) + ")")
            world.config[f"{who}_sampling"]["cfg"] = best
    write_json(os.path.join(out, "world.json"), world.config)
    report["evaluation"] = evaluate_world(world, n=cfg["eval_samples"], seed=seed)
    report["timings_s"]["evaluation"] = round(time.perf_counter() - t0, 1)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    write_json(os.path.join(out, "report.json"), report)
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
    lines.append("  stage timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    lines.append("  wall (s): " + ", ".join(f"{k} {v}" for k, v in report["wall_s"].items())
                 + f"; total {report['total_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.shapes.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the world into (e.g. assets/shapes)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not a world")
    parser.add_argument("--only", nargs="+", default=(), choices=list(STAGE_SETTINGS), metavar="STAGE",
                        help="on a world built in --out: rerun only these stages (" + ", ".join(STAGE_SETTINGS)
                             + ") and the evaluation; the result equals a full rebuild's")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per stage (default 1; weights are reproducible for a fixed count)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="stages run at once in worker processes (default 2, one per core); 1: all in-process")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"override {key} (default {value}, quick {QUICK[key]})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    pretrain(args.out, quick=args.quick, seed=args.seed, threads=args.threads, jobs=args.jobs,
             only=tuple(args.only), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
