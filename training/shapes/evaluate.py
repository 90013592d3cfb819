"""Measuring generators of the shapes world with the judge: held-out prompts, fixed seeds, two numbers.

- prompt accuracy: share of samples whose judged shape, colour, background and position all match the prompt;
- Fréchet distance (judge features) between the samples and real renders of the *same* prompts.
Every generator is scored on the same prompts and the same reference images, so rows of a table compare.
Beside them, `sample_diversity`: how much a generator's samples of ONE prompt differ (a regression onto mean
targets draws one image per prompt; the FD, over all prompts at once, does not show that by itself).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from .judge import Judge, frechet_distance, prompt_accuracy
from .render import render, sample_scenes, scenes_from_captions

if TYPE_CHECKING:
    from .models import ShapesWorld


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """n held-out prompts: captions of the test split (never used for training)."""
    return sample_scenes(n, "test", seed).captions()


def eval_prompt_sets(n: int, seed: int, held_out: list[str]) -> dict[str, list[str]]:
    """{"held_out": n test-split captions among `held_out`, "seen": n among the others}: the benchmark's two
    evaluations when captions are held out of the distillation (render.held_out_captions)."""
    from .render import all_captions, sample_scenes_outside

    held = set(held_out)
    return {"held_out": sample_scenes_outside(n, "test", seed, set(all_captions()) - held).captions(),
            "seen": sample_scenes_outside(n, "test", seed, held).captions()}


def eval_generator(seed: int) -> torch.Generator:
    """The noise generator of evaluation seed `seed` (distinct from every training stream)."""
    return torch.Generator().manual_seed(10_000 + int(seed))


def reference_images(prompts: list[str], seed: int = 0, resolution: int = 64) -> torch.Tensor:
    """Real renders of the prompts (fresh jitter): the Fréchet reference."""
    return render(scenes_from_captions(prompts, torch.Generator().manual_seed(20_000 + int(seed))), resolution)


def score_images(judge: Judge, images01: torch.Tensor, prompts: list[str],
                 reference01: torch.Tensor | None = None) -> dict:
    """{'accuracy', per-attribute accuracies, 'fd'} of images generated for `prompts`."""
    result = prompt_accuracy(judge, images01, prompts)
    if reference01 is not None and len(images01) >= 2:
        result["fd"] = frechet_distance(judge.embed_images(images01), judge.embed_images(reference01))
    return result


def timed_samples(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    images = fn()
    return images, time.perf_counter() - t0


def evaluate_generators(world: "ShapesWorld", runs: dict[str, Callable[[list[str], torch.Generator], torch.Tensor]],
                        n: int = 500, seed: int = 0, batch_size: int = 100, progress: bool = False,
                        held_out: list[str] | None = None, prompts: list[str] | None = None) -> dict:
    """Score each generator `run(prompts, generator) -> images01` on the same n held-out prompts (or the given
    `prompts`), evaluation noise seed `seed` and Fréchet reference; adds seconds per image (wall time of generation
    at `batch_size`).

    held_out (captions no distillation saw, render.held_out_captions): the scores are those on n prompts among
    them, and each row's "seen" entry those on n prompts among the other captions (eval_prompt_sets)."""
    if held_out:
        sets = eval_prompt_sets(n, seed, held_out)
        results = evaluate_generators(world, runs, n, seed, batch_size, progress, prompts=sets["held_out"])
        seen = evaluate_generators(world, runs, n, seed, batch_size, progress, prompts=sets["seen"])
        for name in runs:
            results[name]["seen"] = seen[name]
        results["held_out_captions"] = len(held_out)
        return results
    prompts = eval_prompts(n, seed) if prompts is None else prompts
    reference = reference_images(prompts, seed)
    results = {"prompts": n, "seed": seed}
    items = runs.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="evaluate", total=len(runs))
    for name, run in items:
        g = eval_generator(seed)

        def generate():
            return torch.cat([run(prompts[i : i + batch_size], g) for i in range(0, n, batch_size)])

        images, seconds = timed_samples(generate)
        results[name] = score_images(world.judge, images, prompts, reference)
        results[name]["seconds_per_image"] = seconds / n
    return results


def prompt_diversity(judge: Judge, images01: torch.Tensor, k: int) -> float:
    """Mean pairwise Euclidean distance between the judge features of the k images of each prompt (images grouped
    prompt by prompt: k of the first, k of the second, ...), averaged over the prompts."""
    if k < 2 or len(images01) % k:
        raise ValueError(f"prompt_diversity needs groups of k >= 2 images; got {len(images01)} images, k={k}.")
    features = judge.embed_images(images01)
    groups = features.view(-1, k, features.shape[-1])
    return float(torch.cdist(groups, groups).sum((1, 2)).mean() / (k * (k - 1)))


def sample_diversity(world: "ShapesWorld", runs: dict[str, Callable[[list[str], torch.Generator], torch.Tensor]],
                     prompts: list[str], k: int = 8, seed: int = 0, batch_size: int = 100) -> dict:
    """{"reference": prompt_diversity of k real renders of each prompt (fresh jitter), name: each generator's
    prompt_diversity on k samples of each prompt (evaluation seed `seed`'s noise) divided by the reference}: 1 is as
    varied as the world's own scenes of one caption, 0 one image per prompt whatever the noise."""
    repeated = [p for p in prompts for _ in range(k)]
    reference = prompt_diversity(world.judge, reference_images(repeated, seed), k)
    out = {"reference": reference}
    for name, run in runs.items():
        g = eval_generator(seed)
        images = torch.cat([run(repeated[i : i + batch_size], g) for i in range(0, len(repeated), batch_size)])
        out[name] = prompt_diversity(world.judge, images, k) / reference
    return out


def base_generators(world: "ShapesWorld") -> dict:
    """The world's own rows: teacher (its default sampling), student base at its default steps, and the
    one-step student base (t = 999, cfg 1)."""
    return {
        "teacher": lambda p, g: world.decode_teacher(world.sample_teacher(p, generator=g)),
        "student_base": lambda p, g: world.decode_student(world.sample_student(p, generator=g)),
        "student_base_one_step": lambda p, g: world.decode_student(world.sample_student(p, generator=g, steps=1,
                                                                                        cfg=1.0)),
    }


def evaluate_world(world: "ShapesWorld", n: int = 500, seed: int = 0, batch_size: int = 100) -> dict:
    """Teacher, student base and one-step student base (`base_generators`) on n held-out prompts with evaluation
    seed `seed`. Adds seconds per image."""
    return evaluate_generators(world, base_generators(world), n, seed, batch_size)


def select_cfg(world: "ShapesWorld", who: str, choices: tuple[float, ...], n: int = 100, seed: int = 0,
               tolerance: float = 0.02) -> tuple[float, dict]:
    """The smallest CFG scale of `who` ('teacher' or 'student') whose prompt accuracy on n *validation* prompts
    is within `tolerance` of the best (at 100 prompts one sample is 0.01: smaller differences are noise, and a
    lower CFG keeps more diversity), at the world's sampling steps. Tuned on validation prompts, never on the test
    prompts the tables are measured on. Returns (chosen, {cfg: {'accuracy', 'fd'}})."""
    prompts = sample_scenes(n, "validation", seed).captions()
    reference = reference_images(prompts, seed + 1)
    sample, decode = ((world.sample_teacher, world.decode_teacher) if who == "teacher"
                      else (world.sample_student, world.decode_student))
    scores = {}
    for cfg in choices:
        images = decode(sample(prompts, generator=torch.Generator().manual_seed(30_000 + int(seed)), cfg=cfg))
        r = score_images(world.judge, images, prompts, reference)
        scores[cfg] = {"accuracy": r["accuracy"], "fd": round(r["fd"], 2)}
    best = max(s["accuracy"] for s in scores.values())
    return min(c for c in choices if scores[c]["accuracy"] >= best - tolerance - 1e-6), scores
