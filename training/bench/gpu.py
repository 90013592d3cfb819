"""The GPU measurement in one command (issue 13): under 8 minutes on one H100/H200-class GPU.

    python -m training.bench.gpu                        # CUDA: real sizes, bf16
    python -m training.bench.gpu --reduced              # tiny sizes on the CPU, seconds (what CI runs)
    python -m training.bench.gpu --json gpu_bench.json

1. bench.bridge at real size (SD1.5 64 x 64 latent -> SD3.5 128 x 128) in bf16: the features Bridge, the image
   Bridge and the exact round trip, forward and forward+backward, peak memory, parameters, FLOPs and ratios.
2. bench.distill --sizes real (SD1.5 UNet + VAE, SD3.5 Medium at 1024 px, random init): one distillation step
   with and without gradient checkpointing, each with the full student UNet and with a student LoRA; time per
   step, peak memory and the share of the step outside the teacher (everything but the real/fake teacher
   forwards and the fake-score update).
3. What a user's run needs (issue 23): SD3.5 Medium and Flux-dev teachers built in bf16 from the shipped configs
   (random init), the node's default batch (4), a full SD1.5 UNet student, both Bridge taps: the loading peak (all
   models on the GPU, fake LoRA added, optimizers made), the run's allocated and reserved peaks
   (torch.cuda.max_memory_allocated / max_memory_reserved), s/step, and the estimator's figure beside each
   measured one with their ratio (training/memory.py's `estimate`; "n/a" where it is absent). SD3.5 Medium runs
   as the node's defaults; Flux-dev (22 GiB in bf16) runs with the frozen teacher stored in fp8 (--teacher-storage
   fp8, computed in bf16) and gradient checkpointing, which fit it on an 80 GB card at batch 4.

Record the printed figures in docs/benchmarks.md with the GPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# (gradient checkpointing, student LoRA rank): the distillation variants measured.
DISTILL_VARIANTS = ((False, 0), (True, 0), (False, 64), (True, 64))
# Part 3, a user's run: (teacher family, settings), each with both taps. Flux-dev needs fp8 storage to fit 80 GB.
MEMORY_ROWS = (("sd35_medium", dict(teacher_storage="bf16", gradient_checkpointing=False)),
               ("flux_dev", dict(teacher_storage="fp8", gradient_checkpointing=True)))
NODE_BATCH = 4  # the Distill Student node's default batch
TEXT_SHAPES = {"sd35_medium": ((77 + 256, 4096), 2048), "flux_dev": ((512, 4096), 768)}  # (tokens, width), pooled


def _bridge_args(reduced: bool) -> dict:
    from ..models.tiny import TINY_VAE
    from . import bridge as bench_bridge

    if reduced:
        return dict(sizes=(4,), devices=("cpu",), repeats=1, dtype="fp32",
                    student_config=dict(TINY_VAE, latent_channels=4),
                    teacher_config=dict(TINY_VAE, latent_channels=16, use_quant_conv=False,
                                        use_post_quant_conv=False),
                    projector_kwargs=dict(width=32, depth=2))
    return dict(sizes=(64,), devices=("cuda",), repeats=3, dtype="bf16", student_config=bench_bridge.SD15_VAE_CONFIG,
                teacher_config=bench_bridge.SD3_VAE_CONFIG)


def _teacher(family: str, reduced: bool, storage: str, device):
    """A random-init teacher of the shipped config (tiny on --reduced), built in bf16 on `device`, fp8-stored on
    request (diffusers' layerwise casting, as --teacher-storage fp8 loads it)."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from ..memory import default_dtype
    from ..models import loading, tiny
    from ..teachers import make_teacher

    flux = family.startswith("flux")
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if reduced:
        model = tiny.tiny_flux_transformer() if flux else tiny.tiny_sd3_transformer("sd35")
    else:
        cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
        cfg = cls.load_config(loading.config_dir(family), subfolder="transformer")
        with torch.device(device), default_dtype(torch.bfloat16):
            model = cls.from_config(cfg)
    model = model.to(device=device, dtype=compute).requires_grad_(False).eval()
    if storage == "fp8":
        loading.store_fp8(model, compute)
    return make_teacher(family, model)


def _estimate(family: str, tap: str, settings: dict, batch: int, compute: bool = True):
    """The estimator's figures {"peak_gib", "loading_gib"} for this row (training/memory.py, on CUDA's terms: plain
    DMD steps, no regression pairs), None where it has none (compute False: only cached or shipped profiles), or
    {"error"} with its reason."""
    from ..memory import MemorySettings, estimate

    s = MemorySettings(teacher=family, kind="distill", batch_size=batch,
                       gradient_checkpointing=bool(settings.get("gradient_checkpointing")), tap=tap,
                       teacher_storage=settings.get("teacher_storage", "bf16"), regression=False, device="cuda")
    try:
        est = estimate(s, compute=compute)
    except Exception as e:  # noqa: BLE001 (a figure beside the measurement, never the reason the bench fails)
        return {"error": f"{type(e).__name__}: {e}"}
    if est is None:
        return None
    return {"peak_gib": est.peak_gib, "loading_gib": est.phases.get("loading")}


def memory_row(family: str, tap: str, settings: dict, reduced: bool, batch: int, steps: int, warmup: int) -> dict:
    """One user's-run row: build the models on the device, prepare the Distiller (the loading peak), run `warmup` +
    `steps` student steps (s/step and the run's peaks). GiB throughout."""
    import tempfile

    import torch

    from .._bridge import model as bridge_model
    from ..distill import DistillConfig, DistillModels, Distiller
    from ..models import tiny
    from ..models.text import TextCond
    from ..student import OneStepStudent
    from . import distill as bench_distill
    from .bridge import SD15_VAE_CONFIG

    device = torch.device("cpu" if reduced else "cuda")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    teacher = _teacher(family, reduced, settings["teacher_storage"], device)
    with torch.device(device):
        if reduced:
            unet, vae = tiny.tiny_unet(), tiny.tiny_vae(4)
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            unet, vae = UNet2DConditionModel(**bench_distill.SD15_UNET), AutoencoderKL(**SD15_VAE_CONFIG)
        vae = vae.requires_grad_(False).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        bridge = bridge_model.Bridge.create("sd15", "flux" if family.startswith("flux") else "sd3", k=2,
                                            student_vae=vae, tap=tap, **(dict(width=32, depth=2) if reduced else {}))
    (tokens, width), pooled = ((16, 64), 64 if family.startswith("sd3") else 32) if reduced else TEXT_SHAPES[family]
    s_width = 32 if reduced else 768
    models = DistillModels(
        student=OneStepStudent(unet), bridge=bridge, teacher=teacher,
        encode_teacher=lambda p: TextCond(torch.randn(len(p), tokens, width), torch.randn(len(p), pooled)),
        encode_student=lambda p: TextCond(torch.randn(len(p), 77, s_width)))
    if device.type == "cuda":  # the build (random init, then casts) is not how a user loads: measure from here
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        cfg = DistillConfig(out_dir=out, prompts=[f"prompt {i}" for i in range(8)], batch_size=batch,
                            resolution=64 if reduced else 512, fake_rank=4 if reduced else 64,
                            fake_updates=1 if reduced else 5, resume=False, cpu=reduced,
                            gradient_checkpointing=settings["gradient_checkpointing"],
                            regression_n=0, regression_warmup_steps=0)  # the DMD step is what is measured
        d = Distiller(cfg, models)
        d.prepare()
        load_s = time.perf_counter() - t0
        loading = _peaks(device)
        for step in range(warmup):
            d.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        skipped = sum(d.train_step(step) is None for step in range(warmup, warmup + steps))
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t1) / steps
    run = _peaks(device)
    row = {"teacher": family, "tap": tap, "batch": batch, "student": "full", "settings": settings, "steps": steps,
           "step_s": step_s, "load_s": load_s, "nan_steps": skipped, "loading_allocated_gib": loading[0],
           "loading_reserved_gib": loading[1], "allocated_gib": run[0], "reserved_gib": run[1]}
    est = _estimate(family, tap, settings, batch, compute=not reduced)
    row["estimate"] = est
    del d, models, teacher, unet, vae, bridge
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _peaks(device) -> tuple[float, float]:
    """(allocated, reserved) peaks in GiB; the CPU has one figure, the process's peak RSS (both)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rss, rss


def _ratio(measured, est) -> str:
    return f"{measured / est:.2f}" if est else "n/a"


def format_memory(rows: list[dict]) -> str:
    head = (f"{'teacher, settings':<34}{'tap':>9}{'batch':>6}{'load GiB':>10}{'est':>7}{'ratio':>7}"
            f"{'alloc GiB':>11}{'reserved':>10}{'est':>7}{'ratio':>7}{'s/step':>8}")
    lines = [head]
    for r in rows:
        st = r["settings"]
        name = (f"{r['teacher']}, {st['teacher_storage']}{', ckpt' if st['gradient_checkpointing'] else ''}")
        est = r["estimate"] or {}
        pk, ld = est.get("peak_gib"), est.get("loading_gib")
        lines.append(f"{name:<34}{r['tap']:>9}{r['batch']:>6}{r['loading_allocated_gib']:>10.2f}"
                     f"{(f'{ld:.2f}' if ld else 'n/a'):>7}{_ratio(r['loading_allocated_gib'], ld):>7}"
                     f"{r['allocated_gib']:>11.2f}{r['reserved_gib']:>10.2f}{(f'{pk:.2f}' if pk else 'n/a'):>7}"
                     f"{_ratio(r['allocated_gib'], pk):>7}{r['step_s']:>8.2f}")
        if est.get("error"):
            lines.append(f"  estimator: {est['error']}")
        if r["nan_steps"]:
            lines.append(f"  {r['nan_steps']} timed step(s) skipped as non-finite (random weights): s/step too low")
    lines.append("ratio = measured / estimated. Loading = every model on the device, fake LoRA added, optimizers "
                 "made (the random-init build before it is not counted: a real file loads tensor by tensor).")
    return "\n".join(lines)


def run(reduced: bool, log=print) -> dict:
    import torch

    from . import bridge as bench_bridge
    from . import distill as bench_distill

    if not reduced and not torch.cuda.is_available():
        raise ValueError("No CUDA device: the real-size GPU measurement needs one. Use --reduced for the CPU version.")
    if reduced:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks the device for the distiller: keep it on the CPU
    t0 = time.perf_counter()
    device = "cpu" if reduced else torch.cuda.get_device_name()
    log(f"== bench_gpu: {'reduced sizes on the CPU' if reduced else 'real sizes on ' + device}, torch "
        f"{torch.__version__}")
    rows = bench_bridge.run_benchmark(log=lambda m: log(f"  {m}"), **_bridge_args(reduced))
    log(bench_bridge.format_table(rows))
    for line in bench_bridge.summary(rows):
        log(line)
    bridge_s = time.perf_counter() - t0
    distill = []
    size = "tiny" if reduced else "real"
    steps, warmup, fake_updates = (1, 0, 1) if reduced else (2, 1, 5)
    for checkpointing, lora in DISTILL_VARIANTS:
        t1 = time.perf_counter()
        r = bench_distill.bench(size, batch=1 if reduced else 2, fake_updates=fake_updates, steps=steps, warmup=warmup,
                                checkpointing=checkpointing, student_lora_rank=lora if not reduced else min(lora, 4))
        r["wall_s"] = time.perf_counter() - t1
        distill.append(r)
        log(bench_distill.format_table(r))
        if torch.cuda.is_available() and not reduced:
            torch.cuda.empty_cache()
    log(f"{'variant':<42}{'s/step':>9}{'peak GB':>9}{'outside teacher':>17}")
    for r in distill:
        name = (f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
                f"{'LoRA ' + str(r['student_lora_rank']) if r['student_lora_rank'] else 'full UNet'}")
        log(f"{name:<42}{r['step_s']:>9.3f}{r['peak_memory_gb']:>9.2f}{100 * r['non_teacher_share']:>16.1f}%")
    t2 = time.perf_counter()
    memory = []
    for family, settings in MEMORY_ROWS:
        for tap in ("image", "features"):
            t3 = time.perf_counter()
            r = memory_row(family, tap, settings, reduced, batch=2 if reduced else NODE_BATCH, steps=1,
                           warmup=0 if reduced else 1)
            r["wall_s"] = time.perf_counter() - t3
            memory.append(r)
            log(f"  {family} {tap}: {r['allocated_gib']:.2f} GiB allocated, {r['step_s']:.2f} s/step "
                f"({r['wall_s']:.0f} s)")
    log(format_memory(memory))
    total = time.perf_counter() - t0
    log(f"bench_gpu done in {total:.0f} s (bridge {bridge_s:.0f} s, distillation {t2 - bridge_s - t0:.0f} s, "
        f"user's runs {total - (t2 - t0):.0f} s)")
    return {"device": device, "reduced": reduced, "torch": torch.__version__, "bridge": rows, "distill": distill,
            "memory": memory, "wall_s": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="tiny sizes on the CPU (seconds): checks the script")
    p.add_argument("--json", metavar="OUT.json", help="also write every figure as JSON")
    args = p.parse_args(argv)
    try:
        result = run(args.reduced, log=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
