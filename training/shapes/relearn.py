"""Controlled run behind the benchmark's analysis: how fast does the student base re-learn the attribute it lacks?

    python -m training.shapes.relearn --steps 200 1000 --out runs/relearn

The student base of the knowledge-gap world was trained with a random word for one attribute (world.json
`knowledge_gap`), so it learnt to ignore that word. Every student in the benchmark starts from it. This command
takes the plainest supervised signal there is, the student's own multi-step objective on teacher samples with
their true captions (the synthetic-data baseline's fine-tuning stage, `run.finetune_student_base`), fine-tunes the
student base for each --steps value (a separate run each, its own cosine schedule), and scores the fine-tuned
base with its default multi-step sampler. If even this does not move the gap attribute within a budget, the
one-step distillations (whose signal is weaker and noisier) cannot be expected to within it either.

    python -m training.shapes.relearn --fake-score runs/shapes-benchmark/seed0/cross_space/distill

    python -m training.shapes.relearn --one-step 2e-5:0 1e-3:0 2e-5:1e-3 2e-5:1e-2 --steps 300 --batch 16

The third takes the one-step student (the student base run once at the distillation's input timestep) and gives it
the cleanest signal there is about the gap: plain regression of its output onto teacher samples of the prompt (noise
paired at random, so the target's background is the prompt's and nothing else about the pairing is learnable), with
the distiller's own optimizer groups (`OneStepStudent.parameter_groups`): each value LR:CROSS_LR is the rest's and the
cross-attention's learning rate (CROSS_LR 0: one rate for all). It says how fast the student can learn the word at
all, with which learning rate and in which layers, separate from how strong the distillation's signal is.

The second diagnostic asks what the distillation's fake score believes. DMD's gradient on the gap attribute is
(fake - real): it exists only where the fake score (a LoRA on the teacher, zero-initialised, so it starts AS the
teacher) has learnt that the student draws that attribute at random. This loads the fake LoRA from a distillation
run's training state and samples teacher and fake score alike (the teacher's own steps, CFG 1, as the distiller
queries both): if the fake score still draws the gap attribute as right as the teacher, the student gets no signal
on it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def relearn(out: str, steps: list[int], world_dir: str | None = None, n_samples: int = 800, n_eval: int = 300,
            lr: float | None = None, seed: int = 0, threads: int = 0, batch: int | None = None) -> list[dict]:
    import torch

    from ..loop import write_json
    from . import models
    from . import run as shapes_run
    from .evaluate import evaluate_generators

    if threads:
        torch.set_num_threads(threads)
    world = models.load_shapes_world(world_dir or models.DEFAULT_DIR, register=False)
    gap = (world.config.get("knowledge_gap") or {}).get("attribute")
    settings = dict(shapes_run.DEFAULTS)
    if lr is not None:
        settings["synthetic_lr"] = lr
    if batch is not None:
        settings["synthetic_batch"] = batch
    os.makedirs(out, exist_ok=True)
    data = shapes_run.synthetic_data(world, os.path.join(out, "synthetic.safetensors"), n_samples, seed)
    rows = []
    for n in [0, *steps]:
        if n == 0:
            unet, seconds = world.student_unet, 0.0
        else:
            unet, seconds = shapes_run.finetune_student_base(
                world, os.path.join(out, f"finetune_{n}_lr{settings['synthetic_lr']}_b{settings['synthetic_batch']}"), data,
                dict(settings, synthetic_finetune_steps=n), seed)

        def sample(prompts, generator, unet=unet):
            return world.decode_student(world.sample_student(prompts, generator=generator, unet=unet))

        r = evaluate_generators(world, {"base": sample}, n=n_eval, seed=seed, batch_size=100)["base"]
        rows.append({"steps": n, "lr": settings["synthetic_lr"], "batch": settings["synthetic_batch"],
                     "finetune_s": seconds, "accuracy": r["accuracy"], "fd": r["fd"],
                     **{a: r[a] for a in ("shape", "colour", "background", "position")}})
        print(f"[relearn] {n} steps: prompt accuracy {r['accuracy']:.3f}, {gap} {r[gap]:.3f} "
              f"({seconds:.0f} s fine-tuning)", flush=True)
    write_json(os.path.join(out, "relearn.json"), {"gap": gap, "samples": n_samples, "eval_prompts": n_eval,
                                                   "seed": seed, "rows": rows})
    print(f"\n| fine-tuning steps (batch {settings['synthetic_batch']}, lr {settings['synthetic_lr']}) | prompt accuracy "
          f"| {gap} (the gap) | shape / colour / background / position | FD | fine-tuning s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['accuracy']:.3f} | {r[gap]:.3f} | {r['shape']:.2f} / {r['colour']:.2f} / "
              f"{r['background']:.2f} / {r['position']:.2f} | {r['fd']:.1f} | {r['finetune_s']:.0f} |")
    return rows


def one_step(out: str, rates: list[tuple[float, float]], steps: int, world_dir: str | None = None,
             n_samples: int = 800, n_eval: int = 300, seed: int = 0, threads: int = 0, batch: int = 32) -> list[dict]:
    """The one-step student regressed onto teacher samples, one run per (lr, cross_attention_lr) in `rates`."""
    import copy
    import time

    import torch
    import torch.nn.functional as F

    from ..loop import write_json
    from ..student import OneStepStudent
    from . import models
    from . import run as shapes_run
    from .evaluate import evaluate_generators

    if threads:
        torch.set_num_threads(threads)
    world = models.load_shapes_world(world_dir or models.DEFAULT_DIR, register=False)
    gap = (world.config.get("knowledge_gap") or {}).get("attribute")
    timestep = shapes_run.DEFAULTS["student_timestep"]
    os.makedirs(out, exist_ok=True)
    data = shapes_run.synthetic_data(world, os.path.join(out, "synthetic.safetensors"), n_samples, seed)
    hidden = world.encode_student_prompts(data["prompts"])
    rows = []
    for lr, cross_lr in rates:
        unet = copy.deepcopy(world.student_unet).requires_grad_(True).train()
        student = OneStepStudent(unet, space=world.student_space, schedule=world.config["student_schedule"],
                                 timestep=timestep)
        opt = torch.optim.AdamW(student.parameter_groups(lr, cross_lr), weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(len(data["latents"]), (batch,), generator=g)
            noise = torch.randn((batch, *data["latents"].shape[1:]), generator=g)
            loss = F.mse_loss(student.forward_model(noise, hidden[idx]), data["latents"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        run = shapes_run.student_generator(world, unet.eval().requires_grad_(False), timestep)
        r = evaluate_generators(world, {"one_step": run}, n=n_eval, seed=seed, batch_size=100)["one_step"]
        rows.append({"lr": lr, "cross_attention_lr": cross_lr, "steps": steps, "batch": batch, "seconds": seconds,
                     "accuracy": r["accuracy"], "fd": r["fd"],
                     **{a: r[a] for a in ("shape", "colour", "background", "position")}})
        print(f"[relearn] one-step, lr {lr:g} / cross-attention {cross_lr:g}: {gap} {r[gap]:.3f} "
              f"({seconds:.0f} s)", flush=True)
    write_json(os.path.join(out, "one_step.json"), {"gap": gap, "timestep": timestep, "samples": n_samples,
                                                    "eval_prompts": n_eval, "seed": seed, "rows": rows})
    print(f"\n| lr (rest / cross-attention; 0: one rate) | prompt accuracy | {gap} (the gap) | shape / colour / "
          f"background / position | FD | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']:g} / {r['cross_attention_lr']:g} | {r['accuracy']:.3f} | {r[gap]:.3f} | {r['shape']:.2f} / "
              f"{r['colour']:.2f} / {r['background']:.2f} / {r['position']:.2f} | {r['fd']:.1f} | {r['seconds']:.0f} |")
    return rows


def _rates(text: str) -> tuple[float, float]:
    try:
        lr, cross = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LR:CROSS_LR (e.g. 1e-3:0 or 0:1e-2)") from None
    if lr < 0 or cross < 0 or not (lr or cross):
        raise argparse.ArgumentTypeError(f"{text!r}: the rates must be >= 0 and not both 0")
    return lr, cross


NOISE_LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def _scores_by_noise(world, teacher, gap: str, bridge, n: int, seed: int) -> list[dict]:
    """Where along the noise levels real and fake score disagree on the gap attribute: the one-step student base's
    samples (the distillation's start) through the Bridge, noised at each s, and the gap attribute of the real
    score's x0 (teacher, its CFG, as the distiller queries it) and the fake score's x0, judged against the prompt's
    value and against the sample's own. bridge: a Bridge checkpoint's path, or a Bridge module."""
    import torch

    from .._bridge import checkpoint as bridge_checkpoint
    from ..models.text import TextCond
    from ..student import OneStepStudent
    from . import models
    from . import run as shapes_run
    from .evaluate import eval_generator, eval_prompts
    from .render import ATTRIBUTES, parse_caption

    if isinstance(bridge, (str, os.PathLike)):
        bridge = bridge_checkpoint.load_bridge(bridge, student_vae=world.student_vae)
    bridge = bridge.eval().requires_grad_(False)
    prompts = eval_prompts(n, seed)
    column = list(ATTRIBUTES).index(gap)
    wanted = torch.tensor([ATTRIBUTES[gap].index(parse_caption(p)[gap]) for p in prompts])
    g = eval_generator(seed)
    rows = []
    with torch.no_grad():
        student = OneStepStudent(world.student_unet, space=world.student_space,
                                 schedule=world.config["student_schedule"],
                                 timestep=shapes_run.DEFAULTS["student_timestep"])
        noise = torch.randn((n, world.student_space.channels, models.STUDENT_RESOLUTION // 8,
                             models.STUDENT_RESOLUTION // 8), generator=g)
        x = bridge.forward_model(student(noise, world.encode_student_prompts(prompts))).float()
        own = world.judge.predict(world.decode_teacher(x))[:, column]
        embeds, pooled = world.encode_teacher_prompts(prompts)
        neg, neg_pooled = world._empty_prompt("teacher")
        cond, neg = TextCond(embeds, pooled), TextCond(neg, neg_pooled)
        cfg = float(world.config["teacher_sampling"]["cfg"])
        for level in NOISE_LEVELS:
            s = torch.full((n,), level)
            x_s = teacher.add_noise(x, torch.randn(x.shape, generator=g), s)
            real = teacher.predict_x0(x_s, s, cond, neg_cond=neg, guidance=cfg)
            with teacher.fake():
                fake = teacher.predict_x0(x_s, s, cond)
            row = {"s": level}
            for name, x0 in (("real", real), ("fake", fake)):
                got = world.judge.predict(world.decode_teacher(x0.float()))[:, column]
                row[f"{name}_follows_prompt"] = float((got == wanted).float().mean())
                row[f"{name}_follows_sample"] = float((got == own).float().mean())
            rows.append(row)
    print(f"\n| noise level s | real score's x0: {gap} of the prompt / of the sample | fake score's x0: of the prompt / "
          "of the sample |\n|---|---|---|")
    for r in rows:
        print(f"| {r['s']:g} | {r['real_follows_prompt']:.2f} / {r['real_follows_sample']:.2f} | "
              f"{r['fake_follows_prompt']:.2f} / {r['fake_follows_sample']:.2f} |")
    return rows


def fake_score(run_dir: str, world_dir: str | None = None, n_eval: int = 300, seed: int = 0,
               rank: int | None = None, threads: int = 0, bridge=None) -> dict:
    """Judge scores of the teacher and of the fake score saved in a cross-space distillation run (`run_dir`: its
    folder with train_state.safetensors and metrics), both sampled with the teacher's steps at CFG 1."""
    import torch

    from .. import state as train_state
    from . import models
    from . import run as shapes_run
    from .evaluate import evaluate_generators

    if threads:
        torch.set_num_threads(threads)
    world = models.load_shapes_world(world_dir or models.DEFAULT_DIR, register=False)
    gap = (world.config.get("knowledge_gap") or {}).get("attribute")
    path = os.path.join(run_dir, "train_state.safetensors")
    tensors = train_state.read_module_tensors(path, "fake")
    if rank is None:  # the run's own: the first LoRA tensor is lora_A [rank, in_features]
        rank = int(tensors["params.0"].shape[0])
    teacher = shapes_run.shapes_teacher(world, own_copy=True)
    teacher.add_fake_adapter(rank=rank, alpha=rank)
    params = teacher.fake_parameters()
    if len(tensors) != len(params):
        raise ValueError(f"{path} holds {len(tensors)} fake-score tensors, the adapter has {len(params)}: another "
                         "--rank?")
    with torch.no_grad():
        for i, p in enumerate(params):
            t = tensors[f"params.{i}"]
            if t.shape != p.shape:
                raise ValueError(f"{path}: fake-score tensor {i} has shape {list(t.shape)}, the adapter's "
                                 f"{list(p.shape)}: another --rank?")
            p.copy_(t)
    s = world.config["teacher_sampling"]
    by_noise = _scores_by_noise(world, teacher, gap, bridge, n_eval, seed) if bridge else None

    def sampler(fake: bool):
        def run(prompts, generator):
            with teacher.fake() if fake else contextlib.nullcontext():
                x = world.sample_teacher(prompts, generator=generator, cfg=1.0, transformer=teacher.model)
            return world.decode_teacher(x)
        return run

    r = evaluate_generators(world, {"teacher_cfg1": sampler(False), "fake_score_cfg1": sampler(True)}, n=n_eval,
                            seed=seed, batch_size=100)
    out = {"gap": gap, "run": os.path.abspath(run_dir), "eval_prompts": n_eval, "seed": seed,
           "rows": {k: {m: r[k][m] for m in ("accuracy", "fd", "shape", "colour", "background", "position")}
                    for k in ("teacher_cfg1", "fake_score_cfg1")}}
    if by_noise is not None:
        out["by_noise_level"] = by_noise
    print(f"| sampler ({s['steps']} steps, CFG 1) | prompt accuracy | {gap} (the gap) | shape / colour / background / "
          "position | FD |\n|---|---|---|---|---|")
    for k, v in out["rows"].items():
        print(f"| {k} | {v['accuracy']:.3f} | {v[gap]:.3f} | {v['shape']:.2f} / {v['colour']:.2f} / "
              f"{v['background']:.2f} / {v['position']:.2f} | {v['fd']:.1f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    from ..errors import explain

    parser = argparse.ArgumentParser(prog="python -m training.shapes.relearn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000], help="fine-tuning steps, one run each")
    parser.add_argument("--out", default=os.path.join("runs", "relearn"))
    parser.add_argument("--world", default=None, help="built shapes world (default assets/shapes)")
    parser.add_argument("--samples", type=int, default=800, help="teacher samples to fine-tune on (default 800)")
    parser.add_argument("--eval", type=int, default=300, help="held-out prompts to score (default 300)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: the synthetic baseline's)")
    parser.add_argument("--batch", type=int, default=None, help="fine-tuning batch (default: the baseline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--fake-score", metavar="DISTILL_DIR",
                        help="instead: score the fake score saved in this cross-space distillation run")
    parser.add_argument("--rank", type=int, default=None, help="that run's fake-score LoRA rank (default: its own)")
    parser.add_argument("--bridge", help="with --fake-score: also score real and fake x0 at each noise level on the "
                                             "student's samples through this Bridge (the run's bridge.safetensors)")
    parser.add_argument("--one-step", type=_rates, nargs="+", metavar="LR:CROSS_LR",
                        help="instead: regress the one-step student onto teacher samples, one run per rate pair, "
                             "for the first --steps value")
    args = parser.parse_args(argv)
    if args.bridge and not args.fake_score:
        parser.error("--bridge goes with --fake-score (the noise-level table of that run's scores)")
    if any(s < 1 for s in args.steps) or args.samples < 1 or args.eval < 1 or (args.batch or 1) < 1:
        parser.error("--steps, --samples, --eval and --batch must be >= 1")
    try:
        if args.fake_score:
            from ..loop import write_json

            result = fake_score(args.fake_score, args.world, args.eval, args.seed, args.rank, args.threads,
                                args.bridge)
            write_json(os.path.join(args.fake_score, "fake_score.json"), result)
            return 0
        if args.one_step:
            one_step(args.out, args.one_step, args.steps[0], args.world, args.samples, args.eval, args.seed,
                     args.threads, args.batch or 32)
            return 0
        relearn(args.out, args.steps, args.world, args.samples, args.eval, args.lr, args.seed, args.threads, args.batch)
    except (ValueError, OSError, MemoryError) as e:
        user = explain(e)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
