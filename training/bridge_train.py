"""Bridge training: latent reconstruction + attention fidelity, from a folder of images.

    z_s = E_s(image at student res)   z_t = E_t(image at teacher res)   c = teacher text of the caption
    pred = B(z_s) (teacher model space)           target = to_model(z_t)
    loss = mse(pred, target) + w_attn * KL(attn_teacher(noised target, c) || attn_teacher(noised pred, c))

Both latents are noised with the same noise at the same level, drawn from the teacher's own timestep
distribution, so the only difference the teacher sees is the Bridge's error. The trainer is one class
used by the CLI (`python -m training.run bridge`) and by the ComfyUI training node.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import loop
from ._bridge import checkpoint as bridge_ckpt
from ._bridge import model as bridge_model
from ._bridge import projector as bridge_projector
from .state import load_training_state, save_training_state

if TYPE_CHECKING:
    from .teachers import Teacher


@dataclass
class BridgeTrainConfig:
    out_dir: str
    images: str
    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    attn_weight: float = 0.1
    attn_blocks: list[str] | None = None  # None: the teacher's default blocks
    attn_queries: int = 64
    val_fraction: float = 0.1
    val_batches: int = 2
    val_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10
    seed: int = 0
    k: int = 2
    student_res: int = 512
    teacher_res: int = 1024
    projector: dict = field(default_factory=dict)  # ProjectorConfig overrides (width, depth, ...)
    tap: str = "image"  # where the projector reads the frozen decoder: "image" (full decode) or "features"
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cpu: bool = False  # train on the CPU even where CUDA exists
    # None (auto): on when training runs on CUDA, off on the CPU (see loop.use_gradient_checkpointing).
    gradient_checkpointing: bool | None = None
    # > 1: every step runs batch_size as that many equal micro-batches (forward and backward each, one optimizer
    # step); the losses, the gradient and its clip are the whole batch's.
    gradient_accumulation: int = 1
    resume: bool = True
    cache_dir: str | None = None  # default: <out_dir>/cache
    max_nan_steps: int = 5

    def validate(self) -> None:
        """Every option checked at once, before any model or data is touched (the CLI, the node and library callers
        all come through here)."""
        from .errors import number_problem, seed_problem

        problems = []
        if self.k not in (1, 2):
            problems.append(f"k must be 1 or 2 (teacher pixels per student pixel), got {self.k}")
        # SD1.5 latents are 1/8 of the pixels; the teachers' latents are 1/8 and their transformers take 2x2 patches.
        if number_problem("student_res", self.student_res, low=8, integer=True) or self.student_res % 8:
            problems.append(f"student_res must be a positive multiple of 8 (SD1.5 pixels per latent), got "
                            f"{self.student_res!r}")
        elif self.teacher_res != self.k * self.student_res:
            problems.append(f"teacher_res ({self.teacher_res}) must be k x student_res ({self.k} x {self.student_res})")
        elif self.teacher_res % 16:
            problems.append(f"teacher_res must be a multiple of 16 (8 pixels per teacher latent, 2x2 latents per "
                            f"token), got {self.teacher_res}: with k=1 use a student_res that is a multiple of 16")
        for name in ("steps", "batch_size", "val_every", "ckpt_every", "log_every", "attn_queries", "val_batches",
                     "max_nan_steps"):
            problems.append(number_problem(name, getattr(self, name), low=1, integer=True))
        problems += [
            number_problem("warmup_steps", self.warmup_steps, low=0, integer=True),
            number_problem("lr", self.lr, low=0, low_open=True),
            number_problem("weight_decay", self.weight_decay, low=0),
            number_problem("grad_clip", self.grad_clip, low=0, low_open=True),
            number_problem("attn_weight", self.attn_weight, low=0),
            seed_problem("seed", self.seed),
        ]
        if number_problem("val_fraction", self.val_fraction) or not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tap not in ("image", "features"):
            problems.append(f"tap must be image or features, got {self.tap!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            problems.append(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.gradient_checkpointing not in (None, True, False):
            problems.append(f"gradient_checkpointing must be None (auto: on with CUDA), True or False, got "
                            f"{self.gradient_checkpointing!r}")
        acc_problem = number_problem("gradient_accumulation", self.gradient_accumulation, low=1, integer=True)
        problems.append(acc_problem)
        if not acc_problem and not number_problem("batch_size", self.batch_size, low=1, integer=True) and \
                self.batch_size % self.gradient_accumulation:
            problems.append(f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation "
                            f"({self.gradient_accumulation}): each step runs it as {self.gradient_accumulation} equal "
                            "micro-batches")
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("Invalid Bridge training config: " + "; ".join(problems) + ".")


@dataclass
class BridgeModels:
    """What Bridge training needs. Text encoding is a callable so encoders can be freed after caching."""

    student_vae: torch.nn.Module  # AutoencoderKL, student space
    teacher_vae: torch.nn.Module  # AutoencoderKL, teacher space
    teacher: "Teacher"
    student_space: object  # LatentSpace
    teacher_space: object  # LatentSpace
    encode_text: Callable[[list[str]], "object"]  # prompts -> TextCond
    free_text_encoders: Callable[[], None] = lambda: None
    description: dict = field(default_factory=dict)  # what was loaded, for the checkpoint summary


# --- metrics -------------------------------------------------------------------------------------


def psnr(pred: torch.Tensor, target: torch.Tensor, peak: float | torch.Tensor = 1.0) -> float:
    mse = F.mse_loss(pred.float(), target.float()).item()
    peak = float(peak)
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def attention_kl(p_target: torch.Tensor, p_pred: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(target || pred) over the key axis, averaged over queries (and heads, batch)."""
    p_target = p_target.float()
    p_pred = p_pred.float()
    return (p_target * (torch.log(p_target + eps) - torch.log(p_pred + eps))).sum(-1).mean()


def attention_similarity(p_a: torch.Tensor, p_b: torch.Tensor) -> float:
    """Histogram intersection of two attention distributions, averaged: 1 = identical, 0 = disjoint."""
    return torch.minimum(p_a.float(), p_b.float()).sum(-1).mean().item()


# --- the trainer ---------------------------------------------------------------------------------


class BridgeTrainer:
    STATE_FILE = "train_state.safetensors"
    BRIDGE_FILE = "bridge.safetensors"

    def __init__(self, config: BridgeTrainConfig, models: BridgeModels, progress: loop.ProgressReporter | None = None,
                 stop: loop.StopFlag | None = None):
        from .errors import output_dir

        config.validate()
        self.cfg = config
        self.m = models
        self.progress = progress
        self.stop = stop or loop.StopFlag()
        output_dir(config.out_dir, "Run folder")
        self.cache_dir = config.cache_dir or os.path.join(config.out_dir, "cache")
        self.accel = loop.make_accelerator(config.mixed_precision, cpu=config.cpu)
        self.device = self.accel.device

    # ---- setup ----
    def _student_encode(self, images01: torch.Tensor) -> torch.Tensor:
        vae = self.m.student_vae
        x = images01.to(self.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean.float().cpu()

    def _teacher_encode(self, images01: torch.Tensor) -> torch.Tensor:
        vae = self.m.teacher_vae
        x = images01.to(self.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean.float().cpu()

    def _text_encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.m.encode_text(captions).to_tensors(prefix="text.")

    def prepare_data(self) -> None:
        cfg = self.cfg
        items = data_mod.scan_images(cfg.images)
        train, val = data_mod.split_items(items, cfg.val_fraction, cfg.seed)
        if not train or not val:
            raise ValueError(
                f"Need at least 2 images for a train/held-out split; {cfg.images} has {len(items)}. Add images "
                "or lower --val-fraction."
            )
        fingerprint = json.dumps(self.m.description, sort_keys=True)
        with torch.no_grad():
            for name, split in (("train", train), ("val", val)):
                if self.accel.is_main_process:
                    data_mod.build_latent_cache(
                        split, os.path.join(self.cache_dir, name), self._student_encode, self._teacher_encode,
                        self._text_encode, cfg.student_res, cfg.teacher_res, batch_size=cfg.batch_size,
                        encoder_fingerprint=fingerprint,
                    )
        self.accel.wait_for_everyone()
        # Text encoders are only needed to fill the cache.
        self.m.free_text_encoders()
        self.train_data = data_mod.LatentCache(os.path.join(self.cache_dir, "train"))
        self.val_data = data_mod.LatentCache(os.path.join(self.cache_dir, "val"))

    def build_bridge(self):
        cfg = self.cfg
        pcfg = bridge_model.projector_config(self.m.student_space, self.m.teacher_space, cfg.k, cfg.tap,
                                             self.m.student_vae, **cfg.projector)
        torch.manual_seed(cfg.seed)  # projector init is part of the run's identity
        bridge = bridge_model.Bridge(bridge_projector.Projector(pcfg), self.m.student_space, self.m.teacher_space,
                                     cfg.k, student_vae=self.m.student_vae, tap=cfg.tap)
        self.gradient_checkpointing = loop.use_gradient_checkpointing(cfg.gradient_checkpointing, self.device)
        if self.gradient_checkpointing:
            bridge.enable_gradient_checkpointing()
            self.m.teacher.enable_gradient_checkpointing()
        return bridge.to(self.device)

    # ---- one step ----
    def _batch(self, cache: "data_mod.LatentCache", step: int, stream: int) -> dict:
        g = loop.step_generator(self.cfg.seed, step, stream)
        idx = torch.randint(0, len(cache), (self.cfg.batch_size,), generator=g).tolist()
        return {k: v.to(self.device) for k, v in cache.batch(idx).items()}

    def _cond(self, batch: dict):
        from .models.text import TextCond

        return TextCond.from_tensors(batch, prefix="text.").to(self.device)

    def _attention_draws(self, shape, dtype, step: int, stream: int):
        """Noise levels, noise and the query seed of the attention loss for a batch of teacher latents of `shape`:
        per-(step, stream) randomness, drawn for the whole batch (micro-batches take their rows)."""
        g = loop.step_generator(self.cfg.seed, step, 1000 + stream, device=self.device)
        s = self.m.teacher.sample_s(shape[0], generator=g, device=self.device)
        noise = torch.randn(shape, generator=g, device=self.device, dtype=dtype)
        q_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=self.device).item())
        return s, noise, q_seed

    def _losses(self, batch: dict, step: int, stream: int, with_attention: bool,
                draws=None) -> dict[str, torch.Tensor]:
        """Reconstruction and attention losses for one batch; per-(step, stream) randomness (`draws`: those of
        `_attention_draws` for these rows, when the batch is a micro-batch)."""
        t_space = self.m.teacher_space
        z_s = batch["student"]
        target = t_space.to_model(batch["teacher"])
        pred = self.bridge.forward_model(z_s)
        out = {"rec": F.mse_loss(pred.float(), target.float()), "pred": pred, "target": target}
        if with_attention:
            s, noise, q_seed = draws or self._attention_draws(target.shape, target.dtype, step, stream)
            cond = self._cond(batch)
            maps_t, maps_p = self._attention_maps(target, pred, noise, s, cond, q_seed)
            kls = {name: attention_kl(maps_t[name], maps_p[name]) for name in maps_t}
            out["attn"] = torch.stack(list(kls.values())).mean()
            out["attn_blocks"] = {"target": maps_t, "pred": maps_p}
        return out

    def _attention_maps(self, target, pred, noise, s, cond, q_seed):
        """Teacher attention on the noised target (no grad) and the noised prediction, same queries."""
        teacher = self.m.teacher
        cfg = self.cfg
        x_t = teacher.add_noise(target, noise, s)
        x_p = teacher.add_noise(pred, noise, s)
        gen = lambda: torch.Generator(device=self.device).manual_seed(q_seed)  # noqa: E731  same queries twice
        with torch.no_grad(), teacher.capture_attention(cfg.attn_blocks, cfg.attn_queries, gen()) as maps:
            teacher.velocity(x_t, s, cond)
            maps_t = {k: v.detach() for k, v in maps.items()}
        with teacher.capture_attention(cfg.attn_blocks, cfg.attn_queries, gen()) as maps:
            teacher.velocity(x_p, s, cond)
            maps_p = dict(maps)
        return maps_t, maps_p

    def train_step(self, step: int) -> dict[str, float] | None:
        cfg = self.cfg
        stream = self.accel.process_index
        batch = self._batch(self.train_data, step, stream)
        attention = cfg.attn_weight > 0
        k = cfg.gradient_accumulation
        draws = None
        if attention and k > 1:  # the whole batch's draws, as without accumulation
            shape = batch["teacher"].shape
            draws = self._attention_draws(shape, self.m.teacher_space.to_model(batch["teacher"][:1]).dtype, step,
                                          stream)
        sums: dict[str, torch.Tensor] = {}
        m = cfg.batch_size // k
        for i in range(k):
            part = slice(i * m, (i + 1) * m)
            micro = batch if k == 1 else {key: v[part] for key, v in batch.items()}
            sync = contextlib.nullcontext() if i == k - 1 else self.accel.no_sync(self.bridge.projector)
            with sync:
                with self.accel.autocast():
                    out = self._losses(micro, step, stream, with_attention=attention,
                                       draws=None if draws is None else (draws[0][part], draws[1][part], draws[2]))
                    loss = out["rec"] + (cfg.attn_weight * out["attn"] if "attn" in out else 0.0)
                # Non-finite values are judged on the all-reduced gradient norm, so every DDP process skips the same
                # steps.
                self.accel.backward(loss / k)
            for key, v in (("loss", loss), ("rec", out["rec"]), ("attn", out.get("attn"))):
                if v is not None:
                    sums[key] = sums.get(key, 0.0) + v.detach() / k
            del out, loss
        loss, out = sums["loss"], sums
        grad_norm = self.accel.clip_grad_norm_(self.trainable, cfg.grad_clip)
        if not self.nan_guard.check(grad_norm):
            self.opt.zero_grad(set_to_none=True)
            return None
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        metrics = {"loss": loss.item(), "rec": out["rec"].item(), "grad_norm": float(grad_norm),
                   "lr": self.sched.get_last_lr()[0]}
        if "attn" in out:
            metrics["attn"] = out["attn"].item()
        return metrics

    # ---- validation ----
    def _round_trip(self, z_s: torch.Tensor) -> torch.Tensor:
        """The exact reference E_t(upsample(D_s(z_s))), in teacher model space."""
        raw = bridge_model.exact_round_trip(z_s, self.m.student_vae, self.m.teacher_vae, self.cfg.k)
        return self.m.teacher_space.to_model(raw.float())

    def _teacher_decode(self, model_latent: torch.Tensor) -> torch.Tensor:
        vae = self.m.teacher_vae
        raw = self.m.teacher_space.to_raw(model_latent)
        return ((vae.decode(raw.to(vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def validate(self, step: int, grid_path: str | None = None) -> dict:
        cfg = self.cfg
        n = len(self.val_data)
        per = {"bridge": {}, "round_trip": {}}
        sums: dict[str, dict[str, list[float]]] = {"bridge": {}, "round_trip": {}}
        grid_rows = None
        for b in range(cfg.val_batches):
            idx = [(b * cfg.batch_size + i) % n for i in range(min(cfg.batch_size, n))]
            batch = {k: v.to(self.device) for k, v in self.val_data.batch(idx).items()}
            target = self.m.teacher_space.to_model(batch["teacher"])
            candidates = {"bridge": self.bridge.forward_model(batch["student"]),
                          "round_trip": self._round_trip(batch["student"])}
            target_img = self._teacher_decode(target)
            peak = (target.amax() - target.amin()).item()
            cond = self._cond(batch)
            g = loop.step_generator(cfg.seed, 10**9 + b, 0, device=self.device)  # fixed across validations
            s = self.m.teacher.sample_s(target.shape[0], generator=g, device=self.device)
            noise = torch.randn(target.shape, generator=g, device=self.device)
            images = {}
            for name, pred in candidates.items():
                acc = sums[name]
                mse = F.mse_loss(pred, target).item()
                acc.setdefault("latent_mse", []).append(mse)
                acc.setdefault("latent_psnr", []).append(psnr(pred, target, peak))
                images[name] = self._teacher_decode(pred)
                acc.setdefault("image_psnr", []).append(psnr(images[name], target_img))
                if cfg.attn_weight > 0 or cfg.attn_blocks:
                    maps_t, maps_p = self._attention_maps(target, pred, noise, s, cond, q_seed=b)
                    for blk in maps_t:
                        acc.setdefault(f"attn_sim/{blk}", []).append(attention_similarity(maps_t[blk], maps_p[blk]))
            if b == 0:
                grid_rows = [target_img.cpu(), images["round_trip"].cpu(), images["bridge"].cpu()]
        for name, acc in sums.items():
            per[name] = {k: sum(v) / len(v) for k, v in acc.items()}
        if grid_path and grid_rows is not None:
            # One column per sample; rows: target | exact round trip | Bridge, all decoded by the teacher VAE.
            loop.save_image_grid(grid_rows, grid_path, labels=["target", "round trip", "bridge"])
        return {"step": step, "val": per}

    def _validate_and_log(self, step: int, log) -> tuple[dict, "object"]:
        """Held-out metrics (logged) and the validation grid, returned as a PIL image for previews."""
        main = self.accel.is_main_process
        grid = os.path.join(self.cfg.out_dir, "val", f"step_{step:06d}.png")
        self.bridge.eval()
        val = self.validate(step, grid if main else None)
        self.bridge.train()
        if log is not None:
            log.log(val)
        if not main:
            return val, None
        from PIL import Image

        with Image.open(grid) as im:
            return val, im.convert("RGB")

    # ---- checkpoints ----
    def _summary(self, step: int) -> dict:
        return {"steps": step, "config": asdict(self.cfg), "models": self.m.description,
                "nan_skipped": self.nan_guard.skipped_total, "processes": self.accel.num_processes,
                "last_val": self.last_val, "gradient_checkpointing": self.gradient_checkpointing}

    def save(self, step: int, state: bool = True) -> None:
        """The Bridge file, then the training state. The state is the commit point: a run killed between the two
        resumes before `step` and writes both again, so a state that says "done" always has its Bridge."""
        if not self.accel.is_main_process:
            return
        projector = self.accel.unwrap_model(self.bridge.projector)
        bridge_ckpt.save_bridge(os.path.join(self.cfg.out_dir, self.BRIDGE_FILE), self._plain_bridge(projector),
                                training_summary=self._summary(step),
                                decoder_fingerprint=bridge_ckpt.decoder_fingerprint(self.m.student_vae))
        if state:
            save_training_state(
                os.path.join(self.cfg.out_dir, self.STATE_FILE),
                modules={"projector": projector}, optimizers={"opt": self.opt}, schedulers={"sched": self.sched},
                extra={"step": step, "nan_skipped": self.nan_guard.skipped_total, "config": asdict(self.cfg),
                       "train_seconds": self.clock.seconds(), "last_val": self.last_val},
            )

    def _plain_bridge(self, projector):
        b = self.bridge
        return bridge_model.Bridge(projector, b.student_space, b.teacher_space, b.k, student_vae=None, tap=b.tap)

    # ---- main loop ----
    def run(self) -> dict:
        cfg = self.cfg
        if self.accel.is_main_process:
            loop.remove_stale_temporaries(cfg.out_dir, os.path.join(cfg.out_dir, "val"),
                                          os.path.join(self.cache_dir, "train"), os.path.join(self.cache_dir, "val"))
        self.prepare_data()
        self.bridge = self.build_bridge()
        self.trainable = [p for p in self.bridge.projector.parameters() if p.requires_grad]
        self.opt = loop.make_optimizer(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = loop.lr_schedule(self.opt, cfg.warmup_steps, cfg.steps)
        self.nan_guard = loop.NaNGuard(cfg.max_nan_steps)
        self.last_val = None
        self.clock = loop.TrainClock()
        start = 0
        state_path = os.path.join(cfg.out_dir, self.STATE_FILE)
        if cfg.resume and os.path.exists(state_path):
            extra = load_training_state(state_path, {"projector": self.bridge.projector}, {"opt": self.opt},
                                        {"sched": self.sched})
            start = int(extra["step"])
            self.nan_guard.skipped_total = int(extra.get("nan_skipped", 0))
            self.clock.resume(extra.get("train_seconds", 0.0))
            self.last_val = extra.get("last_val")  # the Bridge's summary holds it
        self.bridge.projector, self.opt = self.accel.prepare(self.bridge.projector, self.opt)
        log = (loop.JsonlLogger(os.path.join(cfg.out_dir, "metrics.jsonl"), resume_step=start)
               if self.accel.is_main_process else None)
        progress = self.progress or loop.ProgressReporter(total=cfg.steps, desc="bridge",
                                                          disable=not self.accel.is_main_process)
        progress.start(start)
        step = start
        t0 = self.clock.start()
        result = {"resumed_from": start, "stopped_early": False, "gradient_checkpointing": self.gradient_checkpointing}
        if start >= cfg.steps:
            # Already finished: write the Bridge again from the state (it may be missing, or older than the state
            # when an earlier version was killed between its two saves).
            self.save(start, state=False)
            if self.last_val is not None:
                result["last_val"] = self.last_val
        try:
            # Diverged, cancelled from a progress callback, or crashed: keep the last finished step resumable.
            free = lambda: self.opt.zero_grad(set_to_none=True)  # noqa: E731  gradients, after running out of memory
            with loop.graceful_interrupt(self.stop), loop.save_on_failure(self.save, lambda: step, start, free=free):
                while step < cfg.steps:
                    metrics = self.train_step(step)
                    step += 1
                    if log is not None and metrics is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                        log.log({"step": step, **metrics})
                    preview = None
                    if step % cfg.val_every == 0 or step == cfg.steps:
                        val, preview = self._validate_and_log(step, log)
                        result["last_val"] = self.last_val = val
                    if step % cfg.ckpt_every == 0 or step == cfg.steps:
                        self.save(step)
                    progress.update(step, metrics or {}, preview)
                    if self.stop.is_set() and step < cfg.steps:
                        self.save(step)
                        result["stopped_early"] = True
                        break
        finally:
            progress.close()
        result.update(step=step, seconds=time.time() - t0, train_seconds=self.clock.seconds(),
                      nan_skipped=self.nan_guard.skipped_total, bridge=os.path.join(cfg.out_dir, self.BRIDGE_FILE),
                      out_dir=cfg.out_dir)
        return result
