"""What a user sees when one of the pack's nodes cannot run.

- ComfyUI shows a failed node's error as the exception's module-qualified class name plus its message, and it names
  a pack's modules after the pack's path: our ModelLoadError would read
  `/path/to/ComfyUI/custom_nodes/<pack>.training.models.loading.ModelLoadError`. `clean_errors` lets the pack's own
  errors leave a node as the builtin class they derive from (ValueError, RuntimeError), message unchanged.
- A dependency missing from ComfyUI's Python must not stop the pack from loading; the nodes that need it say which
  packages to install (`require`), and start-up logs one line (`log_missing`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re

log = logging.getLogger(__name__)

# The package ComfyUI made of the pack folder (named after its path); "nodes._errors" when imported from the checkout.
_ROOT = __name__.removesuffix(".nodes._errors")
_SUBPACKAGES = ("bridge", "training", "nodes")
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(PACK_DIR, "requirements.txt")

# What the training nodes import beyond ComfyUI's own requirements (torch, numpy, pillow, safetensors, ...).
TRAINING_PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "safetensors")


def _builtin_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if c.__module__ == "builtins")


def clean_errors(execute):
    """Decorate a node's `execute` (below @classmethod): the pack's exceptions are re-raised as their builtin base
    class with the same message (the original stays chained, for the log); others pass unchanged."""

    @functools.wraps(execute)
    def wrapper(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except Exception as e:
            if type(e).__module__.removeprefix(_ROOT + ".").split(".")[0] not in _SUBPACKAGES:
                raise
            try:
                clean = _builtin_class(type(e))(str(e))
            except TypeError:  # a builtin whose constructor takes other arguments
                clean = RuntimeError(str(e))
            raise clean from e

    return wrapper


def _requirement_lines() -> dict[str, str]:
    """Package name -> its line in requirements.txt (e.g. "diffusers>=0.35")."""
    try:
        with open(REQUIREMENTS, encoding="utf-8") as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError:
        return {}
    return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-"): line for line in lines if line}


def _install_hint(packages: list[str]) -> str:
    lines = _requirement_lines()
    specs = " ".join(f'"{lines.get(p.replace("_", "-"), p)}"' for p in packages)
    return (f"Install them into the Python environment that runs ComfyUI: `python -m pip install -r {REQUIREMENTS}` "
            f"(or `python -m pip install {specs}`; ComfyUI-Manager: 'Install missing dependencies'), then restart "
            f"ComfyUI.")


def require(node: str, packages=TRAINING_PACKAGES) -> None:
    """Raise a clear error when `packages` cannot be imported in ComfyUI's Python (missing or broken installs)."""
    problems = {}
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as e:
            problems[name] = str(e)
    if problems:
        found = "; ".join(f"{name} ({why})" for name, why in problems.items())
        raise RuntimeError(f"{node} needs Python packages that ComfyUI's environment lacks: {found}. "
                           f"{_install_hint(list(problems))}")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def log_missing(nodes: str, packages=TRAINING_PACKAGES) -> None:
    """One start-up line when packages are not installed at all (checked without importing them)."""
    missing = [p for p in packages if not _installed(p)]
    if missing:
        log.warning("Cross-Space Distillation: %s need %s, not installed in ComfyUI's Python; the other nodes work. "
                    "%s", nodes, ", ".join(missing), _install_hint(missing))
