"""Load Bridge and Bridge Project: thin adapters from ComfyUI objects to bridge/."""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..bridge.checkpoint import check_decoder_fingerprint, decoder_fingerprint, load_bridge, read_bridge_metadata
from ..bridge.model import Bridge, display_name
from ..bridge.taps import ldm_decode_features
from . import specs
from ._errors import clean_errors
from ._schema import build_schema

log = logging.getLogger(__name__)

FOLDER = "bridges"


def register_bridges_folder() -> None:
    """Add models/bridges to ComfyUI's model folders, keeping paths extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths.append(default)
    # Only safetensors: Bridges are never pickles, so other files are not offered at all.
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


register_bridges_folder()


@dataclass
class BridgeHandle:
    """What travels on a BRIDGE socket: the Bridge plus what its file says about it."""
    bridge: Bridge
    name: str
    metadata: dict


_LOADED: dict[str, tuple[tuple[int, int], BridgeHandle]] = {}


def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def load_bridge_cached(path: str) -> BridgeHandle:
    """One Bridge per file; a changed file (mtime or size) is loaded again."""
    key = _file_key(path)
    hit = _LOADED.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    handle = BridgeHandle(load_bridge(path), os.path.basename(path), read_bridge_metadata(path))
    _LOADED[path] = (key, handle)
    return handle


class LoadBridge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.LOAD_BRIDGE)

    @classmethod
    def fingerprint_inputs(cls, bridge_name):
        path = folder_paths.get_full_path(FOLDER, bridge_name)
        return (path, _file_key(path)) if path and os.path.exists(path) else bridge_name

    @classmethod
    @clean_errors
    def execute(cls, bridge_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, bridge_name)
        return io.NodeOutput(load_bridge_cached(path))


# Fingerprint of each VAE's decoder, computed once per VAE object.
_VAE_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vae_fingerprint(vae) -> str | None:
    try:
        return _VAE_FINGERPRINTS[vae]
    except KeyError:
        pass
    try:
        fp = decoder_fingerprint(vae.first_stage_model.state_dict())
    except (AttributeError, ValueError) as e:  # a VAE kind without a conventional decoder: nothing to compare
        log.info("Bridge Project: cannot fingerprint this VAE's decoder (%s).", e)
        fp = None
    _VAE_FINGERPRINTS[vae] = fp
    return fp


def check_student_inputs(handle: BridgeHandle, vae, samples) -> None:
    """Clear errors for a latent or VAE that does not belong to this Bridge's student; warn on another decoder."""
    bridge = handle.bridge
    s = bridge.student_space
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"Bridge Project takes image latents [B,C,H,W]; got {shape}.")
    bridge.check_student_latent(samples)
    bridge.check_finite(samples, "input latent")
    channels = getattr(vae, "latent_channels", None)
    if channels != s.channels:
        raise ValueError(f"The VAE input makes {channels}-channel latents, but Bridge {handle.name!r} expects the "
                         f"{display_name(s)} VAE ({s.channels} channels). Connect the student's VAE (the one that "
                         f"decodes this latent), not the teacher's.")
    ratio = getattr(vae, "downscale_ratio", s.downscale)
    if ratio != s.downscale:
        raise ValueError(f"The VAE input has {ratio} pixels per latent, but Bridge {handle.name!r} was built for "
                         f"{display_name(s)} ({s.downscale}). Connect the student's VAE.")
    warning = check_decoder_fingerprint(handle.metadata, _vae_fingerprint(vae))
    if warning:
        log.warning("Bridge Project (%s): %s", handle.name, warning)


def decode_features(vae, samples: torch.Tensor, k: int) -> torch.Tensor:
    """The 'features' tap on ComfyUI's own VAE: its decoder (original LDM layout) run only to the teacher grid, with
    the VAE loaded, placed and typed the way ComfyUI's VAE.decode does it."""
    memory = vae.memory_used_decode(samples.shape, vae.vae_dtype)
    mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
    return ldm_decode_features(vae.first_stage_model, samples.to(vae.vae_dtype).to(vae.device), k)


def project(model: Bridge, vae, chunk: torch.Tensor, device) -> torch.Tensor:
    """One chunk of student latents -> teacher raw latents, reading ComfyUI's decoder where the Bridge's tap says."""
    if model.tap == "features":
        return model.project_features(decode_features(vae, chunk, model.k).to(device))
    image = vae.decode(chunk)  # [b,H,W,3] in [0,1], ComfyUI's own decode (tiles if it must)
    return model.project_image(image.movedim(-1, 1).to(device))


# On a machine without CUDA ComfyUI's OOM_EXCEPTION is plain Exception: then nothing is treated as OOM.
_OOM = () if mm.OOM_EXCEPTION is Exception else mm.OOM_EXCEPTION


class BridgeProject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(specs.BRIDGE_PROJECT)

    @classmethod
    @clean_errors
    def execute(cls, bridge, vae, latent, chunk_size) -> io.NodeOutput:
        samples = latent["samples"]
        check_student_inputs(bridge, vae, samples)
        model = bridge.bridge
        device = mm.get_torch_device()
        model.to(device)
        out, start, n = [], 0, samples.shape[0]
        pbar = comfy.utils.ProgressBar(n)
        while start < n:
            chunk = samples[start:start + chunk_size]
            try:
                z = project(model, vae, chunk, device)
            except _OOM:
                if chunk_size == 1:
                    raise
                chunk_size = max(1, chunk_size // 2)
                log.warning("Bridge Project: out of memory, retrying with chunk_size=%d.", chunk_size)
                mm.soft_empty_cache()
                continue
            out.append(z.to(mm.intermediate_device(), torch.float32))
            start += chunk.shape[0]
            pbar.update(chunk.shape[0])
        result = {"samples": torch.cat(out)}
        if "batch_index" in latent:
            result["batch_index"] = list(latent["batch_index"])
        # A noise_mask is dropped: it has the student's spatial size.
        return io.NodeOutput(result)
