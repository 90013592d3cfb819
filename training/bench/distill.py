"""Benchmark: where the time of one distillation step goes.

    python -m training.bench.distill                          # tiny and mid sizes on CPU (+ real on CUDA)
    python -m training.bench.distill --sizes real --device cuda --steps 5
    python -m training.bench.distill --sizes tiny --json bench.json

Runs the trainer's own step (`Distiller.train_step`) on random-init models of the real classes (speed and
memory do not depend on the weights) with a timer around its parts:

    student_forward   SD1.5 UNet once at t = 999
    decode_project    frozen SD1.5 VAE decoder + projector (the Bridge)
    real_teacher      frozen teacher x0 with guidance (SD3.5: two forwards, true CFG)
    fake_teacher      the fake-score LoRA's x0
    backward          DMD loss backward through Bridge and UNet + student optimizer step
    fake_samples      fresh student samples for fake updates 2..N (UNet + Bridge, no grad)
    fake_update       fake-score flow-matching forward + backward + optimizer step (N per student step)

and prints seconds per step, the share of each part, and peak memory (CUDA: max_memory_allocated; CPU:
the process's peak RSS). The recipe's other phases are timed beside it (`--no-pairs` skips them): making one batch
of teacher-corrected regression pairs (training/pairs.py at the library's settings: 25 student DDIM steps with CFG,
20 teacher steps with CFG from s0, the teacher VAE decode and the student VAE encode) and a regression warm-up step,
with what the library's default recipe (DistillConfig: 800 pairs, 2000 warm-up steps, 2000 DMD steps) would take at
this batch. Without CUDA the real size is broken down in FLOPs instead, counted on the meta
device (`--flops`). Target (issue 3): everything except the teacher forwards and the fake update is at
most 20% of a step at real sizes (SD1.5 512 px student, SD3.5 Medium at 1024 px).

Sizes: tiny (the test configs, 64 px student), mid (narrow SD1.5/SD3.5-shaped models, 128 px student), real
(SD1.5 UNet + VAE, SD3.5 Medium transformer, 512 px student; CUDA only: one CPU step takes hours).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch

TEACHER_PARTS = ("real_teacher", "fake_teacher", "fake_update")
PARTS = ("student_forward", "decode_project", "real_teacher", "fake_teacher", "backward", "fake_samples",
         "fake_update")

# Real SD1.5 UNet (UNet2DConditionModel defaults are SD1.5's except the text width).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
# Real SD3.5 Medium transformer.
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

SIZES = {
    # unet / vae / transformer configs, student resolution, text shapes, projector, fake LoRA rank
    "tiny": dict(resolution=64, student_text=(77, 32), teacher_text=(77 + 32, 64), pooled=64,
                 projector=dict(width=32, depth=2), fake_rank=8),
    "mid": dict(resolution=128, student_text=(77, 256), teacher_text=(77 + 64, 256), pooled=256,
                unet=dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256),
                vae=dict(block_out_channels=(32, 64, 128, 128)),
                transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                                 attention_head_dim=32, num_attention_heads=8, joint_attention_dim=256,
                                 caption_projection_dim=256, pooled_projection_dim=256, pos_embed_max_size=96,
                                 dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"),
                projector=dict(width=64, depth=3), fake_rank=16),
    "real": dict(resolution=512, student_text=(77, 768), teacher_text=(77 + 256, 4096), pooled=2048,
                 unet=SD15_UNET, vae={}, transformer=SD35_MEDIUM, projector={}, fake_rank=64),
}


class PhaseTimer:
    """Accumulates wall time per named part; synchronises CUDA at the edges so GPU work is attributed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def _teacher_vae(size: str):
    """An SD3.5-style 16-channel VAE of `size` (random init): what making regression pairs decodes with."""
    from diffusers import AutoencoderKL

    from ..models import tiny
    from .bridge import SD3_VAE_CONFIG

    if size == "tiny":
        return tiny.tiny_vae(16)
    return AutoencoderKL(**dict(SD3_VAE_CONFIG, **SIZES[size]["vae"]))


def _models(size: str, tap: str = "image"):
    """(unet, student VAE, SD3.5-style transformer, Bridge) of `size`, random init, on the current default device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from .._bridge import model as bridge_model
    from ..models import tiny
    from .bridge import SD15_VAE_CONFIG

    spec = SIZES[size]
    if size == "tiny":
        unet, vae, transformer = tiny.tiny_unet(), tiny.tiny_vae(4), tiny.tiny_sd3_transformer("sd35")
    else:
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**dict(SD15_VAE_CONFIG, **spec["vae"]))
        transformer = SD3Transformer2DModel(**spec["transformer"])
    bridge = bridge_model.Bridge.create("sd15", "sd3", k=2, student_vae=vae.requires_grad_(False), tap=tap,
                                        **spec["projector"])
    return unet, vae, transformer, bridge


def build(size: str, batch: int, fake_updates: int, out_dir: str, checkpointing: bool, student_lora_rank: int = 0,
          tap: str = "image"):
    """A Distiller over random-init models of `size` (teacher: SD3.5-style; Bridge with `tap`). On CUDA the models
    are created on the GPU (random init of SD3.5 Medium on a CPU takes a minute)."""
    from ..distill import DistillConfig, DistillModels, Distiller
    from ..models.text import TextCond
    from ..student import OneStepStudent
    from ..teachers import make_teacher

    spec = SIZES[size]
    torch.manual_seed(0)
    where = torch.device("cuda") if torch.cuda.is_available() else contextlib.nullcontext()
    with where:
        unet, vae, transformer, bridge = _models(size, tap)
    teacher = make_teacher("sd35_medium", transformer.requires_grad_(False).eval())

    def encode(shape, pooled):
        return lambda prompts: TextCond(prompt_embeds=torch.randn(len(prompts), *shape),
                                        pooled=torch.randn(len(prompts), pooled) if pooled else None)

    with where:
        teacher_vae = _teacher_vae(size).requires_grad_(False).eval()
    models = DistillModels(student=OneStepStudent(unet), bridge=bridge, teacher=teacher,
                           encode_teacher=encode(spec["teacher_text"], spec["pooled"]),
                           encode_student=encode(spec["student_text"], 0), teacher_vae=teacher_vae)
    # The DMD step alone (the pairs and the warm-up are timed on their own, see bench()).
    cfg = DistillConfig(out_dir=out_dir, prompts=[f"prompt {i}" for i in range(8)], batch_size=batch,
                        resolution=spec["resolution"], fake_rank=spec["fake_rank"], fake_updates=fake_updates,
                        resume=False, gradient_checkpointing=checkpointing, student_lora_rank=student_lora_rank,
                        regression_n=0, regression_warmup_steps=0)
    distiller = Distiller(cfg, models)
    if distiller.device.type == "cuda":  # frozen parts in bf16, the student trains in fp32 under autocast
        vae.to(distiller.device, torch.bfloat16)
        transformer.to(distiller.device, torch.bfloat16)
        teacher_vae.to(distiller.device, torch.bfloat16)
    return distiller


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_recipe_phases(d, steps: int) -> dict:
    """After the DMD steps: one batch of regression pairs made with the library's settings (seconds per pair), then
    `steps` regression warm-up steps on them (the trainer's own step), and what the default recipe would take."""
    from ..distill import DistillConfig
    from ..pairs import make_pairs

    c, defaults = d.cfg, DistillConfig(out_dir=d.cfg.out_dir, prompts=["a"])
    path = os.path.join(c.out_dir, "bench_pairs.safetensors")
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    sync()
    made = make_pairs(d.m, c.prompts, c.batch_size, path, resolution=c.resolution, s0=defaults.regression_s0,
                      student_steps=defaults.regression_student_steps,
                      student_cfg=defaults.regression_student_cfg, teacher_steps=defaults.regression_teacher_steps,
                      guidance=c.guidance_arg, batch_size=c.batch_size, device=d.device, progress=False)
    sync()
    pair_s = made["seconds"] / c.batch_size
    # The warm-up step as the trainer runs it (its own optimizer stands in: same parameters, same cost).
    d._use_pairs(path)
    d.pairs = tuple(t.to(d.device) for t in d.pairs)
    d.pair_embeds = d.m.encode_student(d.pair_prompts).prompt_embeds.to(d.device)
    d.opt_warmup = d.opt_student
    g = torch.Generator(device=d.device).manual_seed(0)
    d._warmup_step(g)  # untimed: first-call overheads
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        d._warmup_step(g)
    sync()
    warmup_s = (time.perf_counter() - t0) / steps
    return {"pair_s": pair_s, "warmup_step_s": warmup_s,
            "recipe_s": {"pairs": defaults.regression_n * pair_s,
                         "warmup": defaults.regression_warmup_steps * warmup_s}}


def bench(size: str, batch: int, fake_updates: int, steps: int, warmup: int, checkpointing: bool,
          student_lora_rank: int = 0, tap: str = "image", pairs: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as out:
        d = build(size, batch, fake_updates, out, checkpointing, student_lora_rank, tap)
        d.prepare()
        for step in range(warmup):
            d.train_step(step)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        d.timer = timer = PhaseTimer(d.device)
        with timer.phase("step"):
            for step in range(warmup, warmup + steps):
                d.train_step(step)
        per_step = {k: v / steps for k, v in timer.totals.items()}
        total = per_step.pop("step")
        per_step["other"] = max(0.0, total - sum(per_step.values()))
        ours = total - sum(per_step.get(k, 0.0) for k in TEACHER_PARTS)
        result = {"size": size, "device": str(d.device), "batch": batch, "fake_updates": fake_updates,
                  "steps": steps, "step_s": total, "parts_s": per_step, "non_teacher_share": ours / total,
                  "peak_memory_gb": peak_memory_gb(d.device), "gradient_checkpointing": checkpointing,
                  "student_lora_rank": student_lora_rank, "tap": tap}
        if pairs:
            result.update(bench_recipe_phases(d, steps))
            result["recipe_s"]["dmd"] = d.cfg.steps * total
        return result


def count_flops(size: str, batch: int, fake_updates: int) -> dict:
    """FLOPs of each part of a step, counted on the meta device (no compute, no memory), so the real size can be
    broken down on a CPU. Same parts as the timed step; the teacher is the bare SD3.5 transformer (the fake
    LoRA's own FLOPs are negligible), the fake update is its forward + backward to the input."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = SIZES[size]
    with torch.device("meta"):
        unet, vae, transformer, bridge = _models(size)
        transformer.requires_grad_(False)
        h = spec["resolution"] // 8
        noise = torch.zeros(batch, 4, h, h)
        emb = torch.zeros(batch, *spec["student_text"])
        t_emb, pooled = torch.zeros(batch, *spec["teacher_text"]), torch.zeros(batch, spec["pooled"])
        x_t = torch.zeros(batch, 16, 2 * h, 2 * h)
        t = torch.full((batch,), 999)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def student_bridge_train():
        out = bridge.forward_model(unet(noise, t, encoder_hidden_states=emb).sample)
        out.backward(torch.ones_like(out))

    def teacher_fwd(x=x_t):
        return transformer(hidden_states=x, encoder_hidden_states=t_emb, pooled_projections=pooled, timestep=t).sample

    def teacher_train():
        x = x_t.detach().requires_grad_(True)
        out = teacher_fwd(x)
        out.backward(torch.ones_like(out))

    with torch.no_grad():
        f_student = flops(lambda: unet(noise, t, encoder_hidden_states=emb))
        f_bridge = flops(lambda: bridge.forward_model(noise))
        f_teacher = flops(teacher_fwd)
    f_train = flops(student_bridge_train)
    f_fake = flops(teacher_train)
    # Making one batch of regression pairs (training/pairs.py, the library's settings): the student base's DDIM steps
    # and the teacher's steps, both with CFG (two forwards each), the teacher VAE's decode, the student VAE's encode.
    from ..distill import DistillConfig

    d = DistillConfig(out_dir=".", prompts=["a"])
    with torch.device("meta"):
        t_vae = _teacher_vae(size)
        image = torch.zeros(batch, 3, 2 * spec["resolution"], 2 * spec["resolution"])
        small = torch.zeros(batch, 3, spec["resolution"], spec["resolution"])
        x_t16 = torch.zeros(batch, 16, 2 * h, 2 * h)
    with torch.no_grad():
        f_vaes = flops(lambda: t_vae.decode(x_t16)) + flops(lambda: bridge.student_vae.encode(small))
        del image
    f_pairs = 2 * d.regression_student_steps * f_student + 2 * d.regression_teacher_steps * f_teacher + f_vaes
    with torch.device("meta"):
        x = noise.detach()
    def warmup_step():
        out = unet(x, t, encoder_hidden_states=emb).sample
        out.backward(torch.ones_like(out))
    for p_ in unet.parameters():
        p_.requires_grad_(True)
    f_warmup = flops(warmup_step)
    parts = {"student_forward": f_student, "decode_project": f_bridge, "real_teacher": 2 * f_teacher,
             "fake_teacher": f_teacher, "backward": f_train - f_student - f_bridge,
             "fake_samples": (fake_updates - 1) * (f_student + f_bridge), "fake_update": fake_updates * f_fake}
    total = sum(parts.values())
    ours = total - sum(parts[k] for k in TEACHER_PARTS)
    return {"size": size, "batch": batch, "fake_updates": fake_updates, "step_tflop": total / 1e12,
            "parts_tflop": {k: v / 1e12 for k, v in parts.items()}, "non_teacher_share": ours / total,
            "pair_tflop": f_pairs / batch / 1e12, "warmup_step_tflop": f_warmup / 1e12,
            "recipe_tflop": {"pairs": d.regression_n * f_pairs / batch / 1e12,
                             "warmup": d.regression_warmup_steps * f_warmup / 1e12, "dmd": d.steps * total / 1e12}}


def format_flops(r: dict) -> str:
    lines = [f"== {r['size']}, counted FLOPs: batch {r['batch']}, {r['fake_updates']} fake updates/step, "
             f"{r['step_tflop']:.4g} TFLOP/step", f"{'part':<18}{'TFLOP':>10}{'share':>9}"]
    for k in PARTS:
        v = r["parts_tflop"][k]
        lines.append(f"{k:<18}{v:>10.4g}{100 * v / r['step_tflop']:>8.1f}%")
    lines.append(f"everything but teacher forwards and fake update: {100 * r['non_teacher_share']:.1f}% of the FLOPs")
    rt = r["recipe_tflop"]
    lines.append(f"recipe phases: one regression pair {r['pair_tflop']:.4g} TFLOP, one warm-up step "
                 f"{r['warmup_step_tflop']:.4g} TFLOP ({r['warmup_step_tflop'] / r['step_tflop']:.3f} of a DMD step); "
                 "the default recipe at this batch (800 pairs, 2000 warm-up, 2000 DMD steps): " +
                 ", ".join(f"{k} {v:.4g} TFLOP ({100 * v / sum(rt.values()):.0f}%)" for k, v in rt.items()))
    return "\n".join(lines)


def format_table(r: dict) -> str:
    options = (f"gradient checkpointing {'on' if r.get('gradient_checkpointing') else 'off'}, "
               f"student {'LoRA rank ' + str(r['student_lora_rank']) if r.get('student_lora_rank') else 'full UNet'}, "
               f"{r.get('tap', 'image')} Bridge")
    lines = [f"== {r['size']} on {r['device']}: batch {r['batch']}, {r['fake_updates']} fake updates/step, {options}, "
             f"{r['step_s']:.3f} s/step, peak memory {r['peak_memory_gb']:.2f} GB",
             f"{'part':<18}{'s/step':>10}{'share':>9}"]
    for k in (*PARTS, "other"):
        v = r["parts_s"].get(k, 0.0)
        lines.append(f"{k:<18}{v:>10.4f}{100 * v / r['step_s']:>8.1f}%")
    if "pair_s" in r:  # the recipe's other phases (bench_recipe_phases)
        rs = r["recipe_s"]
        lines.append(f"{'pairs (per pair)':<18}{r['pair_s']:>10.4f}  making one batch of {r['batch']} regression pairs")
        lines.append(f"{'warm-up step':<18}{r['warmup_step_s']:>10.4f}  {r['warmup_step_s'] / r['step_s']:.3f} of a "
                     "DMD step")
        lines.append("the default recipe at this batch: " + ", ".join(
            f"{k} {v:.4g} s ({100 * v / sum(rs.values()):.0f}%)" for k, v in rs.items()) +
            " (800 pairs, 2000 warm-up steps, 2000 DMD steps)")
    verdict = "meets" if r["non_teacher_share"] <= 0.2 else "above"
    lines.append(f"everything but teacher forwards and fake update: {100 * r['non_teacher_share']:.1f}% of the step "
                 f"({verdict} the 20% target, which applies at real sizes)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="comma-separated: tiny, mid, real (default tiny,mid on CPU; "
                                   "tiny,mid,real on CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--fake-updates", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--student-lora-rank", type=int, default=0, help="train a student LoRA of this rank (0: full UNet)")
    p.add_argument("--tap", default="image", choices=("image", "features"), help="the Bridge's tap")
    p.add_argument("--no-pairs", action="store_true",
                   help="skip timing the recipe's other phases (a batch of regression pairs, warm-up steps)")
    p.add_argument("--flops", default="auto",
                   help="comma-separated sizes whose step is broken down in counted FLOPs (meta device, no compute); "
                        "default: real on CPU, none on CUDA; 'none' to skip")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks the device; keep it on the CPU
    sizes = (args.sizes or ("tiny,mid,real" if args.device == "cuda" else "tiny,mid")).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"Unknown size(s) {unknown}; choose from {', '.join(SIZES)}.")
    if "real" in sizes and args.device == "cpu":
        raise SystemExit("The real size needs CUDA (one CPU step of SD3.5 Medium at 1024 px takes hours).")
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} CPU threads")
    results = []
    for size in sizes:
        r = bench(size, args.batch, args.fake_updates, args.steps, args.warmup, args.gradient_checkpointing,
                  args.student_lora_rank, args.tap, pairs=not args.no_pairs)
        results.append(r)
        print(format_table(r), flush=True)
    flop_sizes = ("real" if args.device == "cpu" else "none") if args.flops == "auto" else args.flops
    for size in [f for f in flop_sizes.split(",") if f and f != "none"]:
        if size not in SIZES:
            raise SystemExit(f"Unknown size {size!r} for --flops; choose from {', '.join(SIZES)}.")
        r = count_flops(size, args.batch, args.fake_updates)
        results.append(r)
        print(format_flops(r), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
