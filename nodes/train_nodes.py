"""Train Bridge and Distill Student: long-running nodes that run the library trainers (training/bridge_train.py,
training/distill.py, with models from training/models/assemble.py; the same as `python -m training.run`) in
ComfyUI's execution thread.

What the adapter adds: model files from ComfyUI's model folders, a run folder under ComfyUI's output directory
(output/csd_runs/<kind>_<name>, so running again with resume on continues), autograd despite ComfyUI's inference
mode, ComfyUI's progress bar with the trainers' preview grids, and a cancel that lets the trainer save a resumable
state before the prompt is reported as interrupted.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from . import specs
from ._errors import clean_errors, require
from ._schema import build_schema, resolve_file
from .bridge_nodes import FOLDER as BRIDGES_FOLDER

log = logging.getLogger(__name__)

RUNS = "csd_runs"  # under ComfyUI's output directory
# ComfyUI's code folder, for its bundled tokenizers (SD1.5 / SD3.5 / Flux single files have none). Not found from the
# pack's own path: with --base-directory (ComfyUI Desktop) custom_nodes lies outside ComfyUI's code.
COMFY_ROOT = os.path.dirname(os.path.abspath(folder_paths.__file__))
PREVIEW_MAX_SIZE = 1024  # longest side of the preview sent to the browser


# ---------------------------------------------------------------------------------------------- inputs

def checked_name(name: str) -> str:
    """A file name without folders: `name` minus a trailing .safetensors, checked."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not re.fullmatch(r"[\w][\w .+-]*", name) or ".." in name:
        raise ValueError(f"output_name {name!r} is not a plain file name: use letters, digits, spaces, '_', '-', "
                         "'.' and '+' (no folders), e.g. sd15_to_sd35.")
    return name


def input_path(path: str, what: str, folder: bool) -> str:
    """An absolute path, or one relative to ComfyUI's input folder; must exist."""
    path = os.path.expanduser(path.strip())
    if not path:
        raise ValueError(f"{what} is empty: give a path (absolute, or relative to ComfyUI's input folder).")
    full = path if os.path.isabs(path) else os.path.join(folder_paths.get_input_directory(), path)
    ok = os.path.isdir(full) if folder else os.path.isfile(full)
    if not ok:
        kind = "folder" if folder else "file"
        raise ValueError(f"{what}: no such {kind} {full!r}. Give an absolute path or one relative to ComfyUI's "
                         f"input folder ({folder_paths.get_input_directory()}).")
    return full


def model_path(spec: specs.NodeSpec, input_id: str, choice: str) -> str | None:
    """Full path of a model-file choice, looked up in the folder(s) the input lists (None for (none))."""
    folder = next(i.folder for i in spec.inputs if i.id == input_id)
    return resolve_file(folder, choice)


def teacher_files(spec: specs.NodeSpec, teacher_model, teacher_vae, clip_l, clip_g, t5) -> dict:
    """Full paths of the teacher's files (None where (none) was chosen), as the library loaders take them."""
    chosen = dict(teacher_model=teacher_model, teacher_vae=teacher_vae, clip_l=clip_l, clip_g=clip_g, t5=t5)
    paths = {k: model_path(spec, k, v) for k, v in chosen.items()}
    paths["teacher"] = paths.pop("teacher_model")
    paths["tokenizers"] = COMFY_ROOT  # where a diffusers folder has none
    return paths


def run_dir(kind: str, name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), RUNS, f"{kind}_{name}")


def publish(src: str, folder: str, name: str) -> str:
    """Copy a finished result into models/<folder>/<name>.safetensors (atomically: a reader never sees half a file)."""
    dest_dir = os.path.join(folder_paths.models_dir, folder)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, name + ".safetensors")
    tmp = dest + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------- running

@contextlib.contextmanager
def training_mode():
    """ComfyUI executes nodes under torch.inference_mode(), where nothing records gradients and every tensor made
    is an inference tensor that autograd can never use later. So the models are loaded, and the trainer runs,
    inside this block; ComfyUI's own loaded models are unloaded first to leave the memory to training."""
    mm.unload_all_models()
    mm.soft_empty_cache()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        mm.soft_empty_cache()


class ComfyProgress:
    """The trainers' progress callback (loop.ProgressReporter(callback=...)): ComfyUI's progress bar with the
    trainer's preview grids. ComfyUI's progress hook raises InterruptProcessingException when the user cancels;
    that would abort the trainer mid-step, so the cancel is caught here and turned into the trainer's StopFlag: the
    trainer finishes the step, saves a resumable state and returns, and the node re-raises afterwards."""

    def __init__(self, total: int, stop):
        self.pbar = comfy.utils.ProgressBar(total)
        self.stop = stop
        self.cancelled = False
        self.last_preview = None  # PIL image

    def __call__(self, step: int, total: int, metrics: dict, preview=None) -> None:
        if preview is not None:
            self.last_preview = preview
        if self.cancelled:
            return
        try:
            # Checked first too: the hook clears the flag when it raises, and a missing hook (no server) never would.
            mm.throw_exception_if_processing_interrupted()
            self.pbar.update_absolute(step, total, ("PNG", preview, PREVIEW_MAX_SIZE) if preview is not None else None)
        except mm.InterruptProcessingException:
            self.cancelled = True
            self.stop.set()

    def raise_if_cancelled(self, what: str, step: int, out_dir: str) -> None:
        if self.cancelled or mm.processing_interrupted():
            log.info("%s cancelled at step %d; the state is saved in %s: run again with resume on to continue.", what,
                     step, out_dir)
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()


def preview_image(progress: ComfyProgress, grids: str) -> torch.Tensor:
    """The last preview as a ComfyUI IMAGE [1,H,W,3]: the one the trainer just made, else the newest grid file of
    the run (a resumed run that had nothing left to do), else a black square."""
    from PIL import Image

    image = progress.last_preview
    if image is None:
        files = sorted(glob.glob(os.path.join(grids, "*.png")))
        if files:
            with Image.open(files[-1]) as f:
                image = f.convert("RGB")
    if image is None:
        return torch.zeros(1, 64, 64, 3)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def comfy_on_cpu() -> bool:
    """Train where ComfyUI runs its models: on the CPU when it was started with --cpu, even if CUDA exists."""
    return mm.get_torch_device().type == "cpu"


def _how(result: dict) -> str:
    return f"resumed from {result['resumed_from']}" if result["resumed_from"] else "started"


def _warmup(steps: int) -> int:
    return min(100, max(1, steps // 10))  # as the CLI: short runs warm up for a tenth of their steps


CHECKPOINTING = {"auto": None, "on": True, "off": False}  # the gradient_checkpointing choices -> config values


def memory_preflight(kind: str, config, memory: str, teacher_family: str, bridge: str | None, teacher_storage: str,
                     teacher_offload: bool) -> dict:
    """The library's preflight (training/memory.py), before any model loads: the estimated peak against the device's
    free memory, the plan that fits applied to `config` (memory "auto" or a GiB figure) or a clear error. Returns the
    loaders' memory options (the plan may change them)."""
    from types import SimpleNamespace

    from ..training import memory as mem

    args = SimpleNamespace(memory=memory, teacher_family=teacher_family, bridge=bridge, demo=False,
                           teacher_storage=teacher_storage, teacher_offload=teacher_offload,
                           regression_n=getattr(config, "regression_n", 0))
    plan = mem.preflight_command(args, config, kind)
    if plan is not None:
        log.info("Memory plan for %s: %s", kind, plan.describe())
    return dict(teacher_storage=args.teacher_storage, teacher_offload=args.teacher_offload)


# ---------------------------------------------------------------------------------------------- nodes

class TrainBridge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.TRAIN_BRIDGE, is_output_node=True)

    @classmethod
    @clean_errors
    def execute(cls, student_checkpoint, student_vae, teacher_family, teacher_model, teacher_vae, clip_l, clip_g, t5,
                images, output_name, steps, batch_size, lr, attn_weight, student_res, tap, train_seed,
                resume, memory="auto", gradient_checkpointing="auto", gradient_accumulation=1,
                teacher_storage="auto", teacher_offload=False) -> io.NodeOutput:
        require("Train Bridge")
        from ..training import loop
        from ..training.bridge_train import BridgeTrainConfig
        from ..training.models.assemble import bridge_trainer

        name = checked_name(output_name)
        spec = specs.TRAIN_BRIDGE
        student = model_path(spec, "student_checkpoint", student_checkpoint)
        vae = model_path(spec, "student_vae", student_vae)
        if student is None and vae is None:
            raise ValueError("Train Bridge needs the student's VAE: choose an SD1.5 student_checkpoint or a "
                             "student_vae file.")
        files = teacher_files(spec, teacher_model, teacher_vae, clip_l, clip_g, t5)
        out_dir = run_dir("bridge", name)
        config = BridgeTrainConfig(out_dir=out_dir, images=input_path(images, "images", folder=True), steps=steps,
                                   batch_size=batch_size, lr=lr, warmup_steps=_warmup(steps), attn_weight=attn_weight,
                                   k=2, student_res=student_res, teacher_res=2 * student_res, tap=tap,
                                   seed=train_seed, resume=resume, cpu=comfy_on_cpu(),
                                   gradient_checkpointing=CHECKPOINTING[gradient_checkpointing],
                                   gradient_accumulation=gradient_accumulation)
        config.validate()  # before minutes of model loading
        files.update(memory_preflight("bridge", config, memory, teacher_family, None, teacher_storage,
                                      teacher_offload))
        stop = loop.StopFlag()
        progress = ComfyProgress(steps, stop)
        with training_mode():
            reporter = loop.ProgressReporter(total=steps, desc=f"Train Bridge {name}", callback=progress)
            trainer = bridge_trainer(config, student or vae, teacher_family, progress=reporter, stop=stop,
                                     student_vae=vae, cpu=config.cpu, **files)
            result = trainer.run()
            del trainer
        progress.raise_if_cancelled("Train Bridge", result["step"], out_dir)
        dest = publish(result["bridge"], BRIDGES_FOLDER, name)
        log.info("Train Bridge: %d steps (%s); wrote %s", result["step"], _how(result), dest)
        image = preview_image(progress, os.path.join(out_dir, "val"))
        return io.NodeOutput(os.path.basename(dest), image, ui=ui.PreviewImage(image, cls=cls))


class DistillStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.DISTILL_STUDENT, is_output_node=True)

    @classmethod
    @clean_errors
    def execute(cls, student_checkpoint, bridge_name, teacher_family, teacher_model, teacher_vae, clip_l, clip_g, t5,
                prompts, prompts_file, steps, batch_size, resolution, student_lr, student_lora_rank, fake_lr, guidance,
                train_seed, output_name, resume, regression_pairs=800, regression_warmup_steps=2000,
                fake_guidance=0.0, optimizer="adamw", memory="auto", gradient_checkpointing="auto",
                gradient_accumulation=1, teacher_storage="auto", teacher_offload=False) -> io.NodeOutput:
        require("Distill Student")
        from ..training import loop
        from ..training.distill import DistillConfig, Distiller, parse_prompts, read_prompts
        from ..training.models.assemble import load_distill
        from ..training.models.export import export_sd15
        from ..training.models.families import default_guidance

        name = checked_name(output_name)
        spec = specs.DISTILL_STUDENT
        student = model_path(spec, "student_checkpoint", student_checkpoint)
        bridge = model_path(spec, "bridge_name", bridge_name)
        dest = os.path.join(folder_paths.models_dir, "checkpoints", name + ".safetensors")
        if os.path.abspath(dest) == os.path.abspath(student):
            raise ValueError(f"output_name {name!r} would overwrite the student checkpoint it starts from; choose "
                             "another name.")
        if prompts_file.strip():
            prompt_list = read_prompts(input_path(prompts_file, "prompts_file", folder=False))
        else:
            prompt_list = parse_prompts(prompts, "The prompts text")
        files = teacher_files(spec, teacher_model, teacher_vae, clip_l, clip_g, t5)
        out_dir = run_dir("distill", name)
        # The recipe (pairs, a regression warm-up, then DMD) with the library's defaults; 0 pairs is plain DMD2.
        warmup = regression_warmup_steps if regression_pairs else 0
        config = DistillConfig(out_dir=out_dir, prompts=prompt_list, steps=steps, batch_size=batch_size,
                               resolution=resolution, guidance=guidance or default_guidance(teacher_family) or 1.0,
                               fake_guidance=fake_guidance or None, student_lr=student_lr,
                               student_lora_rank=student_lora_rank, fake_lr=fake_lr, seed=train_seed, resume=resume,
                               regression_n=regression_pairs, regression_warmup_steps=warmup, optimizer=optimizer,
                               gradient_checkpointing=CHECKPOINTING[gradient_checkpointing],
                               gradient_accumulation=gradient_accumulation, cpu=comfy_on_cpu())
        config.validate()
        files.update(memory_preflight("distill", config, memory, teacher_family, bridge, teacher_storage,
                                      teacher_offload))
        stop = loop.StopFlag()
        total = warmup + config.steps
        progress = ComfyProgress(total, stop)
        with training_mode():
            # The text encoders alone first (prompts into the run's cache, encoders freed), then the big models.
            models = load_distill(config, student, bridge, teacher_family, cpu=config.cpu, **files)
            reporter = loop.ProgressReporter(total=total, desc=f"Distill Student {name}", callback=progress)
            result = Distiller(config, models, progress=reporter, stop=stop).run()
            del models
        progress.raise_if_cancelled("Distill Student", result["step"], out_dir)
        # The trained UNet with the base checkpoint's VAE and CLIP, in the original SD1.5 layout.
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        export_sd15(result["student"], student, single_file=dest)
        lora = publish(result["lora"], "loras", name) if result.get("lora") else None  # the LoRA student's own file
        log.info("Distill Student: %d steps (%s); wrote %s%s", result["step"], _how(result), dest,
                 f" and {lora}" if lora else "")
        image = preview_image(progress, os.path.join(out_dir, "samples"))
        return io.NodeOutput(os.path.basename(dest), image, os.path.basename(lora) if lora else "",
                             ui=ui.PreviewImage(image, cls=cls))
