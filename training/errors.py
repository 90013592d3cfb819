"""User errors: bad input, or an environment that cannot work (a full or read-only disk, no CUDA), reported as one
message that names the file or option and the fix.

The library's convention: bad input raises a ValueError subclass (UserError here; ModelLoadError, TrainingStateError,
BridgeCheckpointError) whose message says what to change. Failures that other libraries raise for such causes (an
OSError of a full disk, safetensors' error for the same, PIL's decompression-bomb error, an allocator running out of
memory) are translated by `explain`, which returns None for anything else: that is a bug and keeps its traceback.
`python -m training.run` calls `explain` at its one boundary; the helpers below translate at the place where the
file is known. No heavy imports here: this module is on the CLI's start-up path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys

SEED_LIMIT = 2**64  # torch.manual_seed and torch.Generator take seeds below this (as ComfyUI's seed widget)


class UserError(ValueError):
    """The input or the environment is unusable: the message names the file or option and the fix."""


# errno values whose cause is the user's input or machine, not the code, and what to do about each.
_ERRNO_FIX = {
    errno.ENOSPC: "the disk is full: free some space, or choose an output folder on another disk (--out)",
    errno.EDQUOT: "the disk quota is exhausted: free some space, or choose an output folder elsewhere (--out)",
    errno.EROFS: "the file system is read-only: choose an output folder you can write to (--out)",
    errno.EACCES: "permission denied: fix the permissions, or choose another path (e.g. another --out)",
    errno.EPERM: "operation not permitted: choose another path (e.g. another --out)",
    errno.EEXIST: "a file is where a folder is needed: choose another path (e.g. another --out)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path (e.g. another --out)",
    errno.EISDIR: "it is a folder where a file is needed: give the file",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ELOOP: "too many levels of symbolic links: check the path",
    errno.EFBIG: "the file is too large for this file system: choose an output folder on another disk (--out)",
}
_OOM_FIX = ("lower --batch-size or the resolution (--resolution / --student-res), use --gradient-checkpointing or "
            "--gradient-accumulation, or use a machine with more memory")


def _os_error(code: int, what: str, path: str | None) -> UserError:
    where = f" ({path})" if path else ""
    return UserError(f"{what}{where}: {_ERRNO_FIX[code]}.")


def explain(exc: BaseException) -> UserError | None:
    """`exc` as a UserError when bad input or the environment caused it (ValueError is the library's bad-input type
    and is returned as is), else None."""
    if isinstance(exc, ValueError):
        return exc if isinstance(exc, UserError) else UserError(str(exc))
    if isinstance(exc, OSError) and exc.errno in _ERRNO_FIX:
        path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return _os_error(exc.errno, exc.strerror or str(exc), path)
    if isinstance(exc, MemoryError):
        return UserError(f"Out of memory: {_OOM_FIX}.")
    text = str(exc)
    # The libraries below are imported by whatever raised their errors; this module itself stays import-light.
    safetensors, pil, torch = (sys.modules.get(m) for m in ("safetensors", "PIL.Image", "torch"))
    if safetensors is not None and isinstance(exc, safetensors.SafetensorError):
        code = re.search(r"\(os error (\d+)\)", text)
        if code and int(code.group(1)) in _ERRNO_FIX:
            return _os_error(int(code.group(1)), "Writing or reading a .safetensors file failed", None)
        if text.startswith("Error while deserializing"):  # a damaged file; other SafetensorErrors are bugs
            return UserError(f"A .safetensors file is unreadable ({text}): it is truncated or corrupt; replace it "
                             "(or delete it where it is a cache or checkpoint of this run).")
        return None
    if pil is not None and isinstance(exc, pil.DecompressionBombError):
        return UserError(f"{text} Downscale the image or remove it.")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "can't allocate memory" in text):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return UserError(f"Out of memory ({first[:200]}): {_OOM_FIX}.")
    loop = sys.modules.get(f"{__package__}.loop")
    if loop is not None and isinstance(exc, loop.TrainingDiverged):
        return UserError(text)
    return None


def one_line(message: str) -> str:
    """A message on one line (lists of problems are joined with '; ')."""
    parts = [p.strip().removeprefix("- ").strip() for p in str(message).splitlines()]
    return "; ".join(p for p in parts if p).replace(":;", ":")


# ---------------------------------------------------------------------------------------------- checks at the place

def output_dir(path, what: str = "Output folder") -> str:
    """Create the folder `path` (and parents) and check that it can be written to, before anything expensive runs."""
    if not path:
        raise UserError(f"{what}: no path given.")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a file, not a folder: choose another path (e.g. another --out).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if e.errno in _ERRNO_FIX:
            fix = "choose another path (e.g. another --out)" if e.errno == errno.ENOENT else _ERRNO_FIX[e.errno]
            raise UserError(f"{what} {path!r} cannot be created ({e.strerror}): {fix}.") from None
        raise
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path!r} is not writable: fix its permissions or choose another path "
                        "(e.g. another --out).")
    return path


def read_text(path, what: str = "Text file") -> str:
    """A UTF-8 text file; a missing file or another encoding is a UserError naming the file and the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                        f"{e.start}): save it as UTF-8.") from None


def read_json_object(path, what: str = "JSON file", fix: str = "") -> dict:
    """A JSON object from `path`; an empty, damaged or non-object file is a UserError naming the file."""
    path = os.fspath(path)
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path!r} is not valid JSON ({'empty file' if not e.doc.strip() else e})"
                        f"{': ' + fix if fix else ''}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path!r} holds a JSON {type(data).__name__}, not an object"
                        f"{': ' + fix if fix else ''}.")
    return data


def number_problem(name: str, value, low=None, high=None, low_open: bool = False, integer: bool = False) -> str | None:
    """Why `value` is not a finite number in [low, high] (low excluded with low_open), or None when it is."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        return f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be finite, got {value}"
    if low is not None and (value <= low if low_open else value < low):
        return f"{name} must be {'>' if low_open else '>='} {low}, got {value}"
    if high is not None and value > high:
        return f"{name} must be <= {high}, got {value}"
    return None


def seed_problem(name: str, value) -> str | None:
    """Why `value` is not a usable random seed (an integer in [0, 2**64)), or None."""
    problem = number_problem(name, value, low=0, integer=True)
    if problem is None and value >= SEED_LIMIT:
        problem = f"{name} must be below 2**64 (torch's seed range), got {value}"
    return problem
