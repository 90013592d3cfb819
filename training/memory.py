"""Peak memory of Bridge training and distillation, per phase, before any model loads; the plan chooser and the
preflight every training entry point calls.

Method (docs/benchmarks.md, DESIGN §10). The models are the real classes built from the shipped configs
(`models/configs/*`, or the tiny ones) under `torch._subclasses.fake_tensor.FakeTensorMode`: no weights are read and
no memory is used. The training step is driven on them as the trainers do (`_distill_phases` follows
`Distiller.train_step` / `_warmup_step` and `pairs.make_pairs`; `_bridge_phases` follows `BridgeTrainer.train_step`),
and `torch.distributed._tools.mem_tracker.MemTracker` follows every storage they allocate and free. Each phase's
transient (what it allocates on top of what it found) is measured at micro-batch 1 and 2 and extrapolated linearly
(activations are linear in the batch); what is resident (weights in their storage dtype, optimizer states) is summed
from the measured parameter sizes, so settings that only change storage cost nothing to re-estimate:

- measured with fake tensors: every transient (activations, gradients, autocast copies, attention capture), parameter
  and buffer sizes, per-block sizes of the teacher;
- analytic: fp8 teacher storage (1 byte/param + the largest layer's bf16 copy: diffusers' layerwise-casting hooks do
  not run under fake tensors), block-level teacher offload (the non-block weights + two blocks stay on the GPU); in
  the phases that backpropagate through the teacher (fake-score updates, Bridge training's attention loss) autograd
  keeps the bf16 copies / onloaded blocks for the backward, so those savings need a checkpointed teacher (then one
  block at a time is added; without checkpointing all blocks in bf16 are: measured on CPU with diffusers' hooks),
  8-bit AdamW (2 bytes/param of states instead of 8), fused AdamW (no temporaries beyond one parameter's: the fake run
  uses the single-tensor AdamW, which has the same profile), gradient accumulation (the micro-batch's transients);
- modelled CUDA effects a CPU build cannot show: CUDA autocast is emulated (CPU autocast keeps layer/group norm and
  softmax in bf16 where CUDA computes them in fp32: `_cuda_autocast_rules` upcasts them), the CUDA context
  (CUDA_CONTEXT_GIB) and the caching allocator's slack (ALLOCATOR_SLACK x allocated) are added to the device figure.

torch 2.13 workarounds (DESIGN §10): the tracker's per-module hooks are cleared (they hook frozen parameters and
refuse modules called twice per iteration: the teacher is); `Module.to` is a no-op while peft injects adapters
(`.to()` cannot swap fake parameters); models are built in their target dtype (default dtype set while building);
CPU fake tensors, never fake CUDA ones (SDPA crashes on those in a CPU build).

Known differences from a CUDA run: SD3's positional-embedding buffer is built in fp32 here (bf16 when loaded with
torch_dtype: +0.4 GiB for SD3.5 Medium, conservative); fused AdamW, 8-bit AdamW and the offload/fp8 hooks are not run.
Text encoders are assumed loaded together, alone (without teacher and student), prompts encoded ENCODE_CHUNK at a time.

Results are deterministic: they are cached in memory and in `bench/memory_profiles.json` (shipped for the real sizes;
`python -m training.bench.memory --regenerate` rebuilds it). No torch import at module level.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN workspaces: 0.3-1 GiB depending on the card and libraries
ALLOCATOR_SLACK = 1.10  # reserved / allocated of PyTorch's caching allocator under a training loop's churn
HOST_OVERHEAD_GIB = 0.8  # the Python process with torch, diffusers and transformers imported (CPU runs)
ENCODE_CHUNK = 16  # prompts per text-encoder forward when the prompts are encoded in chunks
MICRO = (1, 2, 4)  # micro-batches measured; others interpolated linearly between them (beyond 4: the 2-4 slope)
PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "memory_profiles.json")
PROFILE_VERSION = 2

DISTILL_PHASES = ("loading", "encoding", "pairs", "warmup", "student_step", "fake_update", "optimizer_step", "saving")
BRIDGE_PHASES = ("loading", "encoding", "latent_cache", "bridge_step", "optimizer_step", "saving")
PHASE_TITLES = {"loading": "loading", "encoding": "prompt encoding", "pairs": "regression pairs",
                "warmup": "regression warm-up", "student_step": "student step", "fake_update": "fake-score update",
                "optimizer_step": "optimizer step", "saving": "checkpoint saving", "latent_cache": "latent cache",
                "bridge_step": "Bridge step"}
TEACHERS = ("sd35_medium", "sd35_large", "flux_dev", "flux_schnell")
TEST_WORLDS = ("tiny", "tiny_flux", "mid")  # tiny configs of the same classes (models/tiny.py), for tests
OPTIMIZERS = ("adamw", "adamw8bit")
STORAGES = ("auto", "bf16", "fp8")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trained parameter: exp_avg + exp_avg_sq
# Relative cost of a step (1.0 = the requested settings without the option): rough priors from what each option
# recomputes or moves, NOT measured here (python -m training.bench.gpu measures s/step on a GPU).
STEP_COST = {"gradient_checkpointing": 1.30, "features_tap": 0.85, "fp8": 1.05, "accumulation_per_split": 0.06,
             "student_lora": 0.95, "adamw8bit": 1.02, "teacher_offload": 1.60}


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class MemorySettings:
    """What decides the memory of a run. kind: "distill" or "bridge". teacher: a family of TEACHERS or a test world
    (TEST_WORLDS). device: "cuda" (bf16 frozen models, autocast, CUDA overheads) or "cpu" (fp32, no autocast)."""

    teacher: str = "sd35_medium"
    kind: str = "distill"
    student_lora_rank: int = 0  # 0: the whole UNet
    batch_size: int = 4  # the effective batch
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    tap: str = "image"
    teacher_storage: str = "bf16"
    teacher_offload: bool = False
    optimizer: str = "adamw"
    resolution: int = 512  # student pixels; the teacher sees k x that
    k: int = 2
    fake_rank: int = 64
    regression: bool = False  # regression pairs made and a regression warm-up (its optimizer stays allocated)
    attention: bool = True  # Bridge training: attention fidelity through the teacher
    device: str = "cuda"

    @property
    def micro_batch(self) -> int:
        return max(1, self.batch_size // max(1, self.gradient_accumulation))

    @property
    def storage(self) -> str:
        """teacher_storage with auto resolved: bf16 (fp8 only when asked or chosen by a plan)."""
        return "bf16" if self.teacher_storage == "auto" else self.teacher_storage

    def label(self) -> str:
        """The settings as a short string (for tables and messages)."""
        parts = [f"batch {self.batch_size}" + (f" = {self.gradient_accumulation} x {self.micro_batch}"
                                               if self.gradient_accumulation > 1 else "")]
        if self.kind == "distill":
            parts.append(f"LoRA r{self.student_lora_rank}" if self.student_lora_rank else "full UNet")
        parts.append("checkpointing" if self.gradient_checkpointing else "no checkpointing")
        parts.append(f"{self.tap} tap")
        parts.append(f"teacher {self.storage}" + (" offloaded" if self.teacher_offload else ""))
        if self.kind == "distill" and self.optimizer != "adamw":
            parts.append(self.optimizer)
        return ", ".join(parts)


@dataclass
class Estimate:
    settings: MemorySettings
    phases: dict  # phase -> device GiB (CUDA: with context and allocator slack)
    allocated: dict  # phase -> GiB of tensors (what the tracker counts)
    host_gib: float  # host RAM at the loading peak (and for the offloaded teacher)
    notes: list = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def row(self) -> dict:
        s = self.settings
        return {"teacher": s.teacher, "kind": s.kind, "student": "lora" if s.student_lora_rank else "full",
                "batch": s.batch_size, "settings": asdict(s), "phases": {k: round(v, 3) for k, v in self.phases.items()},
                "peak_gib": round(self.peak_gib, 3), "peak_phase": self.peak_phase, "host_gib": round(self.host_gib, 2),
                "step_cost": round(step_cost(s), 3)}


def step_cost(s: MemorySettings, base: MemorySettings | None = None) -> float:
    """Relative cost of a step with settings `s` against `base` (default: s without any memory option)."""
    def cost(x: MemorySettings) -> float:
        c = 1.0
        if x.gradient_checkpointing:
            c *= STEP_COST["gradient_checkpointing"]
        if x.tap == "features":
            c *= STEP_COST["features_tap"]
        if x.storage == "fp8":
            c *= STEP_COST["fp8"]
        c *= 1 + STEP_COST["accumulation_per_split"] * (max(1, x.gradient_accumulation) - 1)
        if x.student_lora_rank and x.kind == "distill":
            c *= STEP_COST["student_lora"]
        if x.optimizer == "adamw8bit":
            c *= STEP_COST["adamw8bit"]
        if x.teacher_offload:
            c *= STEP_COST["teacher_offload"]
        return c

    if base is None:
        base = replace(s, gradient_checkpointing=False, tap="image", teacher_storage="bf16", gradient_accumulation=1,
                       student_lora_rank=0, optimizer="adamw", teacher_offload=False)
    return cost(s) / cost(base)


# ---------------------------------------------------------------------------------------------- fake building

def _config(family: str, part: str) -> dict:
    from .models.loading import CONFIG_ROOT

    with open(os.path.join(CONFIG_ROOT, family, part, "config.json"), encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _mid_configs() -> dict:
    """A mid-size world of the tiny classes where activations dominate the weights: for --validate (a real CPU step in
    seconds)."""
    return dict(unet=dict(block_out_channels=(64, 128), cross_attention_dim=32, attention_head_dim=8,
                          norm_num_groups=32, sample_size=16),
                sd3=dict(num_layers=3, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                         sample_size=64, pos_embed_max_size=64))


@dataclass
class _World:
    family: str  # the Teacher family (make_teacher)
    flux: bool
    t5_len: int
    projector: dict


def world_of(teacher: str) -> _World:
    if teacher in TEACHERS:
        flux = teacher.startswith("flux")
        t5 = {"flux_dev": 512, "flux_schnell": 256}.get(teacher, 256)
        return _World(teacher, flux, t5, {})
    if teacher in TEST_WORLDS:
        flux = teacher == "tiny_flux"
        return _World("flux_dev" if flux else "sd35_medium", flux, 32, {"width": 32, "depth": 2})
    raise ValueError(f"Unknown teacher {teacher!r} for the memory estimate; choose one of "
                     f"{', '.join(TEACHERS + TEST_WORLDS)}.")


@contextlib.contextmanager
def default_dtype(dtype):
    """Models built inside are created in `dtype` (`.to(dtype)` fails on fake modules; bench.gpu builds in bf16)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _no_module_to():
    """peft moves new adapter layers with Module.to, which cannot swap fake parameters: they are built in place."""
    from unittest import mock

    import torch

    with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
        yield


def _build_teacher(teacher: str, dtype):
    from .models import tiny

    if teacher in TEACHERS:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        cls = FluxTransformer2DModel if teacher.startswith("flux") else SD3Transformer2DModel
        with default_dtype(dtype):
            model = cls(**_config(teacher, "transformer"))
            vae = _vae(teacher)
        return model, vae
    with default_dtype(dtype):
        if teacher == "tiny_flux":
            model = tiny.tiny_flux_transformer()
        elif teacher == "mid":
            model = tiny.tiny_sd3_transformer("sd35", **_mid_configs()["sd3"])
        else:
            model = tiny.tiny_sd3_transformer("sd35")
        return model, tiny.tiny_vae(16)


def _vae(family: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_config(family, "vae"))


def _build_student(teacher: str):
    """(UNet in the default dtype, student VAE) of the world."""
    from diffusers import UNet2DConditionModel

    from .models import tiny

    if teacher in TEACHERS:
        return UNet2DConditionModel(**_config("sd15", "unet")), _vae("sd15")
    if teacher == "mid":
        return tiny.tiny_unet(**_mid_configs()["unet"]), tiny.tiny_vae(4)
    return tiny.tiny_unet(), tiny.tiny_vae(4)


def _text_encoders(teacher: str) -> list:
    """The teacher's text encoders and the student's CLIP-L (fake-built from the shipped configs)."""
    from .models import tiny

    if teacher not in TEACHERS:
        enc = [tiny.tiny_clip_text("L"), tiny.tiny_t5_text(), tiny.tiny_clip_text("L")]
        return enc if teacher == "tiny_flux" else enc + [tiny.tiny_clip_text("G")]
    import transformers
    from transformers import AutoConfig

    from .models.loading import CONFIG_ROOT

    parts = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if teacher.startswith("sd3") else [])
    out = []
    for family, part in [(teacher, p) for p in parts] + [("sd15", "text_encoder")]:
        cfg = AutoConfig.from_pretrained(os.path.join(CONFIG_ROOT, family, part))
        out.append(getattr(transformers, cfg.architectures[0])(cfg))
    return out


def _param_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _Tracker:
    """MemTracker's global accounting (current and peak bytes of every live storage), without its per-module hooks
    (the torch 2.13 workaround: they hook frozen parameters and refuse modules called twice per iteration)."""

    def __init__(self):
        from torch.distributed._tools.mem_tracker import MemTracker

        self.mt = MemTracker()

    def __enter__(self):
        self.mt.__enter__()
        self.mt._mod_tracker.clear_user_hooks()
        return self

    def __exit__(self, *exc):
        self.mt.__exit__(*exc)

    @staticmethod
    def _total(snap) -> int:
        return sum(d.get("Total", 0) for d in snap.values())

    def current(self) -> int:
        return self._total(self.mt.get_tracker_snapshot("current"))

    def peak(self) -> int:
        return self._total(self.mt.get_tracker_snapshot("peak"))

    def reset_peak(self) -> None:
        # As MemTracker.__enter__ does: the peak restarts from the current state.
        self.mt._peak_mem_snap = self.mt.get_tracker_snapshot("current")
        self.mt._peak_mem = {dev: snap.get("Total", 0) for dev, snap in self.mt._peak_mem_snap.items()}

    @contextlib.contextmanager
    def phase(self, out: dict, name: str, base=None):
        """Record in out[name] the most this block allocated on top of `base()` (the bytes the caller knows to be
        resident: weights and optimizer states), or of what was live when it started. A known base is safer: a
        tensor left over from before the block and freed inside it would otherwise hide part of the block's peak."""
        import gc

        gc.collect()
        start = base() if base is not None else self.current()
        self.reset_peak()
        yield
        out[name] = max(out.get(name, 0), self.peak() - start)


@contextlib.contextmanager
def _cuda_autocast_rules(enabled: bool):
    """CUDA's autocast on a CPU build: under CPU autocast (bf16), the ops CUDA autocast runs in fp32 and CPU autocast
    leaves in bf16 (layer/group norm, softmax) get upcast inputs and fp32 outputs, as on CUDA. The functions are
    patched for the whole fake run (a TorchFunctionMode would not reach the recomputation of gradient checkpointing,
    which runs in the backward pass)."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    if not enabled:
        yield
        return

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    def fp32(fn):
        def wrapped(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
            return fn(*args, **kwargs)
        return wrapped

    with contextlib.ExitStack() as stack:
        for name in ("layer_norm", "group_norm", "softmax", "log_softmax"):
            stack.enter_context(mock.patch.object(F, name, fp32(getattr(F, name))))
        yield


def _autocast(s: "MemorySettings"):
    """The trainers' autocast: bf16 on CUDA (emulated on the CPU with _cuda_autocast_rules), none on the CPU."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if s.device == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- measured profiles

def _profile_key(s: MemorySettings) -> str:
    """What the fake run depends on (storage, offload, optimizer, accumulation and batch are applied afterwards)."""
    if s.kind == "bridge":
        return (f"bridge|{s.teacher}|{s.device}|r{s.resolution}|k{s.k}|{s.tap}|ckpt{int(s.gradient_checkpointing)}"
                f"|attn{int(s.attention)}")
    return (f"distill|{s.teacher}|{s.device}|r{s.resolution}|k{s.k}|{s.tap}|ckpt{int(s.gradient_checkpointing)}"
            f"|lora{s.student_lora_rank}|fake{s.fake_rank}|reg{int(s.regression)}")


_CACHE: dict = {}


def _load_shipped() -> dict:
    try:
        with open(PROFILES_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("version") != PROFILE_VERSION:
        return {}
    return data.get("profiles", {})


def user_cache_file() -> str:
    """Where profiles measured on this machine for the real teachers are kept (they take minutes each)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cross-space-distillation", f"memory_profiles_v{PROFILE_VERSION}.json")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cached(key: str, compute, measure) -> dict | None:
    if key not in _CACHE:
        known = {**_read_json(user_cache_file()), **_load_shipped()}
        if key in known:
            _CACHE[key] = known[key]
        elif compute:
            real = key.split("|")[1] in TEACHERS
            if real:
                print(f"Memory: measuring the profile {key} on fake tensors (a few minutes, once: it is cached in "
                      f"{user_cache_file()})", flush=True)
            _CACHE[key] = measure()
            if real:  # test worlds are never cached on disk: their tests measure
                try:
                    os.makedirs(os.path.dirname(user_cache_file()), exist_ok=True)
                    data = {**_read_json(user_cache_file()), key: _CACHE[key]}
                    tmp = f"{user_cache_file()}.{os.getpid()}.tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        json.dump(data, f)
                    os.replace(tmp, user_cache_file())
                except OSError:
                    pass  # a read-only home: measured again next time
        else:
            return None
    return _CACHE[key]


def profile(s: MemorySettings, compute: bool = True) -> dict | None:
    """The measured profile of `s` (sizes and per-phase transients at MICRO batches, the text encoders' own): from
    memory, the shipped table, or fake runs now (a minute for the tiny worlds, a few for a real teacher)."""
    main = _cached(_profile_key(s), compute, lambda: measure_profile(s))
    enc = _cached(f"encoding|{s.teacher}|{s.device}", compute, lambda: measure_encoding(s))
    if main is None or enc is None:
        return None
    out = {"sizes": dict(main["sizes"], **enc["sizes"]), "transient": dict(main["transient"], **enc["transient"])}
    return out


def measure_encoding(s: MemorySettings) -> dict:
    """The text encoders' sizes and one chunk's transient, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sizes, phases = {}, {}
    with FakeTensorMode(), _cuda_autocast_rules(s.device == "cuda"), _Tracker() as tr:
        _encoding_phase(s, tr, sizes, phases)
    return {"sizes": sizes, "transient": {k: [int(v)] * len(MICRO) for k, v in phases.items()}}


def measure_profile(s: MemorySettings) -> dict:
    """Run the phases on fake tensors at each MICRO batch; returns sizes (bytes) and transients (bytes per micro)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = {"sizes": None, "transient": {}}
    for m in MICRO:
        with FakeTensorMode(), _cuda_autocast_rules(s.device == "cuda"), _Tracker() as tr:
            sizes, phases = (_bridge_phases if s.kind == "bridge" else _distill_phases)(s, m, tr)
        out["sizes"] = sizes
        for name, v in phases.items():
            out["transient"].setdefault(name, []).append(int(v))
    out["micro"] = list(MICRO)
    return out


def _frozen_dtype(s: MemorySettings):
    import torch

    return torch.bfloat16 if s.device == "cuda" else torch.float32


def _teacher_sizes(model) -> dict:
    """Bytes of the teacher's weights: total, its blocks (for offload), the largest block and layer (fp8 compute)."""
    import torch

    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
              for b in getattr(model, name, [])]
    block_bytes = [_param_bytes(b) for b in blocks]
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {"teacher": _param_bytes(model), "teacher_blocks": sum(block_bytes),
            "teacher_max_block": max(block_bytes) if block_bytes else 0,
            "teacher_max_layer": max((w.numel() for w in linears), default=0) * 2,
            "teacher_params": sum(p.numel() for p in model.parameters())}


def _cond(s: MemorySettings, model, n: int):
    import torch

    from .models.text import TextCond

    w = world_of(s.teacher)
    c = model.config
    seq = w.t5_len if w.flux else 77 + w.t5_len
    dtype = _frozen_dtype(s)
    return TextCond(torch.randn(n, seq, c.joint_attention_dim, dtype=dtype),
                    torch.randn(n, c.pooled_projection_dim, dtype=dtype))


def _bridge(s: MemorySettings, svae):
    from ._bridge import model as bridge_model

    w = world_of(s.teacher)
    space = "flux" if w.flux else "sd3"
    return bridge_model.Bridge.create("sd15", space, k=s.k, student_vae=svae, tap=s.tap, **w.projector)


def _encoding_phase(s: MemorySettings, tr: "_Tracker", sizes: dict, phases: dict) -> None:
    """Text encoders alone, one chunk of ENCODE_CHUNK prompts through each (no grad)."""
    import torch

    with default_dtype(_frozen_dtype(s)):
        encoders = [e.eval().requires_grad_(False) for e in _text_encoders(s.teacher)]
    sizes["text_encoders"] = sum(_param_bytes(e) for e in encoders)
    w = world_of(s.teacher)
    with tr.phase(phases, "encoding"), torch.no_grad(), _autocast(s):
        for e in encoders:
            n_pos = getattr(e.config, "max_position_embeddings", None)
            length = 77 if n_pos == 77 else w.t5_len
            ids = torch.randint(0, e.config.vocab_size, (ENCODE_CHUNK, length))
            e(input_ids=ids, output_hidden_states=True)
    del encoders


def _distill_phases(s: MemorySettings, m: int, tr: "_Tracker") -> tuple[dict, dict]:
    """The phases of a distillation on fake tensors, each as the trainer runs it (keep in step with
    Distiller.train_step / _warmup_step and pairs.make_pairs)."""
    import torch
    import torch.nn.functional as F

    from . import dmd
    from ._bridge import model as bridge_model
    from .student import OneStepStudent
    from .teachers import make_teacher

    frozen = _frozen_dtype(s)
    phases: dict = {}
    sizes: dict = {}
    transformer, tvae = _build_teacher(s.teacher, frozen)
    unet, _ = _build_student(s.teacher)  # fp32: the student trains in fp32
    with default_dtype(frozen):
        _, svae = _build_student(s.teacher)  # the frozen decoder in the frozen models' dtype
    teacher = make_teacher(world_of(s.teacher).family, transformer.eval().requires_grad_(False))
    tvae.eval().requires_grad_(False)
    bridge = _bridge(s, svae).requires_grad_(False).eval()
    student = OneStepStudent(unet).train()
    sizes.update(_teacher_sizes(transformer))
    sizes.update(teacher_vae=_param_bytes(tvae), student_vae=_param_bytes(svae),
                 bridge=_param_bytes(bridge.projector), student=_param_bytes(unet))
    lat = student.latent_size(s.resolution)
    t_lat = lat * s.k
    s_dim = unet.config.cross_attention_dim
    autocast = lambda: _autocast(s)  # noqa: E731

    # -- regression pairs (before the LoRA adapters and optimizers exist; make_pairs' calls, one step each) --
    if s.regression:
        with tr.phase(phases, "pairs", lambda: sum(_param_bytes(mod) for mod in (transformer, tvae, svae, bridge.projector,
                                                                              unet))), torch.no_grad():
            hidden = torch.randn(m, 77, s_dim)
            # one CFG step of student.ddim_sample (its scheduler step reads values: not on fake tensors)
            x = torch.randn(m, 4, lat, lat)
            eps = unet.eval()(torch.cat([x, x]), 999, encoder_hidden_states=torch.cat([hidden[:1].expand(m, -1, -1),
                                                                                     hidden])).sample
            x = x - 0.5 * eps[:m] - 0.5 * eps[m:]
            del eps
            y = bridge.forward_model(student.space.to_raw(x)).float()
            # one step of pairs.teacher_correct (its grid is built with .tolist(), which fake tensors cannot do)
            y = teacher.add_noise(y, torch.randn(y.shape), torch.full((m,), 0.9))
            x0 = teacher.predict_x0(y, 0.9, _cond(s, transformer, m), neg_cond=_cond(s, transformer, 1),
                                    guidance=4.0).float()
            y = x0 + 0.5 * (y - x0)
            del x0
            image = bridge_model.decode_to_image01(tvae, bridge.teacher_space.to_raw(y))
            small = F.interpolate(image, size=(s.resolution, s.resolution), mode="area")
            svae.encode((small * 2 - 1).to(svae.dtype)).latent_dist.mean.float()
            del hidden, x, y, image, small
        unet.train()

    # -- Distiller.setup --
    with _no_module_to():
        if s.student_lora_rank:
            student.add_lora(rank=s.student_lora_rank)
        teacher.add_fake_adapter(rank=s.fake_rank, alpha=s.fake_rank)
    if s.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        bridge.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    params = student.trainable_parameters()
    fake_params = list(teacher.fake_parameters())
    sizes.update(student_trainable=sum(p.numel() for p in params),
                 fake=sum(p.numel() * p.element_size() for p in fake_params),
                 fake_params=sum(p.numel() for p in fake_params))
    # Single-tensor AdamW: per-parameter temporaries only, like the fused AdamW used on CUDA.
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    opt_fake = torch.optim.AdamW(fake_params, lr=1e-4, foreach=False)
    for o, ps in ((opt, params), (opt_fake, fake_params)):  # states allocated, as after the first step
        for p in ps:
            p.grad = torch.zeros_like(p)
        o.step()
        o.zero_grad(set_to_none=True)

    def cond(n):
        return _cond(s, transformer, n)

    modules = [transformer, tvae, svae, bridge.projector, unet]

    def resident():  # weights (adapters included) and optimizer states: what the estimate adds back
        states = sum(t.numel() * t.element_size() for o in (opt, opt_fake) for st in o.state.values()
                     for t in st.values() if isinstance(t, torch.Tensor))
        return sum(_param_bytes(mod) for mod in modules) + states

    # -- regression warm-up (Distiller._warmup_step; its own AdamW, whose states are counted as resident) --
    if s.regression:
        with tr.phase(phases, "warmup", resident):
            with autocast():
                pred = student.space.to_model(student(torch.randn(m, 4, lat, lat), torch.randn(m, 77, s_dim)))
            loss = F.mse_loss(pred.float(), torch.randn(m, 4, lat, lat))
            loss.backward()
            del pred, loss
            for p in params:  # the optimizer step itself is the optimizer_step phase's
                p.grad = None

    # -- the student step (Distiller.train_step) --
    with tr.phase(phases, "student_step", resident):
        noise, s_emb, t_cond = torch.randn(m, 4, lat, lat), torch.randn(m, 77, s_dim), cond(m)
        with autocast():
            z = student(noise, s_emb)
            z_in = z.detach().requires_grad_(True)
            x = bridge.forward_model(z_in).float()
        sig = torch.rand(m)
        x_s = teacher.add_noise(x.detach(), torch.randn(x.shape), sig)
        with torch.no_grad(), autocast():
            x0_real = teacher.predict_x0(x_s, sig, t_cond, neg_cond=cond(1), guidance=4.0).float()
            with teacher.fake():
                x0_fake = teacher.predict_x0(x_s, sig, t_cond).float()
        loss, _ = dmd.distribution_matching_loss("dmd", x, x0_real, x0_fake, sig, normalise=True)
        loss.backward()
        z.backward(z_in.grad.float().to(z.dtype))
        if s.regression:  # _add_regression: the DMD gradient is held while the regression one is computed
            held = [p.grad for p in params]
            for p in params:
                p.grad = None
            with autocast():
                pred = student.space.to_model(student(torch.randn(m, 4, lat, lat), torch.randn(m, 77, s_dim)))
            F.mse_loss(pred.float(), torch.randn(m, 4, lat, lat)).backward()
            for p, d in zip(params, held):
                p.grad = d if p.grad is None else p.grad + d
            del held, pred
    with tr.phase(phases, "optimizer_step", resident):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    del noise, s_emb, z, z_in, loss, x_s, x0_real, x0_fake

    # -- a fake-score update with fresh samples (the k > 0 ones; the first reuses the step's samples) --
    with tr.phase(phases, "fake_update", resident):
        with torch.no_grad(), autocast():
            x_f = bridge.forward_model(student(torch.randn(m, 4, lat, lat), torch.randn(m, 77, s_dim))).float()
        sig = torch.rand(m)
        n_f = torch.randn(x_f.shape)
        x_s_f = teacher.add_noise(x_f, n_f, sig)
        with teacher.fake():
            with autocast():
                v = teacher.velocity(x_s_f, sig, cond(m))
            dmd.flow_matching_loss(v, x_f, n_f).backward()
            torch.nn.utils.clip_grad_norm_(fake_params, 1.0)
            opt_fake.step()
            opt_fake.zero_grad(set_to_none=True)
        del v, x_f, n_f, x_s_f
    # x (the step's sample) stays alive through the updates, as in train_step; it is in the measured transients.
    del x
    sizes["t_lat"] = t_lat
    return sizes, phases


def _bridge_phases(s: MemorySettings, m: int, tr: "_Tracker") -> tuple[dict, dict]:
    """Bridge training's phases on fake tensors (keep in step with BridgeTrainer.prepare_data / train_step)."""
    import torch
    import torch.nn.functional as F

    from .bridge_train import attention_kl
    from .teachers import make_teacher

    frozen = _frozen_dtype(s)
    phases: dict = {}
    sizes: dict = {}
    transformer, tvae = _build_teacher(s.teacher, frozen)
    with default_dtype(frozen):
        _, svae = _build_student(s.teacher)
    teacher = make_teacher(world_of(s.teacher).family, transformer.eval().requires_grad_(False))
    tvae.eval().requires_grad_(False)
    svae.eval().requires_grad_(False)
    bridge = _bridge(s, svae)
    if s.gradient_checkpointing:
        bridge.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    sizes.update(_teacher_sizes(transformer))
    sizes.update(teacher_vae=_param_bytes(tvae), student_vae=_param_bytes(svae), bridge=_param_bytes(bridge.projector),
                 student=0, student_trainable=sum(p.numel() for p in bridge.projector.parameters()), fake=0,
                 fake_params=0)
    lat = s.resolution // 8
    t_lat = lat * s.k
    modules = [transformer, tvae, svae, bridge.projector]
    with tr.phase(phases, "latent_cache", lambda: sum(_param_bytes(mod) for mod in modules)), torch.no_grad():
        svae.encode(torch.randn(m, 3, s.resolution, s.resolution, dtype=frozen)).latent_dist.mean.float()
        res = s.resolution * s.k
        tvae.encode(torch.randn(m, 3, res, res, dtype=frozen)).latent_dist.mean.float()
    params = list(bridge.projector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def resident():
        states = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor))
        return sum(_param_bytes(mod) for mod in modules) + states

    with tr.phase(phases, "bridge_step", resident):
        z_s = torch.randn(m, 4, lat, lat)
        target = torch.randn(m, 16, t_lat, t_lat)
        with _autocast(s):
            pred = bridge.forward_model(z_s)
            loss = F.mse_loss(pred.float(), target.float())
            if s.attention:
                sig = torch.rand(m)
                noise = torch.randn(target.shape)
                cond = _cond(s, transformer, m)
                x_t, x_p = teacher.add_noise(target, noise, sig), teacher.add_noise(pred, noise, sig)
                with torch.no_grad(), teacher.capture_attention(None, 64, torch.Generator().manual_seed(0)) as maps:
                    teacher.velocity(x_t, sig, cond)
                    maps_t = {k: v.detach() for k, v in maps.items()}
                with teacher.capture_attention(None, 64, torch.Generator().manual_seed(0)) as maps:
                    teacher.velocity(x_p, sig, cond)
                    maps_p = dict(maps)
                kls = [attention_kl(maps_t[k], maps_p[k]) for k in maps_t]
                loss = loss + 0.1 * torch.stack(kls).mean()
        loss.backward()
    with tr.phase(phases, "optimizer_step", resident):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sizes["t_lat"] = t_lat
    return sizes, phases


# ---------------------------------------------------------------------------------------------- estimate

def _transient(prof: dict, phase: str, micro: int) -> int:
    """A phase's transient at `micro`, piecewise linear through the measured micro-batches (the peak's place can
    move between 1 and 2 samples, so one slope from 1 to 2 under-reads larger batches)."""
    values = prof["transient"].get(phase)
    if not values:
        return 0
    xs = prof.get("micro", MICRO)[:len(values)]
    if len(values) == 1:
        return int(values[0])
    i = 0
    while i < len(xs) - 2 and micro > xs[i + 1]:
        i += 1
    slope = (values[i + 1] - values[i]) / (xs[i + 1] - xs[i])
    return max(0, int(values[i] + slope * (micro - xs[i])))


def _teacher_resident(s: MemorySettings, z: dict) -> tuple[int, str]:
    """Bytes of the teacher's weights on the device under the storage/offload settings, and a note of how."""
    bf16 = z["teacher"]
    if s.device != "cuda":
        return bf16, "teacher fp32 on the CPU"
    per_byte = 1 if s.storage == "fp8" else 2
    scale = per_byte / 2
    if s.teacher_offload:
        # block-level group offload: the non-block weights stay; about two blocks are on the device at a time
        resident = int((bf16 - z["teacher_blocks"]) * scale + 2 * z["teacher_max_block"] * scale)
        note = "teacher offloaded by block (analytic: non-block weights + 2 blocks on the GPU)"
    else:
        resident = int(bf16 * scale)
        note = f"teacher stored {s.storage}"
    if s.storage == "fp8":
        resident += z["teacher_max_layer"]  # the layer computed in bf16 at a time (layerwise casting, analytic)
        note += " (fp8 analytic: 1 byte/param + the largest layer's bf16 copy)"
    return resident, note


def estimate(s: MemorySettings, compute: bool = True) -> Estimate | None:
    """Peak memory per phase for settings `s` (see the module docstring for what is measured and what is modelled).
    compute False: None unless the profile is cached or shipped."""
    check_settings(s)
    prof = profile(s, compute=compute)
    if prof is None:
        return None
    z = prof["sizes"]
    micro = s.micro_batch
    teacher_w, note = _teacher_resident(s, z)
    weights = teacher_w + z["teacher_vae"] + z["student_vae"] + z["bridge"] + z["student"]
    state_bytes = OPTIMIZER_STATE_BYTES[s.optimizer] if s.kind == "distill" else 8
    states = z["student_trainable"] * state_bytes + z["fake_params"] * 8
    warmup_states = z["student_trainable"] * state_bytes if (s.regression and s.kind == "distill") else 0
    fake = z["fake"]
    # Phases that backpropagate through the frozen teacher (fake-score updates; Bridge training's attention loss):
    # autograd keeps every weight a layer used for its backward. Under fp8 layerwise casting those are the bf16
    # copies, and under block offload the onloaded blocks, so both savings vanish unless the teacher is checkpointed
    # (then one block is recomputed at a time). Measured on CPU with diffusers' hooks on a tiny SD3.5: fp8 + LoRA
    # forward with grad held +55 % of the bf16 weights in copies without checkpointing, about half a block with it.
    grad_through_teacher = 0
    if s.device == "cuda" and (s.storage == "fp8" or s.teacher_offload):
        # bf16 bytes: the copies (fp8) or the onloaded blocks (offload) kept for the backward
        grad_through_teacher = z["teacher_max_block"] if s.gradient_checkpointing else z["teacher_blocks"]
    alloc: dict = {}
    alloc["loading"] = weights
    alloc["encoding"] = z["text_encoders"] + _transient(prof, "encoding", micro)
    if s.kind == "distill":
        if s.regression:
            alloc["pairs"] = weights + _transient(prof, "pairs", micro)
            alloc["warmup"] = weights + fake + warmup_states + _transient(prof, "warmup", micro)
        trained = weights + fake + states + warmup_states
        for ph in ("student_step", "fake_update", "optimizer_step"):
            alloc[ph] = trained + _transient(prof, ph, micro)
        alloc["fake_update"] += grad_through_teacher
        if s.optimizer == "adamw8bit":  # its step dequantises one parameter at a time: as the fused one
            alloc["optimizer_step"] = max(alloc["optimizer_step"], trained)
        alloc["saving"] = trained  # saved from the CPU side: no device copy of the UNet (issue 23's save)
    else:
        trained = weights + states
        alloc["latent_cache"] = weights + _transient(prof, "latent_cache", micro)
        alloc["bridge_step"] = trained + _transient(prof, "bridge_step", micro) + \
            (grad_through_teacher if s.attention else 0)
        alloc["optimizer_step"] = trained + _transient(prof, "optimizer_step", micro)
        alloc["saving"] = trained
    notes = [note]
    if s.device == "cuda":
        dev = {k: (ALLOCATOR_SLACK * v) / GIB + CUDA_CONTEXT_GIB for k, v in alloc.items()}
        notes.append(f"device figures = {ALLOCATOR_SLACK} x allocated + {CUDA_CONTEXT_GIB} GiB CUDA context")
    else:
        dev = {k: v / GIB + HOST_OVERHEAD_GIB for k, v in alloc.items()}
        notes.append(f"host figures = tensors + {HOST_OVERHEAD_GIB} GiB for the process")
    # Host RAM while loading: the largest file materialised once (text encoders are loaded and freed first), the
    # offloaded teacher lives in (pinned) host RAM for the whole run.
    t_host = z["teacher"] * (0.5 if s.storage == "fp8" else 1.0)
    host = max(z["text_encoders"], t_host + z["student"]) / GIB + HOST_OVERHEAD_GIB
    return Estimate(s, dev, {k: v / GIB for k, v in alloc.items()}, host, notes)


def check_settings(s: MemorySettings) -> None:
    from .errors import UserError

    world_of(s.teacher)
    problems = []
    if s.kind not in ("distill", "bridge"):
        problems.append(f"kind must be distill or bridge, got {s.kind!r}")
    if s.tap not in ("image", "features"):
        problems.append(f"tap must be image or features, got {s.tap!r}")
    if s.teacher_storage not in STORAGES:
        problems.append(f"teacher_storage must be one of {', '.join(STORAGES)}, got {s.teacher_storage!r}")
    if s.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {s.optimizer!r}")
    if s.device not in ("cuda", "cpu"):
        problems.append(f"device must be cuda or cpu, got {s.device!r}")
    if not isinstance(s.gradient_accumulation, int) or s.gradient_accumulation < 1 or \
            s.batch_size % s.gradient_accumulation:
        problems.append(f"gradient_accumulation must be a positive divisor of the batch size {s.batch_size}, got "
                        f"{s.gradient_accumulation!r}")
    if problems:
        raise UserError("Memory estimate: " + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------- plans

@dataclass
class Plan:
    settings: MemorySettings
    estimate: Estimate
    cost: float  # relative step cost against the requested settings
    changes: list  # what changed from the request, in words
    fits: bool
    hint: str = ""  # e.g. train a features-tap Bridge

    def describe(self) -> str:
        what = "; ".join(self.changes) if self.changes else "the requested settings"
        return (f"{what}: peak {self.estimate.peak_gib:.1f} GiB ({PHASE_TITLES[self.estimate.peak_phase]}), "
                f"step cost x{self.cost:.2f}")


ALL_FEATURES = frozenset({"gradient_checkpointing", "tap", "teacher_storage", "gradient_accumulation",
                          "student_lora", "optimizer", "teacher_offload"})


def plan_ladder(s: MemorySettings, features=ALL_FEATURES) -> list[tuple[MemorySettings, str]]:
    """The settings to try, cheapest in quality and speed first, each on top of the previous: checkpointing, the
    features tap (Bridge training only: distillation reads the tap from its Bridge), fp8 teacher storage,
    accumulation (halving the micro-batch), a student LoRA, 8-bit AdamW, teacher offload."""
    steps = []
    cur = s
    if "gradient_checkpointing" in features and not cur.gradient_checkpointing:
        cur = replace(cur, gradient_checkpointing=True)
        steps.append((cur, "gradient checkpointing on"))
    if s.kind == "bridge" and "tap" in features and cur.tap == "image":
        cur = replace(cur, tap="features")
        steps.append((cur, "features tap"))
    if s.device == "cuda" and "teacher_storage" in features and cur.storage != "fp8":
        cur = replace(cur, teacher_storage="fp8")
        steps.append((cur, "teacher stored in fp8"))
    if "gradient_accumulation" in features:
        ga = cur.gradient_accumulation
        while cur.batch_size % (ga * 2) == 0:
            ga *= 2
            cur = replace(cur, gradient_accumulation=ga)
            steps.append((cur, f"gradient accumulation {ga} (micro-batch {cur.micro_batch})"))
    if s.kind == "distill" and "student_lora" in features and not cur.student_lora_rank:
        cur = replace(cur, student_lora_rank=64)
        steps.append((cur, "student LoRA rank 64"))
    if s.kind == "distill" and "optimizer" in features and cur.optimizer == "adamw" and not cur.student_lora_rank \
            and s.device == "cuda":
        cur = replace(cur, optimizer="adamw8bit")
        steps.append((cur, "8-bit AdamW"))
    if s.device == "cuda" and "teacher_offload" in features and not cur.teacher_offload:
        cur = replace(cur, teacher_offload=True)
        steps.append((cur, "teacher offloaded to the CPU by block"))
    return steps


def choose_plan(s: MemorySettings, budget_gib: float, features=ALL_FEATURES,
                compute: bool = True) -> tuple[Plan | None, list[Plan]]:
    """(the plan to run, every plan tried in order). The plan to run is the first that fits `budget_gib`, or the
    lowest peak when none does (its `fits` is then False). compute False: settings whose profile is not cached or
    shipped are left out ((None, []) when none is)."""
    plans = []
    changes: list = []
    for cand, what in [(s, None)] + plan_ladder(s, features):
        if what:  # one accumulation entry: the latest
            changes = [c for c in changes if not (what.startswith("gradient accumulation") and
                                                  c.startswith("gradient accumulation"))] + [what]
        e = estimate(cand, compute=compute)
        if e is not None:
            plans.append(Plan(cand, e, step_cost(cand, s), list(changes), e.peak_gib <= budget_gib))
    if not plans:
        return None, []
    chosen = next((p for p in plans if p.fits), None) or min(plans, key=lambda p: p.estimate.peak_gib)
    alt = None
    if s.kind == "distill" and s.tap == "image" and chosen is not plans[0]:
        alt = estimate(replace(chosen.settings, tap="features"), compute=compute)
    if alt is not None:
        chosen.hint = (f"a features-tap Bridge (`bridge --tap features`) would need {alt.peak_gib:.1f} GiB with "
                       "these settings")
    return chosen, plans


# ---------------------------------------------------------------------------------------------- preflight

def free_memory_gib(device: str) -> tuple[float, str]:
    """(free GiB, where it was read): CUDA's free memory on the current device, or the host's available RAM."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / GIB, "free on the GPU"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB, "available host RAM"
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / GIB, "available host RAM"
    except ImportError:
        return float("inf"), "host RAM (unknown)"


def parse_memory(value) -> str | float:
    """--memory auto | check | off | a number of GiB."""
    from .errors import UserError

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        budget = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("auto", "check", "off"):
            return text
        try:
            budget = float(text.removesuffix("gib").removesuffix("gb"))
        except ValueError:
            budget = float("nan")
    if not math.isfinite(budget) or budget <= 0:
        raise UserError(f"--memory must be auto, check, off or a positive number of GiB (e.g. 22), got {value!r}.")
    return budget


def preflight(s: MemorySettings, memory="auto", features=ALL_FEATURES, log=print, compute: bool = True) -> Plan | None:
    """Before any model loads: estimate the peak of `s` and compare it with the budget (a GiB figure, or the free
    device memory with "auto"/"check"). Fits: None after one line of log. Does not fit: with "auto" or a figure, the
    plan that fits (printed; the caller applies it); with "check", or when no plan fits, a one-line UserError naming
    the estimate, the memory and the settings that would fit. "off": nothing is checked. compute False: only
    cached or shipped profiles are used (no estimate: one line, and the run goes on)."""
    from .errors import UserError

    mode = parse_memory(memory)
    if mode == "off":
        return None
    if isinstance(mode, float):
        budget, where = mode, "given by --memory"
    else:
        budget, where = free_memory_gib(s.device)
    est = estimate(s, compute=compute)
    if est is None:
        log(f"Memory: no estimate cached for these settings ({s.teacher}, {s.device}); give --memory check or a GiB "
            "figure to compute one.")
        return None
    unit = "GiB" if s.device == "cuda" else "GiB of host RAM"
    if est.peak_gib <= budget:
        log(f"Memory: estimated peak {est.peak_gib:.1f} {unit} ({PHASE_TITLES[est.peak_phase]}) of {budget:.1f} "
            f"{where}: fits.")
        return None
    plan, _ = choose_plan(s, budget, features)
    if mode == "check" or not plan.fits:
        fix = (f"settings that fit: {'; '.join(plan.changes)} ({plan.estimate.peak_gib:.1f} GiB, step cost "
               f"x{plan.cost:.2f}; --memory auto applies them)" if plan.fits else
               f"nothing this run can change fits (best: {'; '.join(plan.changes) or 'as requested'}, "
               f"{plan.estimate.peak_gib:.1f} GiB); use a card with more memory, a smaller --batch-size or "
               "--resolution")
        hint = f"; {plan.hint}" if plan.hint else ""
        raise UserError(f"Not enough memory: estimated peak {est.peak_gib:.1f} {unit} ({PHASE_TITLES[est.peak_phase]}, "
                        f"{s.label()}) but {budget:.1f} GiB {where}; {fix}{hint}. --memory off skips this check.")
    log(f"Memory: the requested settings need about {est.peak_gib:.1f} {unit}, {budget:.1f} GiB {where}; plan: "
        f"{plan.describe()}." + (f" Note: {plan.hint}." if plan.hint else ""))
    return plan


# ---------------------------------------------------------------------------------------------- CLI glue

def _bridge_tap(path: str | None) -> str:
    """The tap a Bridge file was trained with (read from its header; image when there is no file yet)."""
    if not path or not os.path.isfile(path):
        return "image"
    from ._bridge import checkpoint

    return checkpoint.read_bridge_metadata(path).get("tap", "image")


def _available(cfg, args) -> set:
    """The memory features this code base has (a plan never picks one it cannot apply)."""
    have = {"gradient_checkpointing", "student_lora"}
    for name, feature in (("gradient_accumulation", "gradient_accumulation"), ("optimizer", "optimizer"),
                          ("teacher_storage", "teacher_storage"), ("teacher_offload", "teacher_offload")):
        if hasattr(cfg, name) or hasattr(args, name):
            have.add(feature)
    return have


def _device(cfg) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not getattr(cfg, "cpu", False) else "cpu"


def settings_from_distill(args, cfg) -> MemorySettings:
    """The memory settings of a distillation command (its parsed args and validated DistillConfig)."""
    device = _device(cfg)
    ckpt = cfg.gradient_checkpointing
    if ckpt is None:  # auto: on when training on CUDA
        ckpt = device == "cuda"
    demo = getattr(args, "demo", False)
    from .models.assemble import DEMO_BRIDGE

    bridge = getattr(args, "bridge", None) or (DEMO_BRIDGE if demo else None)
    return MemorySettings(
        teacher="tiny" if demo else args.teacher_family, kind="distill", student_lora_rank=cfg.student_lora_rank,
        batch_size=cfg.batch_size, gradient_accumulation=int(getattr(cfg, "gradient_accumulation",
                                                                      getattr(args, "gradient_accumulation", 1)) or 1),
        gradient_checkpointing=bool(ckpt), tap=_bridge_tap(bridge),
        teacher_storage=getattr(args, "teacher_storage", "auto") or "auto",
        teacher_offload=bool(getattr(args, "teacher_offload", False)),
        optimizer=getattr(cfg, "optimizer", getattr(args, "optimizer", "adamw")) or "adamw",
        resolution=cfg.resolution, fake_rank=cfg.fake_rank,
        regression=bool(cfg.regression_pairs) or bool(getattr(args, "regression_n", 0)), device=device)


def settings_from_bridge(args, cfg) -> MemorySettings:
    device = _device(cfg)
    ckpt = cfg.gradient_checkpointing
    if ckpt is None:
        ckpt = device == "cuda"
    demo = getattr(args, "demo", False)
    family = args.teacher_family or "sd35_medium"
    teacher = ("tiny_flux" if family.startswith("flux") else "tiny") if demo else family
    return MemorySettings(
        teacher=teacher, kind="bridge", batch_size=cfg.batch_size,
        gradient_accumulation=int(getattr(cfg, "gradient_accumulation", 1) or 1), gradient_checkpointing=bool(ckpt),
        tap=cfg.tap, teacher_storage=getattr(args, "teacher_storage", "auto") or "auto",
        teacher_offload=bool(getattr(args, "teacher_offload", False)), resolution=cfg.student_res, k=cfg.k,
        attention=cfg.attn_weight > 0, device=device)


def apply_plan(plan: Plan | None, cfg, args) -> None:
    """Write a plan's settings onto the config (fields it has) and the args (the loaders' options): the names are
    gradient_checkpointing, gradient_accumulation, student_lora_rank, optimizer, tap, teacher_storage,
    teacher_offload."""
    if plan is None:
        return
    p = plan.settings
    values = {"gradient_checkpointing": p.gradient_checkpointing, "gradient_accumulation": p.gradient_accumulation,
              "optimizer": p.optimizer, "teacher_storage": p.teacher_storage, "teacher_offload": p.teacher_offload}
    if p.kind == "distill":
        values["student_lora_rank"] = p.student_lora_rank
    else:
        values["tap"] = p.tap
    for name, value in values.items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
        setattr(args, name, value)


def preflight_command(args, cfg, kind: str) -> Plan | None:
    """The preflight of `python -m training.run distill|bridge`: settings from the args and config, the check against
    --memory, the plan applied to both. One call in each command, right before the models load."""
    memory = getattr(args, "memory", "auto")
    if parse_memory(memory) == "off":
        return None
    s = settings_from_distill(args, cfg) if kind == "distill" else settings_from_bridge(args, cfg)
    # The tiny demo worlds need a few MiB, and a CPU run has host RAM to spare or is a test on small files: with auto
    # they use a cached or shipped estimate only (a fresh one takes minutes); check or a GiB figure computes one.
    compute = not ((s.teacher in TEST_WORLDS or s.device == "cpu") and parse_memory(memory) == "auto")
    plan = preflight(s, memory, features=_available(cfg, args) | ({"tap"} if kind == "bridge" else set()),
                     compute=compute)
    apply_plan(plan, cfg, args)
    if plan is not None:
        cfg.validate()
    return plan


# ---------------------------------------------------------------------------------------------- validation

VALIDATE_PROMPTS = ["a red circle", "a blue square on white", "a green triangle", "a yellow star on black"]


def measure_distill_step(s: MemorySettings, log=None) -> dict:
    """Run the real Distiller on real tensors (CPU, fp32) in a test world with settings `s` and measure, with the same
    MemTracker, the peak of a steady-state step (the second: the optimizer states exist) -> {"peak_gib", "seconds"}.
    Everything the process holds in tensors counts (weights, states, caches), as on a device."""
    import gc
    import tempfile
    import time

    import torch

    from .distill import DistillConfig, DistillModels, Distiller
    from .models import tiny
    from .models.text import encode_for_family, encode_sd15
    from .student import OneStepStudent
    from .teachers import make_teacher

    if s.device != "cpu" or s.teacher not in TEST_WORLDS or s.teacher == "tiny_flux":
        raise ValueError("measure_distill_step runs on the CPU in the tiny or mid world.")
    with tempfile.TemporaryDirectory() as tmp, _Tracker() as tr:
        torch.manual_seed(0)
        transformer, tvae = _build_teacher(s.teacher, torch.float32)
        unet, svae = _build_student(s.teacher)
        teacher = make_teacher("sd35_medium", transformer.eval().requires_grad_(False))
        bridge = _bridge(s, svae.eval().requires_grad_(False))
        text = {"clip_l": tiny.tiny_clip_text("L"), "clip_g": tiny.tiny_clip_text("G"), "t5": tiny.tiny_t5_text()}
        toks = {"clip_l": tiny.tiny_clip_tokenizer(), "clip_g": tiny.tiny_clip_tokenizer(),
                "t5": tiny.tiny_t5_tokenizer()}
        clip, tok = tiny.tiny_clip_text("L").eval(), tiny.tiny_clip_tokenizer()

        def free():
            text.clear()

        models = DistillModels(
            student=OneStepStudent(unet), bridge=bridge, teacher=teacher, teacher_vae=tvae.eval().requires_grad_(False),
            encode_teacher=lambda p: encode_for_family("sd35_medium", p, text, toks, max_t5_len=32),
            encode_student=lambda p: encode_sd15(p, clip, tok), free_text_encoders=free,
            description={"memory": "validate"})
        pairs = None
        if s.regression:
            from .pairs import save_pairs

            pairs = os.path.join(tmp, "pairs.safetensors")
            lat = s.resolution // 8
            save_pairs(pairs, torch.randn(8, 4, lat, lat), torch.randn(8, 4, lat, lat), VALIDATE_PROMPTS * 2)
        cfg = DistillConfig(out_dir=tmp, prompts=VALIDATE_PROMPTS, steps=3, batch_size=s.batch_size,
                            resolution=s.resolution, student_lora_rank=s.student_lora_rank, fake_rank=s.fake_rank,
                            fake_updates=2, gradient_checkpointing=s.gradient_checkpointing, cpu=True,
                            mixed_precision="no", log_every=100, sample_every=100, ckpt_every=100,
                            regression_pairs=pairs, regression_warmup_steps=1 if s.regression else 0)
        d = Distiller(cfg, models)
        start = d.prepare()
        step = start
        for _ in range(1 + int(s.regression)):  # the warm-up step, then the first step: every state exists
            d.train_step(step)
            step += 1
        del clip
        gc.collect()
        tr.reset_peak()
        t0 = time.perf_counter()
        d.train_step(step)
        seconds = time.perf_counter() - t0
        peak = tr.peak()
    return {"peak_gib": peak / GIB, "seconds": seconds}


def validate(s: MemorySettings | None = None, log=print) -> dict:
    """Estimated against measured peak of a real CPU distillation step in the mid world (the estimate's tensor bytes,
    without the process overhead, against MemTracker's count on real tensors)."""
    s = s or MemorySettings(teacher="mid", batch_size=4, resolution=128, device="cpu")
    est = estimate(s)
    est_gib = max(est.allocated[p] for p in ("student_step", "fake_update", "optimizer_step"))
    real = measure_distill_step(s)
    out = {"settings": s.label(), "estimated_gib": est_gib, "measured_gib": real["peak_gib"],
           "ratio": est_gib / real["peak_gib"], "step_seconds": real["seconds"]}
    log(f"validate ({s.teacher} world, {s.label()}): estimated {est_gib * 1024:.1f} MiB, measured "
        f"{real['peak_gib'] * 1024:.1f} MiB (MemTracker on the real CPU step), ratio {out['ratio']:.3f}")
    return out
