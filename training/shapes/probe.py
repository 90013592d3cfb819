"""Regression probe: can the one-step student learn a good one-step map within the distillation budget at all?

    python -m training.shapes.probe            # prints a table; --json FILE saves it

DMD barely improves the one-step student in the CPU budget (300 steps, batch 16). This probe separates the possible
causes. It trains the same one-step student (copy of the student base, `OneStepStudent` at each given input timestep,
same optimiser, steps and batch) by plain regression on paired targets: noise z -> the student base's own 25-step
DDIM sample from z (DMD1's regression loss, same space). If regression reaches a high prompt accuracy in the same
budget, the student and the budget suffice, and what is missing is the signal DMD's distribution-level gradient
carries at this batch size; if it does not, the budget (or the parameterisation) is the limit. Results and their
reading: docs/shapes_investigation.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

from ..loop import write_json


def regression_pairs(world, prompts: list[str], n: int, seed: int, batch_size: int = 128):
    """(prompt index [n], noise [n,4,8,8], target [n,4,8,8]): the student base's default sampling from each noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(prompts), (n,), generator=g)
    noise = torch.randn((n, 4, 8, 8), generator=g)
    targets = [world.sample_student([prompts[i] for i in idx[s:s + batch_size]], noise=noise[s:s + batch_size])
               for s in range(0, n, batch_size)]
    return idx, noise, torch.cat(targets)


def train_regression(world, prompts: list[str], pairs, steps: int, batch_size: int, lr: float, seed: int,
                     progress: bool = True, timestep: int = 999):
    """The one-step student (copy of the student base, input timestep `timestep`) trained on MSE(x0(z), target)
    in model space."""
    from tqdm.auto import tqdm

    from ..student import OneStepStudent

    idx, noise, target = pairs
    hidden = world.encode_student_prompts(prompts)
    student = OneStepStudent(copy.deepcopy(world.student_unet).requires_grad_(True), space=world.student_space,
                             schedule=world.config["student_schedule"], timestep=timestep)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc=f"regression t {timestep} lr {lr:g}", disable=not progress)
    for _ in bar:
        b = torch.randint(0, len(idx), (batch_size,), generator=g)
        loss = F.mse_loss(student.forward_model(noise[b], hidden[idx[b]]), target[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the distiller's default grad_clip
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.unet.eval().requires_grad_(False)


def probe(world_dir: str | None = None, steps: int = 300, batch_size: int = 16, lrs=(1e-4,), timesteps=(999, 700),
          pairs: int = 1024, n_eval: int = 300, seed: int = 0, progress: bool = True) -> dict:
    from .evaluate import evaluate_generators
    from .models import load_shapes_world
    from .run import student_generator, training_prompts

    world = load_shapes_world(world_dir) if world_dir else load_shapes_world()
    prompts = training_prompts()
    t0 = time.perf_counter()
    data = regression_pairs(world, prompts, pairs, seed)
    pair_s = time.perf_counter() - t0
    runs, wall = {}, {}
    for ts in timesteps:
        runs[f"student_base_one_step_t{ts}"] = student_generator(world, world.student_unet, ts)
        for lr in lrs:
            t0 = time.perf_counter()
            unet = train_regression(world, prompts, data, steps, batch_size, lr, seed, progress, ts)
            wall[f"regression_t{ts}_lr{lr:g}"] = time.perf_counter() - t0
            runs[f"regression_t{ts}_lr{lr:g}"] = student_generator(world, unet, ts)
    results = evaluate_generators(world, runs, n=n_eval, seed=seed)
    for name, s in wall.items():
        results[name]["train_s"] = s
    results["settings"] = {"steps": steps, "batch_size": batch_size, "pairs": pairs, "pair_seconds": pair_s,
                           "seed": seed, "world": os.path.abspath(world.folder)}
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Regression probe ({s['steps']} steps, batch {s['batch_size']}, {s['pairs']} pairs from the student "
             f"base's 25-step samples, {results['prompts']} held-out prompts, seed {s['seed']}):", "",
             "| one-step student | prompt accuracy | Fréchet distance | training (s) |", "|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, dict) and "accuracy" in r:
            train = f"{r['train_s']:.0f}" if "train_s" in r else "—"
            lines.append(f"| {name} | {r['accuracy']:.3f} | {r['fd']:.1f} | {train} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", default=None, help="a built shapes world (default: the shipped assets/shapes)")
    p.add_argument("--steps", type=int, default=300, help="regression steps (default: the distillation budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="one student per learning rate")
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 700],
                   help="the one-step student's input timestep(s); one student per timestep and learning rate")
    p.add_argument("--pairs", type=int, default=1024, help="(noise, 25-step sample) training pairs")
    p.add_argument("--eval", type=int, default=300, help="held-out prompts evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also save the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    results = probe(a.world, a.steps, a.batch_size, tuple(a.lr), tuple(a.timesteps), a.pairs, a.eval, a.seed)
    print(markdown(results))
    if a.json:
        write_json(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
