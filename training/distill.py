"""Cross-space one-step distillation: train an SD1.5 one-step student against a teacher in another latent space.

One student step (DMD2 recipe, in the teacher's MODEL space):

    z   = G(noise, student text)                      student RAW latent (SD1.5 UNet once at t = 999)
    x   = Bridge.forward_model(z)                     teacher model space; gradient flows back to G
    x_s = (1 - s) x.detach() + s n                    s from the configured distribution, in [0.02, 0.98]
    x0_real = teacher(x_s, s, text, neg, guidance)    frozen teacher (adapter off), no grad
    x0_fake = teacher.fake()(x_s, s, text)            LoRA "fake" score on the same weights, no grad, at the fake
                                                      guidance (teachers.fake_guidance_for: SD3.5 unguided, Flux
                                                      dev the real score's embedding)
    loss = 0.5 mse(x, x - grad(x, x0_real, x0_fake))  DMD (default) or VSD, see dmd.py

then `fake_updates` fake-score steps: flow matching mse(v_fake(x_s), n - x) on detached student samples (the
first reuses this step's samples, the others draw fresh ones). All randomness of a step comes from
`loop.step_generator(seed, step, process)`, so a resumed run repeats the uninterrupted one exactly.

`Distiller` is what both `python -m training.run distill` and the ComfyUI training node call.
"""

from __future__ import annotations

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
from .models.families import GUIDANCE_EMBEDDING, adversarial_teacher_warning
from .state import load_training_state, save_training_state
from .student import OneStepStudent
from .teachers import fake_guidance_for

if TYPE_CHECKING:
    from .models.text import TextCond


# ---------------------------------------------------------------------------------------------- config

GRAD_NORMS = ("teacher", "student", "both")
CLIP_EMA = 0.9  # running mean of the student gradient norm for grad_clip_relative
PAIRS_FILE = "pairs.safetensors"  # the pairs a run makes itself (DistillConfig.regression_n), in its run folder

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
    # The fake score's guidance, trained and queried with it; None: the family's choice (teachers.fake_guidance_for:
    # 1 = unguided for true-CFG teachers as in DMD2, the real score's own value for Flux dev's guidance embedding).
    fake_guidance: float | None = None
    timesteps: str = "uniform"  # "uniform" | "logit_normal" | "teacher", mapped into [s_min, s_max]
    s_min: float = dmd.S_MIN
    s_max: float = dmd.S_MAX
    student_lr: float = 1e-5
    # > 0: the learning rate of the student's cross-attention layers (the only ones that read the prompt); the rest
    # keeps student_lr. What the teacher knows and the student lacks is prompt following: the shapes world's student
    # learns the teacher's background word only with a far higher rate there (docs/shapes_investigation.md).
    student_cross_attention_lr: float = 0.0
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
    # DMD2's second stage, its GAN term, in teacher space: a small head on the fake score's last hidden states (the
    # input of the teacher's output projection, a tap SD3 and Flux share) tells the teacher's latents of real images
    # from the Bridge's outputs, both noised at DMD's levels. The student gets gan_weight x the non-saturating
    # generator loss (through the fake score and the Bridge, beside the DMD gradient); the head and the fake LoRA get
    # gan_disc_weight x the discriminator loss beside each fake update's flow matching. The discriminator reads the
    # fake under the empty prompt (realism, not prompt fit: real latents need no captions). gan_real_latents: a
    # safetensors file with "latents" [N, C, H, W] in the teacher's model space (`save_real_latents`). 0: off.
    gan_weight: float = 0.0
    gan_disc_weight: float = 1.0
    gan_real_latents: str | None = None
    # The default recipe is pairs, then a regression warm-up, then DMD (README "The recipe, by default": why these
    # defaults; shapes_investigation §4, §5.8). Each part can be switched off: regression_n 0 (and
    # regression_warmup_steps 0) for plain DMD2, regression_warmup_steps 0 for no warm-up, steps 0 for no DMD.
    # Regression term (DMD's, across latent spaces; training/pairs.py): a pairs file of student noise -> the student
    # base's own sample as corrected by the teacher through the Bridge, back in the student's space. Each student step
    # adds the gradient of mse(G(noise_i), target_i) over regression_batch pairs (0: batch_size), rescaled to
    # regression_weight x the norm of that step's distribution-matching gradient (a share, whatever the scales).
    # 0 (the default): no term inside the DMD steps, which measured worse per second than the warm-up (§5.8).
    regression_pairs: str | None = None
    regression_weight: float = 0.0
    regression_batch: int = 0
    # > 0: that many regression-only steps (no teacher, no fake score: cheap) before the `steps` distillation steps,
    # with their own optimizer and learning rates (cross-attention: 0 = regression_warmup_lr). The one-step student
    # fits the pairs far faster per second this way than inside the distillation's steps (shapes_investigation §5.8).
    regression_warmup_steps: int = 2000
    regression_warmup_lr: float = 1e-5
    regression_warmup_cross_attention_lr: float = 1e-4
    # Without a regression_pairs file: the run first makes regression_n pairs from its own prompts in
    # <out_dir>/pairs.safetensors (training/pairs.py make_pairs: resumable per batch, reused when present, made before
    # anything trains so from the untrained student base): the student base's regression_student_steps-step DDIM
    # sample at CFG regression_student_cfg, through the Bridge, redrawn by the teacher from noise level regression_s0
    # in regression_teacher_steps steps at the run's guidance. 0: no pairs.
    regression_n: int = 800
    regression_s0: float = 0.9
    regression_student_steps: int = 25
    regression_student_cfg: float = 7.5
    regression_teacher_steps: int = 20
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 500
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cpu: bool = False  # train on the CPU even where CUDA exists
    # None (auto): on when training runs on CUDA, off on the CPU (see loop.use_gradient_checkpointing).
    gradient_checkpointing: bool | None = None
    # The student's (and the regression warm-up's) optimizer: "adamw" (torch's fused kernel on CUDA) or "adamw8bit"
    # (bitsandbytes, CUDA only: 8-bit moments, 6.4 -> 1.6 GiB for the full SD1.5 UNet). The fake LoRA keeps AdamW.
    optimizer: str = "adamw"
    # > 1: every step runs batch_size as that many micro-batches of batch_size / gradient_accumulation (forward and
    # backward each, one optimizer step): batch_size stays the batch the DMD loss and the fake-score updates see.
    gradient_accumulation: int = 1
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
        for name in ("batch_size", "log_every", "sample_every", "ckpt_every", "fake_updates",
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
        if self.fake_guidance is not None:
            p.append(number_problem("fake_guidance", self.fake_guidance, low=0))
        p += [number_problem(name, getattr(self, name), low=0, low_open=True)
              for name in ("student_lr", "fake_lr", "grad_clip")]
        p.append(number_problem("grad_clip_relative", self.grad_clip_relative, low=0))
        p.append(number_problem("student_cross_attention_lr", self.student_cross_attention_lr, low=0))
        if self.regression_pairs is not None and (not isinstance(self.regression_pairs, str) or
                                                  not self.regression_pairs):
            p.append(f"regression_pairs must be None or the path of a pairs file, got {self.regression_pairs!r}")
        p.append(number_problem("regression_weight", self.regression_weight, low=0))
        p.append(number_problem("regression_batch", self.regression_batch, low=0, integer=True))
        p.append(number_problem("regression_warmup_steps", self.regression_warmup_steps, low=0, integer=True))
        p.append(number_problem("regression_warmup_lr", self.regression_warmup_lr, low=0, low_open=True))
        p.append(number_problem("regression_warmup_cross_attention_lr", self.regression_warmup_cross_attention_lr,
                                low=0))
        p.append(number_problem("regression_n", self.regression_n, low=0, integer=True))
        if number_problem("regression_s0", self.regression_s0) or not 0 < self.regression_s0 <= 1:
            p.append(f"regression_s0 (the noise level the teacher redraws from) must be in (0, 1], got "
                     f"{self.regression_s0!r}")
        p.append(number_problem("regression_student_steps", self.regression_student_steps, low=1, integer=True))
        p.append(number_problem("regression_teacher_steps", self.regression_teacher_steps, low=1, integer=True))
        p.append(number_problem("regression_student_cfg", self.regression_student_cfg, low=0))
        has_pairs = bool(self.regression_pairs) or (isinstance(self.regression_n, int) and self.regression_n > 0)
        if self.regression_warmup_steps and not has_pairs:
            p.append("regression_warmup_steps needs pairs to fit: regression_n > 0 (made in the run folder) or a "
                     "regression_pairs file; set regression_warmup_steps 0 for no warm-up")
        if self.regression_weight and not has_pairs:
            p.append("regression_weight > 0 needs pairs: regression_n > 0 or a regression_pairs file; set "
                     "regression_weight 0")
        p.append(number_problem("steps", self.steps, low=0, integer=True))
        if self.steps == 0 and not (has_pairs and self.regression_warmup_steps):
            p.append("steps 0 (no DMD, regression only) needs a regression warm-up: regression_warmup_steps > 0 and "
                     "pairs (regression_n > 0 or regression_pairs); otherwise nothing would train")
        p.append(number_problem("max_train_seconds", self.max_train_seconds, low=0))
        p.append(number_problem("gan_weight", self.gan_weight, low=0))
        p.append(number_problem("gan_disc_weight", self.gan_disc_weight, low=0))
        if self.gan_weight and not self.gan_real_latents:
            p.append("gan_weight > 0 needs gan_real_latents: a file of the teacher's latents of real images "
                     "(training.distill.save_real_latents); or gan_weight 0 for no GAN term")
        elif self.gan_weight and not os.path.isfile(self.gan_real_latents):
            p.append(f"gan_real_latents {self.gan_real_latents!r} is not a file")
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
        if self.gradient_checkpointing not in (None, True, False):
            p.append(f"gradient_checkpointing must be None (auto: on with CUDA), True or False, got "
                     f"{self.gradient_checkpointing!r}")
        p.append(loop.optimizer_problem(self.optimizer, cpu=self.cpu))
        acc = self.gradient_accumulation
        p.append(number_problem("gradient_accumulation", acc, low=1, integer=True))
        if not number_problem("gradient_accumulation", acc, low=1, integer=True):
            for name, n in (("batch_size", self.batch_size),
                            ("regression_batch", self.regression_pairs and self.regression_batch)):
                if isinstance(n, int) and not isinstance(n, bool) and n > 0 and n % acc:
                    p.append(f"{name} ({n}) must be divisible by gradient_accumulation ({acc}): each step runs it "
                             f"as {acc} equal micro-batches")
        p = list(dict.fromkeys(x for x in p if x))
        if p:
            raise ValueError("Invalid distillation config: " + "; ".join(p) + ".")

    @property
    def pairs_file(self) -> str | None:
        """The pairs the run fits: the regression_pairs file, else the one it makes (regression_n > 0), else None.
        None too when nothing would use them (no warm-up and regression_weight 0): no pairs are made then."""
        if not (self.regression_warmup_steps or self.regression_weight):
            return None
        if self.regression_pairs:
            return self.regression_pairs
        return os.path.join(self.out_dir, PAIRS_FILE) if self.regression_n else None

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


def _total_norm(grads: list, device) -> torch.Tensor:
    """The L2 norm of a list of gradients taken together (None entries skipped; 0 when there are none)."""
    norms = [torch.linalg.vector_norm(x.float()) for x in grads if x is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=device)


# ---------------------------------------------------------------------------------------------- text cache

# negative_student: the student's negative prompt, which the regression pairs' student CFG needs (training/pairs.py).
TEXT_FILES = {"teacher": "teacher.safetensors", "student": "student.safetensors", "negative": "negative.safetensors",
              "val_student": "val_student.safetensors", "negative_student": "negative_student.safetensors"}


def text_cache_key(cfg: DistillConfig, description: dict, pair_prompts: list[str]) -> str:
    """What the embeddings depend on: the prompts, the negative and preview prompts, the models (their description)
    and the regression pairs' prompts."""
    blob = json.dumps({"prompts": cfg.prompts, "negative": cfg.negative_prompt,
                       "val": list(cfg.val_prompts or cfg.prompts[:4]), "models": description,
                       "pair_prompts": pair_prompts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def text_cache_paths(cache_dir: str, pairs: bool = False) -> dict[str, str]:
    files = dict(TEXT_FILES, **({"pairs_student": "pairs_student.safetensors"} if pairs else {}))
    return {k: os.path.join(cache_dir, v) for k, v in files.items()}


def text_cache_is_fresh(cache_dir: str, key: str, pairs: bool = False) -> bool:
    """The cache was written for `key` and all its files open (a missing, damaged or stale one: encode again)."""
    paths = text_cache_paths(cache_dir, pairs)
    return _cache_key_of(os.path.join(cache_dir, "cache.json")) == key and all(
        _readable_safetensors(p) for p in paths.values())


def text_store_dtype(cfg: DistillConfig) -> torch.dtype:
    """Embeddings on disk in bf16 where training runs in bf16 (the models see them in bf16 there; half the disk and
    reads, e.g. 4 MiB instead of 8 per Flux prompt), else float32 (CPU runs: unchanged numerics)."""
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"
    return torch.bfloat16 if mp == "bf16" else torch.float32


def write_text_cache(cfg: DistillConfig, cache_dir: str, key: str, encode_teacher, encode_student,
                     pair_prompts: list[str], dtype=torch.float32, chunk: int | None = None) -> None:
    """Encode the prompts (teacher and student), the negative, the preview and the pairs' prompts into `cache_dir`,
    `chunk` prompts per encoder call (models/text.py's ENCODE_CHUNK), with a progress bar; cache.json, which makes
    the cache valid, is written last."""
    from .models.text import ENCODE_CHUNK, write_text_store

    chunk = chunk or ENCODE_CHUNK
    paths = text_cache_paths(cache_dir, bool(pair_prompts))
    key_path = os.path.join(cache_dir, "cache.json")
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(key_path):
        os.remove(key_path)  # a half-finished rebuild must never look valid
    with torch.no_grad():
        write_text_store(paths["teacher"], encode_teacher, cfg.prompts, chunk, dtype, desc="teacher prompts")
        write_text_store(paths["negative"], encode_teacher, [cfg.negative_prompt], chunk, dtype)
        write_text_store(paths["student"], encode_student, cfg.prompts, chunk, dtype, desc="student prompts")
        write_text_store(paths["val_student"], encode_student, list(cfg.val_prompts or cfg.prompts[:4]), chunk, dtype)
        write_text_store(paths["negative_student"], encode_student, [cfg.negative_prompt], chunk, dtype)
        if pair_prompts:
            write_text_store(paths["pairs_student"], encode_student, pair_prompts, chunk, dtype)
    loop.write_json(key_path, {"key": key, "prompts": len(cfg.prompts)})  # atomic: written last


def cached_encoders(cfg: DistillConfig, cache_dir: str):
    """(encode_teacher, encode_student) that look prompts up in a written cache instead of running encoders: for
    the models loaded after `encode_distill_prompts` freed the real ones (the regression pairs and the Distiller
    encode only prompts that are cached). A prompt that is not cached is a clear error."""
    from .models.text import TextCond, TextStore

    paths = text_cache_paths(cache_dir)
    val = list(cfg.val_prompts or cfg.prompts[:4])
    tables = {"teacher": [(cfg.prompts, paths["teacher"]), ([cfg.negative_prompt], paths["negative"])],
              "student": [(cfg.prompts, paths["student"]), (val, paths["val_student"]),
                          ([cfg.negative_prompt], paths["negative_student"])]}

    where = {side: {} for side in tables}  # prompt -> (file, row), first occurrence
    for side, parts in tables.items():
        for names, path in parts:
            for i, p in enumerate(names):
                where[side].setdefault(p, (path, i))
    stores = {}

    def lookup(side):
        def encode(prompts):
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            missing = [p for p in prompts if p not in where[side]]
            if missing:
                raise ValueError(f"The prompt {missing[0][:60]!r} is not in the embedding cache {cache_dir!r} (the "
                                 "text encoders were freed after encoding the run's prompts).")
            rows = []
            for p in prompts:
                path, i = where[side][p]
                if path not in stores:
                    stores[path] = TextStore(path)
                rows.append(stores[path].index([i]))
            return TextCond.cat(rows)
        return encode

    return lookup("teacher"), lookup("student")


def save_real_latents(path: str, latents: torch.Tensor) -> str:
    """The GAN term's real samples: the teacher's latents of real images [N, C, H, W] in its MODEL space (scaled and
    shifted as the Bridge outputs them), written atomically as a safetensors file."""
    from safetensors.torch import save_file

    if latents.ndim != 4 or not torch.isfinite(latents).all():
        raise ValueError(f"Real latents must be finite [N, C, H, W]; got shape {tuple(latents.shape)}.")
    tmp = path + ".tmp"
    save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp, metadata={"format": "real-latents"})
    os.replace(tmp, path)
    return path


def load_real_latents(path: str, channels: int) -> torch.Tensor:
    """The latents of a `save_real_latents` file, checked (safetensors only: never unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if "latents" not in f.keys():
                raise UserError(f"{path!r} has no 'latents' tensor; write it with training.distill.save_real_latents.")
            latents = f.get_tensor("latents").float()
    except (SafetensorError, OSError) as e:
        raise UserError(f"gan_real_latents {path!r} is not a readable safetensors file ({e}).") from None
    if latents.ndim != 4 or latents.shape[1] != channels or not torch.isfinite(latents).all():
        raise UserError(f"gan_real_latents {path!r}: expected finite teacher latents [N, {channels}, H, W], got "
                        f"{tuple(latents.shape)}; encode the real images with this teacher's VAE.")
    return latents


class GanHead(nn.Module):
    """The discriminator head on the fake score's tokens: one logit per image token (the loss averages them)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens).squeeze(-1)


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
        self.pairs = None  # (noise, target latents, index of each pair's prompt into pair_prompts)
        self.pair_prompts: list[str] = []
        self.pairs_seconds = 0.0  # what making the pairs cost (over all invocations), from the pairs file
        if config.regression_pairs:  # a file made elsewhere: checked now, before any work
            self._use_pairs(config.regression_pairs)
        self.timer = None  # set by the benchmark to time the parts of a step
        self.clock = loop.TrainClock()
        # Said once at the start and kept in the run summary (the student checkpoint's metadata).
        warning = adversarial_teacher_warning(models.teacher.family, models.description.get("teacher"))
        self.warnings = [warning] if warning else []

    # ---- regression pairs ----
    def _use_pairs(self, path: str) -> None:
        from .pairs import load_pairs

        noise, latents, prompts, meta = load_pairs(path, self.m.student.space.channels, self.latent)
        self.pair_prompts = sorted(set(prompts))
        where = {p: i for i, p in enumerate(self.pair_prompts)}
        self.pairs = (noise, latents, torch.tensor([where[p] for p in prompts]))
        try:
            self.pairs_seconds = float(json.loads(meta.get("seconds", "0")))
        except (TypeError, ValueError):
            self.pairs_seconds = 0.0

    def make_pairs(self) -> bool:
        """The run's own pairs (regression_n > 0 and no regression_pairs file): made in the run folder from the
        config's prompts, resuming a stopped or killed making (training/pairs.py), reused when complete, then loaded.
        Before anything trains, so the student is still its base. False: stopped (self.stop) before they were all
        made (what is made is kept). A no-op when the run has no pairs to make or has loaded them."""
        c = self.cfg
        if self.pairs is not None or c.regression_pairs or not c.pairs_file:
            return True
        from .pairs import make_pairs

        path = c.pairs_file
        g = c.guidance_arg
        settings = dict(s0=c.regression_s0, student_steps=c.regression_student_steps,
                        student_cfg=c.regression_student_cfg, teacher_steps=c.regression_teacher_steps,
                        guidance=sum(g) / 2 if isinstance(g, tuple) else g,  # a range: its middle
                        seed=c.seed, resolution=c.resolution)
        match = self._pairs_match(path, settings) if self.accel.is_main_process and os.path.exists(path) else True
        if not match:
            # Damaged (None): derived data, made again (the same pairs: the student is still its base here).
            if match is False and c.resume and os.path.exists(os.path.join(c.out_dir, self.STATE_FILE)):
                raise UserError(f"The run folder's pairs {path!r} were made with other regression settings (count, "
                                "s0, steps, CFG, guidance, seed or resolution) than this run's, and its training "
                                "fitted them: give the settings it was started with, or start over (--restart / "
                                "resume off), which makes them again.")
            os.remove(path)
        self.accel.wait_for_everyone()  # no process looks for the file before a stale one is gone
        if self.accel.is_main_process and not os.path.exists(path):
            callback = getattr(self.progress, "callback", None)  # the ComfyUI bar shows the pairs' batches too
            self.m.teacher.model.to(self.device)
            made = make_pairs(self.m, c.prompts, c.regression_n, path, **settings, negative_prompt=c.negative_prompt,
                              batch_size=c.batch_size, device=self.device,
                              callback=(lambda k, n: callback(k, n, {"pairs_batches": k}, None)) if callback else None,
                              stop=self.stop)
            if not made["complete"]:
                return False
        elif self.accel.is_main_process:
            import shutil

            shutil.rmtree(path + ".partial", ignore_errors=True)  # a kill between the merge and its clean-up
        else:
            # The main process makes them (at real size for longer than a collective barrier's timeout), so
            # the others wait for the merged file; a launcher ends them if the main process dies.
            while not os.path.exists(path):
                if self.stop.is_set():
                    return False
                time.sleep(2.0)
        self.accel.wait_for_everyone()
        self._use_pairs(path)
        return True

    def _pairs_match(self, path: str, settings: dict) -> bool | None:
        """Whether the pairs file at `path` holds regression_n pairs made with `settings` (its metadata); None when
        it does not read as a pairs file."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                n = f.get_slice("noise").get_shape()[0]
            made = {k: json.loads(meta[k]) for k in settings}
        except (SafetensorError, OSError, KeyError, ValueError):
            return None
        want = json.loads(json.dumps(settings))
        return n == self.cfg.regression_n and made == want

    # ---- text ----
    def _cache_key(self) -> str:
        return text_cache_key(self.cfg, self.m.description, self.pair_prompts)

    def prepare_text(self) -> None:
        """Encode every prompt once (teacher: all its encoders; student: CLIP-L) in chunks into the on-disk cache
        (unless `encode_distill_prompts` did before the models were loaded), free the encoders, open the cache: the
        prompts' embeddings are read lazily, row by row, as steps draw them."""
        from safetensors import SafetensorError

        from .models.text import TextCond, TextStore

        c = self.cfg
        self.val_prompts = list(c.val_prompts or c.prompts[:4])
        paths = text_cache_paths(self.cache_dir, self.pairs is not None)
        key = self._cache_key()
        if self.accel.is_main_process and not text_cache_is_fresh(self.cache_dir, key, self.pairs is not None):
            write_text_cache(c, self.cache_dir, key, self.m.encode_teacher, self.m.encode_student, self.pair_prompts,
                             dtype=text_store_dtype(c))
        self.accel.wait_for_everyone()
        self.m.free_text_encoders()  # embeddings are all training needs from here on
        self.text = {}
        for k, p in paths.items():
            try:  # the prompts' rows lazily (large); the few others in memory, float32 as the models take them
                self.text[k] = TextStore(p) if k in ("teacher", "student") else TextCond.load(p).to(dtype=torch.float32)
            except (SafetensorError, OSError) as e:
                raise UserError(f"The embedding cache file {p!r} is unreadable ({e}); delete {self.cache_dir!r} and "
                                "run again to encode the prompts anew.") from None
        n_t, n_s = len(self.text["teacher"]), len(self.text["student"])
        if n_t != len(c.prompts) or n_s != len(c.prompts):
            raise ValueError(f"Cached embeddings hold {n_t}/{n_s} prompts, the config has {len(c.prompts)}; delete "
                             f"{self.cache_dir} and run again.")

    # ---- models ----
    def setup(self) -> None:
        from .teachers import is_offloaded

        c, m = self.cfg, self.m
        student, bridge, teacher = m.student, m.bridge, m.teacher
        bridge.requires_grad_(False).eval()
        bridge.to(self.device)
        if not is_offloaded(teacher.model):  # an offloaded teacher moves itself, layer by layer
            teacher.model.to(self.device)  # no-op when the caller loaded it there (keeps its dtype)
        student.to(self.device).train()
        if c.student_lora_rank:
            student.add_lora(rank=c.student_lora_rank)
        teacher.add_fake_adapter(rank=c.fake_rank, alpha=c.fake_alpha or c.fake_rank)
        self.gradient_checkpointing = loop.use_gradient_checkpointing(c.gradient_checkpointing, self.device)
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            bridge.enable_gradient_checkpointing()
            teacher.enable_gradient_checkpointing()
        if c.ema_decay:
            student.enable_ema(c.ema_decay)
        self.student_params = student.trainable_parameters()
        self.fake_params = list(teacher.fake_parameters())
        self.gan_head, self.gan_real = None, None
        if c.gan_weight:
            proj_out = getattr(teacher.model, "proj_out", None)
            if not isinstance(proj_out, nn.Linear):
                raise UserError(f"The GAN term reads the teacher's last hidden states (its proj_out); "
                                f"{type(teacher.model).__name__} has none. Use gan_weight 0 with this teacher.")
            self.gan_real = load_real_latents(c.gan_real_latents, teacher.space.channels)
            self.gan_head = GanHead(proj_out.in_features).to(self.device)
            self.fake_params += list(self.gan_head.parameters())  # trained, clipped and saved with the fake LoRA
        self.opt_student = loop.make_optimizer(student.parameter_groups(c.student_lr, c.student_cross_attention_lr),
                                               lr=c.student_lr, weight_decay=c.weight_decay, name=c.optimizer)
        self.opt_fake = loop.make_optimizer(self.fake_params, lr=c.fake_lr, weight_decay=c.weight_decay)
        self.opt_warmup = None
        if c.regression_warmup_steps:
            self.opt_warmup = loop.make_optimizer(
                student.parameter_groups(c.regression_warmup_lr, c.regression_warmup_cross_attention_lr),
                lr=c.regression_warmup_lr, weight_decay=c.weight_decay, name=c.optimizer)
        self.nan_guard = loop.NaNGuard(c.max_nan_steps)
        self._applied_step = 0  # the last step whose optimizer update the weights hold (see run's save_on_failure)
        self.clip_norm = [0.0, 0]  # running mean of clipped gradient norms (bias-corrected EMA), its count
        if self.pairs is not None:  # on the device once: every step draws from them
            self.pairs = tuple(t.to(self.device) for t in self.pairs)
            self.pair_embeds = self.text["pairs_student"].prompt_embeds.to(self.device)

    def _clip_threshold(self) -> float:
        c = self.cfg
        if not c.grad_clip_relative:
            return c.grad_clip
        ema, n = self.clip_norm
        return float("inf") if n == 0 else c.grad_clip_relative * ema / (1 - CLIP_EMA ** n)

    def _pull_back(self, z: torch.Tensor, z_in: torch.Tensor, metrics: dict) -> None:
        """Backpropagate the Bridge-side gradient (in z_in.grad) into the student, per-sample normalised in student
        space when configured; record the per-sample pull-back norm statistics."""
        self.accel.backward(z, gradient=self._pull_back_gradient(z_in.grad.float(), metrics).to(z.dtype))

    def _pull_back_gradient(self, g: torch.Tensor, metrics: dict) -> torch.Tensor:
        """The whole batch's Bridge-side gradient at the student's latent (float), per-sample normalised in student
        space when configured; records the per-sample pull-back norm statistics."""
        norms = g.flatten(1).norm(dim=1)
        med = norms.median().clamp_min(1e-12)
        metrics.update(pullback_norm_mean=norms.mean().item(),
                       pullback_norm_cv=(norms.std() / norms.mean().clamp_min(1e-12)).item() if len(norms) > 1 else 0.0,
                       pullback_norm_max_over_median=(norms.max() / med).item())
        if self.cfg.grad_norm in ("student", "both"):
            g = g * (norms.mean() / norms.clamp_min(1e-12)).view(-1, *([1] * (g.ndim - 1)))
        return g

    # ---- gradient accumulation ----
    def _micro_batches(self, n: int) -> list[slice]:
        """`n` samples as gradient_accumulation equal micro-batches (validate() checked that they divide)."""
        k = self.cfg.gradient_accumulation
        m = n // k
        return [slice(i * m, (i + 1) * m) for i in range(k)]

    def _sync(self, i: int, parts: list):
        """Under DDP the student's gradients are all-reduced on the last micro-batch's backward only."""
        return contextlib.nullcontext() if i == len(parts) - 1 else self.accel.no_sync(self.generator)

    def _regression_backward(self, g: torch.Generator) -> torch.Tensor:
        """The gradient of the mse of the student's model-space output on a batch of pairs (drawn from the step's
        generator), added into the student's .grad in gradient_accumulation micro-batches (each backpropagated at
        once, weighted so that their sum is the whole batch's); returns the batch's loss, detached (the caller judges
        it finite and discards the gradient otherwise)."""
        c = self.cfg
        noise, latents, index = self.pairs
        idx = torch.randint(0, len(noise), (c.regression_batch or c.batch_size,), generator=g, device=g.device)
        idx = idx.to(noise.device)
        parts = self._micro_batches(len(idx))
        total = torch.zeros((), device=self.device)
        for i, part in enumerate(parts):
            j = idx[part]
            with self._sync(i, parts):
                with self.accel.autocast():
                    pred = self.m.student.space.to_model(self.generator(noise[j], self.pair_embeds[index[j]]))
                loss = F.mse_loss(pred.float(), latents[j]) / len(parts)
                self.accel.backward(loss)
            total = total + loss.detach()
        return total

    def _add_regression(self, g: torch.Generator, metrics: dict) -> bool:
        """Add the regression term's gradient onto the distribution-matching one already in the student's .grad,
        rescaled to regression_weight x that gradient's norm. False: its loss was not finite (the step is skipped)."""
        c = self.cfg
        params = self.student_params
        dmd_grads = [p.grad for p in params]
        dmd_norm = _total_norm(dmd_grads, self.device)
        for p in params:
            p.grad = None
        loss = self._regression_backward(g)
        if not self._all_finite(loss):
            return False
        reg_norm = _total_norm([p.grad for p in params], self.device)
        scale = c.regression_weight * dmd_norm / reg_norm.clamp_min(1e-12)
        for p, d in zip(params, dmd_grads):
            r = None if p.grad is None else p.grad * scale.to(p.grad.dtype)
            p.grad = d if r is None else (r if d is None else d + r)
        metrics.update(regression_loss=loss.item(), regression_scale=scale.item(), dmd_grad_norm=dmd_norm.item())
        return True

    def _optimizers(self) -> dict:
        opts = {"student": self.opt_student, "fake": self.opt_fake}
        if self.opt_warmup is not None:
            opts["warmup"] = self.opt_warmup
        return opts

    def _warmup_step(self, g: torch.Generator, step: int | None = None) -> dict[str, float] | None:
        """A regression-only step (the warm-up): the student's mse on a batch of pairs, its own optimizer."""
        loss = self._regression_backward(g)
        if not self._all_finite(loss):
            self.opt_warmup.zero_grad(set_to_none=True)
            return None
        self.opt_warmup.step()
        if step is not None:
            self._applied_step = step + 1
        self.opt_warmup.zero_grad(set_to_none=True)
        self.m.student.ema_step()
        return {"regression_loss": loss.item(), "warmup": 1.0}

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
        s, n = self._draw_noise(x.shape, g)
        return s, n, self.m.teacher.add_noise(x.detach(), n, s)

    def _draw_noise(self, shape, g: torch.Generator):
        """Noise levels and noise for teacher latents of `shape` (only the shape matters: the draws come first)."""
        c = self.cfg
        s = dmd.sample_timesteps(shape[0], c.timesteps, c.s_min, c.s_max, generator=g, device=g.device,
                                 teacher=self.m.teacher, resolution=c.resolution * self.m.bridge.k)
        n = torch.randn(tuple(shape), generator=g, device=g.device)
        return s.to(self.device), n.to(self.device)

    def _all_finite(self, value: torch.Tensor) -> bool:
        """The NaN guard's verdict, agreed by all processes (a process skipping alone would hang DDP)."""
        v = self.accel.gather(value.detach().float().reshape(1))
        return self.nan_guard.check(v.sum())

    def _gan_logits(self, x_s: torch.Tensor, s, guidance) -> torch.Tensor:
        """The head's per-token logits on the fake score's last hidden states for noised teacher latents `x_s`,
        queried under the empty prompt; call inside teacher.fake()."""
        box = {}
        hook = self.m.teacher.model.proj_out.register_forward_pre_hook(lambda mod, args: box.__setitem__("h", args[0]))
        try:
            neg = self.text["negative"].repeat(x_s.shape[0]).to(self.device)
            self.m.teacher.velocity(x_s, s, neg, **self._fake_embedding(guidance))
        finally:
            hook.remove()
        return self.gan_head(box["h"].float())

    def _real_batch(self, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A batch of real latents, as many as `like` (the Bridge's outputs they are told from), of its shape."""
        if self.gan_real.shape[1:] != like.shape[1:]:
            raise UserError(f"gan_real_latents {self.cfg.gan_real_latents!r} holds latents of shape "
                            f"{tuple(self.gan_real.shape[1:])}, the Bridge outputs {tuple(like.shape[1:])}: encode "
                            "the real images at the teacher's resolution of this run.")
        idx = torch.randint(0, len(self.gan_real), (len(like),), generator=g, device=g.device).cpu()
        return self.gan_real[idx].to(self.device)

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

    # ---- the fake score's guidance (teachers.fake_guidance_for) ----
    def _embeds_guidance(self) -> bool:
        return self.m.teacher.family in GUIDANCE_EMBEDDING

    def _fake_query(self, guidance, neg) -> dict:
        """predict_x0 keywords of the fake query: none for the unguided fake of a CFG teacher (the call as before),
        the embedding for Flux dev, CFG through the LoRA for a fake_guidance other than 1."""
        fg = fake_guidance_for(self.m.teacher.family, self.cfg.fake_guidance, guidance)
        if self._embeds_guidance():
            return {"guidance": fg}
        if not isinstance(fg, torch.Tensor) and float(fg) == 1.0:
            return {}
        return {"neg_cond": neg, "guidance": fg}

    def _fake_embedding(self, guidance) -> dict:
        """velocity keywords of a fake update: the guidance embedding it is queried with (Flux dev), else none."""
        if not self._embeds_guidance():
            return {}
        return {"guidance": fake_guidance_for(self.m.teacher.family, self.cfg.fake_guidance, guidance)}

    def _fresh_guidance(self, g: torch.Generator):
        """The real guidance of a fresh fake-update batch: drawn like the student step's only where the fake follows
        it (Flux dev with a guidance range), so other runs draw exactly the random numbers they drew before."""
        c = self.cfg
        if not (self._embeds_guidance() and c.fake_guidance is None and isinstance(c.guidance_arg, tuple)):
            return c.guidance_arg
        return dmd.sample_guidance(c.batch_size, c.guidance_arg, generator=g, device=g.device).to(self.device)

    def train_step(self, step: int) -> dict[str, float] | None:
        c, teacher = self.cfg, self.m.teacher
        g = loop.step_generator(c.seed, step, self.accel.process_index, device=self.device)
        if step < c.regression_warmup_steps:
            return self._warmup_step(g, step)
        noise, s_emb, t_cond = self._batch(g)
        metrics: dict[str, float] = {}

        # -- student (generator) update --
        # The graph is cut at the student's latent z: the Bridge's backward gives the per-sample gradient in student
        # space (logged; normalised there with grad_norm "student"/"both"), which then flows into the student.
        # With gradient accumulation the batch runs as micro-batches, each backpropagated at once, its loss weighted
        # so the sum is the whole batch's; its randomness is drawn for the whole batch, as without accumulation.
        parts = self._micro_batches(c.batch_size)
        # Student-space normalisation needs every sample's pulled-back norm before any of it flows into the student:
        # with several micro-batches the student runs without a graph first and again, micro-batch by micro-batch,
        # for the backward (one student forward more; the graphs of all micro-batches are never held at once).
        coupled = c.grad_norm in ("student", "both")
        recompute = coupled and len(parts) > 1
        held, xs, gzs = [], [], []
        loss = grad_abs = check = gan_g = 0.0
        for i, part in enumerate(parts):
            with self._sync(i, parts):
                with self.accel.autocast(), torch.no_grad() if recompute else contextlib.nullcontext():
                    with self._phase("student_forward"):
                        z = self.generator(noise[part], s_emb[part])
                z_in = z.detach().requires_grad_(True)
                with self.accel.autocast(), self._phase("decode_project"):
                    x = self.m.bridge.forward_model(z_in, straight_through=c.straight_through_clamp).float()
                if i == 0:  # noise levels, noise and guidance of the whole batch, in the order of one batch
                    s_all, n_all = self._draw_noise((c.batch_size, *x.shape[1:]), g)
                    guidance_all = dmd.sample_guidance(c.batch_size, c.guidance_arg, generator=g, device=g.device)
                    if isinstance(guidance_all, torch.Tensor):
                        guidance_all = guidance_all.to(self.device)
                s = s_all[part]
                x_s = teacher.add_noise(x.detach(), n_all[part], s)
                guidance = guidance_all[part] if isinstance(guidance_all, torch.Tensor) and len(parts) > 1 else \
                    guidance_all
                cond = t_cond.index(torch.arange(part.start, part.stop))
                neg = self.text["negative"].repeat(x.shape[0]).to(self.device)
                with torch.no_grad(), self.accel.autocast():
                    with self._phase("real_teacher"):
                        x0_real = teacher.predict_x0(x_s, s, cond, neg_cond=neg, guidance=guidance).float()
                    with self._phase("fake_teacher"), teacher.fake():
                        x0_fake = teacher.predict_x0(x_s, s, cond, **self._fake_query(guidance, neg)).float()
                loss_i, grad = dmd.distribution_matching_loss(c.loss, x, x0_real, x0_fake, s,
                                                              normalise=c.grad_norm in ("teacher", "both"))
                gan_i = 0.0
                if self.gan_head is not None:  # the generator's GAN loss, through the fake score and the Bridge
                    x_leaf = x.detach().requires_grad_(True)
                    with self._phase("gan_generator"), teacher.fake():
                        with self.accel.autocast():
                            logits = self._gan_logits(teacher.add_noise(x_leaf, n_all[part], s), s, guidance)
                        gan_loss = F.softplus(-logits.float()).mean()
                        # Its gradient at the Bridge's output, taken inside the adapter's state (gradient
                        # checkpointing re-runs the forward in the backward); nothing accumulates in the fake.
                        (gx,) = torch.autograd.grad(gan_loss, x_leaf)
                    gan_i = (x * gx.detach().float()).sum()  # d/dx = the GAN loss's gradient
                    gan_g = gan_g + gan_loss.detach() / len(parts)
                # The gradient's nan_to_num would hide a diverged teacher (e.g. a bf16 overflow) as a zero gradient:
                # non-finite teacher outputs make the step a NaN step too (judged once the whole batch has run).
                check = check + loss_i.detach() + 0 * (x0_real.sum() + x0_fake.sum())
                with self._phase("backward"):
                    self.accel.backward((loss_i + c.gan_weight * gan_i) / len(parts))  # into z_in: the Bridge is frozen
                    gz = z_in.grad.float()
                    if not coupled:  # nothing to wait for: into the student now, which frees this graph
                        self.accel.backward(z, gradient=gz.to(z.dtype))
                    elif not recompute:
                        held.append(z)
                loss = loss + loss_i.detach() / len(parts)
                grad_abs = grad_abs + grad.abs().mean() / len(parts)
                xs.append(x.detach())
                gzs.append(gz)
                del z, z_in, x, x_s, x0_real, x0_fake, grad, loss_i
        if not self._all_finite(check):
            self.opt_student.zero_grad(set_to_none=True)
            return None
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        with self._phase("backward"):
            gz = self._pull_back_gradient(torch.cat(gzs) if len(gzs) > 1 else gzs[0], metrics)
            if coupled:
                for i, part in enumerate(parts):
                    with self._sync(i, parts):
                        if recompute:
                            with self.accel.autocast(), self._phase("student_forward"):
                                z = self.generator(noise[part], s_emb[part])
                        else:
                            z = held[i]
                        self.accel.backward(z, gradient=gz[part].to(z.dtype))
                        del z
                held.clear()
            if self.pairs is not None and c.regression_weight and not self._add_regression(g, metrics):
                self.opt_student.zero_grad(set_to_none=True)
                return None
            threshold = self._clip_threshold()
            gn = float(self.accel.clip_grad_norm_(self.student_params, threshold))
            self.opt_student.step()
            self._applied_step = step + 1  # the state now holds this step's student update
            self.opt_student.zero_grad(set_to_none=True)
            self.m.student.ema_step()
        if c.grad_clip_relative and math.isfinite(gn):
            ema, n = self.clip_norm
            self.clip_norm = [CLIP_EMA * ema + (1 - CLIP_EMA) * min(gn, threshold), n + 1]
        metrics.update(loss=float(loss), grad_abs=float(grad_abs), student_grad_norm=gn,
                       clipped=float(gn > threshold), sample_std=x.std().item())
        if self.gan_head is not None:
            metrics["gan_g"] = float(gan_g)

        # -- fake score updates --
        # Whole-batch samples and draws; the teacher's forward and backward (the costly part) in micro-batches.
        fake_losses, gan_stats = [], []
        for k in range(c.fake_updates):
            if k == 0:
                x_f, cond_f, guidance_f = x, t_cond, guidance_all
            else:
                noise_k, s_emb_k, cond_f = self._batch(g)
                guidance_f = self._fresh_guidance(g)
                with self._phase("fake_samples"), torch.no_grad(), self.accel.autocast():
                    x_f = torch.cat([self._generate(noise_k[part], s_emb_k[part]) for part in parts])
            s_f, n_f, x_s_f = self._noise(x_f, g)
            if self.gan_head is not None:  # real samples, noised at levels of their own
                s_r, _, x_s_r = self._noise(self._real_batch(x_f, g), g)
            # Forward and backward inside the adapter's state: toggling adapters may change requires_grad of the
            # LoRA weights, and under gradient checkpointing the backward re-runs the forward.
            with self._phase("fake_update"), teacher.fake():
                loss_f = 0.0
                for part in parts:
                    with self.accel.autocast():
                        g_part = guidance_f[part] if isinstance(guidance_f, torch.Tensor) and len(parts) > 1 else \
                            guidance_f
                        cond_i = cond_f.index(torch.arange(part.start, part.stop))
                        v = teacher.velocity(x_s_f[part], s_f[part], cond_i, **self._fake_embedding(g_part))
                    loss_i = dmd.flow_matching_loss(v, x_f[part], n_f[part]) / len(parts)
                    if self.gan_head is not None:  # the discriminator: real latents up, the Bridge's outputs down
                        with self.accel.autocast():
                            fake_logits = self._gan_logits(x_s_f[part], s_f[part], g_part)
                            real_logits = self._gan_logits(x_s_r[part], s_r[part], g_part)
                        gan_d = (F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean())
                        loss_i = loss_i + c.gan_disc_weight * gan_d / len(parts)
                        gan_stats.append(((real_logits > 0).float().mean().item(),
                                          (fake_logits < 0).float().mean().item()))
                    loss_i.backward()
                    loss_f = loss_f + loss_i.detach()
                    del v, loss_i
                if not self._all_finite(loss_f):
                    self.opt_fake.zero_grad(set_to_none=True)
                    continue
                self._average_fake_grads()
                torch.nn.utils.clip_grad_norm_(self.fake_params, c.grad_clip)
                self.opt_fake.step()
                self.opt_fake.zero_grad(set_to_none=True)
            fake_losses.append(loss_f.item())
        if fake_losses:
            metrics["fake_loss"] = sum(fake_losses) / len(fake_losses)
        if gan_stats:  # the discriminator's accuracy on real and on the Bridge's outputs
            metrics["gan_d_real"] = sum(r for r, _ in gan_stats) / len(gan_stats)
            metrics["gan_d_fake"] = sum(f for _, f in gan_stats) / len(gan_stats)
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
                "nan_skipped": self.nan_guard.skipped_total, "gradient_checkpointing": self.gradient_checkpointing,
                **({"warnings": self.warnings} if self.warnings else {})}

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
                                optimizers=self._optimizers(), schedulers={},
                                extra=extra)

    def _resume(self) -> int:
        path = os.path.join(self.cfg.out_dir, self.STATE_FILE)
        if not (self.cfg.resume and os.path.exists(path)):
            return 0
        extra = load_training_state(path, self._state_modules(), self._optimizers(), {})
        if self.m.student.ema is not None:
            self.m.student.ema.optimization_step = int(extra.get("ema_step", 0))
        self.nan_guard.skipped_total = int(extra.get("nan_skipped", 0))
        ema, n = extra.get("clip_norm", [0.0, 0])
        self.clip_norm = [float(ema), int(n)]
        self.clock.resume(extra.get("train_seconds", 0.0))
        return int(extra["step"])

    def _free_gradients(self) -> None:
        """After running out of memory: drop every gradient (the failed step's), so saving has room."""
        for opt in self._optimizers().values():
            opt.zero_grad(set_to_none=True)

    def _out_of_time(self) -> bool:
        """The time budget is spent (on any process: all stop at the same step, or DDP would hang)."""
        if not self.cfg.max_train_seconds:
            return False
        spent = torch.tensor([float(self.clock.seconds() >= self.cfg.max_train_seconds)], device=self.device)
        return bool(self.accel.reduce(spent, reduction="sum").item() > 0)

    # ---- main loop ----
    def prepare(self) -> int:
        """Pairs (when the run makes its own), text cache, models, optimizers, resume; returns the step to start from."""
        if not self.make_pairs():
            raise UserError("Stopped while making the regression pairs; run again to continue making them.")
        if self.accel.is_main_process:
            for w in self.warnings:
                print(f"warning: {w}", flush=True)
        self.prepare_text()
        self.setup()
        self.generator = self.m.student
        start = self._resume()
        # DDP for the student; the teacher (and its fake LoRA) and the Bridge stay plain modules.
        self.generator, self.opt_student = self.accel.prepare(self.m.student, self.opt_student)
        return start

    def run(self) -> dict:
        c = self.cfg
        total = c.regression_warmup_steps + c.steps  # the warm-up's steps come first
        if self.accel.is_main_process:
            loop.remove_stale_temporaries(c.out_dir, os.path.join(c.out_dir, "samples"), self.cache_dir)
        with loop.graceful_interrupt(self.stop):
            pairs_made = self.make_pairs()  # first: the pairs come from the untrained student base
        if not pairs_made:  # stopped while making them: the batches made so far are kept for the next run
            return {"resumed_from": 0, "out_dir": c.out_dir, "step": 0, "stopped_early": True, "seconds": 0.0,
                    "train_seconds": 0.0, "nan_skipped": 0, "pairs": c.pairs_file, "pairs_seconds": None,
                    "student": os.path.join(c.out_dir, self.STUDENT_FILE)}
        start = self.prepare()
        main = self.accel.is_main_process
        log = loop.JsonlLogger(os.path.join(c.out_dir, "metrics.jsonl"), resume_step=start) if main else None
        progress = self.progress or loop.ProgressReporter(total=total, desc="distill", disable=not main)
        if isinstance(progress, loop.ProgressReporter):
            progress.total = total  # warm-up and DMD steps, whatever total the caller's reporter was made with
        progress.start(start)
        result: dict = {"resumed_from": start, "out_dir": c.out_dir,
                        "gradient_checkpointing": self.gradient_checkpointing}
        step = start
        if start >= total:
            self.save(start, state=False)  # already finished: the student file again, from the state
        t0 = self.clock.start()
        # A failure after a step's student update (e.g. out of memory in its fake-score updates) saves that step as
        # done: resuming would otherwise apply its update a second time.
        done = lambda: max(step, self._applied_step)  # noqa: E731
        failure = loop.save_on_failure(self.save, done, start, free=self._free_gradients)
        # The budget is read once per step, after it (a fresh run makes at least one step): a second reading in the
        # loop's condition could find it spent after the step's own reading did not, and end the run unsaved.
        out_of_time = step > 0 and self._out_of_time()
        with loop.graceful_interrupt(self.stop), failure:
            while step < total and not out_of_time:
                metrics = self.train_step(step)
                step += 1
                if log is not None and metrics is not None and (step % c.log_every == 0 or step == total):
                    log.log({"step": step, **metrics})
                preview = None
                if main and (step % c.sample_every == 0 or step == total):
                    preview = self.preview(step, os.path.join(c.out_dir, "samples", f"step_{step:06d}.png"))
                out_of_time = self._out_of_time()
                if main and out_of_time and step % c.sample_every and step != total:
                    preview = self.preview(step, os.path.join(c.out_dir, "samples", f"step_{step:06d}.png"))
                if step % c.ckpt_every == 0 or step == total or out_of_time:
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
        if self.pairs is not None:  # what the pairs cost, beside the training loop's seconds
            result.update(pairs=c.pairs_file, pairs_seconds=self.pairs_seconds, warmup_steps=c.regression_warmup_steps)
        if self.m.student.is_lora:
            result["lora"] = os.path.join(c.out_dir, self.LORA_FILE)
        return result


def distill(config: DistillConfig, models: DistillModels, progress=None, stop=None) -> dict:
    """Run (or resume) a distillation; see Distiller."""
    return Distiller(config, models, progress=progress, stop=stop).run()
