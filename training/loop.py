"""Small pieces shared by both trainers: per-step randomness, NaN guard, metrics log, training clock, stop/interrupt
handling, progress reporting, LR schedule, autocast, image grids and atomic JSON files.

Heavy imports (tqdm, PIL, diffusers) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ._bridge import checkpoint

if TYPE_CHECKING:
    from PIL import Image


# ---------------------------------------------------------------------------------------------- randomness

def step_generator(seed: int, step: int, stream: int = 0, device="cpu") -> torch.Generator:
    """A generator seeded from (seed, step, stream) alone, so a resumed run draws exactly what the uninterrupted
    one drew, and different steps/streams (processes, purposes) draw independent numbers."""
    digest = hashlib.sha256(f"{int(seed)}:{int(step)}:{int(stream)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------- NaN guard

class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


class NaNGuard:
    """Skip steps whose loss / gradient norm is not finite; stop after `max_consecutive` of them in a row."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped_total = 0  # restored from the training state on resume

    def check(self, value) -> bool:
        """True when `value` (tensor or number) is finite; False means: skip this step."""
        finite = bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all())
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"Training diverged: {self.consecutive} steps in a row had a non-finite loss or gradient norm "
                f"({self.skipped_total} skipped in total). Lower the learning rate, check the data for broken "
                "images, or try mixed_precision 'no'. The last good state was saved; resume from it.")
        return False


# ---------------------------------------------------------------------------------------------- metrics log

def _plain(value):
    """JSON-able version of a metric value: tensors and numpy scalars become numbers (or lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar
    return value


class JsonlLogger:
    """Appends one JSON object per line (a resumed run continues the same file); each line is flushed.

    `resume_step`: drop lines logged after that step (a hard crash can leave steps the resumed run repeats)."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            lines = [line + "\n" for line in text.splitlines() if line.strip()]
            keep = [line for line in lines if _row_step(line) is not None and _row_step(line) <= resume_step]
            # A crash mid-write leaves a torn last line: it is dropped with the steps the resumed run repeats.
            if len(keep) != len(lines) or (text and not text.endswith("\n")):
                tmp = self.path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(keep)
                os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        line = json.dumps(_plain(row))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl line (0 when it has none); None for a line that is not a JSON object."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step", 0) if isinstance(row, dict) else None


class TrainClock:
    """Training-loop seconds summed over invocations: a resumed run continues from the seconds its checkpoint saved
    (`resume`), so reported training time does not shrink to the steps left after an interruption."""

    def __init__(self):
        self.prior = 0.0
        self._start: float | None = None

    def resume(self, seconds: float) -> None:
        self.prior = float(seconds)

    def start(self) -> float:
        self._start = time.time()
        return self._start

    def seconds(self) -> float:
        return self.prior + (time.time() - self._start if self._start is not None else 0.0)


def remove_stale_temporaries(*folders) -> None:
    """When a run starts: delete the temporaries that killed writes left in its folders (see
    checkpoint.atomic_temp_path); a training state's are gigabytes each."""
    for folder in folders:
        checkpoint.remove_stale_temporaries(folder)


def write_json(path, data) -> None:
    """Write JSON atomically (temp file + os.replace): an interruption never leaves a truncated file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- stopping

class StopFlag:
    """Set by a user (Ctrl+C, ComfyUI cancel, a test); the trainer checks it after each step, saves and returns."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()


@contextlib.contextmanager
def graceful_interrupt(stop: StopFlag):
    """First Ctrl+C sets `stop` (the trainer saves after this step and exits); a second one interrupts at once.
    Signal handlers can only be installed from the main thread; elsewhere (ComfyUI's worker thread) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = {"n": 0}

    def handler(signum, frame):
        presses["n"] += 1
        if presses["n"] > 1:
            raise KeyboardInterrupt
        stop.set()
        print("\nInterrupted: training will save a checkpoint and exit after this step (Ctrl+C again to abort "
              "without saving).", flush=True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator ran out of memory (CUDA's or the host's)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def free_after_out_of_memory(exc: BaseException, free: Callable[[], None] | None = None) -> None:
    """Release what the failed step still holds before anything else allocates: the locals of the frames the error
    unwound (the step's activations and graph live there, kept alive by the traceback; the frames still running are
    left alone), then `free` (the trainer's gradients), then the allocator's cache."""
    import gc
    import traceback

    traceback.clear_frames(exc.__traceback__)
    if free is not None:
        free()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def save_on_failure(save: Callable[[int], None], current_step: Callable[[], int], start: int,
                    free: Callable[[], None] | None = None):
    """Whatever ends training early (an error, a cancel from a progress callback, a full disk) first saves the last
    finished step, so the run resumes from there. A save that fails too (the disk is still full) is reported as a
    warning; the original error is the one raised. After running out of memory, `free_after_out_of_memory` (with
    `free`, e.g. dropping gradients) runs first, so the save (which streams tensors to the CPU) has room."""
    try:
        yield
    except BaseException as exc:
        if is_out_of_memory(exc):
            free_after_out_of_memory(exc, free)
        step = current_step()
        if step > start:
            try:
                save(step)
            except Exception as e:
                import warnings

                warnings.warn(f"Could not save the training state at step {step} after the failure below: "
                              f"{type(e).__name__}: {e}", stacklevel=3)
        raise


# ---------------------------------------------------------------------------------------------- progress

def _format_metric(key: str, value) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.2e}" if key == "lr" or (value != 0 and abs(value) < 1e-3) else f"{value:.4g}"
    return str(value)


class ProgressReporter:
    """A tqdm bar (metrics in the postfix, ETA from tqdm) plus an optional `callback(step, total, metrics,
    preview)` on every update. disable=True hides the bar but still calls the callback. Exceptions raised by the
    callback (ComfyUI's cancel) propagate to the trainer, which saves and re-raises."""

    def __init__(self, total: int, desc: str = "", disable: bool = False,
                 callback: Callable[[int, int, dict, Image.Image | None], None] | None = None):
        self.total = int(total)
        self.desc = desc
        self.disable = disable
        self.callback = callback
        self._bar = None

    def start(self, step: int = 0) -> None:
        """Open the bar at `step` (the resume position)."""
        from tqdm.auto import tqdm

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=self.total, initial=step, desc=self.desc, disable=self.disable, dynamic_ncols=True)

    def update(self, step: int, metrics: dict, preview: Image.Image | str | None = None) -> None:
        """`step` = steps done so far; `preview` = a PIL image or the path of an image file (e.g. a saved grid)."""
        if self._bar is None:
            self.start(0)
        self._bar.update(step - self._bar.n)
        if metrics:
            self._bar.set_postfix({k: _format_metric(k, v) for k, v in metrics.items()}, refresh=False)
        if self.callback is not None:
            if isinstance(preview, (str, os.PathLike)):
                from PIL import Image

                with Image.open(preview) as im:
                    preview = im.convert("RGB")
            self.callback(step, self.total, metrics, preview)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------- optimisation

def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 0 (diffusers' get_cosine_schedule_with_warmup); step it once per step."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def make_accelerator(mixed_precision: str = "auto", cpu: bool = False):
    """accelerate's Accelerator for a trainer: "auto" = bf16 on CUDA, full precision on CPU; DDP under
    `accelerate launch`. cpu: train on the CPU even where CUDA exists (e.g. ComfyUI started with --cpu)."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


OPTIMIZERS = ("adamw", "adamw8bit")


def optimizer_problem(name: str, cpu: bool = False, option: str = "optimizer") -> str | None:
    """Why the optimizer `name` cannot run here (unknown, bitsandbytes missing, no CUDA), or None: checked by the
    configs' validate(), before any model loads."""
    import importlib.util

    if name not in OPTIMIZERS:
        return f"{option} must be one of {', '.join(OPTIMIZERS)}, got {name!r}"
    if name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            return (f"{option} adamw8bit needs the bitsandbytes package: pip install bitsandbytes (or use "
                    f"{option} adamw)")
        if cpu or not torch.cuda.is_available():
            return (f"{option} adamw8bit needs a CUDA GPU (8-bit optimizer states save GPU memory); use {option} "
                    "adamw on the CPU")
    return None


def make_optimizer(params, lr: float, weight_decay: float, name: str = "adamw", **kw) -> torch.optim.Optimizer:
    """AdamW over `params` (tensors or parameter groups): torch's fused kernel when every parameter is on CUDA (one
    kernel for the whole update, no per-step temporaries of the foreach version), else the default one;
    name "adamw8bit": bitsandbytes' AdamW8bit (moments stored in 8 bits: a quarter of AdamW's two fp32 states)."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, **kw)
    if name != "adamw":
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    fused = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None, **kw)


def use_gradient_checkpointing(setting: bool | None, device) -> bool:
    """A trainer's gradient_checkpointing: None (auto) is on when training runs on CUDA (activations are what fills a
    GPU; recomputing them costs about a third more compute), off on the CPU."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


def default_device(cpu: bool = False) -> str:
    """Where models are loaded for training: CUDA when present, unless cpu."""
    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


# ---------------------------------------------------------------------------------------------- image grids

_PAD = 2


def _grid_rows(rows) -> list[torch.Tensor]:
    rows = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    if not rows:
        raise ValueError("An image grid needs at least one row of images.")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, torch.Tensor) or r.ndim != 4 or r.shape[1] not in (1, 3):
            shape = list(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"Grid row {i} must be a tensor [B,3,H,W] with values in [0,1]; got {shape}.")
        out.append(r.detach().float().cpu().expand(-1, 3, -1, -1))
    sizes = {r.shape[0] for r in out}
    if len(sizes) != 1:
        raise ValueError(f"Every grid row needs the same number of images; got {[r.shape[0] for r in out]}.")
    h = max(r.shape[2] for r in out)
    w = max(r.shape[3] for r in out)
    resized = []
    for r in out:
        if r.shape[2:] != (h, w):
            # Whole-number upscales stay pixel-exact (a 64 px student decode next to a 128 px teacher decode).
            exact = h % r.shape[2] == 0 and w % r.shape[3] == 0
            r = torch.nn.functional.interpolate(r, size=(h, w), mode="nearest" if exact else "bilinear",
                                                align_corners=None if exact else False)
        resized.append(r.clamp(0, 1))
    return resized


def grid_image(rows, labels: list[str] | None = None) -> Image.Image:
    """One grid row per tensor [B,3,H,W] in [0,1] (a single tensor = one row), images resized to the largest
    size, optional labels (one per row) on a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _grid_rows(rows)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"Give one label per grid row: {len(rows)} rows, {len(labels)} labels.")
    n, h, w = rows[0].shape[0], rows[0].shape[2], rows[0].shape[3]
    font = ImageFont.load_default()
    margin = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = int(max(probe.textlength(str(t), font=font) for t in labels)) + 4 * _PAD
    grid = Image.new("RGB", (margin + n * (w + _PAD) + _PAD, len(rows) * (h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(rows):
        y = _PAD + i * (h + _PAD)
        pixels = (r * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(n):
            grid.paste(Image.fromarray(pixels[j]), (margin + _PAD + j * (w + _PAD), y))
        if labels:
            top, bottom = draw.textbbox((0, 0), str(labels[i]), font=font)[1::2]
            draw.text((2 * _PAD, y + (h - (bottom - top)) // 2 - top), str(labels[i]), fill="black", font=font)
    return grid


def save_image_grid(rows, path, labels: list[str] | None = None) -> str:
    """Write `grid_image(rows, labels)` as a PNG atomically (temp file + os.replace); returns the path."""
    path = os.fspath(path)
    image = grid_image(rows, labels)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = checkpoint.atomic_temp_path(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
