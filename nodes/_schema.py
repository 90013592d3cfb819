"""Turns the plain-data node specs (specs.py) into ComfyUI V3 schemas."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .specs import DIFFUSERS, DIFFUSERS_MARK, NONE, In, NodeSpec, Out

_BUILTIN = {
    "MODEL": io.Model,
    "CONDITIONING": io.Conditioning,
    "LATENT": io.Latent,
    "VAE": io.Vae,
    "CLIP": io.Clip,
    "IMAGE": io.Image,
    "INT": io.Int,
    "FLOAT": io.Float,
    "STRING": io.String,
    "BOOLEAN": io.Boolean,
    "COMBO": io.Combo,
}
_CUSTOM: dict[str, type] = {}


def io_type(name: str):
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name not in _CUSTOM:  # one class per custom type name
        _CUSTOM[name] = io.Custom(name)
    return _CUSTOM[name]


def _folders(folder: str | tuple[str, ...]) -> tuple[str, ...]:
    return (folder,) if isinstance(folder, str) else tuple(folder)


def _diffusers_models() -> dict[str, str]:
    """ComfyUI's `diffusers` model folder holds model folders, not files: name (relative path) -> full path of each
    folder with a model_index.json, found as ComfyUI's own Diffusers loader finds them."""
    found = {}
    for base in folder_paths.get_folder_paths(DIFFUSERS):
        for root, _, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.setdefault(os.path.relpath(root, base), root)
    return found


def folder_files(folder: str | tuple[str, ...]) -> list[str]:
    """The files of one ComfyUI model folder, or of several merged (first folder first, no repeats); the
    `diffusers` folder contributes its model folders, marked as such."""
    names: list[str] = []
    for f in _folders(folder):
        found = ([n + DIFFUSERS_MARK for n in sorted(_diffusers_models())] if f == DIFFUSERS
                 else folder_paths.get_filename_list(f))
        names += [n for n in found if n not in names]
    return names


def resolve_file(folder: str | tuple[str, ...], name: str | None) -> str | None:
    """Full path of a combo choice: None for NONE/empty, the first folder that has the file otherwise."""
    if not name or name == NONE:
        return None
    for f in _folders(folder):
        # A diffusers folder by its listed name, or by its plain name (workflows saved before the mark).
        path = (_diffusers_models().get(name.removesuffix(DIFFUSERS_MARK)) if f == DIFFUSERS
                else folder_paths.get_full_path(f, name))
        if path is not None:
            return path
    raise FileNotFoundError(f"{name!r} is not in the models folder(s) {', '.join(_folders(folder))}; refresh the "
                            "node (R) and pick an existing file.")


def _input(spec: In):
    t = io_type(spec.type)
    common = dict(display_name=spec.display_name, tooltip=spec.tooltip)
    if spec.type in ("INT", "FLOAT"):
        extra = {"control_after_generate": True} if spec.control_after_generate else {}
        return t.Input(spec.id, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **extra, **common)
    if spec.type == "STRING":
        return t.Input(spec.id, default=spec.default, multiline=spec.multiline, **common)
    if spec.type == "BOOLEAN":
        return t.Input(spec.id, default=spec.default, **common)
    if spec.type == "COMBO":
        # Folder combos are listed when the schema is built, so /object_info shows new files after a refresh.
        options = list(spec.options) if spec.options else folder_files(spec.folder)
        if spec.none_choice:
            options = [NONE, *options]
        return t.Input(spec.id, options=options, default=spec.default, **common)
    return t.Input(spec.id, **common)


def _output(spec: Out):
    return io_type(spec.type).Output(spec.id, display_name=spec.display_name, tooltip=spec.tooltip)


def build_schema(spec: NodeSpec, **extra) -> io.Schema:
    return io.Schema(node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
                     description=spec.description, inputs=[_input(i) for i in spec.inputs],
                     outputs=[_output(o) for o in spec.outputs], **extra)
