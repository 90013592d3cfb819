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
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dmd, loop
from .errors import UserError
from .state import load_training_state, save_training_state
from .student import OneStepStudent
from .models.text import encode_sd15

if TYPE_CHECKING:
    from .models.text import TextCond


# ---------------------------------------------------------------------------------------------- config

GRAD_NORMS = ("teacher", "student", "both")
CLIP_EMA = 0.9  # running mean of the student gradient norm for grad_clip_relative

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
    # Coping with the Bridge's Jacobian (docs/shapes_investigation.md): it weights samples very unequally once the
    # teacher-space gradient is pulled back into the student's latent space.
    # grad_norm: where the per-sample normalisation acts. "teacher": DMD2's (p_real - p_fake) / mean|p_real| in
    # teacher space; "student": the raw DMD direction, and every sample's gradient pulled back through the Bridge
    # rescaled to the batch's mean norm (equal weight per sample); "both": DMD2's, then that.
    grad_norm: str = "teacher"
    # > 0: the clip threshold is this factor x a running mean of past (clipped) student gradient norms instead of
    # the fixed grad_clip, so it only cuts outliers instead of being active on every step.
    grad_clip_relative: float = 0.0
    # Straight-through clamp of the decoded student image in the training path (forward clamps to [0, 1], backward
    # passes the gradient of saturated pixels too); inference keeps the plain clamp.
    straight_through_clamp: bool = False
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 500
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cpu: bool = False  # train on the CPU even where CUDA exists
    gradient_checkpointing: bool = False
    resume: bool = True
    # > 0: stop once the training loop has run this many seconds (over all invocations); `steps` is then a cap.
    # For comparisons at equal wall time.
    max_train_seconds: float = 0.0
    cache_dir: str | None = None  # default <out_dir>/cache
    max_nan_steps: int = 5

    def validate(self) -> None:
        """Every option checked at once, before any model is touched (the CLI, the node and library callers all come
        through here)."""
        from .errors import number_problem, seed_problem

        p = []
        if not self.prompts or not all(isinstance(x, str) for x in self.prompts):
            p.append("prompts must be a non-empty list of strings (one prompt per line in the prompts file)")
        if self.val_prompts is not None and (not self.val_prompts or not all(isinstance(x, str)
                                                                               for x in self.val_prompts)):
            p.append("val_prompts must be None (the first 4 prompts) or a non-empty list of strings")
        for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "fake_updates",
                     "max_nan_steps"):
            p.append(number_problem(name, getattr(self, name), low=1, integer=True))
        if number_problem("resolution", self.resolution, low=8, integer=True) or self.resolution % 8:
            p.append(f"resolution must be a positive multiple of 8 (SD1.5 pixels per latent), got {self.resolution!r}")
        if self.loss not in dmd.LOSSES:
            p.append(f"loss must be one of {', '.join(dmd.LOSSES)}, got {self.loss!r}")
        if self.grad_norm not in GRAD_NORMS:
            p.append(f"grad_norm must be one of {', '.join(GRAD_NORMS)}, got {self.grad_norm!r}")
        if self.grad_norm != "teacher" and self.loss != "dmd":
            p.append(f"grad_norm {self.grad_norm!r} needs loss 'dmd' (VSD has its own weighting)")
        if self.timesteps not in dmd.TIMESTEP_DISTS:
            p.append(f"timesteps must be one of {', '.join(dmd.TIMESTEP_DISTS)}, got {self.timesteps!r}")
        if number_problem("s_min", self.s_min) or number_problem("s_max", self.s_max) or \
                not 0 <= self.s_min < self.s_max <= 1:
            p.append(f"need 0 <= s_min < s_max <= 1, got [{self.s_min}, {self.s_max}]")
        g = self.guidance
        if isinstance(g, (list, tuple)):
            bad = [number_problem("guidance", x, low=0) for x in g]
            if len(g) != 2 or any(bad) or g[0] > g[1]:
                p.append(f"a guidance range is [low, high], finite numbers with 0 <= low <= high, got {list(g)}")
        else:
            p.append(number_problem("guidance", g, low=0))
        p += [number_problem(name, getattr(self, name), low=0, low_open=True)
              for name in ("student_lr", "fake_lr", "grad_clip")]
        p.append(number_problem("grad_clip_relative", self.grad_clip_relative, low=0))
        p.append(number_problem("max_train_seconds", self.max_train_seconds, low=0))
        p.append(number_problem("weight_decay", self.weight_decay, low=0))
        if self.fake_alpha is not None:
            p.append(number_problem("fake_alpha", self.fake_alpha, low=0, low_open=True))
        p.append(number_problem("student_lora_rank", self.student_lora_rank, low=0, integer=True))
        p.append(number_problem("fake_rank", self.fake_rank, low=1, integer=True))
        if number_problem("ema_decay", self.ema_decay) or not 0 <= self.ema_decay < 1:
            p.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        p.append(seed_problem("seed", self.seed))
        if not isinstance(self.val_seeds, (list, tuple)) or not self.val_seeds:
            p.append(f"val_seeds must be a non-empty list of preview seeds, got {self.val_seeds!r}")
        else:
            p += [seed_problem("each of val_seeds", s) for s in self.val_seeds]
        if self.mixed_precision not in ("auto", "bf16", "no"):
            p.append(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        p = list(dict.fromkeys(x for x in p if x))
        if p:
            raise ValueError("Invalid distillation config: " + "; ".join(p) + ".")

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
    from .errors import read_text

    return parse_prompts(read_text(path, "Prompts file (one prompt per line)"), repr(path))


def _cache_key_of(path: str) -> str | None:
    """The key recorded in an embedding cache's cache.json; None when it is missing or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get("key") if isinstance(data, dict) else None


def _readable_safetensors(path: str) -> bool:
    """Whether a safetensors file's header opens and covers the file (a truncated file does not): cheap, no data read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


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
    LORA_FILE = "student_lora.safetensors"  # written beside STUDENT_FILE when the student is a LoRA

    def __init__(self, config: DistillConfig, models: DistillModels,
                 progress: "loop.ProgressReporter | None" = None, stop: "loop.StopFlag | None" = None):
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
        from safetensors import SafetensorError

        from .models.text import TextCond

        c = self.cfg
        self.val_prompts = list(c.val_prompts or c.prompts[:4])
        files = {"teacher": "teacher.safetensors", "student": "student.safetensors",
                 "negative": "negative.safetensors", "val_student": "val_student.safetensors"}
        paths = {k: os.path.join(self.cache_dir, v) for k, v in files.items()}
        key_path = os.path.join(self.cache_dir, "cache.json")
        key = self._cache_key()
        if self.accel.is_main_process:
            # The cache is derived data: a missing, damaged (a crash mid-write) or stale file means encode again.
            fresh = _cache_key_of(key_path) == key and all(_readable_safetensors(p) for p in paths.values())
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
        self.text = {}
        for k, p in paths.items():
            try:
                self.text[k] = TextCond.load(p)
            except (SafetensorError, OSError) as e:
                raise UserError(f"The embedding cache file {p!r} is unreadable ({e}); delete {self.cache_dir!r} and "
                                "run again to encode the prompts anew.") from None
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
        self.clip_norm = [0.0, 0]  # running mean of clipped gradient norms (bias-corrected EMA), its count

    def _clip_threshold(self) -> float:
        c = self.cfg
        if not c.grad_clip_relative:
            return c.grad_clip
        ema, n = self.clip_norm
        return float("inf") if n == 0 else c.grad_clip_relative * ema / (1 - CLIP_EMA ** n)

    def _pull_back(self, z: torch.Tensor, z_in: torch.Tensor, metrics: dict) -> None:
        """Backpropagate the Bridge-side gradient (in z_in.grad) into the student, per-sample normalised in student
        space when configured; record the per-sample pull-back norm statistics."""
        g = z_in.grad.float()
        norms = g.flatten(1).norm(dim=1)
        med = norms.median().clamp_min(1e-12)
        metrics.update(pullback_norm_mean=norms.mean().item(),
                       pullback_norm_cv=(norms.std() / norms.mean().clamp_min(1e-12)).item() if len(norms) > 1 else 0.0,
                       pullback_norm_max_over_median=(norms.max() / med).item())
        if self.cfg.grad_norm in ("student", "both"):
            g = g * (norms.mean() / norms.clamp_min(1e-12)).view(-1, *([1] * (g.ndim - 1)))
        self.accel.backward(z, gradient=g.to(z.dtype))

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
        # The graph is cut at the student's latent z: the Bridge's backward gives the per-sample gradient in student
        # space (logged; normalised there with grad_norm "student"/"both"), which then flows into the student.
        with self.accel.autocast():
            with self._phase("student_forward"):
                z = self.generator(noise, s_emb)
            z_in = z.detach().requires_grad_(True)
            with self._phase("decode_project"):
                x = self.m.bridge.forward_model(z_in, straight_through=c.straight_through_clamp).float()
        s, _, x_s = self._noise(x, g)
        guidance = dmd.sample_guidance(c.batch_size, c.guidance_arg, generator=g, device=g.device)
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(self.device)
        with torch.no_grad(), self.accel.autocast():
            with self._phase("real_teacher"):
                x0_real = teacher.predict_x0(x_s, s, t_cond, neg_cond=neg, guidance=guidance).float()
            with self._phase("fake_teacher"), teacher.fake():
                x0_fake = teacher.predict_x0(x_s, s, t_cond).float()
        loss, grad = dmd.distribution_matching_loss(c.loss, x, x0_real, x0_fake, s,
                                                    normalise=c.grad_norm in ("teacher", "both"))
        # The gradient's nan_to_num would hide a diverged teacher (e.g. a bf16 overflow) as a zero gradient:
        # non-finite teacher outputs make the step a NaN step too.
        if not self._all_finite(loss + 0 * (x0_real.sum() + x0_fake.sum())):
            self.opt_student.zero_grad(set_to_none=True)
            return None
        with self._phase("backward"):
            self.accel.backward(loss)  # into z_in only: the Bridge is frozen
            self._pull_back(z, z_in, metrics)
            threshold = self._clip_threshold()
            gn = float(self.accel.clip_grad_norm_(self.student_params, threshold))
            self.opt_student.step()
            self.opt_student.zero_grad(set_to_none=True)
            self.m.student.ema_step()
        if c.grad_clip_relative and math.isfinite(gn):
            ema, n = self.clip_norm
            self.clip_norm = [CLIP_EMA * ema + (1 - CLIP_EMA) * min(gn, threshold), n + 1]
        metrics.update(loss=loss.item(), grad_abs=grad.abs().mean().item(), student_grad_norm=gn,
                       clipped=float(gn > threshold), sample_std=x.detach().std().item())

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
        from .models.export import save_student_lora, save_student_unet

        if not self.accel.is_main_process:
            return
        extra = {"step": step, "nan_skipped": self.nan_guard.skipped_total, "train_seconds": self.clock.seconds(),
                 "clip_norm": list(self.clip_norm)}
        ema = self.m.student.ema
        if ema is not None:
            extra["ema_step"] = ema.optimization_step
        # The student file, then the training state: the state is the commit point (see BridgeTrainer.save).
        save_student_unet(os.path.join(self.cfg.out_dir, self.STUDENT_FILE), self.m.student,
                          summary=self.summary(step))
        if self.m.student.is_lora:
            save_student_lora(os.path.join(self.cfg.out_dir, self.LORA_FILE), self.m.student,
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
        ema, n = extra.get("clip_norm", [0.0, 0])
        self.clip_norm = [float(ema), int(n)]
        self.clock.resume(extra.get("train_seconds", 0.0))
        return int(extra["step"])

    def _out_of_time(self) -> bool:
        """The time budget is spent (on any process: all stop at the same step, or DDP would hang)."""
        if not self.cfg.max_train_seconds:
            return False
        spent = torch.tensor([float(self.clock.seconds() >= self.cfg.max_train_seconds)], device=self.device)
        return bool(self.accel.reduce(spent, reduction="sum").item() > 0)

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
        with loop.graceful_interrupt(self.stop), loop.save_on_failure(self.save, lambda: step, start):
            while step < c.steps and not (step > 0 and self._out_of_time()):  # at least one step
                metrics = self.train_step(step)
                step += 1
                if log is not None and metrics is not None and (step % c.log_every == 0 or step == c.steps):
                    log.log({"step": step, **metrics})
                preview = None
                if main and (step % c.sample_every == 0 or step == c.steps):
                    preview = self.preview(step, os.path.join(c.out_dir, "samples", f"step_{step:06d}.png"))
                out_of_time = self._out_of_time()
                if main and out_of_time and step % c.sample_every and step != c.steps:
                    preview = self.preview(step, os.path.join(c.out_dir, "samples", f"step_{step:06d}.png"))
                if step % c.ckpt_every == 0 or step == c.steps or out_of_time:
                    self.save(step)
                progress.update(step, metrics or {}, preview)
                if metrics is not None:
                    result["last_metrics"] = metrics
                if out_of_time:
                    result["time_budget_reached"] = True
                    break
                if self.stop.is_set():
                    self.save(step)
                    result["stopped_early"] = True
                    break
        progress.close()
        result.update(step=step, seconds=time.time() - t0, train_seconds=self.clock.seconds(),
                      nan_skipped=self.nan_guard.skipped_total, student=os.path.join(c.out_dir, self.STUDENT_FILE))
        if self.m.student.is_lora:
            result["lora"] = os.path.join(c.out_dir, self.LORA_FILE)
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
    from .models.families import TEACHER_FAMILIES

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
    t.add_argument("--student-lora-rank", type=int, default=0,
                   help="train a LoRA of this rank on the UNet's attention projections (0: the whole UNet); the run "
                        "then also writes <out>/student_lora.safetensors, a LoRA for ComfyUI's LoraLoader / "
                        "diffusers' load_lora_weights on the base SD1.5 checkpoint")
    t.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the student weights (0: off)")
    t.add_argument("--fake-lr", type=float, default=1e-4)
    t.add_argument("--fake-rank", type=int, default=64, help="rank of the fake-score LoRA on the teacher")
    t.add_argument("--fake-alpha", type=float, help="LoRA alpha of the fake score (default = rank)")
    t.add_argument("--fake-updates", type=int, default=5, help="fake-score steps per student step")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=DistillConfig.grad_clip,
                   help="student gradient-norm clip (fixed; see --grad-clip-relative)")
    t.add_argument("--grad-norm", default=DistillConfig.grad_norm, choices=GRAD_NORMS,
                   help="per-sample gradient normalisation: teacher = DMD2's, in teacher space; student = after the "
                        "pull-back through the Bridge, every sample to the batch's mean norm; both")
    t.add_argument("--grad-clip-relative", type=float, default=DistillConfig.grad_clip_relative,
                   help="> 0: clip at this factor x the running mean gradient norm instead of --grad-clip")
    t.add_argument("--straight-through-clamp", action=argparse.BooleanOptionalAction,
                   default=DistillConfig.straight_through_clamp,
                   help="training only: the decoded image's [0,1] clamp passes gradients of saturated pixels")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--sample-every", type=int, help="preview grid every N steps (default 250; 20 with --demo)")
    t.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (student UNet, student decoder, teacher)")
    t.add_argument("--restart", action="store_true", help="start over instead of resuming from --out")


def _given(value, default):
    """An option's value, or `default` when it was not given (0 is a value, refused by the config's checks)."""
    return default if value is None else value


def _parse_seeds(text: str, option: str = "--val-seeds") -> list[int]:
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"{option} must be comma-separated integer seeds, e.g. 0,1; got {text!r}.")
    return seeds


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
        val_seeds=_parse_seeds(args.val_seeds),
        steps=_given(args.steps, 60 if demo else 2000), batch_size=_given(args.batch_size, 2 if demo else 4),
        resolution=_given(args.resolution, 64 if demo else 512), loss=args.loss,
        guidance=_parse_guidance(args.guidance or ("3.5" if (args.teacher_family or "").startswith("flux") else "4.5")),
        timesteps=args.timesteps, s_min=args.s_min, s_max=args.s_max, student_lr=args.student_lr,
        student_lora_rank=args.student_lora_rank, ema_decay=args.ema_decay, fake_lr=args.fake_lr,
        fake_rank=args.fake_rank, fake_alpha=args.fake_alpha, fake_updates=args.fake_updates,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_norm=args.grad_norm,
        grad_clip_relative=args.grad_clip_relative, straight_through_clamp=args.straight_through_clamp,
        log_every=args.log_every,
        sample_every=_given(args.sample_every, 20 if demo else 250), ckpt_every=args.ckpt_every, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        resume=not args.restart, cache_dir=args.cache_dir,
    )


def _check_demo_bridge(path: str) -> None:
    if not os.path.isfile(path):
        what = "is a dangling symbolic link" if os.path.islink(path) else (
            "is not a file" if os.path.exists(path) else "does not exist")
        raise UserError(f"The Bridge {path!r} (--bridge) {what}: give a trained Bridge .safetensors file, or leave "
                        "--bridge out to use the demo Bridge of `python -m training.run bridge --demo`.")


def demo_models(seed: int = 0, bridge_path: str | None = None) -> tuple[DistillModels, dict]:
    """The tiny world of `bridge --demo` (same seed: same student VAE, teacher and text encoders) plus a tiny
    SD1.5-style UNet and CLIP-L for the student. Uses the demo Bridge when it exists, else a fresh one; a
    `bridge_path` that is given must exist (a typo must not train against an untrained Bridge)."""
    import warnings

    from .models import tiny
    from ._bridge import checkpoint as bridge_checkpoint
    from ._bridge import model as bridge_model
    from .cli.bridge import demo_models as bridge_demo_models

    if bridge_path is not None:
        _check_demo_bridge(bridge_path)
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
    from .models import loading
    from ._bridge import checkpoint as bridge_checkpoint
    from .cli.bridge import load_real_models as bridge_load_real_models

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
                             device=device, tokenizer=tokenizers)
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
    models, _ = load_real_models(args.student, args.bridge, args.teacher_family, teacher=args.teacher,
                                 teacher_vae=args.teacher_vae, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5,
                                 tokenizers=args.tokenizers, dtype=args.dtype, student_vae=args.student_vae)
    return models


def run(args) -> int:
    from .models.export import export_diffusers, export_sd15, export_single_file

    from .errors import output_dir

    if args.demo:
        args.out = args.out or os.path.join("runs", "distill-demo")
    else:
        missing = [opt for opt, value in (("--student", args.student), ("--bridge", args.bridge),
                                          ("--teacher-family", args.teacher_family), ("--teacher", args.teacher),
                                          ("--prompts", args.prompts), ("--out", args.out)) if not value]
        if missing:
            raise UserError(f"Distillation needs {', '.join(missing)}: the SD1.5 --student, a trained --bridge, the "
                            "teacher (--teacher-family, --teacher, text encoders), --prompts FILE and --out FOLDER "
                            "(or --demo to try it on tiny models).")
    # Everything cheap first: prompts and options, then the output folder, before any model is loaded.
    prompts = read_prompts(args.prompts) if args.prompts else DEMO_PROMPTS
    cfg = config_from_args(args, prompts)
    cfg.validate()
    if args.demo and args.bridge:
        _check_demo_bridge(args.bridge)
    output_dir(cfg.out_dir)
    if args.demo:
        models, base = demo_models(args.seed, args.bridge)
    else:
        models, base = real_models(args), None
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
    if result.get("lora"):
        print(f"Student LoRA (kohya layout, for the base SD1.5 model): {result['lora']}")
    return 0
