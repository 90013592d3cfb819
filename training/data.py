"""Image-folder data for Bridge training: scan captioned images, split, and cache their latents once.

The latent cache is a folder of safetensors shards ("student", "teacher" and the text tensors, one row per
image) plus `manifest.json` describing exactly what was encoded (files with sizes and mtimes, captions,
resolutions, the caller's encoder fingerprint). An unchanged dataset is read back; any change rebuilds the whole
cache (simple and correct). Encoders are callables, so this module never touches diffusers.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "manifest.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageItem:
    path: str
    caption: str


# ---------------------------------------------------------------------------------------------- folders

def _readable(path: str) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Image.DecompressionBombError as e:
        # A real image, only too large to open safely: refused rather than silently left out of the data.
        raise UserError(f"The image {path!r} is too large to open ({e}); downscale it (training uses a few hundred "
                         "pixels per side) or remove it from the folder.") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def scan_images(folder) -> list[ImageItem]:
    """Every .jpg/.jpeg/.png/.webp under `folder` (recursive, hidden folders skipped, sorted by path) with its
    caption from a same-stem .txt file beside it (empty when none). Unreadable images are skipped with a warning."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"Image folder {folder!r} {what}. Give a folder of .jpg/.png/.webp images (captions in "
                         "same-name .txt files beside them).")
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    paths.sort()
    if not paths:
        raise ValueError(f"No images in {folder!r} (looked for {', '.join(IMAGE_EXTS)} in it and its subfolders).")
    bad = {p for p in paths if not _readable(p)}
    if bad:
        shown = ", ".join(os.path.relpath(p, folder) for p in sorted(bad)[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"Skipping {len(bad)} unreadable image(s) in {folder!r}: {shown}", stacklevel=2)
    items = []
    for p in paths:
        if p in bad:
            continue
        txt = os.path.splitext(p)[0] + ".txt"
        caption = ""
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        items.append(ImageItem(p, caption))
    if not items:
        raise ValueError(f"None of the {len(paths)} images in {folder!r} could be read; check the files.")
    return items


def load_image(path, size: int) -> torch.Tensor:
    """RGB image as [1,3,size,size] float in [0,1]: short side resized to `size`, then center-cropped."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def split_items(items: list[ImageItem], val_fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Deterministic (seeded) train / held-out split; both non-empty. Each keeps the input order."""
    if len(items) < 2:
        raise ValueError(f"Need at least 2 images to hold some out for validation; got {len(items)}. Add images.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive); got {val_fraction}.")
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------------- latent cache

def _describe(items: list[ImageItem], student_res: int, teacher_res: int, encoder_fingerprint: str) -> dict:
    files = []
    for it in items:
        st = os.stat(it.path)
        files.append({"path": os.path.abspath(it.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "caption": it.caption})
    return {"version": CACHE_VERSION, "student_res": student_res, "teacher_res": teacher_res,
            "encoder_fingerprint": encoder_fingerprint, "files": files}


def _read_manifest(cache_dir: str) -> dict | None:
    try:
        with open(os.path.join(cache_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    from ._bridge import checkpoint

    tmp = checkpoint.atomic_temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _check_rows(name: str, t, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != n:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"Encoder output {name!r} must be a tensor with one row per image ({n}); got {got}.")
    return t.detach().cpu().contiguous()


def build_latent_cache(items: list[ImageItem], cache_dir, student_encode: Callable[[torch.Tensor], torch.Tensor],
                       teacher_encode: Callable[[torch.Tensor], torch.Tensor],
                       text_encode: Callable[[list[str]], dict[str, torch.Tensor]], student_res: int,
                       teacher_res: int, batch_size: int = 8, shard_size: int = 256,
                       encoder_fingerprint: str = "") -> bool:
    """Encode `items` once into safetensors shards under `cache_dir`; returns True when it (re)built the cache,
    False when the existing one matches (same files, sizes, mtimes, captions, resolutions and fingerprint).

    student_encode(images01 [B,3,student_res,student_res]) -> latents; teacher_encode likewise at teacher_res;
    text_encode(captions) -> {name: tensor [B,...]} (names kept, e.g. "text.prompt_embeds")."""
    from tqdm.auto import tqdm

    from ._bridge import checkpoint

    if not items:
        raise ValueError("No images to cache.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1; got {batch_size} and {shard_size}.")
    cache_dir = os.fspath(cache_dir)
    wanted = _describe(items, student_res, teacher_res, encoder_fingerprint)
    old = _read_manifest(cache_dir)
    if old is not None and {k: old.get(k) for k in wanted} == wanted and all(
            os.path.isfile(os.path.join(cache_dir, s["file"])) for s in old.get("shards", [])):
        return False

    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(os.path.join(cache_dir, MANIFEST)):
        os.remove(os.path.join(cache_dir, MANIFEST))  # a half-finished rebuild must never look valid
    shards, pending, keys = [], {}, None

    def flush():
        rows = {k: torch.cat(v) for k, v in pending.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        checkpoint.save_safetensors_atomic(os.path.join(cache_dir, name), rows, {"format": "latent_cache"})
        shards.append({"file": name, "count": rows["student"].shape[0]})
        pending.clear()

    bar = tqdm(total=len(items), desc="encoding images", unit="img")
    try:
        # Batches never straddle shards, so every shard holds exactly its rows.
        for start in range(0, len(items), shard_size):
            shard_items = items[start:start + shard_size]
            for b in range(0, len(shard_items), batch_size):
                batch = shard_items[b:b + batch_size]
                n = len(batch)
                rows = {
                    "student": _check_rows("student", student_encode(
                        torch.cat([load_image(it.path, student_res) for it in batch])), n),
                    "teacher": _check_rows("teacher", teacher_encode(
                        torch.cat([load_image(it.path, teacher_res) for it in batch])), n),
                }
                for k, v in text_encode([it.caption for it in batch]).items():
                    if k in rows:
                        raise ValueError(f"text_encode returned the reserved key {k!r}; prefix its keys "
                                         "(e.g. 'text.').")
                    rows[k] = _check_rows(k, v, n)
                if keys is None:
                    keys = {k: list(v.shape[1:]) for k, v in rows.items()}
                got = {k: list(v.shape[1:]) for k, v in rows.items()}
                if got != keys:
                    raise ValueError(f"Encoder outputs changed shape between batches ({keys} then {got}); the "
                                     "encoders must return fixed-size tensors (pad text to a fixed length).")
                for k, v in rows.items():
                    pending.setdefault(k, []).append(v)
                bar.update(n)
            flush()
    finally:
        bar.close()
    keep = {s["file"] for s in shards}
    for f in os.listdir(cache_dir):  # shards of a larger earlier build
        if f.startswith("shard_") and f.endswith(".safetensors") and f not in keep:
            os.remove(os.path.join(cache_dir, f))
    _write_json_atomic(os.path.join(cache_dir, MANIFEST), {**wanted, "shards": shards, "keys": sorted(keys)})
    return True


class LatentCache:
    """Read side of `build_latent_cache`: `len(cache)`, `cache.keys`, `cache.batch(indices) -> {key: tensor}`.
    Shards are memory-mapped; a batch reads only its rows."""

    def __init__(self, cache_dir):
        from safetensors import SafetensorError, safe_open

        from ._bridge import files

        self.cache_dir = os.fspath(cache_dir)
        manifest = _read_manifest(self.cache_dir)
        if manifest is None or "shards" not in manifest:
            raise ValueError(f"No complete latent cache in {self.cache_dir!r} (missing or damaged {MANIFEST}); "
                             "build it with build_latent_cache (training does this first).")
        self.keys: list[str] = list(manifest["keys"])
        self.student_res, self.teacher_res = manifest["student_res"], manifest["teacher_res"]
        self.captions = [f["caption"] for f in manifest["files"]]
        self._shards, self._where = [], []
        for s in manifest["shards"]:
            path = os.path.join(self.cache_dir, s["file"])
            files.check_safetensors_file(path, what="Latent cache shard",
                                         corrupt_hint=f"Delete {self.cache_dir!r} to re-encode.")
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"Latent cache shard {path!r} is unreadable ({e}); delete {self.cache_dir!r} to "
                                 "re-encode.") from None
            self._where += [(len(self._shards), i) for i in range(s["count"])]
            self._shards.append(handle)

    def __len__(self) -> int:
        return len(self._where)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"Latent cache indices {bad[:5]} out of range (the cache holds {len(self)} images).")
        out = {}
        for key in self.keys:
            rows = []
            for i in indices:
                shard, local = self._where[i]
                rows.append(self._shards[shard].get_slice(key)[local:local + 1])
            out[key] = torch.cat(rows)
        return out


# ---------------------------------------------------------------------------------------------- synthetic data

_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
_SHAPES = ("circle", "square", "triangle")


def make_synthetic_images_once(folder, n: int, size: int, seed: int, timeout_s: float = 600.0) -> None:
    """`make_synthetic_images` in the first process only when several run (`accelerate launch` sets RANK): the
    others wait for the folder to appear (it appears complete, by one rename) instead of writing the same files."""
    import time

    if int(os.environ.get("RANK", "0")) == 0:
        make_synthetic_images(folder, n, size, seed)
        return
    deadline = time.monotonic() + timeout_s
    while not os.path.isdir(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Process {os.environ['RANK']} waited {timeout_s:.0f} s for process 0 to write the "
                               f"demo images into {folder!r}; see process 0's error.")
        time.sleep(0.2)


def make_synthetic_images(folder, n: int, size: int, seed: int) -> list[ImageItem]:
    """`n` deterministic PNGs of coloured shapes on coloured backgrounds, each with a caption .txt
    (e.g. "a red circle on a blue background"). For tests and the tiny demo run.

    `folder` must not exist yet (or be empty). It appears complete or not at all: the images are written to
    `<folder>.partial` (a killed earlier attempt's is deleted first) and renamed when all are done."""
    import shutil

    from PIL import Image, ImageDraw

    given = os.fspath(folder)
    final = os.path.abspath(given)
    if os.path.isdir(final) and os.listdir(final):
        raise ValueError(f"{final!r} already holds files; synthetic images go into a new folder.")
    folder = final + ".partial"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = random.Random(seed)
    names = list(_COLORS)
    items = []
    for i in range(n):
        bg, fg = rng.sample(names, 2)
        shape = rng.choice(_SHAPES)
        im = Image.new("RGB", (size, size), _COLORS[bg])
        draw = ImageDraw.Draw(im)
        r = rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_COLORS[fg])
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=_COLORS[fg])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLORS[fg])
        path = os.path.join(folder, f"img_{i:04d}.png")
        im.save(path)
        caption = f"a {fg} {shape} on a {bg} background"
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption + "\n")
        items.append(ImageItem(os.path.join(given, os.path.basename(path)), caption))
    os.replace(folder, final)  # atomic; replaces an empty folder
    return items
