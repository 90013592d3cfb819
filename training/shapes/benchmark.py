"""The shapes-world benchmark: does cross-space distillation transfer the teacher's knowledge?

    python -m training.shapes.benchmark --seeds 0 1 2 --out runs/shapes-benchmark   # writes docs/shapes_benchmark.md

Rows, all on the same held-out prompts and evaluation seeds (one evaluation seed per training seed):
  teacher (its 20 steps + CFG)      student base (25 DDIM steps + CFG)      student base, one step (t = 999)
  student base, one step at the distilled students' input timestep (their starting point; if not 999)
  same-space: one-step student distilled from the student base itself (SwiftBrush/DMD style: the eps UNet as an
              exact rectified-flow teacher, `adapters.EpsFlowTeacher`, identity "Bridge")
  cross-space: distilled from the teacher through the trained Bridge (the method)
  ablations: a Bridge trained without attention fidelity (attn_weight 0); the exact round trip
             E_t(upsample(D_s(z))) in place of the Bridge (`adapters.RoundTripBridge`)
Columns: prompt accuracy, Fréchet distance (judge features), training wall time, latency; mean ± std over seeds.
Every distilled row uses the same Distiller, DMD loss, schedule and settings as the default run
(`training.shapes.run`), only the teacher / Bridge differ.

Each (seed, row) is one task, run in up to --jobs worker processes with --threads torch threads each; a task's
result is saved as <out>/seed<S>/<row>/result.json, so an interrupted benchmark resumes where it stopped
(--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from ..loop import write_json
from .run import DEFAULTS, QUICK, add_setting_arguments

ROWS = ("teacher", "student_base", "student_base_one_step", "student_base_start", "same_space", "cross_space",
        "cross_space_no_attn", "round_trip", "student_vae_ceiling")
TASKS = ("base", "same_space", "cross_space", "cross_space_no_attn", "round_trip")  # "base": the 3 untrained rows
DEFAULT_DOC = os.path.join("docs", "shapes_benchmark.md")
# The hand-written analysis of the result (what was tried and why the table looks as it does), linked from the table.
INVESTIGATION = "shapes_investigation.md"


def _result_path(out: str, seed: int, task: str) -> str:
    return os.path.join(out, f"seed{seed}", task, "result.json")


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
    if task == "base":
        rows = dict(base_generators(world), **shapes_run.start_rows(world, settings),
                    student_vae_ceiling=student_vae_ceiling(world))
    else:
        bridge = None
        if task in ("cross_space", "cross_space_no_attn"):
            images = os.path.join(out, "data", f"seed{seed}")
            attn = settings["attn_weight"] if task == "cross_space" else 0.0
            bridge, res = shapes_run.train_bridge(world, os.path.join(folder, "bridge"), images, settings, seed,
                                                  attn_weight=attn)
            if bridge is None:
                raise KeyboardInterrupt(f"{task} seed {seed} stopped; run the benchmark again to resume it")
            training_s["bridge"] = res["wall_s"]
            extra["bridge_val"] = (res.get("last_val") or {}).get("val")
        elif task == "round_trip":
            bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space,
                                     world.k)
        mode = "same" if task == "same_space" else "cross"
        unet, res = shapes_run.distill_student(world, os.path.join(folder, "distill"), mode, settings, seed,
                                               bridge=bridge)
        if unet is None:
            raise KeyboardInterrupt(f"{task} seed {seed} stopped; run the benchmark again to resume it")
        training_s["distill"] = res["wall_s"]
        extra["distill_last_metrics"] = res.get("last_metrics")
        extra["guidance"] = res["guidance"]
        rows = {task: shapes_run.student_generator(world, unet, settings["student_timestep"])}
    evaluation = evaluate_generators(world, rows, n=settings["eval_samples"], seed=seed,
                                     batch_size=settings["eval_batch"])
    result = {"task": task, "seed": seed, "threads": threads, "rows": {
        name: dict(evaluation[name], training_s=sum(training_s.values()) if training_s else None)
        for name in rows}, "training_s": training_s, **extra}
    write_json(_result_path(out, seed, task), result)
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def aggregate(results: list[dict], seeds: list[int]) -> dict:
    """{row: {metric: {"mean", "std", "values"}}} over seeds for accuracy, fd, training_s, latency_ms."""
    table: dict = {}
    for row in ROWS:
        per_seed = []
        for seed in seeds:
            for r in results:
                if r["seed"] == seed and row in r["rows"]:
                    per_seed.append(r["rows"][row])
        if not per_seed:
            continue
        entry = {}
        for metric, get in (("accuracy", lambda r: r["accuracy"]), ("fd", lambda r: r.get("fd")),
                            ("training_s", lambda r: r.get("training_s")),
                            ("latency_ms", lambda r: r["seconds_per_image"] * 1000)):
            vals = [get(r) for r in per_seed]
            if any(v is None for v in vals):
                entry[metric] = None
                continue
            m, sd = _mean_std(vals)
            entry[metric] = {"mean": m, "std": sd, "values": vals}
        for attr in ("shape", "colour", "background", "position"):
            entry[attr] = _mean_std([r[attr] for r in per_seed])[0]
        table[row] = entry
    return table


def _pm(entry, digits: int) -> str:
    if entry is None:
        return "—"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def findings(table: dict) -> list[str]:
    """Plain statements comparing the rows the issue's expectation is about (computed, not written by hand)."""
    out = []

    def acc(row):
        return table[row]["accuracy"]

    def compare(a, b, what):
        if a not in table or b not in table:
            return
        da = acc(a)["mean"] - acc(b)["mean"]
        noise = math.sqrt(acc(a)["std"] ** 2 + acc(b)["std"] ** 2)
        verdict = ("clearly higher" if da > 2 * noise and da > 0.02 else
                   "clearly lower" if -da > 2 * noise and -da > 0.02 else "within noise")
        fa, fb = table[a].get("fd"), table[b].get("fd")
        fd = (f"; FD {fa['mean']:.2f} vs {fb['mean']:.2f}" if fa and fb else "")
        out.append(f"- {what}: prompt accuracy {acc(a)['mean']:.3f} vs {acc(b)['mean']:.3f} "
                   f"({da:+.3f}, {verdict}){fd}.")

    compare("cross_space", "same_space", "Cross-space vs same-space distillation")
    compare("cross_space", "student_base_one_step", "Cross-space vs the one-step student base")
    compare("same_space", "student_base_one_step", "Same-space vs the one-step student base")
    compare("cross_space", "student_base_start", "Cross-space vs its starting point (the base at the student's timestep)")
    compare("same_space", "student_base_start", "Same-space vs its starting point (the base at the student's timestep)")
    compare("cross_space", "cross_space_no_attn", "Bridge with vs without attention fidelity")
    compare("cross_space", "round_trip", "Trained Bridge vs the exact round trip")
    compare("cross_space", "teacher", "Cross-space student vs its teacher")
    return out


def markdown(summary: dict, notes: str | None = None) -> str:
    s = summary
    table, labels = s["table"], s["row_labels"]
    lines = [
        "# Shapes-world benchmark" + (" (QUICK: numbers are meaningless)" if s["quick"] else ""),
        "",
        f"Regenerate with `{s['command']}`. World `{s['world']}`; seeds {s['seeds']} (each seed: its own Bridge and "
        f"distillation runs and its own evaluation seed); {s['settings']['eval_samples']} held-out prompts per seed; "
        f"{s['jobs']} tasks at once with {s['threads']} CPU thread(s) each; benchmark wall time "
        f"{s['wall_s'] / 60:.1f} min (all its invocations).",
        "",
        "| row | prompt accuracy | Fréchet distance (judge) | training wall time (s) | latency (ms/image) |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        if row not in table:
            continue
        e = table[row]
        train = (_pm(e["training_s"], 0) if e["training_s"] else
                 "— (pretrained)" if row in ("teacher", "student_base", "student_base_one_step", "student_base_start")
                 else "—")
        lines.append(f"| {labels[row]} | {_pm(e['accuracy'], 3)} | {_pm(e['fd'], 2)} | {train} | "
                     f"{_pm(e['latency_ms'], 2)} |")
    st = s["settings"]
    lines += [
        "",
        "Mean ± standard deviation over seeds. Training wall time: Bridge training + distillation (the round-trip "
        "and same-space rows need no Bridge). Latency: generation + decoding per image at batch "
        f"{st['eval_batch']}.",
        "",
        f"Settings: Bridge {st['bridge_steps']} steps at batch {st['bridge_batch']} on {st['n_images']} rendered "
        f"images (projector width {st['projector_width']}, depth {st['projector_depth']}, attention weight "
        f"{st['attn_weight']}); distillation {st['distill_steps']} student steps at batch {st['distill_batch']}, "
        f"DMD loss, {st['fake_updates']} fake-score updates per step (LoRA rank {st['fake_rank']}, lr "
        f"{st['fake_lr']}), student lr {st['student_lr']}, real-score CFG = each teacher's own sampling CFG.",
        "",
        "Per-attribute accuracy (shape / colour / background / position), mean over seeds:",
        "",
    ]
    for row in ROWS:
        if row in table:
            e = table[row]
            lines.append(f"- {labels[row]}: {e['shape']:.3f} / {e['colour']:.3f} / {e['background']:.3f} / "
                         f"{e['position']:.3f}")
    lines += ["", "## Findings (computed from the table)", ""] + findings(table)
    lines += ["", f"Why the table looks as it does, and what was tried: [{INVESTIGATION}]({INVESTIGATION})."]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def benchmark(seeds: list[int], out: str, world_dir: str | None = None, doc: str = DEFAULT_DOC, jobs: int = 2,
              threads: int = 1, quick: bool = False, fresh: bool = False, notes: str | None = None,
              command: str = "python -m training.shapes.benchmark", **overrides) -> dict:
    import multiprocessing as mp
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from . import models
    from . import run as shapes_run

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
    if not seeds:
        raise ValueError("Give at least one seed (--seeds 0 1 2).")
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1; got jobs={jobs}, threads={threads}.")
    settings = dict(QUICK if quick else DEFAULTS, **overrides)
    world_dir = world_dir or models.DEFAULT_DIR
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    world = models.load_shapes_world(world_dir, register=False)  # fails early, with the rebuild hint
    settings_path = os.path.join(out, "settings.json")
    identity = {"world": os.path.abspath(world_dir), "settings": settings}
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            if json.load(f) != identity:
                raise ValueError(f"{out} holds results of a benchmark with other settings or another world; use "
                                 "another --out or --fresh.")
    write_json(settings_path, identity)

    t0 = time.perf_counter()
    for seed in seeds:  # rendered once here, so parallel tasks never write the same folder
        shapes_run.render_images(os.path.join(out, "data", f"seed{seed}"), settings["n_images"], seed)
    results, todo = [], []
    for seed in seeds:
        for task in TASKS:
            path = _result_path(out, seed, task)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    results.append(json.load(f))
            else:
                todo.append((task, seed))
    # Longest first (Bridge + distillation), so the workers finish together.
    todo.sort(key=lambda ts: (ts[0] not in ("cross_space", "cross_space_no_attn"), ts[0] == "base", ts[1]))
    print(f"[benchmark] {len(results)} task(s) already done, {len(todo)} to run with {jobs} job(s)", flush=True)
    if jobs == 1:
        for task, seed in todo:
            print(f"[benchmark] {task} seed {seed}", flush=True)
            results.append(run_task(task, seed, out, world_dir, settings, threads))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_task, task, seed, out, world_dir, settings, threads): (task, seed)
                       for task, seed in todo}
            for fut in futures:
                results.append(fut.result())
                task, seed = futures[fut]
                print(f"[benchmark] done: {task} seed {seed}", flush=True)
    # Summed over invocations, so a resumed (or re-aggregated) benchmark reports what it cost in all.
    wall_path = os.path.join(out, "wall_s.json")
    wall = time.perf_counter() - t0
    if os.path.exists(wall_path):
        with open(wall_path, encoding="utf-8") as f:
            wall += float(json.load(f)["wall_s"])
    write_json(wall_path, {"wall_s": wall})

    summary = {
        "format": "shapes-benchmark", "quick": quick, "world": os.path.abspath(world_dir), "seeds": seeds,
        "jobs": jobs, "threads": threads, "settings": settings, "wall_s": wall, "command": command,
        "row_labels": {row: shapes_run.row_label(row, world, settings) for row in ROWS},
        "table": aggregate(results, seeds), "results": results,
    }
    write_json(os.path.join(out, "benchmark.json"), summary)
    text = markdown(summary, notes)
    if doc:
        os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
        with open(doc, "w", encoding="utf-8") as f:
            f.write(text)
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
    add_setting_arguments(parser, DEFAULTS, QUICK)
    args = parser.parse_args(argv)
    notes = None
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            notes = f.read()
    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    command = "python -m training.shapes.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    benchmark(args.seeds, args.out, args.world, doc=args.doc, jobs=args.jobs, threads=args.threads, quick=args.quick,
              fresh=args.fresh, notes=notes, command=command.strip(), **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
