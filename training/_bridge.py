"""Access to the sibling `bridge` package from training code.

Inside ComfyUI the pack is one package (`<pack>.bridge`, `<pack>.training`); from the repository root
(`python -m training.run`, pytest) both are top-level. A relative `..bridge` import works only in the
first case, an absolute `bridge` only in the second, so this module resolves the right one once.
Use: `from ._bridge import checkpoint` (or spaces, projector, model).
"""

import importlib

_PARENT = __package__.rpartition(".")[0]
_PREFIX = f"{_PARENT}.bridge." if _PARENT else "bridge."


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return importlib.import_module(_PREFIX + name)
