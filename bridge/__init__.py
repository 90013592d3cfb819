"""The Bridge: student VAE decoder + compact projector into a teacher's latent space.

No ComfyUI and no training code here. Importing this package stays cheap: diffusers is imported only
by the functions that need it.
"""

from .spaces import SPACES, LatentSpace, get_space, register_space

__all__ = ["SPACES", "LatentSpace", "get_space", "register_space"]
