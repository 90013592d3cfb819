"""What may be opened as a safetensors file: the one check every loader in the project runs first.

Used for Bridge files, training states, student checkpoints, model files, the files inside diffusers folders
and caches. It reads at most 9 bytes, and only from a regular file: a named pipe, a device or a socket named
`*.safetensors` would block or stream forever. Nothing is ever unpickled; a pickle (`.bin`, `.ckpt`, `.pt`,
or one renamed to `.safetensors`) is refused with a message that says how to convert it.

A safetensors file starts with its header length N (8 bytes, little endian) followed by N bytes of JSON
starting with '{'. Any value of N is valid, so the first byte alone (0x80 for a pickle) tells nothing;
N must fit in the file and the JSON must start right after it. Pickles and zips fail that test, and their
magic bytes then only choose the message.
"""

from __future__ import annotations

import os
import stat
import struct

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONVERT_HINT = ("Convert it to .safetensors first, on a machine where you trust the file: python -c \"import torch, "
                "safetensors.torch as st; st.save_file(torch.load('IN.bin', weights_only=True), 'OUT.safetensors')\" "
                "(for a .ckpt use torch.load(...)['state_dict']), or download the model's .safetensors release.")


def pickle_message(path, detected: bool = False) -> str:
    how = " (detected from its content despite the file name)" if detected else ""
    return (f"{os.path.basename(os.fspath(path))!r} is a PyTorch pickle/zip checkpoint{how}, not safetensors. It is "
            "refused: this project never unpickles files (unpickling can run arbitrary code). " + CONVERT_HINT)


def check_safetensors_file(path, error: type[Exception] = ValueError, what: str = "File",
                           corrupt_hint: str = "Copy or download it again.") -> str:
    """Raise `error` (message names the file and the fix) unless `path` is a regular file that starts like a
    safetensors file. Returns the path as a string. `what` names the file in the not-found message."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path!r}. Check the path.") from None
    except OSError as e:
        raise error(f"{what} {path!r} cannot be read ({e.strerror}). Check the path and its permissions.") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path!r} is a folder; give the path of a single .safetensors file.")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path!r} is not a regular file (a named pipe, device or socket), so it is not read; give the "
                    "path of a .safetensors file.")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise error(pickle_message(path))
    if name.lower().endswith(".gguf"):
        raise error(f"{name!r} is a GGUF file; give a .safetensors file (or a diffusers folder) instead.")
    # O_NONBLOCK: should the file be swapped for a pipe after the stat, open and read still return at once.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"{what} {path!r} cannot be opened ({e.strerror}). Check its permissions.") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path!r} is not a regular file; give the path of a .safetensors file.")
        head = os.read(fd, 9)
    finally:
        os.close(fd)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= st.st_size and head[8:9] == b"{":
            return path
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
        raise error(pickle_message(path, detected=True))
    if head[:4] == b"GGUF":
        raise error(f"{name!r} is a GGUF file despite its name; give a .safetensors file instead.")
    raise error(f"{name!r} is not a readable safetensors file (truncated or corrupt: "
                f"{'empty or too short' if len(head) < 9 else 'its header does not fit the file'}). {corrupt_hint}")
