"""Captioned shape images: the data of the shapes world.

A scene is one shape (kind, colour) on a plain background colour, at one of five positions, with a little
random size and offset jitter so the data is a distribution, not a lookup table. Rendering is pure torch:
each shape is a signed distance field evaluated on the pixel grid and anti-aliased analytically
(coverage = clamp(0.5 - distance_in_pixels, 0, 1)), so any resolution renders sharp and thousands of
images render in about a second.

Captions follow one template: "a red triangle on a blue background, top left".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.16, 0.30, 0.90),
    "yellow": (0.96, 0.84, 0.14),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
COLOUR_NAMES = tuple(COLOURS)
# Centres in image units (x right, y down).
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
POSITION_NAMES = tuple(POSITIONS)
# Every attribute a caption states, with its possible values (the judge predicts each one).
ATTRIBUTES = {"shape": SHAPES, "colour": COLOUR_NAMES, "background": COLOUR_NAMES, "position": POSITION_NAMES}

SIZE_RANGE = (0.16, 0.2)  # shape "radius" in image units
OFFSET = 0.03  # max jitter of the centre, image units
SPLITS = ("train", "validation", "test")

_CAPTION_RE = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background, (?P<position>[\w ]+)$"
)


def caption_of(attributes: dict) -> str:
    """The caption of one scene's attributes (dict with shape, colour, background, position names)."""
    a = attributes
    return f"a {a['colour']} {a['shape']} on a {a['background']} background, {a['position']}"


def parse_caption(caption: str) -> dict:
    """Inverse of `caption_of`; ValueError for anything that is not a shapes-world caption."""
    m = _CAPTION_RE.match(caption.strip())
    if m is None:
        raise ValueError(
            f"Not a shapes-world caption: {caption!r}. Expected e.g. 'a red triangle on a blue background, top left'."
        )
    attrs = m.groupdict()
    for name, values in ATTRIBUTES.items():
        if attrs[name] not in values:
            raise ValueError(f"Unknown {name} {attrs[name]!r} in caption {caption!r}; known: {', '.join(values)}.")
    if attrs["colour"] == attrs["background"]:
        raise ValueError(f"Caption {caption!r} has the same shape and background colour; they must differ.")
    return attrs


def all_captions() -> list[str]:
    """Every valid caption, in a fixed order."""
    return [
        caption_of(dict(shape=s, colour=c, background=b, position=p))
        for s in SHAPES
        for c in COLOUR_NAMES
        for b in COLOUR_NAMES
        if b != c
        for p in POSITION_NAMES
    ]


def held_out_captions(n: int) -> list[str]:
    """n of the world's captions set aside for evaluation (issue 25): a fixed draw on its own stream, the same in
    every run (a larger n extends a smaller one's set), for distillation-stage data (pairs, DMD prompts, synthetic
    samples, Bridge images) to leave out. n = 0: none."""
    captions = all_captions()
    if not 0 <= n < len(captions):
        raise ValueError(f"held-out captions must be between 0 and {len(captions) - 1}, got {n}.")
    seed = int.from_bytes(hashlib.sha256(b"shapes/held_out_captions").digest()[:8], "little")
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))
    return [captions[int(i)] for i in order[:n]]


def sample_scenes_outside(n: int, split: str, seed: int, excluded: set[str]) -> Scenes:
    """n scenes of `sample_scenes(., split, seed)`'s stream whose captions are not in `excluded`, in stream order
    (the same as sample_scenes(n, ...) when nothing is excluded)."""
    m = n
    while True:
        scenes = sample_scenes(m, split, seed)
        keep = torch.tensor([c not in excluded for c in scenes.captions()], dtype=torch.bool)
        if int(keep.sum()) >= n:
            return scenes[torch.nonzero(keep).flatten()[:n]]
        m = 2 * m + 16


def split_generator(split: str, seed: int = 0) -> torch.Generator:
    """A generator whose stream depends only on (split, seed), so splits never share a random stream."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    digest = hashlib.sha256(f"shapes/{split}/{int(seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Scenes:
    """A batch of scenes as index tensors (into ATTRIBUTES' value tuples) plus continuous jitter."""

    shape: torch.Tensor  # [N] long
    colour: torch.Tensor  # [N] long
    background: torch.Tensor  # [N] long
    position: torch.Tensor  # [N] long
    size: torch.Tensor  # [N] float, radius in image units
    offset: torch.Tensor  # [N, 2] float, centre jitter (x, y) in image units

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def __getitem__(self, idx) -> "Scenes":
        return Scenes(*(t[idx] for t in (self.shape, self.colour, self.background, self.position,
                                          self.size, self.offset)))

    @property
    def labels(self) -> torch.Tensor:
        """[N, 4] long: shape, colour, background, position indices (the judge's targets)."""
        return torch.stack([self.shape, self.colour, self.background, self.position], dim=1)

    def attributes(self, i: int) -> dict:
        return {name: values[int(idx)] for (name, values), idx in zip(ATTRIBUTES.items(), self.labels[i])}

    def captions(self) -> list[str]:
        return [caption_of(self.attributes(i)) for i in range(len(self))]

    def render(self, resolution: int) -> torch.Tensor:
        return render(self, resolution)


def _jitter(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = SIZE_RANGE
    size = lo + (hi - lo) * torch.rand(n, generator=generator)
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * OFFSET
    return size, offset


def sample_scenes(n: int, split: str = "train", seed: int = 0) -> Scenes:
    """n scenes with uniformly random attributes (background != colour), deterministic in (split, seed)."""
    g = split_generator(split, seed)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOUR_NAMES), (n,), generator=g)
    # Background uniform over the other colours: shift by 1..C-1 so it never equals the shape's colour.
    background = (colour + 1 + torch.randint(len(COLOUR_NAMES) - 1, (n,), generator=g)) % len(COLOUR_NAMES)
    position = torch.randint(len(POSITION_NAMES), (n,), generator=g)
    size, offset = _jitter(n, g)
    return Scenes(shape, colour, background, position, size, offset)


def scenes_from_captions(captions: list[str], generator: torch.Generator | None = None) -> Scenes:
    """Scenes matching the given captions, with random jitter (reference images for given prompts)."""
    attrs = [parse_caption(c) for c in captions]
    idx = {name: torch.tensor([values.index(a[name]) for a in attrs], dtype=torch.long)
           for name, values in ATTRIBUTES.items()}
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    size, offset = _jitter(len(captions), g)
    return Scenes(idx["shape"], idx["colour"], idx["background"], idx["position"], size, offset)


def _box(px, py, hx, hy):
    dx, dy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle(px, py, r):
    """Signed distance to an upward equilateral triangle of side 2r centred on its centroid (y up)."""
    k = 3.0**0.5
    px = px.abs() - r
    py = py + r / k
    fold = (px + k * py) > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * r), torch.zeros_like(px))
    return -torch.sqrt(px**2 + py**2) * torch.sign(py)


# Signed distance (image units, negative inside) per shape kind, in SHAPES order; px, py with y up.
_DISTANCES = (
    lambda px, py, r: torch.sqrt(px**2 + py**2) - r,  # circle
    lambda px, py, r: _box(px, py, 0.85 * r, 0.85 * r),  # square of about the circle's area
    lambda px, py, r: _triangle(px, py + 0.1 * r, 1.1 * r),  # triangle, nudged down so it looks centred
    lambda px, py, r: torch.minimum(_box(px, py, r, 0.36 * r), _box(px, py, 0.36 * r, r)),  # cross
)


def _signed_distance(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    d = torch.empty_like(px)
    for kind, distance in enumerate(_DISTANCES):
        sel = (shape == kind).nonzero().squeeze(1)
        if len(sel):
            d[sel] = distance(px[sel], py[sel], r[sel])
    return d


def render(scenes: Scenes, resolution: int) -> torch.Tensor:
    """Images [N, 3, R, R] in [0, 1] for the scenes, anti-aliased at any resolution."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}.")
    palette = torch.tensor(list(COLOURS.values()))
    centres = torch.tensor(list(POSITIONS.values()))
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    out = [torch.zeros(0, 3, resolution, resolution)]
    chunk = max(8, 2**20 // resolution**2)  # about a million pixels at a time keeps temporaries in cache
    for start in range(0, len(scenes), chunk):
        s = scenes[start : start + chunk]
        c = centres[s.position] + s.offset  # [n, 2]
        px = coords.view(1, 1, -1) - c[:, 0].view(-1, 1, 1)
        py = c[:, 1].view(-1, 1, 1) - coords.view(1, -1, 1)  # y up for the distance functions
        px, py = (t.contiguous() for t in torch.broadcast_tensors(px, py))
        r = s.size.view(-1, 1, 1)
        coverage = (0.5 - _signed_distance(s.shape, px, py, r) * resolution).clamp(0, 1).unsqueeze(1)
        fg = palette[s.colour].view(-1, 3, 1, 1)
        bg = palette[s.background].view(-1, 3, 1, 1)
        out.append(bg + (fg - bg) * coverage)
    return torch.cat(out)


def make_split(split: str, n: int, resolution: int, seed: int = 0) -> tuple[torch.Tensor, list[str], Scenes]:
    """(images [N,3,R,R] in [0,1], captions, scenes) of one split."""
    scenes = sample_scenes(n, split, seed)
    return render(scenes, resolution), scenes.captions(), scenes
