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


def fake_score(run_dir: str, world_dir: str | None = None, n_eval: int = 300, seed: int = 0,
               rank: int | None = None, threads: int = 0) -> dict:
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
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.steps) or args.samples < 1 or args.eval < 1 or (args.batch or 1) < 1:
        parser.error("--steps, --samples, --eval and --batch must be >= 1")
    try:
        if args.fake_score:
            from ..loop import write_json

            result = fake_score(args.fake_score, args.world, args.eval, args.seed, args.rank, args.threads)
            write_json(os.path.join(args.fake_score, "fake_score.json"), result)
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
