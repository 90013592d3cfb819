"""One-Step Student Sampler: one model evaluation at the top of the schedule, through ComfyUI's own sampling."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.sample
import torch
from comfy_api.latest import io

from . import specs
from ._errors import clean_errors
from ._schema import build_schema


class OneStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.ONE_STEP_SAMPLER)

    @classmethod
    @clean_errors
    def execute(cls, model, positive, seed, width, height, batch_size) -> io.NodeOutput:
        if width % 8 or height % 8:
            raise ValueError(f"Width and height must be multiples of 8 (one latent per 8x8 pixels); got "
                             f"{width}x{height}.")
        channels = model.get_model_object("latent_format").latent_channels
        latent = torch.zeros([batch_size, channels, height // 8, width // 8], device=mm.intermediate_device())
        noise = comfy.sample.prepare_noise(latent, seed)
        # One "euler" step of the "simple" schedule goes from sigma_max (t = 999) straight to 0, i.e. the model's
        # x0 prediction from pure noise. At cfg 1 the negative is never evaluated, so it is empty.
        samples = comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, [], latent, seed=seed)
        return io.NodeOutput({"samples": samples})
