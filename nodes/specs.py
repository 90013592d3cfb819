"""The pack's node schemas as plain data.

The node modules turn these into ComfyUI V3 `io.Schema` objects (nodes/_schema.py); tests read them
without ComfyUI (e.g. to check the reference workflows' widget values). No imports beyond the standard
library, so this file loads anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "CSD_"
CATEGORY = "cross-space"

# Custom socket types (prefixed so they cannot clash with other packs' types).
BRIDGE = "CSD_BRIDGE"
SCORES = "CSD_SCORES"

# Inputs of these types are widgets (a value in the node), all others are sockets.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
RANK_BY = ("combined", "denoise_error", "text_alignment")  # = training.scoring.RANK_BY (tested)
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
NONE = "(none)"  # the "not given" choice of optional model-file combos
DIFFUSERS = "diffusers"  # ComfyUI's folder of diffusers-format model folders; a combo from it lists the folders
DIFFUSERS_MARK = " (diffusers folder)"  # how those folders are listed, beside the single files of other folders
TEACHER_FAMILIES = ("sd35_medium", "sd35_large", "flux_dev", "flux_schnell")  # = training/models/families.py's (tested)
BRIDGE_TAPS = ("image", "features")  # = bridge.taps.TAPS (tested)


@dataclass(frozen=True)
class In:
    id: str
    type: str
    tooltip: str
    default: object = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()  # COMBO: fixed choices
    folder: str | tuple[str, ...] | None = None  # COMBO: the files of this ComfyUI model folder (or folders, merged)
    none_choice: bool = False  # COMBO from a folder: NONE comes first, meaning "not given"
    multiline: bool = False
    control_after_generate: bool = False
    display_name: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def widget_values(self) -> int:
        """How many entries this input takes in a UI workflow's widgets_values (a seed also stores its
        'control after generate' mode)."""
        if not self.is_widget:
            return 0
        return 2 if self.control_after_generate else 1


@dataclass(frozen=True)
class Out:
    id: str
    type: str
    tooltip: str
    display_name: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]


LOAD_BRIDGE = NodeSpec(
    node_id="CSD_LoadBridge",
    display_name="Load Bridge",
    category=f"{CATEGORY}/bridge",
    description="Loads a Bridge (.safetensors from models/bridges): the projector that maps a student's decoded "
                "image (SD1.5) into a teacher's latent space (SD3.5 / Flux). Pickle files are never loaded.",
    inputs=(
        In("bridge_name", "COMBO", folder="bridges",
           tooltip="Bridge file in models/bridges (or a 'bridges' path from extra_model_paths.yaml)."),
    ),
    outputs=(
        Out("bridge", BRIDGE, display_name="BRIDGE",
            tooltip="The Bridge: which student and teacher spaces it connects and its projector."),
    ),
)

BRIDGE_PROJECT = NodeSpec(
    node_id="CSD_BridgeProject",
    display_name="Bridge Project",
    category=f"{CATEGORY}/bridge",
    description="Maps a student latent (e.g. SD1.5, 4 channels) into the teacher's latent space (16 channels, k "
                "times larger): decodes it with the student VAE (fully, or for a 'features' Bridge only up to the "
                "teacher's latent grid), then runs the Bridge projector. The result is a raw "
                "teacher LATENT for the teacher's VAE Decode (preview) or as the start of a low-denoise teacher pass.",
    inputs=(
        In("bridge", BRIDGE, tooltip="The Bridge from Load Bridge."),
        In("vae", "VAE", tooltip="The student's VAE (the one the student latent belongs to, e.g. the SD1.5 VAE)."),
        In("latent", "LATENT", tooltip="Student latent batch to map, e.g. from the One-Step Student Sampler."),
        In("chunk_size", "INT", default=4, min=1, max=256, step=1,
           tooltip="Latents decoded and projected at a time. Lower it to save memory; halved automatically when "
                   "memory runs out."),
    ),
    outputs=(
        Out("teacher_latent", "LATENT", display_name="LATENT",
            tooltip="Raw teacher latent (what the teacher VAE decodes), 16 channels, k times the student's size."),
    ),
)

TEACHER_SCORE = NodeSpec(
    node_id="CSD_TeacherScore",
    display_name="Teacher Score",
    category=f"{CATEGORY}/scoring",
    description="Scores each latent of a batch with a teacher model (SD3.5, Flux, ...): the teacher's denoising "
                "error averaged over fixed noise levels and seeds (lower = more plausible) and the text alignment "
                "(relative improvement of the positive over the negative prediction; higher = better aligned).",
    inputs=(
        In("model", "MODEL", tooltip="The teacher model, loaded by ComfyUI's loaders (SD3.5, Flux, ...)."),
        In("positive", "CONDITIONING", tooltip="The prompt, encoded with the teacher's text encoders."),
        In("negative", "CONDITIONING",
           tooltip="What the prompt is compared against: an empty prompt or a negative prompt."),
        In("latent", "LATENT", tooltip="Teacher-space latents to score, e.g. from Bridge Project."),
        In("noise_levels", "STRING", default="0.3, 0.5, 0.7",
           tooltip="Comma-separated noise levels in (0, 1) as fractions of the teacher's schedule (0 clean, 1 pure "
                   "noise)."),
        In("num_seeds", "INT", default=2, min=1, max=64, step=1,
           tooltip="Noise draws per level; more = steadier scores, proportionally slower."),
        In("eval_seed", "INT", default=0, min=0, max=0xFFFFFFFF, step=1,
           tooltip="First seed of the fixed noise draws (the same noise is used for every latent of the batch)."),
    ),
    outputs=(
        Out("scores", SCORES, display_name="SCORES",
            tooltip="Per-sample scores, for Select Best."),
        Out("text", "STRING", display_name="STRING",
            tooltip="The scores as a table, for display (e.g. with Preview Any)."),
    ),
)

SELECT_BEST = NodeSpec(
    node_id="CSD_SelectBest",
    display_name="Select Best",
    category=f"{CATEGORY}/scoring",
    description="Keeps the best latents of a batch according to Teacher Score. The latent can be from any space: "
                "e.g. score the bridged teacher latents, then keep the matching SD1.5 latents.",
    inputs=(
        In("latent", "LATENT",
           tooltip="The batch to choose from; same batch size and order as the scored latents."),
        In("scores", SCORES, tooltip="Scores from Teacher Score."),
        In("count", "INT", default=2, min=1, max=4096, step=1,
           tooltip="How many latents to keep (all of them, sorted, if the batch is smaller)."),
        In("rank_by", "COMBO", options=RANK_BY, default="combined",
           tooltip="combined: average rank of both scores; denoise_error: most plausible to the teacher; "
                   "text_alignment: best explained by the prompt."),
    ),
    outputs=(
        Out("latent_out", "LATENT", display_name="LATENT", tooltip="The best latents, best first."),
        Out("text", "STRING", display_name="STRING", tooltip="Which samples were kept, with their scores."),
    ),
)

ONE_STEP_SAMPLER = NodeSpec(
    node_id="CSD_OneStepSampler",
    display_name="One-Step Student Sampler",
    category=f"{CATEGORY}/sampling",
    description="Samples a one-step student (an SD1.5 checkpoint distilled with this pack; LoRAs applied upstream "
                "work): one model evaluation at t = 999 from pure noise, no CFG. The negative prompt is not used.",
    inputs=(
        In("model", "MODEL", tooltip="The student model (any SD1.5 checkpoint loaded by ComfyUI)."),
        In("positive", "CONDITIONING", tooltip="The prompt, encoded with the student's CLIP."),
        In("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, step=1, control_after_generate=True,
           tooltip="Seed of the starting noise (the same seed gives the same noise as KSampler)."),
        In("width", "INT", default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="Image width in pixels."),
        In("height", "INT", default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="Image height in pixels."),
        In("batch_size", "INT", default=1, min=1, max=4096, step=1, tooltip="Number of images."),
    ),
    outputs=(
        Out("latent", "LATENT", display_name="LATENT", tooltip="Student latents (raw VAE space), ready for VAE Decode."),
    ),
)


def _teacher_inputs() -> tuple[In, ...]:
    """The teacher's files, shared by both training nodes (loaded by the library, not by ComfyUI's loaders)."""
    return (
        In("teacher_family", "COMBO", options=TEACHER_FAMILIES, default="sd35_medium",
           tooltip="Which teacher the files below are: SD3.5 Medium/Large (CLIP-L + CLIP-G + T5) or Flux.1 dev/schnell "
                   "(CLIP-L + T5)."),
        In("teacher_model", "COMBO", folder=("diffusion_models", "checkpoints", DIFFUSERS),
           tooltip="The teacher's diffusion model: a transformer file from models/diffusion_models (e.g. "
                   "flux1-dev.safetensors), a checkpoint from models/checkpoints (e.g. sd3.5_medium.safetensors), or "
                   "a diffusers folder from models/diffusers, listed as '<name> (diffusers folder)' (its VAE and text "
                   "encoders are used where the inputs below are (none))."),
        In("teacher_vae", "COMBO", folder="vae", none_choice=True,
           tooltip="The teacher's VAE from models/vae (e.g. ae.safetensors for Flux). (none): the VAE inside the "
                   "teacher checkpoint or diffusers folder."),
        In("clip_l", "COMBO", folder="text_encoders", none_choice=True,
           tooltip="CLIP-L text encoder from models/text_encoders (clip_l.safetensors); every teacher family needs it "
                   "((none): the one in a diffusers teacher folder)."),
        In("clip_g", "COMBO", folder="text_encoders", none_choice=True,
           tooltip="CLIP-G text encoder (clip_g.safetensors); SD3.5 only: (none) for Flux or a diffusers teacher "
                   "folder."),
        In("t5", "COMBO", folder="text_encoders", none_choice=True,
           tooltip="T5-XXL text encoder (t5xxl_fp16.safetensors or another precision of it); every teacher family "
                   "needs it ((none): the one in a diffusers teacher folder)."),
    )


GRADIENT_CHECKPOINTING = ("auto", "on", "off")
TEACHER_STORAGE = ("auto", "bf16", "fp8")  # = training/models/loading.py's storage choices (tested)
OPTIMIZERS = ("adamw", "adamw8bit")  # = training.loop.OPTIMIZERS (tested)


def _memory_inputs() -> tuple[In, ...]:
    """How a training node fits the GPU: the preflight's budget and the memory features it may choose from."""
    return (
        In("memory", "STRING", default="auto",
           tooltip="Memory preflight, before any model loads: auto (estimate the peak for these settings and, if it "
                   "does not fit the GPU's free memory, choose settings that do: gradient checkpointing, fp8 "
                   "teacher, smaller micro-batches, ...; the plan is printed in the console), a number of GiB (plan "
                   "for that budget), check (stop with the settings that would fit instead of changing any), or off "
                   "(no check)."),
        In("gradient_checkpointing", "COMBO", default="auto", options=GRADIENT_CHECKPOINTING,
           tooltip="Recompute activations in backward: much less GPU memory for about a third more compute. auto: on "
                   "with a GPU, off on the CPU."),
        In("gradient_accumulation", "INT", default=1, min=1, max=64, step=1,
           tooltip="Run each step's batch as this many smaller micro-batches (the loss still sees the whole batch): "
                   "less memory, a little slower. Must divide batch_size."),
        In("teacher_storage", "COMBO", default="auto", options=TEACHER_STORAGE,
           tooltip="How the frozen teacher is kept: fp8 (float8, computed in bf16: half the memory of bf16), bf16, "
                   "or auto (fp8 exactly when the file is fp8, e.g. flux1-dev-fp8, which is then never upcast)."),
        In("teacher_offload", "BOOLEAN", default=False,
           tooltip="Last resort for small GPUs: the teacher stays in system RAM and each layer goes to the GPU for its "
                   "forward. Much slower; use with gradient checkpointing."),
    )


TRAIN_BRIDGE = NodeSpec(
    node_id="CSD_TrainBridge",
    display_name="Train Bridge",
    category=f"{CATEGORY}/training",
    description="Trains a Bridge from a folder of images (latent reconstruction + the teacher's attention fidelity), "
                "with the same trainer as `python -m training.run bridge`. Writes models/bridges/<output_name>"
                ".safetensors for Load Bridge. The run folder is output/csd_runs/bridge_<output_name>: cancelling "
                "saves a resumable state there, and running again with resume on continues from it. Long-running: "
                "watch the progress bar and its validation previews.",
    inputs=(
        In("student_checkpoint", "COMBO", folder=("checkpoints", DIFFUSERS), none_choice=True,
           tooltip="The student's SD1.5 checkpoint (a .safetensors file in models/checkpoints, or a diffusers folder in "
                   "models/diffusers, listed as '<name> (diffusers folder)'): only its VAE is used. (none) when a student_vae file is given."),
        In("student_vae", "COMBO", folder="vae", none_choice=True,
           tooltip="An SD1.5 VAE file from models/vae; overrides the checkpoint's VAE. The Bridge is tied to this "
                   "decoder."),
        *_teacher_inputs(),
        In("images", "STRING", default="bridge_images",
           tooltip="Folder of training images (jpg/png/webp, searched recursively; a caption .txt beside an image is "
                   "used as its prompt). A relative path is inside ComfyUI's input folder."),
        In("output_name", "STRING", default="sd15_to_sd35",
           tooltip="Name of the Bridge file written to models/bridges (.safetensors is added) and of the run folder."),
        In("steps", "INT", default=2000, min=1, max=1_000_000, step=1, tooltip="Optimizer steps in total."),
        In("batch_size", "INT", default=4, min=1, max=256, step=1, tooltip="Images per step."),
        In("lr", "FLOAT", default=2e-4, min=1e-7, max=1.0, step=1e-5,
           tooltip="Learning rate of the projector (AdamW, warmup then cosine decay)."),
        In("attn_weight", "FLOAT", default=0.1, min=0.0, max=100.0, step=0.01,
           tooltip="Weight of the attention-fidelity loss (the teacher's attention on bridged vs real latents); 0 "
                   "trains on latent reconstruction alone."),
        In("student_res", "INT", default=512, min=64, max=4096, step=8,
           tooltip="Student image size in pixels (512 for SD1.5); the teacher sees the same images at twice this "
                   "size."),
        In("tap", "COMBO", default="image", options=BRIDGE_TAPS,
           tooltip="Where the Bridge reads the frozen student decoder: image (the full decode) or features (the "
                   "decoder run only up to the teacher's latent grid, several times cheaper in training and in Bridge "
                   "Project). Stored in the Bridge file."),
        # Not named "seed": the web UI gives an INT called seed a "control after generate" widget that would change
        # it after every run, and a resumed run must keep its seed.
        In("train_seed", "INT", default=0, min=0, max=0xFFFFFFFF, step=1,
           tooltip="Seed of the projector init, data order and noise; keep it when resuming."),
        In("resume", "BOOLEAN", default=True,
           tooltip="Continue the run in output/csd_runs/bridge_<output_name> if it has a saved state (e.g. after a "
                   "cancel or with more steps); off starts over."),
        *_memory_inputs(),
    ),
    outputs=(
        Out("bridge_name", "STRING", display_name="bridge_name",
            tooltip="File name of the trained Bridge in models/bridges (what Load Bridge lists after a refresh)."),
        Out("preview", "IMAGE", display_name="IMAGE",
            tooltip="The last validation grid: rows target | exact round trip | Bridge, decoded by the teacher VAE."),
    ),
)

DISTILL_STUDENT = NodeSpec(
    node_id="CSD_DistillStudent",
    display_name="Distill Student",
    category=f"{CATEGORY}/training",
    description="Distills a one-step SD1.5 student from an SD3.5 / Flux teacher through a trained Bridge "
                "(distribution matching in the teacher's latent space), with the same trainer as `python -m "
                "training.run distill`. Writes models/checkpoints/<output_name>.safetensors, a standard SD1.5 "
                "checkpoint for Load Checkpoint + One-Step Student Sampler; with student_lora_rank > 0 also "
                "models/loras/<output_name>.safetensors, the student as a LoRA for Load LoRA on SD1.5 checkpoints. "
                "The recipe by default: teacher-corrected regression pairs from your prompts, a regression warm-up, "
                "then DMD (regression_pairs 0: plain DMD). Before any model loads, a memory preflight checks the "
                "estimated peak against the GPU's free memory and, with memory auto, picks settings that fit. "
                "The run folder is output/csd_runs/distill_<output_name> (pairs, state): cancelling saves a "
                "resumable state there.",
    inputs=(
        In("student_checkpoint", "COMBO", folder=("checkpoints", DIFFUSERS),
           tooltip="The SD1.5 checkpoint the student starts from (a .safetensors file in models/checkpoints, or a "
                   "diffusers folder in models/diffusers, listed as '<name> (diffusers folder)'): its UNet is trained; its VAE and CLIP go into the exported checkpoint."),
        In("bridge_name", "COMBO", folder="bridges",
           tooltip="A Bridge from models/bridges trained for this student VAE and this teacher (see Train Bridge)."),
        *_teacher_inputs(),
        In("prompts", "STRING", multiline=True,
           default="a photo of a cat sitting on a windowsill\na watercolor painting of a mountain lake at dawn\n"
                   "a red sports car on a wet street at night\na bowl of fruit on a wooden table, soft light",
           tooltip="Training prompts, one per line ('#' lines are comments). Ignored when prompts_file is given."),
        In("prompts_file", "STRING", default="",
           tooltip="Optional text file of prompts (one per line); a relative path is inside ComfyUI's input folder. "
                   "Empty: use the prompts above."),
        In("steps", "INT", default=2000, min=0, max=1_000_000, step=1,
           tooltip="DMD steps after the regression warm-up; 0: the warm-up alone (regression only; needs "
                   "regression_pairs and regression_warmup_steps above 0)."),
        In("batch_size", "INT", default=4, min=1, max=256, step=1, tooltip="Student samples per step."),
        In("resolution", "INT", default=512, min=64, max=4096, step=8,
           tooltip="Student image size in pixels (512 for SD1.5); the teacher sees the bridged latents at twice this."),
        In("student_lr", "FLOAT", default=1e-5, min=1e-9, max=1.0, step=1e-6,
           tooltip="Learning rate of the student UNet (of its LoRA when student_lora_rank > 0; LoRAs usually "
                   "want about 10x more)."),
        In("student_lora_rank", "INT", default=0, min=0, max=1024, step=1,
           tooltip="0 trains the whole UNet. Above 0, trains a LoRA of this rank on the UNet's attention "
                   "projections instead and also writes it to models/loras/<output_name>.safetensors, to apply the "
                   "one-step student to the base model (or a fine-tune of it) with Load LoRA."),
        In("fake_lr", "FLOAT", default=1e-4, min=1e-9, max=1.0, step=1e-6,
           tooltip="Learning rate of the fake-score LoRA on the teacher (it tracks the student's distribution)."),
        In("guidance", "FLOAT", default=0.0, min=0.0, max=30.0, step=0.1,
           tooltip="Guidance of the real score: CFG scale for SD3.5, guidance embedding for Flux dev. 0: the "
                   "family's default (4.5 for SD3.5, 3.5 for Flux dev, 1 for Flux schnell)."),
        In("train_seed", "INT", default=0, min=0, max=0xFFFFFFFF, step=1,
           tooltip="Seed of the training noise and prompt order; keep it when resuming (not a per-run seed)."),
        In("output_name", "STRING", default="sd15_one_step",
           tooltip="Name of the exported checkpoint in models/checkpoints (.safetensors is added) and of the run "
                   "folder."),
        In("resume", "BOOLEAN", default=True,
           tooltip="Continue the run in output/csd_runs/distill_<output_name> if it has a saved state; off starts "
                   "over."),
        In("regression_pairs", "INT", default=800, min=0, max=100_000, step=1,
           tooltip="Teacher-corrected regression pairs made first from your prompts: the student base's own 25-step "
                   "sample of a prompt, redrawn by the teacher from noise level 0.9 through the Bridge. 0: plain DMD2, "
                   "no pairs and no warm-up. On the shapes world they are what teaches the student what only the "
                   "teacher knows (background 0.79 with them, chance without). About 1.3 DMD steps of compute per pair "
                   "at SD3.5 Medium size. Kept in the run folder: cancelling keeps the ones made."),
        In("regression_warmup_steps", "INT", default=2000, min=0, max=1_000_000, step=1,
           tooltip="Regression-only steps fitting the student to the pairs before the DMD steps: cheap (about 1% of a "
                   "DMD step each, no teacher query). 0: no warm-up. Unused when regression_pairs is 0."),
        In("fake_guidance", "FLOAT", default=0.0, min=0.0, max=30.0, step=0.1,
           tooltip="Guidance of the fake score, trained and queried with it. 0: the family's choice: unguided for "
                   "SD3.5 (as DMD2), the real guidance's embedding for Flux dev."),
        In("optimizer", "COMBO", default="adamw", options=OPTIMIZERS,
           tooltip="The student's optimizer: adamw (fused on a GPU), or adamw8bit (needs bitsandbytes and a CUDA "
                   "GPU) storing its state in 8 bits: about 4.8 GiB less for a full SD1.5 UNet."),
        *_memory_inputs(),
    ),
    outputs=(
        Out("ckpt_name", "STRING", display_name="ckpt_name",
            tooltip="File name of the exported one-step SD1.5 checkpoint in models/checkpoints."),
        Out("preview", "IMAGE", display_name="IMAGE",
            tooltip="The last preview grid: one-step student samples (SD1.5 VAE) and the same through the Bridge "
                    "(teacher VAE)."),
        Out("lora_name", "STRING", display_name="lora_name",
            tooltip="File name of the student LoRA in models/loras (for Load LoRA); empty when student_lora_rank "
                    "is 0."),
    ),
)

ALL = (LOAD_BRIDGE, BRIDGE_PROJECT, TEACHER_SCORE, SELECT_BEST, ONE_STEP_SAMPLER, TRAIN_BRIDGE, DISTILL_STUDENT)
BY_ID = {spec.node_id: spec for spec in ALL}
