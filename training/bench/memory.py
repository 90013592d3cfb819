"""`python -m training.bench.memory`: the estimated peak memory of distillation and Bridge training at real size, per
phase, for the teachers x students x settings grid (training/memory.py explains the method).

    python -m training.bench.memory                    the table (from the shipped profiles; missing ones computed)
    python -m training.bench.memory --json rows.json   also the rows as JSON (teacher, student, batch, settings,
                                                       phases in GiB, peak_gib, ...)
    python -m training.bench.memory --cards            the settings that fit 24 / 48 / 80 GB cards (plan chooser)
    python -m training.bench.memory --validate         a real CPU distillation step (mid-size world): estimated
                                                       against measured peak
    python -m training.bench.memory --regenerate       measure the grid's profiles anew into memory_profiles.json
                                                       (fake tensors: minutes per real-size profile on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

TABLE_TEACHERS = ("sd35_medium", "sd35_large", "flux_dev")
CARDS_GB = (24, 48, 80)  # marketed GB; the budget is what such a card reports free, about 0.93 x GB in GiB
FREE_GIB = {24: 22.0, 48: 44.5, 80: 74.5}  # free after the driver's reservation (24 GB card: ~22.1 GiB usable)


def base_settings(teacher: str, lora: bool, kind: str = "distill"):
    from ..memory import MemorySettings

    return MemorySettings(teacher=teacher, kind=kind, student_lora_rank=64 if lora else 0, batch_size=4)


def grid(teacher: str, lora: bool) -> list:
    """The settings rows of the table for one teacher and student: the request, then each memory option in the plan
    chooser's order on top of the previous ones (the features tap shown beside the image tap)."""
    from ..memory import plan_ladder

    s = base_settings(teacher, lora)
    rows = [("as requested (node defaults)", s)]
    changes = []
    for cand, what in plan_ladder(s):
        changes.append(what)
        rows.append(("+ " + what, cand))
        if what == "gradient checkpointing on":
            rows.append(("+ features tap (a features-tap Bridge)", replace(cand, tap="features")))
    return rows


def profile_settings() -> list:
    """The settings whose fake-tensor profiles are shipped, most important first (each row of the table reuses one:
    storage, offload, optimizer and accumulation are applied analytically)."""
    out = []
    for ckpt, lora, tap in ((True, False, "image"), (True, True, "image"), (False, False, "image"),
                            (True, False, "features"), (True, True, "features"), (False, True, "image")):
        for t in ("sd35_medium", "flux_dev", "sd35_large"):
            out.append(replace(base_settings(t, lora), gradient_checkpointing=ckpt, tap=tap))
    for t in TABLE_TEACHERS:
        for ckpt, tap in ((True, "image"), (True, "features"), (False, "image")):
            out.append(replace(base_settings(t, False, "bridge"), gradient_checkpointing=ckpt, tap=tap))
    return out


def demo_settings() -> list:
    """The tiny demo worlds as `--demo` runs them on a CPU (their preflight with --memory auto reads these)."""
    from ..memory import MemorySettings

    return [MemorySettings(teacher="tiny", batch_size=2, resolution=64, device="cpu"),
            MemorySettings(teacher="tiny", kind="bridge", batch_size=4, resolution=64, device="cpu"),
            MemorySettings(teacher="tiny_flux", kind="bridge", batch_size=4, resolution=64, device="cpu")]


def regenerate(only: str | None = None, log=print, reverse: bool = False) -> None:
    """Measure the profiles (demo worlds first, then the real sizes in profile_settings' order) and write them to
    memory_profiles.json after each one, so an interrupted run keeps what it measured."""
    from .. import memory

    path = memory.PROFILES_FILE
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != memory.PROFILE_VERSION:
            data = {}
    except (OSError, ValueError):
        data = {}
    data = {"version": memory.PROFILE_VERSION, "profiles": data.get("profiles", {})}
    todo = demo_settings() + profile_settings()
    if reverse:
        todo = todo[::-1]
    for s in todo:
        keys = [memory._profile_key(s), f"encoding|{s.teacher}|{s.device}"]
        if only and only not in keys[0]:
            continue
        for key, fn in ((keys[0], memory.measure_profile), (keys[1], memory.measure_encoding)):
            if key in data["profiles"] and not only:
                continue
            t0 = time.perf_counter()
            measured = fn(s)
            try:  # another --regenerate may have written meanwhile: merge into what is there now
                with open(path, encoding="utf-8") as f:
                    now = json.load(f)
                if now.get("version") == memory.PROFILE_VERSION:
                    data["profiles"].update(now.get("profiles", {}))
            except (OSError, ValueError):
                pass
            data["profiles"][key] = measured
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            log(f"{key}: measured in {time.perf_counter() - t0:.0f} s")


def table_rows(compute: bool = True) -> list:
    from ..memory import estimate

    rows = []
    for teacher in TABLE_TEACHERS:
        for lora in (False, True):
            for label, s in grid(teacher, lora):
                e = estimate(s, compute=compute)
                if e is None:
                    continue
                row = e.row()
                row["label"] = label
                rows.append(row)
    return rows


def format_table(rows: list) -> str:
    from ..memory import DISTILL_PHASES, PHASE_TITLES

    phases = [p for p in DISTILL_PHASES if any(p in r["phases"] for r in rows)]
    head = f"{'teacher':<12} {'student':<8} {'settings':<44} " + " ".join(f"{PHASE_TITLES[p][:11]:>11}"
                                                                           for p in phases)
    lines = [head + f" {'peak':>6} {'cost':>5}"]
    for r in rows:
        cells = " ".join(f"{r['phases'][p]:>11.1f}" if p in r["phases"] else f"{'-':>11}" for p in phases)
        lines.append(f"{r['teacher']:<12} {r['student']:<8} {r['label'][:44]:<44} {cells} {r['peak_gib']:>6.1f} "
                     f"{r['step_cost']:>5.2f}")
    return "\n".join(lines)


def cards(compute: bool = True) -> list:
    """For each card x teacher x student: the plan the chooser picks from the node's defaults (batch 4)."""
    from ..memory import choose_plan

    out = []
    for gb in CARDS_GB:
        for teacher in TABLE_TEACHERS:
            for lora in (False, True):
                s = base_settings(teacher, lora)
                plan, _ = choose_plan(s, FREE_GIB[gb], compute=compute)
                if plan is None:
                    continue
                out.append({"card_gb": gb, "budget_gib": FREE_GIB[gb], "teacher": teacher,
                            "student": "lora" if lora else "full", "fits": plan.fits,
                            "plan": "; ".join(plan.changes) or "as requested", "peak_gib": round(plan.estimate.peak_gib, 1),
                            "peak_phase": plan.estimate.peak_phase, "step_cost": round(plan.cost, 2),
                            "host_gib": round(plan.estimate.host_gib, 1), "hint": plan.hint})
    return out


def cards_markdown(plans: list) -> str:
    """The cards' plans as the Markdown table of docs/benchmarks.md and docs/comfyui.md."""
    lines = ["| card | teacher | student | settings that fit (batch 4) | peak GiB (phase) | step cost |",
             "|---|---|---|---|---|---|"]
    for c in plans:
        what = c["plan"] if c["fits"] else f"does not fit (best: {c['plan']})"
        hint = f" — {c['hint']}" if c["hint"] and c["fits"] else ""
        lines.append(f"| {c['card_gb']} GB | {c['teacher']} | {c['student']} | {what}{hint} | "
                     f"{c['peak_gib']} ({c['peak_phase']}) | x{c['step_cost']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the table's rows (and the cards' plans) as JSON here")
    p.add_argument("--cards", action="store_true", help="print the plans that fit 24 / 48 / 80 GB cards")
    p.add_argument("--markdown", action="store_true", help="with --cards: as the docs' Markdown table")
    p.add_argument("--validate", action="store_true", help="estimated vs measured peak of a real CPU step")
    p.add_argument("--regenerate", action="store_true", help="measure the shipped profiles anew")
    p.add_argument("--only", help="with --regenerate: only profiles whose key contains this text")
    p.add_argument("--reverse", action="store_true", help="with --regenerate: the list from its end (a second process)")
    p.add_argument("--no-compute", action="store_true", help="only rows whose profiles are shipped or cached")
    args = p.parse_args(argv)
    if args.regenerate:
        regenerate(args.only, reverse=args.reverse)
        return 0
    if args.validate:
        from ..memory import MemorySettings, validate

        results = [validate(MemorySettings(teacher="mid", batch_size=4, resolution=128, device="cpu",
                                           gradient_checkpointing=ckpt)) for ckpt in (False, True)]
        worst = max(abs(r["ratio"] - 1) for r in results)
        print(f"worst deviation {worst:.1%} (target: within 10 %)")
        return 0 if worst <= 0.10 else 1
    rows = table_rows(compute=not args.no_compute)
    print(format_table(rows))
    print("GiB per phase on the GPU (1.10 x allocated + 0.5 GiB CUDA context); cost: relative step time (prior).")
    plans = cards(compute=not args.no_compute) if (args.cards or args.json) else []
    if args.cards and args.markdown:
        print(cards_markdown(plans))
    elif args.cards:
        for c in plans:
            print(f"{c['card_gb']} GB  {c['teacher']:<12} {c['student']:<5} "
                  f"{'fits' if c['fits'] else 'DOES NOT FIT'}: {c['plan']} -> {c['peak_gib']} GiB "
                  f"({c['peak_phase']}), cost x{c['step_cost']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "cards": plans}, f, indent=1)
        print(f"rows: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
