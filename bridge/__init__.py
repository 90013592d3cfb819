"""The Bridge: student VAE decoder + compact projector into a teacher's latent space.

No ComfyUI and no training code here. Importing this package stays cheap: torch-based parts load on
first use, and diffusers is imported only by the functions that need it.
"""

import importlib

from .spaces import SPACES, LatentSpace, get_space, register_space

_LAZY = {
    "Bridge": "model",
    "exact_round_trip": "model",
    "projector_config": "model",
    "TAPS": "taps",
    "Projector": "projector",
    "ProjectorConfig": "projector",
    "BridgeCheckpointError": "checkpoint",
    "save_bridge": "checkpoint",
    "load_bridge": "checkpoint",
    "read_bridge_metadata": "checkpoint",
    "decoder_fingerprint": "checkpoint",
    "check_decoder_fingerprint": "checkpoint",
    "save_safetensors_atomic": "checkpoint",
}

__all__ = ["SPACES", "LatentSpace", "get_space", "register_space", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
