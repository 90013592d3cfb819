"""What the commands share: the model-file options of the training commands and how they are read back."""

from __future__ import annotations

import argparse

from ..models.families import TEACHER_FAMILIES

DTYPE_HELP = "weights dtype for the frozen models (auto: bf16 on CUDA, fp32 on CPU)"


def add_model_arguments(p: argparse.ArgumentParser, demo_help: str, student_help: str,
                        dtype_help: str = DTYPE_HELP) -> argparse._ArgumentGroup:
    """The "models" options of Bridge training and distillation: --demo, --student, --student-vae, the teacher's
    files (--teacher-family, --teacher, --teacher-vae, text encoders, tokenizers) and --dtype. Returns the group,
    for a command's own model options."""
    g = p.add_argument_group("models")
    g.add_argument("--demo", action="store_true", help=demo_help)
    g.add_argument("--student", help=student_help)
    g.add_argument("--student-vae", help="separate SD1.5 VAE file (overrides the one in --student)")
    g.add_argument("--teacher-family", choices=TEACHER_FAMILIES, help="which teacher the files are")
    g.add_argument("--teacher", help="teacher diffusers folder, or transformer single file "
                                     "(ComfyUI models/diffusion_models or an all-in-one checkpoint)")
    g.add_argument("--teacher-vae", help="teacher VAE single file (e.g. models/vae/ae.safetensors for Flux)")
    g.add_argument("--clip-l", help="teacher's CLIP-L text encoder file (models/text_encoders/clip_l.safetensors)")
    g.add_argument("--clip-g", help="CLIP-G text encoder file (SD3.5)")
    g.add_argument("--t5", help="T5-XXL text encoder file (t5xxl_fp16.safetensors)")
    g.add_argument("--tokenizers", help="folder with tokenizer subfolders (tokenizer, tokenizer_2, tokenizer_3) "
                                        "when the teacher is given as single files")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help=dtype_help)
    return g


def model_files(args) -> dict:
    """The options of `add_model_arguments` as keyword arguments of models/assemble.py's loaders."""
    return dict(student_vae=args.student_vae, teacher=args.teacher, teacher_vae=args.teacher_vae, clip_l=args.clip_l,
                clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers, dtype=args.dtype)


def given(value, default):
    """An option's value, or `default` when it was not given (0 is a value, refused by the config's checks)."""
    return default if value is None else value


MEMORY_HELP = ("peak-memory preflight before any model loads (training/memory.py): auto (default) compares the estimate "
               "with the free GPU memory (host RAM on the CPU) and, when it does not fit, applies the cheapest settings "
               "that fit and prints them; a number of GiB does the same against that budget; check refuses instead "
               "of changing settings; off skips it")


def add_memory_argument(group) -> None:
    """--memory, the preflight's setting (the same for `bridge` and `distill`)."""
    group.add_argument("--memory", default="auto", metavar="auto|check|GiB|off", help=MEMORY_HELP)
