"""`python -m training.run sample`: one-step images from a student, written as PNGs.

The student is either an SD1.5 checkpoint exported after distillation (single file or diffusers folder; its
own VAE and CLIP-L are used), or the trainer's student checkpoint (student_unet.safetensors) together with
--base, the SD1.5 model whose VAE and CLIP-L it was trained with. Noise for a batch comes from one CPU
generator seeded with --seed, as ComfyUI makes it, so the same seed gives the same images there.
"""

from __future__ import annotations

import argparse
import os
import re


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True,
                   help="exported SD1.5 student (.safetensors single file or diffusers folder), or a student "
                        "checkpoint (student_unet.safetensors) with --base")
    p.add_argument("--base", help="SD1.5 checkpoint or folder whose VAE and CLIP-L to use with a student checkpoint")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt (repeat the option for several prompts; each gets --batch images)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first batch (default 0)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--resolution", type=int, default=512, help="image size, a multiple of 8 (default 512)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def sample_images(student, vae, text_encoder, tokenizer, prompt: str, seed: int = 0, batch: int = 1,
                  resolution: int = 512) -> list:
    """One-step images (PIL) for one prompt: noise from torch.Generator().manual_seed(seed) for the batch."""
    import torch
    from PIL import Image

    from .._bridge import model as bridge_model
    from ..models.text import encode_sd15

    check_sampling(batch=batch, resolution=resolution, seed=seed)
    size = student.latent_size(resolution)
    device = next(student.parameters()).device
    emb = encode_sd15([prompt], text_encoder, tokenizer).prompt_embeds.expand(batch, -1, -1).to(device)
    noise = student.make_noise(batch, size, generator=torch.Generator().manual_seed(seed), device="cpu")
    with torch.no_grad():
        z = student(noise.to(device), emb)
        images = bridge_model.decode_to_image01(vae, z)
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def check_sampling(batch: int = 1, resolution: int = 512, seed: int = 0, prompts: int = 1) -> None:
    """Refuse sampling options that cannot work, before any model is loaded."""
    from ..errors import UserError, number_problem, seed_problem

    problems = [number_problem("--batch", batch, low=1, integer=True),
                seed_problem("--seed", seed) or seed_problem(f"--seed + {prompts - 1} (one seed per prompt)",
                                                             seed + prompts - 1)]
    if number_problem("--resolution", resolution, low=8, integer=True) or resolution % 8:
        problems.append(f"--resolution must be a positive multiple of 8 (SD1.5 pixels per latent), got {resolution!r}")
    problems = [p for p in problems if p]
    if problems:
        raise UserError("; ".join(problems) + ".")


def resolve_device(name: str) -> str:
    """--device as a torch device string: auto is CUDA when present; a device this machine lacks is refused."""
    import torch

    from ..errors import UserError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not a device this command runs on: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (no GPU, or a CPU-only torch); use --device "
                        "cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto.")
    return str(device)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


def run(args) -> int:
    from ..errors import output_dir
    from .common import check_inputs

    # Everything cheap first: options and the files given (before torch loads), device and output folder, then the
    # models.
    check_sampling(batch=args.batch, resolution=args.resolution, seed=args.seed, prompts=len(args.prompt))
    check_inputs(args)
    device = resolve_device(args.device)
    output_dir(args.out)
    from ..models import assemble
    student, vae, text_encoder, tokenizer = assemble.load_student_for_sampling(args.student, args.base, device)
    written = []
    for i, prompt in enumerate(args.prompt):
        seed = args.seed + i
        for j, image in enumerate(sample_images(student, vae, text_encoder, tokenizer, prompt, seed=seed,
                                                batch=args.batch, resolution=args.resolution)):
            path = os.path.join(args.out, f"{i:03d}_{_slug(prompt)}_seed{seed}_{j}.png")
            try:
                image.save(path)
            except OSError as e:  # e.g. the disk is full: no half-written image, and the error names the file
                if os.path.exists(path):
                    os.remove(path)
                raise OSError(e.errno, e.strerror or str(e), path) from None
            written.append(path)
    print("\n".join(written))
    return 0
