"""The judge: a small CNN that reads every caption attribute off an image, and the metrics built on it.

Trained on rendered images only (never on model samples), so it measures how well a generator's samples
match their prompts:
- prompt accuracy: share of samples whose predicted shape, colour, background and position all match the
  caption;
- Fréchet distance between the judge's penultimate features of samples and of real rendered images
  (the FID recipe, in a feature space that knows this world).
Images of any size are resized to the judge's 64 px (area averaging, i.e. anti-aliased) first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._bridge import checkpoint, files
from .render import ATTRIBUTES, parse_caption, render, sample_scenes

HEADS = tuple((name, len(values)) for name, values in ATTRIBUTES.items())


@dataclass
class JudgeConfig:
    resolution: int = 64
    widths: tuple = (32, 64, 64, 128)  # one stride-2 conv stage each: 64 -> 4 px
    features: int = 128  # penultimate width: the Fréchet-distance feature space

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeConfig":
        return cls(resolution=int(d["resolution"]), widths=tuple(int(w) for w in d["widths"]),
                   features=int(d["features"]))


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config = config or JudgeConfig()
        layers, c_in = [], 3
        for w in config.widths:
            layers += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c_in = w
        self.conv = nn.Sequential(*layers)
        side = config.resolution // 2 ** len(config.widths)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.features), nn.SiLU())
        self.head = nn.Linear(config.features, sum(n for _, n in HEADS))

    def prepare(self, images01: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] at any square size -> judge resolution, centred to [-1, 1]."""
        if images01.ndim != 4 or images01.shape[1] != 3 or images01.shape[2] != images01.shape[3]:
            raise ValueError(f"Judge expects square RGB images [B,3,H,H] in [0,1], got {tuple(images01.shape)}.")
        r = self.config.resolution
        x = images01.to(self.head.weight)
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode="area" if x.shape[-1] > r else "bilinear")
        return x * 2 - 1

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(self.prepare(images01)))

    def forward(self, images01: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute, in ATTRIBUTES order."""
        return list(self.head(self.features(images01)).split([n for _, n in HEADS], dim=1))

    @torch.no_grad()
    def predict(self, images01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[B, 4] long: predicted shape, colour, background, position indices."""
        out = [torch.stack([lg.argmax(1) for lg in self(images01[i : i + batch_size])], dim=1)
               for i in range(0, len(images01), batch_size)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def embed_images(self, images01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.features(images01[i : i + batch_size]).double().cpu()
                          for i in range(0, len(images01), batch_size)])


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild pixel noise and colour drift, so small generator imperfections do not flip the judge."""
    n = images.shape[0]
    drift = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 0.06
    noise = torch.randn(images.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.06
    return (images + drift + noise).clamp(0, 1)


def train_judge(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                config: JudgeConfig | None = None, log=print) -> Judge:
    """Train on freshly rendered train-split images, at random render sizes (48..128 px) so it reads
    students' 64 px and teachers' 128 px outputs alike."""
    torch.manual_seed(seed)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    sizes = (48, 64, 96, 128)
    t0 = time.time()
    for step in range(steps):
        scenes = sample_scenes(batch_size, "train", seed=seed * 1_000_000 + step)
        images = _augment(render(scenes, sizes[step % len(sizes)]), g)
        logits = judge(images)
        loss = sum(F.cross_entropy(lg, scenes.labels[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"judge step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return judge.eval().requires_grad_(False)


def attribute_matches(judge: Judge, images01: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """[B, 4] bool: does each predicted attribute match the caption's."""
    if len(images01) != len(captions):
        raise ValueError(f"{len(images01)} images but {len(captions)} captions; give one caption per image.")
    target = torch.tensor([[values.index(parse_caption(c)[name]) for name, values in ATTRIBUTES.items()]
                           for c in captions], dtype=torch.long).view(-1, len(ATTRIBUTES))
    return judge.predict(images01) == target


def prompt_accuracy(judge: Judge, images01: torch.Tensor, captions: list[str]) -> dict:
    """{'accuracy': share of images with all attributes right, '<attribute>': per-attribute share}."""
    ok = attribute_matches(judge, images01, captions).float()
    result = {"accuracy": ok.all(dim=1).float().mean().item()}
    result.update({name: ok[:, i].mean().item() for i, name in enumerate(ATTRIBUTES)})
    return result


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (float64, no scipy):
    |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2)."""
    a, b = features_a.double(), features_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("Fréchet distance needs at least 2 samples per set.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    sa = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * cross)


def reference_features(judge: Judge, n: int = 1000, split: str = "test", seed: int = 0,
                       resolution: int = 64) -> torch.Tensor:
    """Judge features of n real rendered images of a split: the reference set of the Fréchet distance."""
    return judge.embed_images(render(sample_scenes(n, split, seed), resolution))


def save_judge(folder: str, judge: Judge) -> None:
    """config.json + model.safetensors (config also in the safetensors header)."""
    config = json.dumps(asdict(judge.config))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config + "\n")
    checkpoint.save_safetensors_atomic(os.path.join(folder, "model.safetensors"), judge.state_dict(),
                                       {"format": "shapes-judge", "config": config})


def load_judge(folder: str) -> Judge:
    from safetensors.torch import load_file

    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"No judge {name} in {folder!r}; rebuild with `python -m training.shapes.pretrain`.")
    with open(os.path.join(folder, "config.json")) as f:
        judge = Judge(JudgeConfig.from_dict(json.load(f)))
    weights = files.check_safetensors_file(os.path.join(folder, "model.safetensors"), what="Judge weights")
    judge.load_state_dict(load_file(weights))
    return judge.eval().requires_grad_(False)
