"""Benchmark: the Bridge, with either tap, vs the exact round trip E_t(upsample_k(D_s(z_s))).

    python -m training.bench.bridge                       # 32->64 and 64->128 on CPU (+ CUDA when present)
    python -m training.bench.bridge --sizes 32 --json bench.json
    python -m training.bench.bridge --device cuda --dtype bf16 --repeats 5

Real configs of the SD1.5 VAE (student) and the SD3/SD3.5 VAE (teacher) with random init (speed and memory
do not depend on the weights), student latent s x s -> teacher latent 2s x 2s. Three paths, all on the same
student decoder: the 'features' Bridge (decoder run only to the teacher grid, bridge/taps.py), the 'image'
Bridge (full decode, the paper's design) and the round trip. Measured per path: forward time (no grad, as in the ComfyUI node), forward+backward time
with the gradient taken w.r.t. the input latent only (as in distillation, where the Bridge is frozen), peak
memory above the loaded weights for both, parameters and FLOPs (torch FlopCounterMode, counted on the meta
device so counting costs nothing). CPU peak memory is the process's peak RSS over the pass (Linux); CUDA
uses torch.cuda.max_memory_allocated. The 64 x 64 case takes about 15 minutes and 18 GB on a 2-core CPU.
Measured figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

from .._bridge import model as bridge_model

# The real SD1.5 VAE (AutoencoderKL, 4 latent channels).
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# The real SD3 / SD3.5 VAE: 16 channels, shift, no quant convs.
SD3_VAE_CONFIG = dict(
    SD15_VAE_CONFIG, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("features", "image", "round_trip")  # the features Bridge, the image Bridge, the exact round trip
BRIDGES = ("features", "image")
LABELS = {"features": "features bridge", "image": "image bridge", "round_trip": "round trip"}


# ------------------------------------------------------------------------------------------ models

def build_models(student_config: dict, teacher_config: dict, k: int = 2, projector_kwargs: dict | None = None,
                 device="cpu", dtype=torch.float32):
    """({tap: bridge}, teacher_vae): a Bridge of each tap around one random-init student VAE, and a random-init
    teacher VAE. Everything frozen: only the input latent gets a gradient, as in distillation."""
    from diffusers import AutoencoderKL

    student_vae, teacher_vae = AutoencoderKL(**student_config), AutoencoderKL(**teacher_config)
    student_vae, teacher_vae = student_vae.to(device), teacher_vae.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:
        student_vae, teacher_vae = student_vae.to(dtype=dtype), teacher_vae.to(dtype=dtype)
    bridges = {}
    for tap in BRIDGES:
        bridge = bridge_model.Bridge.create("sd15", "sd3", k=k, student_vae=student_vae, tap=tap,
                                            **(projector_kwargs or {}))
        bridge.projector.requires_grad_(False)
        bridges[tap] = bridge.to(device, dtype).eval()  # the projector (the VAE is already there)
    return bridges, teacher_vae


def _paths(bridges, teacher_vae, k: int, upsample: str) -> dict:
    """Every path: student raw latent -> teacher model-space latent."""
    any_bridge = bridges["image"]
    space = any_bridge.teacher_space
    return {
        **{tap: b.forward_model for tap, b in bridges.items()},
        "round_trip": lambda z: space.to_model(
            bridge_model.exact_round_trip(z, any_bridge.student_vae, teacher_vae, k=k, upsample=upsample)),
    }


def _param_counts(bridges, teacher_vae) -> dict:
    """(parameters the path runs, of which its own: projector or teacher encoder). The features Bridge runs only
    the decoder's layers up to its tap."""
    vae = bridges["image"].student_vae
    decoder = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    encoder = sum(p.numel() for n, p in teacher_vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    out = {"round_trip": (decoder + encoder, encoder)}
    for tap, bridge in bridges.items():
        projector = sum(p.numel() for p in bridge.projector.parameters())
        used = decoder if tap == "image" else _tapped_decoder_params(vae, bridge.k)
        out[tap] = (used + projector, projector)
    return out


def _tapped_decoder_params(vae, k: int) -> int:
    """Decoder parameters the 'features' tap runs (post_quant_conv, conv_in, mid block, the up blocks to the tap)."""
    from .._bridge import taps

    stop, _ = taps._diffusers_plan(vae.decoder, k)
    d = vae.decoder
    modules = [d.conv_in, d.mid_block, *d.up_blocks[:stop], *d.up_blocks[stop].resnets]
    if vae.post_quant_conv is not None:
        modules.append(vae.post_quant_conv)
    return sum(p.numel() for m in modules for p in m.parameters())


# ------------------------------------------------------------------------------------------ measuring

def _fwd(fn, z):
    with torch.no_grad():
        return fn(z)


def _fwd_bwd(fn, z):
    z = z.detach().requires_grad_(True)
    out = fn(z)
    out.backward(torch.ones_like(out))  # any fixed cotangent: the cost is the same
    return z.grad


def count_flops(student_config, teacher_config, size: int, batch: int, k: int, upsample: str,
                projector_kwargs=None) -> dict:
    """Forward and forward+backward FLOPs per path, on meta tensors (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        bridges, teacher_vae = build_models(student_config, teacher_config, k, projector_kwargs, device="meta")
    z = torch.zeros(batch, student_config["latent_channels"], size, size, device="meta")
    out = {}
    for name, fn in _paths(bridges, teacher_vae, k, upsample).items():
        counts = []
        for step in (_fwd, _fwd_bwd):
            with FlopCounterMode(display=False) as counter:
                step(fn, z)
            counts.append(counter.get_total_flops())
        out[name] = tuple(counts)
    return out


class _PeakMemory:
    """Peak memory of a block above what was allocated before it, in bytes (None where unsupported)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1))

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS starts from the live set
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
                self.base = self._status_kb("VmRSS") * 1024
            except OSError:
                self.base = None
        else:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = self._status_kb("VmHWM") * 1024 - self.base
        return False


def _timed(step, fn, z, device, repeats: int, warmup: int) -> tuple[float, int | None]:
    """(median seconds, peak bytes above the weights) of `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        step(fn, z)
    times, peaks = [], []
    for _ in range(repeats):
        with _PeakMemory(device) as mem:
            t0 = time.perf_counter()
            result = step(fn, z)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        del result
        peaks.append(mem.peak)
    return statistics.median(times), (max(peaks) if None not in peaks else None)


def run_benchmark(sizes=(32, 64), devices=("cpu",), repeats: int | None = None, dtype: str = "fp32", batch: int = 1,
                  k: int = 2, upsample: str = "bicubic", gradient_checkpointing: bool = False,
                  skip_large: bool = False, student_config: dict = SD15_VAE_CONFIG,
                  teacher_config: dict = SD3_VAE_CONFIG, projector_kwargs: dict | None = None, log=print,
                  methods=METHODS) -> list[dict]:
    """One row per (device, size, path) with times, memory, parameters and FLOPs (paths: `methods`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown benchmark path(s) {unknown}; choose from {', '.join(METHODS)}.")
    rows = []
    flops = {s: count_flops(student_config, teacher_config, s, batch, k, upsample, projector_kwargs) for s in sizes}
    for dev_name in devices:
        device = torch.device(dev_name)
        torch.manual_seed(0)
        bridges, teacher_vae = build_models(student_config, teacher_config, k, projector_kwargs, device,
                                            DTYPES[dtype])
        if gradient_checkpointing:
            for bridge in bridges.values():
                bridge.enable_gradient_checkpointing()  # the shared student decoder and the projectors
            teacher_vae.enable_gradient_checkpointing()
        params = _param_counts(bridges, teacher_vae)
        elem = torch.finfo(DTYPES[dtype]).bits // 8
        paths = _paths(bridges, teacher_vae, k, upsample)
        for size in sizes:
            if skip_large and size > 32 and device.type == "cpu":
                log(f"[{dev_name}] skipping {size}x{size} (--skip-large)")
                continue
            # CUDA warms up once (kernel selection, allocator); CPU passes take seconds to minutes and
            # have no such start-up cost worth a second pass.
            n_rep = repeats or (3 if device.type == "cuda" else 1)
            warmup = 1 if device.type == "cuda" else 0
            z = torch.randn(batch, student_config["latent_channels"], size, size,
                            generator=torch.Generator().manual_seed(size)).to(device, DTYPES[dtype])
            for name in methods:
                log(f"[{dev_name}] {size}x{size} -> {k * size}x{k * size}: {LABELS[name]} ...")
                fwd_s, fwd_mem = _timed(_fwd, paths[name], z, device, n_rep, warmup)
                fb_s, fb_mem = _timed(_fwd_bwd, paths[name], z, device, n_rep, warmup)
                total, own = params[name]
                rows.append(dict(
                    device=dev_name, dtype=dtype, batch=batch, student=size, teacher=k * size, method=name,
                    params=total, own_params=own, weights_bytes=total * elem,
                    flops_fwd=flops[size][name][0], flops_fwd_bwd=flops[size][name][1],
                    fwd_s=fwd_s, fwd_bwd_s=fb_s, peak_fwd_bytes=fwd_mem, peak_fwd_bwd_bytes=fb_mem,
                    repeats=n_rep, gradient_checkpointing=gradient_checkpointing, upsample=upsample,
                ))
        del bridges, teacher_vae, paths
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------ reporting

_COLUMNS = [  # header, row key, scale, format
    ("params M", "params", 1e-6, "{:.1f}"),
    ("GFLOP fwd", "flops_fwd", 1e-9, "{:.1f}"),
    ("GFLOP f+b", "flops_fwd_bwd", 1e-9, "{:.1f}"),
    ("fwd s", "fwd_s", 1, "{:.3f}"),
    ("f+b s", "fwd_bwd_s", 1, "{:.3f}"),
    ("peak fwd MB", "peak_fwd_bytes", 2**-20, "{:.0f}"),
    ("peak f+b MB", "peak_fwd_bwd_bytes", 2**-20, "{:.0f}"),
]


def _cell(value, scale, fmt) -> str:
    return "n/a" if value is None else fmt.format(value * scale)


def format_table(rows: list[dict]) -> str:
    """A text table: every path per case, then round trip / Bridge ratios per Bridge (> 1: the Bridge is cheaper)."""
    head = ["device", "student -> teacher", "path"] + [c[0] for c in _COLUMNS]
    lines = []
    cases = {}
    for r in rows:
        cases.setdefault((r["device"], r["student"], r["teacher"]), {})[r["method"]] = r
    for (dev, s, t), by in cases.items():
        case = f"{s}x{s} -> {t}x{t}"
        for name in METHODS:
            if name in by:
                r = by[name]
                lines.append([dev, case, LABELS[name]] + [_cell(r[c[1]], c[2], c[3]) for c in _COLUMNS])
        for tap in BRIDGES:
            if tap in by and "round_trip" in by:
                a, b = by["round_trip"], by[tap]
                ratios = []
                for _, key, _, _ in _COLUMNS:
                    ok = a[key] is not None and b[key] not in (None, 0)
                    ratios.append(f"{a[key] / b[key]:.2f}x" if ok else "n/a")
                lines.append([dev, case, f"round trip / {tap}"] + ratios)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


# Issue 13's targets for the features Bridge at real size; the image Bridge is reported against the same numbers.
TARGET_SPEEDUP, TARGET_MEMORY = 6.0, 1 / 6


def summary(rows: list[dict]) -> list[str]:
    """Per case and Bridge: forward+backward speed-up over the exact round trip and peak-memory share, against the
    targets (features Bridge: >= 6x faster, <= 1/6 of the memory)."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["device"], r["student"]), {})[r["method"]] = r
    for (dev, s), m in by.items():
        if "round_trip" not in m:
            continue
        a = m["round_trip"]
        for tap in BRIDGES:
            if tap not in m:
                continue
            b = m[tap]
            speed = a["fwd_bwd_s"] / b["fwd_bwd_s"]
            line = (f"{dev} {s}x{s}, {tap} bridge: forward+backward {speed:.2f}x faster than the exact round trip "
                    f"(target >= {TARGET_SPEEDUP:g}x: {'met' if speed >= TARGET_SPEEDUP else 'missed'})")
            if a["peak_fwd_bwd_bytes"] and b["peak_fwd_bwd_bytes"] is not None:
                mem = b["peak_fwd_bwd_bytes"] / a["peak_fwd_bwd_bytes"]
                line += (f", peak memory {mem:.3f} of it (target <= {TARGET_MEMORY:.3f}: "
                         f"{'met' if mem <= TARGET_MEMORY else 'missed'})")
            out.append(line)
    return out


def _load_note() -> str:
    """CPU timings are only meaningful on an otherwise idle machine: say when it was not."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    return f", load average {load:.1f} on {os.cpu_count()} cores" + (" (busy: CPU timings are noisy)"
                                                                      if load > 0.5 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench.bridge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,64",
                   help="student latent sizes, comma-separated (teacher = 2x); default 32,64 (64 = SD1.5 at 512 px)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CPU, plus CUDA when present)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--skip-large", action="store_true", help="skip sizes above 32 on CPU (they take minutes)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--upsample", choices=["bicubic", "bilinear"], default="bicubic",
                   help="how the round trip upsamples the decoded image to teacher resolution")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="enable gradient checkpointing in both paths (off by default in both)")
    p.add_argument("--paths", default=",".join(METHODS),
                   help=f"comma-separated paths to measure (default all: {','.join(METHODS)})")
    p.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.paths.split(",") if m.strip())
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--paths takes a comma-separated subset of {','.join(METHODS)}; got {args.paths!r}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, e.g. 32,64; got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error("--sizes needs at least one positive size")
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
        if devices[0].startswith("cuda") and not torch.cuda.is_available():
            p.error("--device cuda, but no CUDA device is available; use --device cpu")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = run_benchmark(sizes, devices, args.repeats, args.dtype, args.batch, upsample=args.upsample,
                         gradient_checkpointing=args.gradient_checkpointing, skip_large=args.skip_large, log=log,
                         methods=methods)
    print(f"\nBridge (SD1.5 decoder to its features or to the image + projector) vs exact round trip "
          f"E_t(upsample(D_s(z))) with SD1.5 / SD3 VAEs, "
          f"random init, {args.dtype}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads" + _load_note())
    print(format_table(rows))
    for line in summary(rows):
        print(line)
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   cpu_threads=torch.get_num_threads(), cpu_cores=os.cpu_count(), note=_load_note().lstrip(", "),
                   cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
