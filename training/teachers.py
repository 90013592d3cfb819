"""Rectified-flow teachers (SD3 / SD3.5, Flux dev / schnell) behind one small interface.

Convention (diffusers): s in [0, 1], x_s = (1 - s) x0 + s n, the model predicts v = n - x0, so
x0 = x_s - s v and eps = x_s + (1 - s) v. All latents are in the teacher's MODEL space (`space.to_model(raw)`).

The interface (also implemented by closed_form.ClosedFormTeacher):
    space, family, model
    sample_s(n, generator=None, device=None, resolution=None)   training noise levels [n]
    add_noise(x0, noise, s)                                      x_s
    velocity(x_s, s, cond)                                       v (one forward; Flux dev: default guidance)
    predict_x0(x_s, s, cond, neg_cond=None, guidance=None)       guided x0 (guidance None: family default)
    add_fake_adapter(rank, alpha, target_modules=None); fake(); fake_parameters()
    enable_gradient_checkpointing()
    capture_attention(blocks=None, n_queries=64, generator=None, per_head=False); default_attention_blocks()

Guidance: SD3 is true CFG, negative and positive in one batched forward (neg_cond None -> conditional only);
Flux dev takes guidance as an embedding (one forward, neg_cond unused); Flux schnell has no guidance at all.
Guidance may be a float or a per-sample tensor [B].
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, ContextManager, Iterator, Protocol

import torch

from ._bridge import spaces
from .models import families
from .models.text import TextCond

if TYPE_CHECKING:
    from torch import Tensor

FAMILIES = ("sd3", "sd35_medium", "sd35_large", "flux_dev", "flux_schnell")
DEFAULT_GUIDANCE = {"sd3": 7.0, **families.DEFAULT_GUIDANCE}
SD3_SHIFT = 3.0
# Flux dynamic shift: mu linear in the image token count (FluxPipeline's calculate_shift defaults).
FLUX_SHIFT = dict(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
# peft target modules: the attention projections of SD3 and Flux blocks (image and text streams).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# ---------------------------------------------------------------------------------------------- flow math

def _per_sample(s, x: Tensor) -> Tensor:
    """s (float, [B] or [1]) -> [B,1,...,1] on x's device and dtype."""
    s = torch.as_tensor(s, device=x.device, dtype=x.dtype)
    return s.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1))) if s.numel() == 1 else \
        s.reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, s) -> Tensor:
    """x_s = (1 - s) x0 + s n."""
    s = _per_sample(s, x0)
    return (1 - s) * x0 + s * noise


def x0_from_v(x_s: Tensor, s, v: Tensor) -> Tensor:
    return x_s - _per_sample(s, x_s) * v


def eps_from_v(x_s: Tensor, s, v: Tensor) -> Tensor:
    return x_s + (1 - _per_sample(s, x_s)) * v


def sd3_shift(s: Tensor, shift: float = SD3_SHIFT) -> Tensor:
    """SD3 timestep shift (FlowMatchEulerDiscreteScheduler with `shift`): s' = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def flux_mu(image_tokens: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_tokens, **FLUX_SHIFT)


def flux_shift(s: Tensor, mu: float) -> Tensor:
    """Flux dynamic shift (the scheduler's exponential time_shift with sigma 1): e^mu / (e^mu + (1/s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def logit_normal(n: int, generator=None, device=None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mean, logit_std=std, device=device,
                                                 generator=generator)


# ---------------------------------------------------------------------------------------------- Flux packing

def pack_flux(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, row-major, channels then (dy, dx) (FluxPipeline order)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width (2x2 packing); got {h}x{w}.")
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_flux for a latent of `height` x `width`."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} Flux tokens do not fit a {height}x{width} latent.")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def flux_image_ids(h2: int, w2: int, device=None, dtype=None) -> Tensor:
    """(h2*w2, 3) position ids (0, row, col) of the packed tokens."""
    rows, cols = torch.meshgrid(torch.arange(h2), torch.arange(w2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- teachers

class Teacher(Protocol):
    """What the trainers use (for type hints; SD3Teacher, FluxTeacher and ClosedFormTeacher implement it)."""

    space: object  # bridge.spaces.LatentSpace the teacher's latents live in (MODEL space = space.to_model(raw))
    family: str
    model: object

    def sample_s(self, n: int, generator=None, device=None, resolution: int | None = None) -> Tensor: ...
    def add_noise(self, x0: Tensor, noise: Tensor, s) -> Tensor: ...
    def velocity(self, x_s: Tensor, s, cond: TextCond) -> Tensor: ...
    def predict_x0(self, x_s: Tensor, s, cond: TextCond, neg_cond: TextCond | None = None, guidance=None) -> Tensor: ...
    def add_fake_adapter(self, rank: int, alpha: float | None = None, target_modules=None) -> None: ...
    def fake(self) -> ContextManager[None]: ...
    def fake_parameters(self) -> list[torch.nn.Parameter]: ...
    def enable_gradient_checkpointing(self) -> None: ...


class _DiffusersTeacher:
    """Shared part: fake LoRA adapter, attention capture, checkpointing. Subclasses define `_v` (one forward)."""

    space_name = ""

    def __init__(self, model, family: str, space=None, guidance: float | None = None,
                 attention_blocks: list[str] | None = None):
        self.model = model
        self.family = family
        self.space = spaces.get_space(space or self.space_name)
        self.guidance = guidance
        self._attention_blocks = list(attention_blocks) if attention_blocks else None
        self._fake_on = False

    # ---- flow ----
    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, s) -> Tensor:
        return add_noise(x0, noise, s)

    def _model_inputs(self, x_s: Tensor, cond: TextCond):
        p = _execution(self.model)
        if cond.pooled is None:
            raise ValueError(f"The {self.family} teacher needs pooled text embeddings (TextCond.pooled); encode "
                             f"prompts with text.encode_for_family.")
        if len(cond) not in (1, x_s.shape[0]):
            raise ValueError(f"Text conditioning has {len(cond)} rows for a batch of {x_s.shape[0]} latents.")
        if len(cond) == 1 and x_s.shape[0] > 1:
            cond = cond.repeat(x_s.shape[0])
        return x_s.to(device=p.device, dtype=p.dtype), cond.to(device=p.device, dtype=p.dtype)

    def velocity(self, x_s: Tensor, s, cond: TextCond, guidance=None) -> Tensor:
        """v = n - x0 predicted by the model (adapter state as set by `fake()`), x_s's dtype. guidance: Flux dev's
        embedding (None: the teacher's default); SD3 ignores it (one conditional forward)."""
        return self._v(x_s, s, cond, self.guidance if guidance is None else guidance).to(x_s.dtype)

    # ---- fake score (peft LoRA on the same weights) ----
    def add_fake_adapter(self, rank: int = 64, alpha: float | None = None, target_modules=None) -> None:
        """LoRA adapter "fake" on the attention projections (zero-init, so the fake starts equal to the teacher).

        Base weights are frozen; the adapter is off except inside `with teacher.fake():`."""
        from peft import LoraConfig

        if "fake" in (getattr(self.model, "peft_config", None) or {}):
            raise ValueError("This teacher already has a fake adapter.")
        self.model.requires_grad_(False)
        targets = list(target_modules or LORA_TARGETS)
        present = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()} | \
                  {".".join(n.rsplit(".", 2)[-2:]) for n, _ in self.model.named_modules()}
        targets = [t for t in targets if t in present]
        if not targets:
            raise ValueError(f"None of the LoRA target modules {list(target_modules or LORA_TARGETS)} exist in "
                             f"{type(self.model).__name__}.")
        self.model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                          init_lora_weights=True), adapter_name="fake")
        # peft gives the LoRA its base layer's dtype and device: with fp8 storage that is float8 (untrainable), with
        # offloading the CPU. The LoRA trains where and in what the model computes (fp8: the compute dtype).
        where = _execution(self.model)
        for n, p in self.model.named_parameters():
            if "lora_" in n and ".fake" in n and (p.dtype != where.dtype or p.device != where.device):
                p.data = p.data.to(device=where.device, dtype=where.dtype)
        self.model.disable_adapters()

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.model.named_parameters() if "lora_" in n and ".fake" in n]
        if not params:
            raise ValueError("No fake adapter: call add_fake_adapter() first.")
        return params

    @contextlib.contextmanager
    def fake(self) -> Iterator[None]:
        """Predictions inside come from teacher + LoRA ("fake score"); outside, from the frozen teacher.

        peft's enable_adapters() turns requires_grad back on for the LoRA weights (off again on exit). With gradient
        checkpointing, run backward inside the same state: the recomputation uses the current adapter state."""
        self.fake_parameters()  # clear error when there is no adapter
        if self._fake_on:
            yield
            return
        self.model.enable_adapters()
        self._fake_on = True
        try:
            yield
        finally:
            self.model.disable_adapters()
            self._fake_on = False

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    # ---- attention ----
    def default_attention_blocks(self) -> list[str]:
        return list(self._attention_blocks or self._default_blocks())

    def capture_attention(self, blocks: list[str] | None = None, n_queries: int | None = 64,
                          generator: torch.Generator | None = None, per_head: bool = False):
        """Context manager yielding a dict filled by each forward: block name -> [B, n_queries, n_keys] attention rows
        of sampled image queries (see training/attention.py). blocks None: `default_attention_blocks()`.
        Not part of the `Teacher` protocol: only Bridge training (attention fidelity) needs it. Under SD3 true CFG
        the recorded batch is [negative, positive] (one batched forward)."""
        from .attention import capture_attention

        return capture_attention(self.model, blocks or self.default_attention_blocks(), n_queries, generator,
                                 per_head)

    def to(self, device=None, dtype=None) -> "_DiffusersTeacher":
        self.model.to(device=device, dtype=dtype)
        return self


class _Where:
    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype


def _execution(model) -> _Where:
    """Where a model computes: diffusers' `device` / `dtype` know about its offload (the onload device) and fp8
    storage (the compute dtype); any other module: its first parameter."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        return _Where(model.device, model.dtype)
    return next(model.parameters())


def is_offloaded(model) -> bool:
    """Whether diffusers' group offloading manages `model`'s devices (then `.to(device)` must not be called)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(model)


def _middle(n: int, k: int) -> list[int]:
    """k consecutive indices around the middle of range(n)."""
    start = max(0, min(n - k, n // 2 - k // 2))
    return list(range(start, min(n, start + k)))


class SD3Teacher(_DiffusersTeacher):
    """SD3 / SD3.5 (SD3Transformer2DModel). timestep = 1000 s; true CFG in one batched forward."""

    space_name = "sd3"

    def __init__(self, model, family: str = "sd35_medium", space=None, guidance: float | None = None,
                 shift: float = SD3_SHIFT, attention_blocks: list[str] | None = None):
        if not family.startswith("sd3"):
            raise ValueError(f"SD3Teacher serves the sd3 / sd35_* families, not {family!r}.")
        super().__init__(model, family, space, DEFAULT_GUIDANCE[family] if guidance is None else guidance,
                         attention_blocks)
        self.shift = shift

    def sample_s(self, n: int, generator=None, device=None, resolution: int | None = None,
                 s_min: float | None = None, s_max: float | None = None) -> Tensor:
        """Logit-normal(0, 1) then the SD3 shift (3); optionally clamped to [s_min, s_max]."""
        s = sd3_shift(logit_normal(n, generator, device), self.shift)
        return s.clamp(s_min if s_min is not None else 0.0, s_max if s_max is not None else 1.0)

    def _v(self, x_s: Tensor, s, cond: TextCond, guidance=None) -> Tensor:
        x, c = self._model_inputs(x_s, cond)
        # float32 like the pipeline's scheduler timesteps (1000 s in bf16 would round to steps of 4)
        t = torch.as_tensor(s, device=x.device, dtype=torch.float32).expand(x.shape[0]) * 1000
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=c.prompt_embeds,
                          pooled_projections=c.pooled, return_dict=False)[0]

    def predict_x0(self, x_s: Tensor, s, cond: TextCond, neg_cond: TextCond | None = None, guidance=None) -> Tensor:
        """x0 with true CFG, x0_neg + g (x0_cond - x0_neg), negative and positive in one forward.

        guidance None: the family default; neg_cond None or guidance 1: conditional only."""
        g = self.guidance if guidance is None else guidance
        b = x_s.shape[0]
        s = torch.as_tensor(s, device=x_s.device, dtype=torch.float32).expand(b)
        no_cfg = g is None or neg_cond is None or (not isinstance(g, torch.Tensor) and float(g) == 1.0)
        if no_cfg:
            return x0_from_v(x_s, s, self._v(x_s, s, cond).to(x_s.dtype))
        neg = neg_cond.repeat(b) if len(neg_cond) == 1 and b > 1 else neg_cond
        if len(cond) == 1 and b > 1:
            cond = cond.repeat(b)
        v_neg, v_pos = self._v(torch.cat([x_s, x_s]), torch.cat([s, s]), TextCond.cat([neg.to(cond.prompt_embeds.device),
                                                                                        cond])).to(x_s.dtype).chunk(2)
        v = v_neg + _per_sample(g, v_pos) * (v_pos - v_neg)  # linear, so CFG on v equals CFG on x0
        return x0_from_v(x_s, s, v)

    def _default_blocks(self) -> list[str]:
        return [f"transformer_blocks.{i}.attn" for i in _middle(len(self.model.transformer_blocks), 3)]


class FluxTeacher(_DiffusersTeacher):
    """Flux.1 (FluxTransformer2DModel). Packed 2x2 latents; timestep s (the model multiplies by 1000);
    dev: guidance embedding, schnell: none."""

    space_name = "flux"

    def __init__(self, model, family: str = "flux_dev", space=None, guidance: float | None = None,
                 attention_blocks: list[str] | None = None):
        if family not in ("flux_dev", "flux_schnell"):
            raise ValueError(f"FluxTeacher serves flux_dev and flux_schnell, not {family!r}.")
        has_embed = bool(model.config.guidance_embeds)
        if has_embed != (family == "flux_dev"):
            raise ValueError(f"Family {family!r} does not match the transformer: guidance_embeds={has_embed} "
                             f"(dev has a guidance embedding, schnell has none).")
        super().__init__(model, family, space, DEFAULT_GUIDANCE[family] if guidance is None else guidance,
                         attention_blocks)
        if family == "flux_schnell":
            self.guidance = None

    def sample_s(self, n: int, generator=None, device=None, resolution: int | None = None,
                 s_min: float | None = None, s_max: float | None = None) -> Tensor:
        """Logit-normal(0, 1) then the dynamic shift for `resolution` pixels per side (default: the space's native
        resolution; 1024 px -> 4096 tokens -> mu 1.15); optionally clamped to [s_min, s_max]."""
        res = resolution or self.space.native_resolution
        tokens = (res // (self.space.downscale * 2)) ** 2
        s = flux_shift(logit_normal(n, generator, device), flux_mu(tokens))
        return s.clamp(s_min if s_min is not None else 0.0, s_max if s_max is not None else 1.0)

    def _v(self, x_s: Tensor, s, cond: TextCond, guidance=None) -> Tensor:
        x, c = self._model_inputs(x_s, cond)
        b, _, h, w = x.shape
        t = torch.as_tensor(s, device=x.device, dtype=x.dtype).expand(b)  # as FluxPipeline (the model scales by 1000)
        g = None
        if self.model.config.guidance_embeds:
            g = torch.as_tensor(self.guidance if guidance is None else guidance, device=x.device,
                                dtype=torch.float32).expand(b)
        out = self.model(hidden_states=pack_flux(x), timestep=t, guidance=g, pooled_projections=c.pooled,
                         encoder_hidden_states=c.prompt_embeds,
                         txt_ids=torch.zeros(c.prompt_embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                         img_ids=flux_image_ids(h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]
        return unpack_flux(out, h, w)

    def predict_x0(self, x_s: Tensor, s, cond: TextCond, neg_cond: TextCond | None = None, guidance=None) -> Tensor:
        """x0 in one forward; dev: guidance (None: family default) goes in as the embedding; neg_cond is unused."""
        return x0_from_v(x_s, s, self._v(x_s, s, cond, guidance).to(x_s.dtype))

    def _default_blocks(self) -> list[str]:
        double = [f"transformer_blocks.{i}.attn" for i in _middle(len(self.model.transformer_blocks), 2)]
        single = [f"single_transformer_blocks.{i}.attn" for i in _middle(len(self.model.single_transformer_blocks), 1)]
        return double + single


def fake_guidance_for(family: str, fake_guidance, real_guidance):
    """The guidance the fake score is trained and queried with.

    DMD2 trains its fake score unguided against a guided real score. The fake is a LoRA on the teacher, trained by
    flow matching on the student's samples; what matters is that it is queried exactly as it is trained, and that at
    initialisation (LoRA zero) it is the real score wherever the student equals the teacher, so the only gradient
    is the student's distance from the teacher:
    - true CFG (SD3.5): the fake is the conditional prediction (guidance 1), as DMD2's; the real score's CFG is the
      direction the student is pushed in (a fake "with CFG" would need an unconditional branch it never trains).
    - a guidance embedding (Flux dev): the embedding is a model input like the prompt, and Flux dev has no
      unguided mode (it was distilled at guidance >= 1). Queried at another embedding than the real score's, the
      zero-init fake would differ from the real score even for a student equal to the teacher, a gradient that
      only goes once the LoRA has learnt to undo the embedding. So the fake takes the real score's embedding, the
      same value per sample (tests/test_teachers.py shows the difference).
    `fake_guidance` (DistillConfig.fake_guidance) overrides both; None: the family's choice above."""
    if fake_guidance is not None:
        return fake_guidance
    return real_guidance if family in families.GUIDANCE_EMBEDDING else 1.0


def make_teacher(family: str, transformer, **kw) -> _DiffusersTeacher:
    """sd3 / sd35_medium / sd35_large -> SD3Teacher; flux_dev / flux_schnell -> FluxTeacher."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown teacher family {family!r}; choose one of {', '.join(FAMILIES)}.")
    cls = SD3Teacher if family.startswith("sd3") else FluxTeacher
    return cls(transformer, family=family, **kw)
