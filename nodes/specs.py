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
    folder: str | None = None  # COMBO: the files of this ComfyUI model folder
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
                "times larger): decodes it with the student VAE, then runs the Bridge projector. The result is a raw "
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

ALL = (LOAD_BRIDGE, BRIDGE_PROJECT, TEACHER_SCORE, SELECT_BEST, ONE_STEP_SAMPLER)
BY_ID = {spec.node_id: spec for spec in ALL}
