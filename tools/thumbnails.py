"""Thumbnails of the reference workflows (`workflows/<name>.jpg`, what ComfyUI's template browser shows beside each
template) and the pack's registry icon (`assets/icon.png`), drawn from the workflow files themselves: every node at
its place with its title, every link coloured by its type as in ComfyUI's canvas. Deterministic (PIL only).

    python tools/thumbnails.py            # rewrite all of them after changing a workflow
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
ICON = ROOT / "assets" / "icon.png"
SIZE = (480, 320)
QUALITY = 85
BACKGROUND = (32, 32, 32)
TITLE_H = 30  # LiteGraph's title bar above a node's pos
SLOT_H = 20

# ComfyUI's default link colours per type (its canvas palette); our BRIDGE in the pack's green.
LINK_COLORS = {"MODEL": (179, 157, 219), "CLIP": (255, 213, 0), "VAE": (255, 110, 110), "LATENT": (255, 156, 249),
               "CONDITIONING": (255, 169, 49), "IMAGE": (100, 181, 246), "BRIDGE": (102, 204, 136),
               "STRING": (160, 220, 160)}
CORE_NAMES = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode", "VAEDecode": "VAE Decode",
              "SaveImage": "Save Image", "PreviewImage": "Preview Image", "KSampler": "KSampler",
              "TripleCLIPLoader": "TripleCLIPLoader", "DualCLIPLoader": "DualCLIPLoader", "UNETLoader": "Load Diffusion Model",
              "VAELoader": "Load VAE", "FluxGuidance": "FluxGuidance", "PreviewAny": "Preview Any",
              "MarkdownNote": "Note", "LoraLoader": "Load LoRA", "LoraLoaderModelOnly": "LoraLoaderModelOnly"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _display_names() -> dict[str, str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("csd_specs_thumbnails", ROOT / "nodes" / "specs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return {**CORE_NAMES, **{s.node_id: s.display_name for s in module.ALL}}


def render(workflow: dict, names: dict[str, str] | None = None) -> Image.Image:
    """The workflow's graph, scaled to fit SIZE."""
    names = names if names is not None else _display_names()
    nodes = {n["id"]: n for n in workflow["nodes"]}
    boxes = {i: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for i, n in nodes.items()}
    x0, y0 = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    x1, y1 = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    margin = 12
    scale = min((SIZE[0] - 2 * margin) / (x1 - x0), (SIZE[1] - 2 * margin) / (y1 - y0))
    ox = (SIZE[0] - (x1 - x0) * scale) / 2 - x0 * scale
    oy = (SIZE[1] - (y1 - y0) * scale) / 2 - y0 * scale

    def pt(x, y):
        return ox + x * scale, oy + y * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(max(9, round(15 * scale * 2.2)))
    radius = max(2, round(8 * scale))

    for i, n in nodes.items():
        ours = n["type"].startswith("CSD_")
        note = n["type"] == "MarkdownNote"
        body = (58, 52, 36) if note else (53, 53, 53)
        title = (42, 107, 138) if ours else (70, 62, 40) if note else (72, 72, 72)
        a, b = pt(*boxes[i][:2]), pt(*boxes[i][2:])
        draw.rounded_rectangle([a, b], radius=radius, fill=body, outline=(20, 20, 20))
        draw.rounded_rectangle([a, (b[0], a[1] + TITLE_H * scale)], radius=radius, fill=title)
        label = n.get("title") or names.get(n["type"], n["type"])
        width = b[0] - a[0] - 6
        while label and draw.textlength(label, font=font) > width:
            label = label[:-2] + "…" if len(label) > 2 else ""
        draw.text((a[0] + 4, a[1] + TITLE_H * scale / 2), label, fill=(230, 230, 230), font=font, anchor="lm")

    for _, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        s, d = nodes[src], nodes[dst]
        p0 = pt(s["pos"][0] + s["size"][0], s["pos"][1] + SLOT_H * (src_slot + 0.5))
        p3 = pt(d["pos"][0], d["pos"][1] + SLOT_H * (dst_slot + 0.5))
        bend = max(20 * scale, (p3[0] - p0[0]) / 2)
        p1, p2 = (p0[0] + bend, p0[1]), (p3[0] - bend, p3[1])
        curve = [_bezier(p0, p1, p2, p3, t / 24) for t in range(25)]
        draw.line(curve, fill=LINK_COLORS.get(typ, (170, 170, 170)), width=max(1, round(3 * scale * 1.5)))
        for p in (p0, p3):
            r = max(1.5, 5 * scale)
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=LINK_COLORS.get(typ, (170, 170, 170)))
    return image


def _bezier(p0, p1, p2, p3, t):
    u = 1 - t
    return tuple(u ** 3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t ** 3 * d for a, b, c, d in zip(p0, p1, p2, p3))


def icon() -> Image.Image:
    """128 px: a small 4-channel latent grid carried across into a larger 16-channel one."""
    image = Image.new("RGB", (128, 128), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i in range(2):
        for j in range(2):
            draw.rectangle([10 + 14 * j, 46 + 14 * i, 22 + 14 * j, 58 + 14 * i], fill=LINK_COLORS["LATENT"])
    for i in range(4):
        for j in range(4):
            draw.rectangle([70 + 12 * j, 34 + 12 * i, 80 + 12 * j, 44 + 12 * i], fill=LINK_COLORS["BRIDGE"])
    draw.line([(44, 64), (64, 64)], fill=(230, 230, 230), width=4)
    draw.polygon([(64, 56), (64, 72), (70, 64)], fill=(230, 230, 230))
    return image


def thumbnail_path(workflow: Path) -> Path:
    return workflow.with_suffix(".jpg")


def main() -> int:
    names = _display_names()
    for path in sorted(WORKFLOWS.glob("*.json")):
        render(json.loads(path.read_text()), names).save(thumbnail_path(path), quality=QUALITY, optimize=True)
        print(thumbnail_path(path).relative_to(ROOT))
    ICON.parent.mkdir(exist_ok=True)
    icon().save(ICON, optimize=True)
    print(ICON.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
