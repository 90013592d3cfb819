"""The shapes world: a small, structurally faithful stand-in for SD1.5 -> SD3.5 that runs on CPU.

- `render`: captioned shape images ("a red triangle on a blue background, top left"), any resolution,
  train/validation/test splits by seed.
- `text`: word-level tokenizer and the two frozen CLIP-style text encoders (teacher 64 wide + pooled,
  student 32 wide).
- `judge`: CNN reading every caption attribute; prompt accuracy and Fréchet distance in its feature space.
- `models`: configs of the two AutoencoderKL VAEs (student 64 px -> 8x8x4, teacher 128 px -> 16x16x16), the
  SD3.5-style teacher transformer and the SD1.5-style student UNet; `load_shapes_world(folder)` loads a built
  world (default: the shipped assets/shapes) as a `ShapesWorld`.
- `sampling`: teacher Euler + CFG sampler, student DDIM sampler (steps=1, cfg=1: the one-step student).
- `evaluate`: held-out prompts, evaluation seeds, `score_images`, `evaluate_world`.
- `pretrain`: `python -m training.shapes.pretrain --out assets/shapes` rebuilds all of it.

Importing this package is cheap: torch, diffusers and transformers load on first use.
"""

import importlib

_LAZY = {
    "ShapesWorld": "models",
    "load_shapes_world": "models",
    "score_images": "evaluate",
    "evaluate_world": "evaluate",
    "eval_prompts": "evaluate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
