"""Cross-space one-step distillation: train an SD1.5 one-step student against a teacher in another latent space.

One student step (DMD2 recipe, in the teacher's MODEL space):

    z   = G(noise, student text)                      student RAW latent (SD1.5 UNet once at t = 999)
    x   = Bridge.forward_model(z)                     teacher model space; gradient flows back to G
    x_s = (1 - s) x.detach() + s n                    s from the configured distribution, in [0.02, 0.98]
    x0_real = teacher(x_s, s, text, neg, guidance)    frozen teacher (adapter off), no grad
    x0_fake = teacher.fake()(x_s, s, text)            LoRA "fake" score on the same weights, no grad
    loss = 0.5 mse(x, x - grad(x, x0_real, x0_fake))  DMD (default) or VSD, see dmd.py

then `fake_updates` fake-score steps: flow matching mse(v_fake(x_s), n - x) on detached student samples (the
first reuses this step's samples, the others draw fresh ones). All randomness of a step comes from
`loop.step_generator(seed, step, process)`, so a resumed run repeats the uninterrupted one exactly.

`Distiller` is what both `python -m training.run distill` and the ComfyUI training node call.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dmd, loop
from .state import load_training_state, save_training_state
from .student import OneStepStudent
from .text import encode_sd15

if TYPE_CHECKING:
    from .text import TextCond


# ---------------------------------------------------------------------------------------------- config

@dataclass
class DistillConfig:
    out_dir: str
    prompts: list[str]
    negative_prompt: str = ""
    val_prompts: list[str] | None = None  # default: the first 4 prompts
    val_seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 2000
    batch_size: int = 4
    resolution: int = 512  # student pixels per side; the teacher sees k x that through the Bridge
    loss: str = "dmd"  # "dmd" | "vsd"
    guidance: float | list[float] = 4.5  # real-score guidance: fixed, or [low, high] drawn per sample
    timesteps: str = "uniform"  # "uniform" | "logit_normal" | "teacher", mapped into [s_min, s_max]
    s_min: float = dmd.S_MIN
    s_max: float = dmd.S_MAX
    student_lr: float = 1e-5
    student_lora_rank: int = 0  # 0: fine-tune the whole UNet
    ema_decay: float = 0.0  # 0: no EMA
    fake_lr: float = 1e-4
    fake_rank: int = 64
    fake_alpha: float | None = None  # default: = rank
    fake_updates: int = 5  # fake-score steps per student step (DMD2: 5)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 500
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cpu: bool = False  # train on the CPU even where CUDA exists
    gradient_checkpointing: bool = False
    resume: bool = True
    cache_dir: str | None = None  # default <out_dir>/cache
    max_nan_steps: int = 5

    def validate(self) -> None:
        p = []
        if not self.prompts or not all(isinstance(x, str) for x in self.prompts):
            p.append("prompts must be a non-empty list of strings (one prompt per line in the prompts file)")
        for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "fake_updates",
                     "max_nan_steps"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8 or self.resolution < 8:
            p.append(f"resolution must be a positive multiple of 8 (SD1.5 pixels per latent), got {self.resolution}")
        if self.loss not in dmd.LOSSES:
            p.append(f"loss must be one of {', '.join(dmd.LOSSES)}, got {self.loss!r}")
        if self.timesteps not in dmd.TIMESTEP_DISTS:
            p.append(f"timesteps must be one of {', '.join(dmd.TIMESTEP_DISTS)}, got {self.timesteps!r}")
        if not 0 <= self.s_min < self.s_max <= 1:
            p.append(f"need 0 <= s_min < s_max <= 1, got [{self.s_min}, {self.s_max}]")
        g = self.guidance
        if isinstance(g, (list, tuple)):
            if len(g) != 2 or g[0] > g[1]:
                p.append(f"a guidance range is [low, high] with low <= high, got {list(g)}")
        elif not isinstance(g, (int, float)):
            p.append(f"guidance must be a number or [low, high], got {g!r}")
        for name in ("student_lr", "fake_lr"):
            if getattr(self, name) <= 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.student_lora_rank < 0 or self.fake_rank < 1:
            p.append("student_lora_rank must be >= 0 and fake_rank >= 1")
        if not 0 <= self.ema_decay < 1:
            p.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            p.append(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if p:
            raise ValueError("Invalid distillation config:\n  - " + "\n  - ".join(p))

    @property
    def guidance_arg(self):
        return tuple(self.guidance) if isinstance(self.guidance, (list, tuple)) else float(self.guidance)


@dataclass
class DistillModels:
    """What distillation needs. Text encoding is a callable so encoders can be freed once embeddings are cached."""

    student: OneStepStudent
    bridge: nn.Module  # bridge.model.Bridge with its (frozen) student VAE
    teacher: object  # a Teacher (SD3Teacher, FluxTeacher, ClosedFormTeacher, ...)
    encode_teacher: Callable[[list[str]], "TextCond"]
    encode_student: Callable[[list[str]], "TextCond"]  # SD1.5 CLIP-L hidden states as prompt_embeds
    teacher_vae: nn.Module | None = None  # for previews through the Bridge; None: student previews only
    free_text_encoders: Callable[[], None] = lambda: None
    description: dict = field(default_factory=dict)  # what was loaded, for the cache key and summaries


def parse_prompts(text: str, source: str = "the prompts") -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{source} has no prompts (one per line; '#' lines are comments).")
    return prompts


def read_prompts(path: str) -> list[str]:
    """A text file of prompts, see `parse_prompts`."""
    if not os.path.isfile(path):
        raise ValueError(f"Prompts file not found: {path!r}. Give a text file with one prompt per line.")
    with open(path, encoding="utf-8") as f:
        return parse_prompts(f.read(), repr(path))


class _Params(nn.Module):
    """Existing parameters (the fake LoRA inside the teacher) as a module, so training-state checkpoints save
    and restore them without the frozen weights around them. Holds the same tensors, not copies."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


# ---------------------------------------------------------------------------------------------- trainer

class Distiller:
    STATE_FILE = "train_state.safetensors"
    STUDENT_FILE = "student_unet.safetensors"

    def __init__(self, config: DistillConfig, models: DistillModels,
                 progress: "loop.ProgressReporter | None" = None, stop: "loop.StopFlag | None" = None):
        config.validate()
        self.cfg = config
        self.m = models
        self.progress = progress
        self.stop = stop or loop.StopFlag()
        os.makedirs(config.out_dir, exist_ok=True)
        self.cache_dir = config.cache_dir or os.path.join(config.out_dir, "cache")
        self.accel = loop.make_accelerator(config.mixed_precision, cpu=config.cpu)
        self.device = self.accel.device
        bridge = models.bridge
        if bridge.student_vae is None:
            raise ValueError("Distillation needs the Bridge with its student VAE (the frozen SD1.5 decoder the "
                             "gradient flows through): build it with student_vae=... / load_bridge(path, student_vae).")
        if bridge.student_space.channels != models.student.space.channels:
            raise ValueError(f"The Bridge maps {bridge.student_space.name} latents but the student generates "
                             f"{models.student.space.name} latents.")
        if bridge.teacher_space.channels != models.teacher.space.channels:
            raise ValueError(f"The Bridge maps into {bridge.teacher_space.name} ({bridge.teacher_space.channels} "
                             f"channels) but the teacher works in {models.teacher.space.name} "
                             f"({models.teacher.space.channels}). Use a Bridge trained for this teacher.")
        self.latent = models.student.latent_size(config.resolution)
        self.timer = None  # set by the benchmark to time the parts of a step
        self.clock = loop.TrainClock()

    # ---- text ----
    def _cache_key(self) -> str:
        c = self.cfg
        blob = json.dumps({"prompts": c.prompts, "negative": c.negative_prompt, "val": self.val_prompts,
                           "models": self.m.description}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def prepare_text(self) -> None:
        """Encode every prompt once (teacher: all its encoders; student: CLIP-L), cache on disk, free encoders."""
        from .text import TextCond

        c = self.cfg
        self.val_prompts = list(c.val_prompts or c.prompts[:4])
        files = {"teacher": "teacher.safetensors", "student": "student.safetensors",
                 "negative": "negative.safetensors", "val_student": "val_student.safetensors"}
        paths = {k: os.path.join(self.cache_dir, v) for k, v in files.items()}
        key_path = os.path.join(self.cache_dir, "cache.json")
        key = self._cache_key()
        if self.accel.is_main_process:
            fresh = os.path.exists(key_path) and all(os.path.exists(p) for p in paths.values())
            if fresh:
                with open(key_path, encoding="utf-8") as f:
                    fresh = json.load(f).get("key") == key
            if not fresh:
                os.makedirs(self.cache_dir, exist_ok=True)
                if os.path.exists(key_path):
                    os.remove(key_path)  # a half-finished rebuild must never look valid
                with torch.no_grad():
                    self.m.encode_teacher(c.prompts).save(paths["teacher"])
                    self.m.encode_teacher([c.negative_prompt]).save(paths["negative"])
                    self.m.encode_student(c.prompts).save(paths["student"])
                    self.m.encode_student(self.val_prompts).save(paths["val_student"])
                loop.write_json(key_path, {"key": key, "prompts": len(c.prompts)})  # atomic: written last
        self.accel.wait_for_everyone()
        self.m.free_text_encoders()  # embeddings are all training needs from here on
        self.text = {k: TextCond.load(p) for k, p in paths.items()}
        n_t, n_s = self.text["teacher"].prompt_embeds.shape[0], self.text["student"].prompt_embeds.shape[0]
        if n_t != len(c.prompts) or n_s != len(c.prompts):
            raise ValueError(f"Cached embeddings hold {n_t}/{n_s} prompts, the config has {len(c.prompts)}; delete "
                             f"{self.cache_dir} and run again.")

    # ---- models ----
    def setup(self) -> None:
        c, m = self.cfg, self.m
        student, bridge, teacher = m.student, m.bridge, m.teacher
        bridge.requires_grad_(False).eval()
        bridge.to(self.device)
        teacher.model.to(self.device)  # no-op when the caller loaded it there (keeps its dtype)
        student.to(self.device).train()
        if c.student_lora_rank:
            student.add_lora(rank=c.student_lora_rank)
        teacher.add_fake_adapter(rank=c.fake_rank, alpha=c.fake_alpha or c.fake_rank)
        if c.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            bridge.enable_gradient_checkpointing()
            teacher.enable_gradient_checkpointing()
        if c.ema_decay:
            student.enable_ema(c.ema_decay)
        self.student_params = student.trainable_parameters()
        self.fake_params = list(teacher.fake_parameters())
        self.opt_student = torch.optim.AdamW(self.student_params, lr=c.student_lr, weight_decay=c.weight_decay)
        self.opt_fake = torch.optim.AdamW(self.fake_params, lr=c.fake_lr, weight_decay=c.weight_decay)
        self.nan_guard = loop.NaNGuard(c.max_nan_steps)

    def _state_modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.accel.unwrap_model(self.generator), "fake": _Params(self.fake_params)}
        ema = self.m.student.ema_state_module()
        if ema is not None:
            mods["ema"] = ema
        return mods

    # ---- one step ----
    def _batch(self, g: torch.Generator):
        c = self.cfg
        idx = torch.randint(0, len(c.prompts), (c.batch_size,), generator=g, device=g.device).cpu()
        t_cond = self.text["teacher"].index(idx).to(self.device)
        s_emb = self.text["student"].index(idx).prompt_embeds.to(self.device)
        noise = torch.randn((c.batch_size, self.m.student.space.channels, self.latent, self.latent), generator=g,
                            device=g.device).to(self.device)
        return noise, s_emb, t_cond

    def _generate(self, noise, s_emb) -> torch.Tensor:
        """Student sample -> teacher MODEL-space latent (float32), differentiable w.r.t. the student."""
        z = self.generator(noise, s_emb)
        return self.m.bridge.forward_model(z).float()

    def _noise(self, x: torch.Tensor, g: torch.Generator):
        c = self.cfg
        s = dmd.sample_timesteps(x.shape[0], c.timesteps, c.s_min, c.s_max, generator=g, device=g.device,
                                 teacher=self.m.teacher, resolution=c.resolution * self.m.bridge.k)
        n = torch.randn(x.shape, generator=g, device=g.device)
        s, n = s.to(self.device), n.to(self.device)
        return s, n, self.m.teacher.add_noise(x.detach(), n, s)

    def _all_finite(self, value: torch.Tensor) -> bool:
        """The NaN guard's verdict, agreed by all processes (a process skipping alone would hang DDP)."""
        v = self.accel.gather(value.detach().float().reshape(1))
        return self.nan_guard.check(v.sum())

    def _average_fake_grads(self) -> None:
        """The fake LoRA lives inside the teacher, which is not DDP-wrapped: average its gradients by hand."""
        if self.accel.num_processes == 1:
            return
        grads = [p.grad for p in self.fake_params if p.grad is not None]
        flat = self.accel.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for g_ in grads:
            g_.copy_(flat[offset:offset + g_.numel()].view_as(g_))
            offset += g_.numel()

    def _phase(self, name: str):
        """A named part of the step, for the benchmark's breakdown (`timer` is None in training)."""
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def train_step(self, step: int) -> dict[str, float] | None:
        c, teacher = self.cfg, self.m.teacher
        g = loop.step_generator(c.seed, step, self.accel.process_index, device=self.device)
        noise, s_emb, t_cond = self._batch(g)
        neg = self.text["negative"].repeat(c.batch_size).to(self.device)
        metrics: dict[str, float] = {}

        # -- student (generator) update --
        with self.accel.autocast():
            with self._phase("student_forward"):
                z = self.generator(noise, s_emb)
            with self._phase("decode_project"):
                x = self.m.bridge.forward_model(z).float()
        s, _, x_s = self._noise(x, g)
        guidance = dmd.sample_guidance(c.batch_size, c.guidance_arg, generator=g, device=g.device)
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(self.device)
        with torch.no_grad(), self.accel.autocast():
            with self._phase("real_teacher"):
                x0_real = teacher.predict_x0(x_s, s, t_cond, neg_cond=neg, guidance=guidance).float()
            with self._phase("fake_teacher"), teacher.fake():
                x0_fake = teacher.predict_x0(x_s, s, t_cond).float()
        loss, grad = dmd.distribution_matching_loss(c.loss, x, x0_real, x0_fake, s)
        # The gradient's nan_to_num would hide a diverged teacher (e.g. a bf16 overflow) as a zero gradient:
        # non-finite teacher outputs make the step a NaN step too.
        if not self._all_finite(loss + 0 * (x0_real.sum() + x0_fake.sum())):
            self.opt_student.zero_grad(set_to_none=True)
            return None
        with self._phase("backward"):
            self.accel.backward(loss)
            gn = self.accel.clip_grad_norm_(self.student_params, c.grad_clip)
            self.opt_student.step()
            self.opt_student.zero_grad(set_to_none=True)
            self.m.student.ema_step()
        metrics.update(loss=loss.item(), grad_abs=grad.abs().mean().item(), student_grad_norm=float(gn),
                       sample_std=x.detach().std().item())

        # -- fake score updates --
        fake_losses = []
        for k in range(c.fake_updates):
            if k == 0:
                x_f, cond_f = x.detach(), t_cond
            else:
                noise_k, s_emb_k, cond_f = self._batch(g)
                with self._phase("fake_samples"), torch.no_grad(), self.accel.autocast():
                    x_f = self._generate(noise_k, s_emb_k)
            s_f, n_f, x_s_f = self._noise(x_f, g)
            # Forward and backward inside the adapter's state: toggling adapters may change requires_grad of the
            # LoRA weights, and under gradient checkpointing the backward re-runs the forward.
            with self._phase("fake_update"), teacher.fake():
                with self.accel.autocast():
                    v = teacher.velocity(x_s_f, s_f, cond_f)
                loss_f = dmd.flow_matching_loss(v, x_f, n_f)
                if not self._all_finite(loss_f):
                    self.opt_fake.zero_grad(set_to_none=True)
                    continue
                loss_f.backward()
                self._average_fake_grads()
                torch.nn.utils.clip_grad_norm_(self.fake_params, c.grad_clip)
                self.opt_fake.step()
                self.opt_fake.zero_grad(set_to_none=True)
            fake_losses.append(loss_f.item())
        if fake_losses:
            metrics["fake_loss"] = sum(fake_losses) / len(fake_losses)
        return metrics

    # ---- previews ----
    @torch.no_grad()
    def preview(self, step: int, path: str | None):
        """One-step samples for the fixed validation prompts x seeds: row 1 decoded by the SD1.5 VAE, row 2 the
        same latents through the Bridge decoded by the teacher VAE (when given). Returns the grid as PIL."""
        from ._bridge import model as bridge_model

        student, bridge = self.m.student, self.m.bridge
        emb = self.text["val_student"].prompt_embeds
        rows_s, rows_t = [], []
        was_training = student.training
        student.eval()
        with student.ema_weights():
            for seed in self.cfg.val_seeds:
                gen = torch.Generator().manual_seed(int(seed))
                noise = torch.randn((emb.shape[0], student.space.channels, self.latent, self.latent), generator=gen)
                z = student(noise.to(self.device), emb.to(self.device))
                rows_s.append(bridge.decode_student(z).cpu())
                if self.m.teacher_vae is not None:
                    rows_t.append(bridge_model.decode_to_image01(self.m.teacher_vae, bridge(z)).cpu())
        student.train(was_training)
        size = rows_t[0].shape[-2:] if rows_t else rows_s[0].shape[-2:]
        rows = [torch.cat(rows_s)] + ([torch.cat(rows_t)] if rows_t else [])
        rows = [F.interpolate(r, size=size, mode="nearest") if r.shape[-2:] != size else r for r in rows]
        labels = ["student (SD1.5 VAE)"] + (["through Bridge (teacher VAE)"] if rows_t else [])
        return loop.save_image_grid(rows, path, labels=labels)

    # ---- checkpoints ----
    def summary(self, step: int) -> dict:
        return {"steps": step, "config": asdict(self.cfg), "models": self.m.description,
                "nan_skipped": self.nan_guard.skipped_total}

    def save(self, step: int, state: bool = True) -> None:
        from .export import save_student_unet

        if not self.accel.is_main_process:
            return
        extra = {"step": step, "nan_skipped": self.nan_guard.skipped_total, "train_seconds": self.clock.seconds()}
        ema = self.m.student.ema
        if ema is not None:
            extra["ema_step"] = ema.optimization_step
        # The student file, then the training state: the state is the commit point (see BridgeTrainer.save).
        save_student_unet(os.path.join(self.cfg.out_dir, self.STUDENT_FILE), self.m.student,
                          summary=self.summary(step))
        if state:
            save_training_state(os.path.join(self.cfg.out_dir, self.STATE_FILE), modules=self._state_modules(),
                                optimizers={"student": self.opt_student, "fake": self.opt_fake}, schedulers={},
                                extra=extra)

    def _resume(self) -> int:
        path = os.path.join(self.cfg.out_dir, self.STATE_FILE)
        if not (self.cfg.resume and os.path.exists(path)):
            return 0
        extra = load_training_state(path, self._state_modules(),
                                    {"student": self.opt_student, "fake": self.opt_fake}, {})
        if self.m.student.ema is not None:
            self.m.student.ema.optimization_step = int(extra.get("ema_step", 0))
        self.nan_guard.skipped_total = int(extra.get("nan_skipped", 0))
        self.clock.resume(extra.get("train_seconds", 0.0))
        return int(extra["step"])

    # ---- main loop ----
    def prepare(self) -> int:
        """Text cache, models, optimizers, resume; returns the step to start from."""
        self.prepare_text()
        self.setup()
        self.generator = self.m.student
        start = self._resume()
        # DDP for the student; the teacher (and its fake LoRA) and the Bridge stay plain modules.
        self.generator, self.opt_student = self.accel.prepare(self.m.student, self.opt_student)
        return start

    def run(self) -> dict:
        c = self.cfg
        if self.accel.is_main_process:
            loop.remove_stale_temporaries(c.out_dir, os.path.join(c.out_dir, "samples"), self.cache_dir)
        start = self.prepare()
        main = self.accel.is_main_process
        log = loop.JsonlLogger(os.path.join(c.out_dir, "metrics.jsonl"), resume_step=start) if main else None
        progress = self.progress or loop.ProgressReporter(total=c.steps, desc="distill", disable=not main)
        progress.start(start)
        result: dict = {"resumed_from": start, "out_dir": c.out_dir}
        step = start
        if start >= c.steps:
            self.save(start, state=False)  # already finished: the student file again, from the state
        t0 = self.clock.start()
        with loop.graceful_interrupt(self.stop):
            while step < c.steps:
                metrics = self.train_step(step)
                step += 1
                if log is not None and metrics is not None and (step % c.log_every == 0 or step == c.steps):
                    log.log({"step": step, **metrics})
                preview = None
                if main and (step % c.sample_every == 0 or step == c.steps):
                    preview = self.preview(step, os.path.join(c.out_dir, "samples", f"step_{step:06d}.png"))
                if step % c.ckpt_every == 0 or step == c.steps:
                    self.save(step)
                progress.update(step, metrics or {}, preview)
                if metrics is not None:
                    result["last_metrics"] = metrics
                if self.stop.is_set():
                    self.save(step)
                    result["stopped_early"] = True
                    break
        progress.close()
        result.update(step=step, seconds=time.time() - t0, train_seconds=self.clock.seconds(),
                      nan_skipped=self.nan_guard.skipped_total, student=os.path.join(c.out_dir, self.STUDENT_FILE))
        return result


def distill(config: DistillConfig, models: DistillModels, progress=None, stop=None) -> dict:
    """Run (or resume) a distillation; see Distiller."""
    return Distiller(config, models, progress=progress, stop=stop).run()


# ---------------------------------------------------------------------------------------------- CLI

DEMO_PROMPTS = [
    "a red circle on a blue background", "a green square on a white background, top left",
    "a yellow triangle on a black background", "a blue star on an orange background, bottom right",
    "a purple circle on a grey background, center", "a white square on a red background",
    "an orange triangle on a green background, top right", "a black star on a yellow background",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bridge_cli import TEACHER_FAMILIES

    g = p.add_argument_group("models")
    g.add_argument("--demo", action="store_true",
                   help="tiny random-init models (the same tiny SD1.5/SD3.5 world as `bridge --demo`, whose Bridge "
                        "it uses when present) and built-in prompts: runs on a CPU in a minute or two")
    g.add_argument("--student", help="SD1.5 checkpoint (.safetensors single file) or diffusers folder: the student "
                                     "starts from its UNet; its VAE and CLIP-L are the student's")
    g.add_argument("--student-vae", help="separate SD1.5 VAE file (overrides the one in --student)")
    g.add_argument("--bridge", help="trained Bridge (.safetensors) from the student's VAE into the teacher's space")
    g.add_argument("--teacher-family", choices=TEACHER_FAMILIES, help="which teacher the files are")
    g.add_argument("--teacher", help="teacher diffusers folder, or transformer single file")
    g.add_argument("--teacher-vae", help="teacher VAE single file (previews through the Bridge)")
    g.add_argument("--clip-l", help="CLIP-L text encoder file (teacher side)")
    g.add_argument("--clip-g", help="CLIP-G text encoder file (SD3.5)")
    g.add_argument("--t5", help="T5-XXL text encoder file")
    g.add_argument("--tokenizers", help="folder with tokenizer subfolders when the teacher is given as single files")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="dtype of the frozen models (auto: bf16 on CUDA, fp32 on CPU); the student trains in fp32")

    d = p.add_argument_group("prompts and output")
    d.add_argument("--prompts", help="text file, one prompt per line ('#' lines are comments)")
    d.add_argument("--negative-prompt", default="", help="negative prompt for the teacher's guidance (SD3/SD3.5)")
    d.add_argument("--val-prompts", help="text file of preview prompts (default: the first 4 prompts)")
    d.add_argument("--val-seeds", default="0,1", help="comma-separated preview seeds (default 0,1)")
    d.add_argument("--out", help="run folder (student checkpoint, training state, metrics.jsonl, samples/); "
                                 "default runs/distill-demo with --demo")
    d.add_argument("--cache-dir", help="embedding cache folder (default <out>/cache)")
    d.add_argument("--resolution", type=int, help="student image size (default 512; 64 with --demo)")
    d.add_argument("--no-export", action="store_true",
                   help="skip writing the standard SD1.5 checkpoint (student_sd15.safetensors) at the end")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="student steps (default 2000; 60 with --demo)")
    t.add_argument("--batch-size", type=int, help="default 4 (2 with --demo)")
    t.add_argument("--loss", default="dmd", choices=dmd.LOSSES, help="DMD2-normalised gradient (default) or VSD")
    t.add_argument("--guidance",
                   help="real-score guidance: a number, or LOW,HIGH for a per-sample uniform draw (e.g. 2,8); "
                        "default 4.5 for SD3.5 (true CFG), 3.5 for Flux (guidance embedding)")
    t.add_argument("--timesteps", default="uniform", choices=dmd.TIMESTEP_DISTS,
                   help="noise-level distribution, mapped into [--s-min, --s-max]")
    t.add_argument("--s-min", type=float, default=dmd.S_MIN)
    t.add_argument("--s-max", type=float, default=dmd.S_MAX)
    t.add_argument("--student-lr", type=float, default=1e-5)
    t.add_argument("--student-lora-rank", type=int, default=0, help="train a LoRA of this rank (0: full UNet)")
    t.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the student weights (0: off)")
    t.add_argument("--fake-lr", type=float, default=1e-4)
    t.add_argument("--fake-rank", type=int, default=64, help="rank of the fake-score LoRA on the teacher")
    t.add_argument("--fake-alpha", type=float, help="LoRA alpha of the fake score (default = rank)")
    t.add_argument("--fake-updates", type=int, default=5, help="fake-score steps per student step")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--sample-every", type=int, help="preview grid every N steps (default 250; 20 with --demo)")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (student UNet, student decoder, teacher)")
    t.add_argument("--restart", action="store_true", help="start over instead of resuming from --out")


def _parse_guidance(text: str):
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--guidance must be a number or LOW,HIGH; got {text!r}.") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts
    raise ValueError(f"--guidance must be a number or LOW,HIGH; got {text!r}.")


def config_from_args(args, prompts: list[str]) -> DistillConfig:
    demo = args.demo
    return DistillConfig(
        out_dir=args.out, prompts=prompts, negative_prompt=args.negative_prompt,
        val_prompts=read_prompts(args.val_prompts) if args.val_prompts else None,
        val_seeds=[int(s) for s in args.val_seeds.split(",") if s.strip()],
        steps=args.steps or (60 if demo else 2000), batch_size=args.batch_size or (2 if demo else 4),
        resolution=args.resolution or (64 if demo else 512), loss=args.loss,
        guidance=_parse_guidance(args.guidance or ("3.5" if (args.teacher_family or "").startswith("flux") else "4.5")),
        timesteps=args.timesteps, s_min=args.s_min, s_max=args.s_max, student_lr=args.student_lr,
        student_lora_rank=args.student_lora_rank, ema_decay=args.ema_decay, fake_lr=args.fake_lr,
        fake_rank=args.fake_rank, fake_alpha=args.fake_alpha, fake_updates=args.fake_updates,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, log_every=args.log_every,
        sample_every=args.sample_every or (20 if demo else 250), ckpt_every=args.ckpt_every, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def demo_models(seed: int = 0, bridge_path: str | None = None) -> tuple[DistillModels, dict]:
    """The tiny world of `bridge --demo` (same seed: same student VAE, teacher and text encoders) plus a tiny
    SD1.5-style UNet and CLIP-L for the student. Uses the demo Bridge when it exists, else a fresh one."""
    import warnings

    from . import tiny
    from ._bridge import checkpoint as bridge_checkpoint
    from ._bridge import model as bridge_model
    from .bridge_cli import demo_models as bridge_demo_models

    world = bridge_demo_models(seed)
    bridge_path = bridge_path or os.path.join("runs", "bridge-demo", "bridge.safetensors")
    if os.path.exists(bridge_path):
        bridge = bridge_checkpoint.load_bridge(bridge_path, student_vae=world.student_vae)
    else:
        warnings.warn(f"No demo Bridge at {bridge_path}: using an untrained one. Run `python -m training.run "
                      "bridge --demo` first for a trained Bridge.", stacklevel=2)
        torch.manual_seed(seed)
        bridge = bridge_model.Bridge.create("sd15", "sd3", k=2, student_vae=world.student_vae, width=32, depth=2)
    torch.manual_seed(seed + 1)
    unet = tiny.tiny_unet()
    clip, tok = tiny.tiny_clip_text("L").eval(), tiny.tiny_clip_tokenizer()
    encoders = {"clip": clip}

    def free():
        world.free_text_encoders()
        encoders.clear()

    models = DistillModels(
        student=OneStepStudent(unet), bridge=bridge, teacher=world.teacher, teacher_vae=world.teacher_vae,
        encode_teacher=world.encode_text, encode_student=lambda prompts: encode_sd15(prompts, encoders["clip"], tok),
        free_text_encoders=free, description={**world.description, "student_unet": "tiny sd15-like",
                                              "bridge": os.path.abspath(bridge_path) if os.path.exists(bridge_path)
                                              else "untrained"},
    )
    return models, {"vae": world.student_vae, "text_encoder": clip, "tokenizer": tok}


def load_real_models(student: str, bridge: str, teacher_family: str, teacher: str | None = None,
                     teacher_vae: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
                     t5: str | None = None, tokenizers: str | None = None, dtype: str = "auto",
                     student_vae: str | None = None, cpu: bool = False) -> tuple[DistillModels, None]:
    """Student UNet + CLIP-L from the SD1.5 file `student`, the Bridge file, and the teacher (transformer, VAE, text
    encoders) from local files, as the CLI and the ComfyUI node take them. Returns (models, None): unlike
    `demo_models` there are no in-memory base components; the export reads them from `student`."""
    from . import loading
    from ._bridge import checkpoint as bridge_checkpoint
    from .bridge_cli import load_real_models as bridge_load_real_models

    if not bridge:
        raise ValueError("Distillation needs a trained Bridge (.safetensors from the student's VAE into the teacher's "
                         "space); train one first (`python -m training.run bridge ...` or the Train Bridge node).")
    if not teacher:
        raise ValueError("Distillation needs the teacher model file or diffusers folder (teacher=...).")
    # Both teacher spaces have 16 channels, so a Bridge for the other teacher would run and train nonsense.
    bridge_space = bridge_checkpoint.read_bridge_metadata(bridge)["teacher_space"]["name"]
    family_space = "flux" if teacher_family.startswith("flux") else "sd3"
    if bridge_space != family_space:
        raise ValueError(f"The Bridge {os.path.basename(bridge)!r} maps into the {bridge_space} latent space but the "
                         f"{teacher_family} teacher works in {family_space}; use a Bridge trained for this teacher.")
    # Student VAE, teacher, teacher VAE, teacher text encoders: the same loader as Bridge training.
    world = bridge_load_real_models(student, teacher_family, teacher=teacher, teacher_vae=teacher_vae, clip_l=clip_l,
                                    clip_g=clip_g, t5=t5, tokenizers=tokenizers, student_vae=student_vae, dtype=dtype,
                                    cpu=cpu)
    device = loop.default_device(cpu)
    sd15 = loading.load_sd15(student, components=("unet", "text_encoder", "tokenizer"), dtype=torch.float32,
                             device=device)
    bridge_module = bridge_checkpoint.load_bridge(bridge, student_vae=world.student_vae, device=device)
    text = {"clip": sd15.text_encoder.to(world.student_vae.dtype).eval()}

    def free():
        world.free_text_encoders()
        text.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    models = DistillModels(
        student=OneStepStudent(sd15.unet), bridge=bridge_module, teacher=world.teacher, teacher_vae=world.teacher_vae,
        encode_teacher=world.encode_text,
        encode_student=lambda prompts: encode_sd15(prompts, text["clip"], sd15.tokenizer),
        free_text_encoders=free, description={**world.description, "bridge": os.path.basename(bridge)},
    )
    return models, None


def real_models(args) -> DistillModels:
    """`load_real_models` from the command-line arguments."""
    if not args.bridge:
        raise SystemExit("Distillation needs --bridge (a trained Bridge .safetensors; train one with `python -m "
                         "training.run bridge ...`), or run with --demo.")
    if not args.student or not args.teacher_family or not args.teacher:
        raise SystemExit("Distillation needs --student (SD1.5 file or folder), --teacher-family and --teacher "
                         "(or run with --demo to try it on tiny models).")
    models, _ = load_real_models(args.student, args.bridge, args.teacher_family, teacher=args.teacher,
                                 teacher_vae=args.teacher_vae, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5,
                                 tokenizers=args.tokenizers, dtype=args.dtype, student_vae=args.student_vae)
    return models


def run(args) -> int:
    from .export import export_diffusers, export_sd15, export_single_file

    if args.demo:
        args.out = args.out or os.path.join("runs", "distill-demo")
        prompts = read_prompts(args.prompts) if args.prompts else DEMO_PROMPTS
        models, base = demo_models(args.seed, args.bridge)
    else:
        if not args.prompts or not args.out or not args.student:
            raise SystemExit("Distillation needs --student, --bridge, the teacher (--teacher-family, --teacher, text "
                             "encoders), --prompts FILE and --out FOLDER (or --demo).")
        prompts = read_prompts(args.prompts)
        models, base = real_models(args), None
    cfg = config_from_args(args, prompts)
    result = Distiller(cfg, models).run()
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    if not args.no_export and not result.get("stopped_early"):
        out = os.path.join(cfg.out_dir, "student_sd15.safetensors")
        if base is not None:  # demo: the tiny base components are in memory
            unet = models.student.merged_unet()
            export_single_file(out, unet, base["vae"], base["text_encoder"])
            export_diffusers(os.path.join(cfg.out_dir, "student_sd15"), unet, base["vae"], base["text_encoder"],
                             base["tokenizer"])
        else:
            export_sd15(models.student, args.student, single_file=out)
        print(f"SD1.5 checkpoint: {out}")
    print(f"Student checkpoint: {result['student']}")
    return 0
