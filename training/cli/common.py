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
    g.add_argument("--teacher-storage", default="auto", choices=("auto", "bf16", "fp8"),
                   help="the frozen teacher transformer's weights: fp8 (float8_e4m3fn, computed in --dtype: about half "
                        "the memory of bf16), bf16 (in --dtype), auto (default: fp8 exactly when the file is fp8, "
                        "e.g. ComfyUI's flux1-dev-fp8, which is then never upcast)")
    g.add_argument("--teacher-offload", action="store_true",
                   help="last resort for small GPUs: keep the teacher transformer in host memory and bring each layer "
                        "to the GPU for its forward (much slower; use with --gradient-checkpointing)")
    return g


def model_files(args) -> dict:
    """The options of `add_model_arguments` as keyword arguments of models/assemble.py's loaders."""
    return dict(student_vae=args.student_vae, teacher=args.teacher, teacher_vae=args.teacher_vae, clip_l=args.clip_l,
                clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers, dtype=args.dtype,
                teacher_storage=args.teacher_storage, teacher_offload=args.teacher_offload)


def given(value, default):
    """An option's value, or `default` when it was not given (0 is a value, refused by the config's checks)."""
    return default if value is None else value


# The path options of the commands and what each must be; checked by `check_inputs` before anything loads.
# "model": a .safetensors file or a diffusers folder; "file": a .safetensors file; "text": a text file.
PATH_OPTIONS = {"images": "folder", "student": "model", "base": "model", "student_vae": "file", "teacher": "model",
                "teacher_vae": "file", "clip_l": "file", "clip_g": "file", "t5": "file", "tokenizers": "folder",
                "bridge": "file", "prompts": "text", "val_prompts": "text"}


def path_problem(flag: str, path: str, kind: str) -> str | None:
    """Why the path given to `flag` cannot be what it must be (`kind`, see PATH_OPTIONS), or None. Model files are
    only opened far enough to see that they start like a safetensors file (9 bytes): a wrong file is refused in
    milliseconds, not after the libraries have loaded."""
    import os

    from .._bridge import files
    from ..errors import UserError

    if not os.path.exists(path):
        return f"{flag} {path!r} does not exist" + (" (a link to a missing file)" if os.path.islink(path) else "")
    if os.path.isdir(path):
        return None if kind in ("folder", "model") else f"{flag} {path!r} is a folder; give a file"
    if kind == "folder":
        return f"{flag} {path!r} is a file; give a folder"
    if kind == "text":
        return None
    try:
        files.check_safetensors_file(path, error=UserError, what=flag)
    except UserError as e:
        if not path.lower().endswith(".safetensors") and "pickle" not in str(e):
            return (f"{flag} {path!r} is not a safetensors file; give a .safetensors file"
                    + (" or a diffusers folder" if kind == "model" else ""))
        return f"{flag}: {str(e).rstrip('.')}"
    return None


def check_inputs(args, needed: tuple[str, ...] = (), what: str = "This command", alternative: str = "") -> None:
    """Refuse in one UserError, before anything expensive runs, every path option given that does not exist or is
    not what it must be, and the `needed` options (flags, e.g. "--student") that were not given: only what is
    actually wrong, each named by the flag the user types."""
    import os

    from ..errors import UserError

    problems = [path_problem("--" + dest.replace("_", "-"), value, kind) for dest, kind in PATH_OPTIONS.items()
                if (value := getattr(args, dest, None))]
    out = getattr(args, "out", None)
    if out and os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"--out {out!r} is a file, not a folder: choose another path")
    problems = [p for p in problems if p]
    missing = [flag for flag in needed if not getattr(args, flag.lstrip("-").replace("-", "_"), None)]
    if missing:
        problems.append(f"{what} needs {', '.join(missing)}" + (f" ({alternative})" if alternative else ""))
    if problems:
        raise UserError("; ".join(problems) + ".")


def validate_flags(cfg, args, renames: dict | None = None) -> None:
    """`cfg.validate()` with its problems named as the user typed them: each problem's leading config field becomes
    the command's flag (`--batch-size` for batch_size) where the command has that option; `renames`: field -> flag
    where the names differ (e.g. out_dir -> --out)."""
    import re

    from ..errors import UserError

    renames = renames or {}

    def flag(m: re.Match) -> str:
        field = m.group(3)
        name = renames.get(field) or ("--" + field.replace("_", "-") if hasattr(args, field) else field)
        return m.group(1) + (m.group(2) or "") + name

    try:
        cfg.validate()
    except ValueError as e:
        head, sep, body = str(e).partition(": ")
        raise UserError(head + sep + re.sub(r"(^|; |each of )(a )?([a-z][a-z0-9_]*)\b", flag, body)) from None


MEMORY_HELP = ("peak-memory preflight before any model loads (training/memory.py): auto (default) compares the estimate "
               "with the free GPU memory (host RAM on the CPU) and, when it does not fit, applies the cheapest settings "
               "that fit and prints them; a number of GiB does the same against that budget; check refuses instead "
               "of changing settings; off skips it")


def add_memory_argument(group) -> None:
    """--memory, the preflight's setting (the same for `bridge` and `distill`)."""
    group.add_argument("--memory", default="auto", metavar="auto|check|GiB|off", help=MEMORY_HELP)
