"""Teacher-corrected regression pairs: the regression term of cross-space distillation (DMD's, across latent spaces).

One pair per prompt draw:

    z          student noise [C_s, h, w]
    x(z)       the student base's own multi-step sample from z (DDIM with CFG), in the student's space
    y          x(z) through the Bridge into the teacher's space, noised to s0 and denoised by the teacher (its CFG)
    target     y decoded by the teacher VAE, resized to the student's resolution, encoded by the student VAE

The target keeps the base sample's layout, a deterministic function of z, so a one-step student regressed onto
(z, target) learns a map and not a mean (noise paired at random blurs whatever varies within a prompt); and it carries
what the teacher redraws from s0 on, which is where the teacher follows the prompt over the image (the shapes world:
the background word the student base ignores, docs/shapes_investigation.md §5.8).

The pairs file is a safetensors file (`noise`, `latents` in the student's MODEL space; the prompts and settings in its
metadata), written atomically; `Distiller` reads it with `DistillConfig.regression_pairs`, or makes it itself in its run
folder (`DistillConfig.regression_n`, the default recipe). Making them is resumable batch by batch (`make_pairs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .distill import DistillModels

FORMAT = "csd-regression-pairs"
VERSION = "1"


def teacher_correct(teacher, x: torch.Tensor, cond, neg_cond, s0: float, steps: int, guidance,
                    generator: torch.Generator, callback=None) -> torch.Tensor:
    """Teacher model-space latents noised to s0 and denoised by the teacher: `steps` Euler steps on a uniform grid
    of s from s0 to 0 (each x_{s'} = x0 + s'/s (x_s - x0), the flow's deterministic step), with its guidance.
    callback: called with no arguments after each step (progress)."""
    n = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    x = teacher.add_noise(x, n, torch.full((x.shape[0],), s0, device=x.device))
    grid = torch.linspace(s0, 0.0, steps + 1).tolist()
    for s, s_next in zip(grid[:-1], grid[1:]):
        x0 = teacher.predict_x0(x, s, cond, neg_cond=neg_cond, guidance=guidance).float()
        x = x0 + (s_next / s) * (x - x0)
        if callback is not None:
            callback()
    return x


@torch.no_grad()
def make_pairs(models: "DistillModels", prompts: list[str], n: int, path: str, *, resolution: int,
               s0: float = 0.9, student_steps: int = 25, student_cfg: float = 7.5, teacher_steps: int = 20,
               guidance=None, negative_prompt: str = "", batch_size: int = 16, seed: int = 0,
               device: str | torch.device = "cpu", progress: bool = True, callback=None, stop=None) -> dict:
    """n pairs of random prompts from `prompts` (see the module docstring), written to `path` (safetensors, atomic).
    `models`: what the distillation uses (its student's UNet is the base: call this before training it).
    resolution: the student's pixels per side.

    Resumable: every finished batch goes to `<path>.partial/` (one file per batch, written atomically, with the random
    state after it); a killed or stopped call keeps them and the next call with the same settings continues after
    the last one, making exactly the pairs an uninterrupted call makes (other settings start the folder over). The
    merged file is written at the end and the folder removed. callback(batches_done, batches_total) after each batch
    (a ComfyUI bar); `stop` (a loop.StopFlag) set: return after the current batch. progress: a tqdm bar per batch
    with its ETA. Returns {"n", "seconds" (over all calls), "path", "complete"}."""
    from ._bridge import model as bridge_model
    from .student import ddim_sample
    from .errors import UserError, output_dir

    if not 0 < s0 <= 1:
        raise ValueError(f"s0 (the noise level the teacher redraws from) must be in (0, 1], got {s0}.")
    if n < 1 or batch_size < 1 or student_steps < 1 or teacher_steps < 1:
        raise ValueError("n, batch_size, student_steps and teacher_steps must be positive integers.")
    if not prompts:
        raise ValueError("make_pairs needs at least one prompt.")
    folder = os.path.dirname(os.path.abspath(path))
    output_dir(folder, "Pairs folder")
    student, bridge, teacher = models.student, models.bridge, models.teacher
    same_space = getattr(bridge, "k", None) == 1 and bridge.teacher_space.name == student.space.name
    if models.teacher_vae is None and not same_space:
        raise UserError("Regression pairs need the teacher VAE (the teacher's sample is decoded and re-encoded by the "
                        "student VAE).")
    latent = student.latent_size(resolution)
    settings = dict(s0=s0, student_steps=student_steps, student_cfg=student_cfg, teacher_steps=teacher_steps,
                    guidance=guidance, seed=seed, resolution=resolution, student_space=student.space.name,
                    teacher_space=bridge.teacher_space.name)
    job = {**settings, "n": n, "batch_size": batch_size, "negative_prompt": negative_prompt,
           "prompts": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
           "models": getattr(models, "description", {})}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(int(seed))
    chosen = [prompts[int(i)] for i in torch.randint(len(prompts), (n,), generator=g)]
    noise = torch.randn((n, student.space.channels, latent, latent), generator=g)
    starts = list(range(0, n, batch_size))
    parts = _Partial(path + ".partial", job)
    out, spent = parts.finished(len(starts))  # the batches a killed or stopped call left, and their seconds
    if out:
        g.set_state(parts.rng_state)  # continue the random stream where it stopped
    unet = student.unet.to(device).eval()
    bridge.to(device).eval()
    if models.teacher_vae is not None:
        models.teacher_vae.to(device)
    neg_s = models.encode_student([negative_prompt]).prompt_embeds.to(device)
    neg_t = models.encode_teacher([negative_prompt]).to(device)
    # The bar counts pairs and moves after every sampler step (a batch takes many seconds on a CPU), with an ETA.
    bar, step = None, None
    if progress:
        from tqdm.auto import tqdm

        done = sum(len(t) for t in out)
        bar = tqdm(total=n, initial=done, desc=f"regression pairs ({batch_size} per batch)", unit="pair",
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for k in range(len(out), len(starts)):
            i = starts[k]
            p = chosen[i : i + batch_size]
            b = len(p)
            if bar is not None:  # each sampler step of this batch: its share of the batch's pairs
                step = (lambda share=b / (student_steps + teacher_steps): bar.update(min(share, n - bar.n)))
            hidden = models.encode_student(p).prompt_embeds.to(device)
            x = ddim_sample(unet, hidden, neg_s, noise[i : i + b].to(device), student.schedule, student_steps,
                            student_cfg, callback=step)
            y = bridge.forward_model(student.space.to_raw(x)).float()
            y = teacher_correct(teacher, y, models.encode_teacher(p).to(device), neg_t, s0, teacher_steps, guidance,
                                g, callback=step)
            if same_space:  # a teacher in the student's own space (same-space distillation): y is the target
                target = y.cpu()
            else:
                image = bridge_model.decode_to_image01(models.teacher_vae, bridge.teacher_space.to_raw(y))
                small = F.interpolate(image, size=(resolution, resolution), mode="area")
                vae = bridge.student_vae
                raw = vae.encode((small * 2 - 1).to(vae.dtype)).latent_dist.mean.float()
                target = student.space.to_model(raw).cpu()
            if not torch.isfinite(target).all():
                raise UserError("The regression pairs came out non-finite (NaN/inf): the teacher or a VAE diverged; "
                                "try --dtype fp32.")
            out.append(target)
            parts.save(k, target, g.get_state(), spent + time.perf_counter() - t0)
            if bar is not None:  # exact count at the batch's end (the per-step shares are fractions)
                bar.n = min(n, i + b)
                bar.refresh()
            if callback is not None:
                callback(k + 1, len(starts))
            if stop is not None and stop.is_set() and k + 1 < len(starts):
                return {"n": n, "seconds": spent + time.perf_counter() - t0, "path": path, "complete": False}
    finally:
        if bar is not None:
            bar.close()
    latents = torch.cat(out)
    seconds = spent + time.perf_counter() - t0
    save_pairs(path, noise, latents, chosen, **settings, seconds=seconds)
    parts.remove()
    return {"n": n, "seconds": seconds, "path": path, "complete": True}


class _Partial:
    """The batches of an unfinished `make_pairs`: `batch_NNNNNN.safetensors` files (the batch's target latents, the
    generator's state after it, the seconds spent so far) beside a `job.json` of the settings they were made with.
    Derived data: a folder of other settings, or a batch file that does not read, is made again."""

    def __init__(self, folder: str, job: dict):
        self.folder, self.job = folder, json.loads(json.dumps(job, default=str))  # JSON's view (tuples as lists) to compare
        self.rng_state = None

    def _file(self, k: int) -> str:
        return os.path.join(self.folder, f"batch_{k:06d}.safetensors")

    def finished(self, total: int) -> tuple[list[torch.Tensor], float]:
        """The finished batches in order (stops at the first missing or unreadable one) and the seconds they took;
        sets `rng_state`. Prepares the folder for this job."""
        from safetensors import SafetensorError, safe_open

        job_file = os.path.join(self.folder, "job.json")
        try:
            with open(job_file, encoding="utf-8") as f:
                same = json.load(f) == self.job
        except (OSError, ValueError):
            same = False
        if not same:
            self.remove()
            os.makedirs(self.folder, exist_ok=True)
            tmp = job_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.job, f)
            os.replace(tmp, job_file)
            return [], 0.0
        out, seconds = [], 0.0
        for k in range(total):
            try:
                with safe_open(self._file(k), framework="pt") as f:
                    target, rng = f.get_tensor("latents"), f.get_tensor("rng_state")
                    seconds = float(json.loads(f.metadata()["seconds"]))
            except (SafetensorError, OSError, KeyError, ValueError, TypeError):
                break
            out.append(target)
            self.rng_state = rng
        return out, seconds

    def save(self, k: int, target: torch.Tensor, rng_state: torch.Tensor, seconds: float) -> None:
        from safetensors.torch import save_file

        tmp = self._file(k) + ".tmp"
        save_file({"latents": target.float().contiguous(), "rng_state": rng_state.contiguous()}, tmp,
                  metadata={"seconds": json.dumps(seconds)})
        os.replace(tmp, self._file(k))

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def save_pairs(path: str, noise: torch.Tensor, latents: torch.Tensor, prompts: list[str], **settings) -> None:
    """Write a pairs file atomically: `noise` and `latents` [N, C, h, w] (student MODEL space), one prompt per pair;
    `settings` (JSON-able) go to the metadata beside the prompts."""
    from safetensors.torch import save_file

    if noise.shape != latents.shape or noise.ndim != 4 or len(prompts) != noise.shape[0]:
        raise ValueError(f"Pairs need noise and latents of one shape [N, C, h, w] and N prompts; got "
                         f"{tuple(noise.shape)}, {tuple(latents.shape)}, {len(prompts)} prompts.")
    meta = {"format": FORMAT, "version": VERSION, "prompts": json.dumps(list(prompts)),
            **{k: json.dumps(v) for k, v in settings.items()}}
    tmp = path + ".tmp"
    save_file({"noise": noise.float().contiguous(), "latents": latents.float().contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_pairs(path: str, channels: int, latent: int) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(noise, latents, prompts, metadata) of a pairs file, checked against the student's latent shape
    [channels, latent, latent]; every problem is a UserError that names the fix."""
    from safetensors import SafetensorError, safe_open

    from .errors import UserError

    fix = "make it with `python -m training.run pairs` (or training.pairs.make_pairs)"
    if not os.path.isfile(path):
        raise UserError(f"Regression pairs file {path!r} does not exist; {fix}.")
    if not path.endswith(".safetensors"):
        raise UserError(f"Regression pairs file {path!r} is not a .safetensors file (pickled files are never "
                        f"loaded); {fix}.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get("format") != FORMAT or not {"noise", "latents"} <= keys:
                raise UserError(f"{path!r} is not a regression pairs file (no {FORMAT!r} metadata with 'noise' and "
                                f"'latents'); {fix}.")
            noise, latents = f.get_tensor("noise").float(), f.get_tensor("latents").float()
    except (SafetensorError, OSError) as e:
        raise UserError(f"Regression pairs file {path!r} is unreadable or damaged ({e}); {fix}.") from None
    try:
        prompts = json.loads(meta.get("prompts", ""))
    except ValueError:
        prompts = None
    want = (channels, latent, latent)
    if noise.ndim != 4 or tuple(noise.shape[1:]) != want or noise.shape != latents.shape:
        raise UserError(f"Regression pairs {path!r} hold noise {tuple(noise.shape)} / latents {tuple(latents.shape)}, "
                        f"the student needs [N, {channels}, {latent}, {latent}] (this resolution); make the pairs at "
                        "the distillation's resolution.")
    if not isinstance(prompts, list) or len(prompts) != noise.shape[0] or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"Regression pairs {path!r}: the prompts in its metadata do not match its {noise.shape[0]} "
                        f"pairs; {fix}.")
    if not (torch.isfinite(noise).all() and torch.isfinite(latents).all()):
        raise UserError(f"Regression pairs {path!r} contain NaN/inf; {fix} again.")
    return noise, latents, prompts, meta
