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

Record the printed figures in docs/benchmarks.md with the GPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# (gradient checkpointing, student LoRA rank): the distillation variants measured.
DISTILL_VARIANTS = ((False, 0), (True, 0), (False, 64), (True, 64))


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
    total = time.perf_counter() - t0
    log(f"bench_gpu done in {total:.0f} s (bridge {bridge_s:.0f} s, distillation {total - bridge_s:.0f} s)")
    return {"device": device, "reduced": reduced, "torch": torch.__version__, "bridge": rows, "distill": distill,
            "wall_s": total}


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
