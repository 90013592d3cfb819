"""Teacher Score and Select Best: adapters from ComfyUI's sampling machinery to training/scoring.py."""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..training.scoring import TeacherScores, parse_levels, teacher_scores
from . import specs
from ._errors import clean_errors
from ._schema import build_schema


class _ScoreSampler(comfy.samplers.Sampler):
    """Runs the whole scoring loop inside one Sampler.sample, driven by a CFGGuider: ComfyUI loads the model
    and prepares the conditioning once (SD3 pooled outputs, Flux guidance, ...), then every teacher call
    goes through calc_cond_batch with the positive or the negative conditioning alone."""

    def __init__(self, seeds: list[int], levels: list[float]):
        self.seeds = seeds
        self.levels = levels
        self.scores: TeacherScores | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model = model_wrap.inner_model
        conds = model_wrap.conds
        options = extra_args["model_options"]
        sampling = model.model_sampling

        def denoise(x, sigma, which):
            return comfy.samplers.calc_cond_batch(model, [conds[which]], x, sigma.to(x.device), options)[0]

        def add_noise(x0, n, sigma):
            return sampling.noise_scaling(sigma.to(x0.device), n, x0)

        pbar = comfy.utils.ProgressBar(len(self.seeds) * len(self.levels))
        self.scores = teacher_scores(latent_image, denoise, sigmas.tolist(), self.seeds, add_noise=add_noise,
                                     levels=self.levels, callback=lambda done, total: pbar.update_absolute(done))
        return latent_image


def check_teacher_latent(model, samples) -> None:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"Teacher Score takes image latents [B,C,H,W]; got {shape}.")
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise ValueError(f"The latent has {samples.shape[1]} channels but this teacher works on {channels}-channel "
                         "latents. Score teacher-space latents (e.g. the output of Bridge Project), not student "
                         "latents.")
    if torch.count_nonzero(samples) == 0:
        raise ValueError("The latent is all zeros (an empty latent): there is nothing to score. Connect generated "
                         "latents.")


class TeacherScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.TEACHER_SCORE)

    @classmethod
    @clean_errors
    def execute(cls, model, positive, negative, latent, noise_levels, num_seeds, eval_seed) -> io.NodeOutput:
        samples = latent["samples"]
        check_teacher_latent(model, samples)
        levels = parse_levels(noise_levels)
        sampling = model.get_model_object("model_sampling")
        # Level t as a fraction of the teacher's own schedule (its timestep shift included): 1 - t of the way
        # from pure noise to clean.
        sigmas = torch.tensor([float(sampling.percent_to_sigma(1.0 - t)) for t in levels])
        seeds = [eval_seed + i for i in range(num_seeds)]
        sampler = _ScoreSampler(seeds, levels)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, seed=eval_seed)
        scores = sampler.scores
        return io.NodeOutput(scores, scores.format())


class SelectBest(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.SELECT_BEST)

    @classmethod
    @clean_errors
    def execute(cls, latent, scores, count, rank_by) -> io.NodeOutput:
        samples = latent["samples"]
        if len(scores) != samples.shape[0]:
            raise ValueError(f"The scores are for {len(scores)} samples but the latent batch has {samples.shape[0]}. "
                             "Connect the batch that was scored (or one made from it in the same order).")
        keep = scores.select(count, rank_by)
        out = dict(latent)
        out["samples"] = samples[keep]
        if "batch_index" in latent:
            out["batch_index"] = [latent["batch_index"][i] for i in keep]
        mask = latent.get("noise_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == samples.ndim and mask.shape[0] == samples.shape[0]:
            out["noise_mask"] = mask[keep]
        lines = [f"kept {len(keep)} of {len(scores)} by {rank_by} (best first):"]
        lines += [f"sample {i}: denoise_error {scores.denoise_error[i].item():.6g}, "
                  f"text_alignment {scores.text_alignment[i].item():+.6g}" for i in keep]
        return io.NodeOutput(out, "\n".join(lines))
