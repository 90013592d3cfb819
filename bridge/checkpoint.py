"""Bridge checkpoints: one `.safetensors` file, projector weights + JSON metadata in the header.

Header metadata (all strings, JSON where structured):
    format="cross-space-bridge", format_version="2", student_space, teacher_space (full LatentSpace dicts,
    so custom spaces round-trip), k, projector (ProjectorConfig dict), decoder_fingerprint, training_summary,
    tap ("image" or "features": where the projector reads the student decoder; bridge/taps.py).
Version 1 files (no tap; projector dicts without input_norm) are read as tap "image", exactly as before.
Tensors: "projector.<name>" for every entry of the projector's state dict. Nothing is ever unpickled.

Also home of `save_safetensors_atomic`, the one atomic writer every checkpoint in the project uses, and of
the student-decoder fingerprint (which VAE decoder a Bridge was trained behind).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import secrets
import struct
import warnings
import zlib
from typing import TYPE_CHECKING

import torch

from .files import check_safetensors_file
from .projector import Projector, ProjectorConfig
from .spaces import LatentSpace

if TYPE_CHECKING:
    from .model import Bridge

FORMAT = "cross-space-bridge"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before the tap existed; every version-1 Bridge reads the full image
PREFIX = "projector."
# What a header may ask for. A Bridge is a compact net (the default has ~1M parameters); the limits are far above
# any sensible one, and every tensor shape is checked against the file before anything is built.
MAX_HEADER_VALUE_CHARS = 1_000_000
MAX_JSON_DEPTH = 64


class BridgeCheckpointError(ValueError):
    """A file that cannot be loaded as a Bridge; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------- writing

_TMP_SUFFIX = ".tmp"


def atomic_temp_path(path) -> str:
    """A new, empty temporary file beside `path` (same filesystem, so os.replace onto `path` is atomic), named
    `.<name>.<random>.tmp` and created with the permissions a normal file gets (the umask applies; mkstemp's
    0600 would make every checkpoint private)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary file beside {path!r}.")


def remove_stale_temporaries(folder) -> list[str]:
    """Delete the temporaries `atomic_temp_path` left in `folder` when a process was killed mid-write (for a
    real training state, gigabytes each). Call it when a run starts, before anything writes there."""
    folder = os.fspath(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        stem = n[1:-len(_TMP_SUFFIX)] if n.startswith(".") and n.endswith(_TMP_SUFFIX) else ""
        base, _, token = stem.rpartition(".")
        # 8 random characters: ours (hex) and tempfile.mkstemp's, which earlier versions used.
        if base and len(token) == 8 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in token):
            p = os.path.join(folder, n)
            if os.path.isfile(p) and not os.path.islink(p):
                os.remove(p)
                removed.append(p)
    return removed


def save_safetensors_atomic(path, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file so that `path` is either the old file or the complete new one, never half.

    Temp file in the same directory (same filesystem, so os.replace is atomic) + fsync + os.replace."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata keys and values must be strings; not: {bad}. JSON-encode them.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = atomic_temp_path(path)
    try:
        mode = os.stat(tmp).st_mode & 0o7777  # the umask's; save_file recreates the file as 0600
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # safetensors reports a full disk as "... (os error 28)" without the file: say which file it was.
        code = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the file itself is synced


def save_bridge(path, bridge: "Bridge", training_summary: dict | None = None,
                decoder_fingerprint: str | None = None) -> None:
    """Save a Bridge's projector and everything needed to rebuild it. The student VAE is not saved;
    its fingerprint is (computed from `bridge.student_vae` when not given)."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"Bridge checkpoints are .safetensors files; got {path!r}. Use a name ending in "
                         "'.safetensors'.")
    if decoder_fingerprint is None and bridge.student_vae is not None:
        decoder_fingerprint = _decoder_fingerprint(bridge.student_vae)
    try:
        summary = json.dumps(training_summary or {}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"training_summary must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "student_space": json.dumps(bridge.student_space.to_dict()),
        "teacher_space": json.dumps(bridge.teacher_space.to_dict()),
        "k": str(bridge.k),
        "projector": json.dumps(bridge.projector.config.to_dict()),
        "decoder_fingerprint": decoder_fingerprint or "",
        "training_summary": summary,
    }
    metadata.update(_tap_header(bridge.tap))
    tensors = {PREFIX + k: v for k, v in bridge.projector.state_dict().items()}
    save_safetensors_atomic(path, tensors, metadata)


# ---------------------------------------------------------------------------------------------- reading

def _check_file(path: str) -> None:
    """Refuse what is not a safetensors file before any parser sees it. Pickles are never opened."""
    if not os.path.lexists(path):
        raise BridgeCheckpointError(f"Bridge file not found: {path!r}. Check the path (ComfyUI: models/bridges/).")
    if os.path.isdir(path):
        raise BridgeCheckpointError(f"{path!r} is a folder; a Bridge is a single .safetensors file.")
    check_safetensors_file(path, BridgeCheckpointError, what="Bridge file",
                           corrupt_hint="Copy it again or re-export it from its training run.")


def _what_is_it(keys: list[str]) -> str:
    """A best guess at what a non-Bridge safetensors file holds, for the error message."""
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a full model checkpoint"
    if any(k.split(".")[0] in ("decoder", "encoder") or ".decoder." in k for k in keys):
        return "a VAE"
    if any("lora" in k.lower() for k in keys):
        return "a LoRA"
    return "some other model"


_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def _json_field(raw: dict, key: str):
    """One JSON header value, bounded in size and nesting (json.loads recurses: a deeply nested value would raise
    RecursionError here, and later in whatever walks it)."""
    text = raw[key]
    if len(text) > MAX_HEADER_VALUE_CHARS:
        raise ValueError(f"header field {key!r} is {len(text)} characters long (at most {MAX_HEADER_VALUE_CHARS})")
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
    else:
        stack = [(value, 1)]
        while stack:  # iterative: measuring the depth must not recurse either
            v, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                break
            children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
            stack.extend((c, depth + 1) for c in children)
        else:
            if not isinstance(value, dict):
                raise ValueError(f"header field {key!r} must be a JSON object, not {type(value).__name__}")
            return value
    raise ValueError(f"header field {key!r} is nested deeper than {MAX_JSON_DEPTH} levels")


def _check_named_space(role: str, space: LatentSpace) -> None:
    """A space named like a built-in one (sd15, sdxl, sd3, flux) must have its numbers: a header claiming SD1.5 with
    16 channels is damaged, and would otherwise be blamed later on the user's VAE."""
    from .spaces import BUILT_IN

    known = BUILT_IN.get(space.name)
    if known is None:
        return  # a custom space: its numbers are the only description there is
    wrong = [f"{f} {getattr(space, f)!r} (the {space.name} space has {getattr(known, f)!r})"
             for f in ("channels", "downscale", "scale", "shift")
             if not math.isclose(getattr(space, f), getattr(known, f), rel_tol=1e-6, abs_tol=1e-9)]
    if wrong:
        raise ValueError(f"its {role} space is named {space.name!r} but has {', '.join(wrong)}; the header is "
                         "inconsistent")


def _parse_header(raw: dict, name: str) -> dict | None:
    """The one validation of a Bridge header's fields (format, version, spaces, k, projector, summary): the
    parsed metadata, None when the file is not a Bridge at all, or BridgeCheckpointError. A new header field is
    checked here."""
    if raw.get("format") != FORMAT:
        return None
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise BridgeCheckpointError(f"{name!r}: format_version {raw.get('format_version')!r} is not "
                                    "a number; the file is corrupt.") from None
    if version not in READABLE_VERSIONS:
        newer = " It was written by a newer version: update the node pack." if version > FORMAT_VERSION else ""
        raise BridgeCheckpointError(f"{name!r} has Bridge format version {version}; this version "
                                    f"reads versions {', '.join(map(str, READABLE_VERSIONS))}.{newer}")
    meta = {"format": FORMAT, "format_version": version}
    try:
        for key in ("student_space", "teacher_space", "projector", "training_summary"):
            meta[key] = _json_field(raw, key)
        for role in ("student", "teacher"):
            _check_named_space(role, LatentSpace.from_dict(meta[f"{role}_space"]))
        ProjectorConfig.from_dict(meta["projector"])
        if len(raw["k"]) > 4:
            raise ValueError(f"k {raw['k'][:20]!r}... is not a small integer")
        meta["k"] = int(raw["k"])
    except (KeyError, ValueError, TypeError) as e:
        raise BridgeCheckpointError(f"{name!r} has a damaged Bridge header ({type(e).__name__}: "
                                    f"{e}); the file is corrupt or was edited. Re-export it.") from None
    meta["decoder_fingerprint"] = raw.get("decoder_fingerprint") or None
    meta["tap"] = _read_tap(raw, version, name)
    return meta


def _skeleton(meta: dict, name: str) -> "Bridge":
    """The Bridge the header describes, with its projector on the meta device: shapes without memory."""
    from .model import Bridge

    try:
        with torch.device("meta"):
            projector = Projector(ProjectorConfig.from_dict(meta["projector"]))
        return Bridge(projector, LatentSpace.from_dict(meta["student_space"]),
                      LatentSpace.from_dict(meta["teacher_space"]), meta["k"], student_vae=None, tap=meta["tap"])
    except ValueError as e:
        raise BridgeCheckpointError(f"{name!r}: its header describes an impossible Bridge ({e}).") from None


def _check_tensors(skeleton: "Bridge", tensors: dict[str, tuple[str, list[int]]], name: str) -> None:
    """Every tensor of the file against the projector its header describes: names, shapes, floating point."""
    expected = {PREFIX + k: list(v.shape) for k, v in skeleton.projector.state_dict().items()}
    shapes = {k: shape for k, (_, shape) in tensors.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: file {shapes[k]}, expected {expected[k]}" for k in sorted(set(expected) & set(shapes))
             if shapes[k] != expected[k]]
    not_float = [f"{k} ({dtype})" for k, (dtype, _) in sorted(tensors.items()) if dtype not in _WEIGHT_DTYPES]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape ({'; '.join(wrong[:3])})")
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) that are not floating point ({', '.join(not_float[:3])})")
    if problems:
        raise BridgeCheckpointError(f"{name!r} does not match the projector its header describes: "
                                    + "; ".join(problems) + ". The file is damaged or was edited; re-export it.")


def _open(path) -> tuple[dict, "Bridge"]:
    """Everything cheap, before anything expensive: the file type, the header, and every tensor's name, dtype
    and shape against the projector the header describes. Returns (parsed metadata, that Bridge without
    weights). Reads the header only; no weights, no memory for the projector."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {}
            for k in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                s = f.get_slice(k)
                tensors[k] = (s.get_dtype(), list(s.get_shape()))
    except (SafetensorError, OSError, ValueError) as e:
        raise BridgeCheckpointError(f"{name!r} is not a readable safetensors file (truncated or "
                                    f"corrupt: {e}). Copy or download it again.") from None
    meta = _parse_header(raw, name)
    if meta is None:
        raise BridgeCheckpointError(
            f"{name!r} is a safetensors file but not a Cross-Space Bridge (its header has no "
            f"'format: {FORMAT}'; it looks like {_what_is_it(list(tensors))}). Pick a Bridge file "
            "(ComfyUI: models/bridges/).")
    skeleton = _skeleton(meta, name)
    _check_tensors(skeleton, tensors, name)
    return meta, skeleton


# ---- the tap (format version 2): kept apart from the version-1 fields above ----

def _tap_header(tap: str) -> dict:
    return {"tap": tap}


def _read_tap(raw: dict, version: int, name: str) -> str:
    from .taps import TAPS

    if version == 1:
        return "image"  # version 1 had only the full decode
    tap = raw.get("tap")
    if tap not in TAPS:
        raise BridgeCheckpointError(f"{name!r} has a damaged Bridge header (tap {tap!r}; expected one of "
                                    f"{', '.join(TAPS)}); the file is corrupt or was edited. Re-export it.")
    return tap


def read_bridge_metadata(path) -> dict:
    """format, format_version, student_space / teacher_space (dicts), k, projector (config dict),
    decoder_fingerprint (str or None), training_summary (dict), tap ("image" for version-1 files). Checks
    everything `load_bridge` checks (header, tensor names, dtypes and shapes, and that every weight is finite: a
    Bridge's projector is small, so reading its weights is cheap), so a file it accepts loads."""
    meta, _ = _open(path)
    _read_weights(os.fspath(path))
    return meta


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors, refused unless readable and finite (NaN/inf weights make every output NaN)."""
    from safetensors.torch import load_file

    name = os.path.basename(path)
    try:
        tensors = load_file(path)
    except Exception as e:  # data section unreadable although the header was fine
        raise BridgeCheckpointError(f"{name!r}: could not read the weights ({e}); the file is corrupt.") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise BridgeCheckpointError(f"{name!r} holds NaN/inf weights ({', '.join(bad[:3])}); the file is corrupt "
                                    "or came from a diverged training run.")
    return tensors


def load_bridge(path, student_vae=None, device="cpu", dtype=torch.float32) -> "Bridge":
    """Rebuild a Bridge from its checkpoint. Only the projector is moved to device/dtype; the student VAE
    stays where the caller put it. Warns (does not fail) when the VAE is not the one it was trained with."""
    from .model import Bridge

    path = os.fspath(path)
    meta, bridge = _open(path)
    tensors = _read_weights(path)
    projector = bridge.projector
    # assign: the meta-device parameters become the file's tensors (nothing was allocated before this point).
    projector.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items()}, strict=True, assign=True)
    projector.to(device=device, dtype=dtype)
    if student_vae is not None:
        bridge = Bridge(projector, bridge.student_space, bridge.teacher_space, bridge.k, student_vae=student_vae,
                        tap=bridge.tap)
        warning = check_decoder_fingerprint(meta, decoder_fingerprint(student_vae))
        if warning:
            warnings.warn(warning, stacklevel=2)
    return bridge.eval()


# ---------------------------------------------------------------------------------------------- fingerprint
#
# Which student decoder a Bridge was trained behind. The same weights are stored under different names
# (diffusers `decoder.up_blocks.0...` vs original `first_stage_model.decoder.up.3...`), in different order,
# with attention weights as Linear [C,C] or 1x1 conv [C,C,1,1], and in fp32/fp16/bf16. So the fingerprint
# ignores names, order and trailing unit dimensions: per tensor it keeps numel, RMS and four projections
# onto fixed pseudo-random vectors (first-order sensitive to any change of the weights), and it groups
# them by numel with each statistic sorted. Half-precision casts move these numbers by ~1e-3 relative, a
# fine-tune by far more, so fingerprints are compared with a tolerance (`fingerprints_match`). The same
# weights in the same precision give the identical string.

_FP_PREFIX = "csd-dec1:"
_N_PROJ = 4
_P = 2**31 - 1  # prime modulus of the index hash
_RMS_RTOL = 1e-2
_PROJ_ATOL = 2e-2


def _decoder_tensors(state_dict_or_module) -> list[torch.Tensor]:
    if isinstance(state_dict_or_module, torch.nn.Module):
        sd = state_dict_or_module.state_dict()
    elif isinstance(state_dict_or_module, dict):
        sd = state_dict_or_module
    else:
        raise ValueError("decoder_fingerprint takes a VAE module or a state dict; got "
                         f"{type(state_dict_or_module).__name__}.")
    out = []
    for k, v in sd.items():
        parts = str(k).split(".")
        if isinstance(v, torch.Tensor) and v.is_floating_point() and ("decoder" in parts or "post_quant_conv" in parts):
            out.append(v)
    if not out:
        raise ValueError("No VAE decoder weights found (expected keys containing 'decoder.' or 'post_quant_conv.'); "
                         "pass the student VAE or its full state dict.")
    return out


def _hash_vectors(n: int) -> torch.Tensor:
    """Fixed pseudo-random vectors in [-1,1), [_N_PROJ, n], from integer arithmetic (the same on every
    machine). A tensor of numel m uses the first m entries."""
    i = torch.arange(n, dtype=torch.int64)
    rows = []
    for j in range(_N_PROJ):
        h = (i * 1103515245 + 12345 + 2654435 * (j + 1)) % _P
        h = (h * h + 40503 * (j + 1)) % _P  # < 2^62: no overflow
        rows.append(h.double() * (2.0 / _P) - 1.0)
    return torch.stack(rows)


def _tensor_stats(t: torch.Tensor, vectors: torch.Tensor) -> list[float]:
    v = t.detach().reshape(-1).to("cpu", torch.float64)
    rms = v.square().mean().sqrt().item()
    r = vectors[:, : v.numel()]
    proj = (r @ v) / (r.norm(dim=1) * max(rms, 1e-3))  # ~N(0,1) for random weights
    return [rms, *proj.tolist()]


def decoder_fingerprint(state_dict_or_module) -> str:
    """Fingerprint of a VAE decoder (+ post_quant_conv): a module, or a state dict in diffusers or
    original/ComfyUI layout. Compare two with `fingerprints_match` / `check_decoder_fingerprint`."""
    tensors = _decoder_tensors(state_dict_or_module)
    vectors = _hash_vectors(max(t.numel() for t in tensors))
    groups: dict[int, list[list[float]]] = {}
    for t in tensors:
        groups.setdefault(t.numel(), []).append(_tensor_stats(t, vectors))
    header, values = [], []
    for n in sorted(groups):
        rows = groups[n]
        header.append([n, len(rows)])
        for col in range(1 + _N_PROJ):
            values.extend(sorted(r[col] for r in rows))
    blob = json.dumps(header, separators=(",", ":")).encode() + b"\n" + struct.pack(f"<{len(values)}f", *values)
    return _FP_PREFIX + base64.urlsafe_b64encode(zlib.compress(blob, 9)).decode()


_decoder_fingerprint = decoder_fingerprint  # for save_bridge, whose argument has the same name


def _parse_fingerprint(fp: str):
    if not isinstance(fp, str) or not fp.startswith(_FP_PREFIX):
        raise ValueError("not a decoder fingerprint")
    blob = zlib.decompress(base64.urlsafe_b64decode(fp[len(_FP_PREFIX):].encode()))
    head, _, data = blob.partition(b"\n")
    header = json.loads(head)
    values = struct.unpack(f"<{len(data) // 4}f", data)
    if len(values) != sum(c for _, c in header) * (1 + _N_PROJ):
        raise ValueError("truncated decoder fingerprint")
    return header, values


def fingerprints_match(a: str, b: str) -> bool:
    """Same decoder weights (up to layout and half-precision casting)?"""
    ha, va = _parse_fingerprint(a)
    hb, vb = _parse_fingerprint(b)
    if ha != hb:
        return False
    i = 0
    for _, count in ha:
        for col in range(1 + _N_PROJ):
            for x, y in zip(va[i:i + count], vb[i:i + count]):
                tol = _RMS_RTOL * max(abs(x), abs(y)) + 1e-6 if col == 0 else _PROJ_ATOL
                if abs(x - y) > tol:
                    return False
            i += count
    return True


def fingerprint_digest(fp: str) -> str:
    """A short label for messages (equal digests mean equal strings, not the converse)."""
    return hashlib.sha256(fp.encode()).hexdigest()[:12]


def check_decoder_fingerprint(meta, fingerprint: str | None) -> str | None:
    """Warning message when the student VAE differs from the one the Bridge was trained with, else None.

    `meta` is read_bridge_metadata()'s dict (or the stored fingerprint string). A mismatch is not an error:
    fine-tuned SD1.5 VAEs exist and usually still work, only less exactly."""
    stored = meta.get("decoder_fingerprint") if isinstance(meta, dict) else meta
    if not stored or not fingerprint:
        return None  # nothing recorded or nothing to compare: no claim either way
    try:
        same = fingerprints_match(stored, fingerprint)
    except (ValueError, zlib.error, struct.error, TypeError):
        return ("Could not compare the student VAE with the one this Bridge was trained with (unreadable decoder "
                "fingerprint); results may be off if it is a different VAE.")
    if same:
        return None
    return (f"This Bridge was trained with a different student VAE decoder (fingerprint {fingerprint_digest(stored)}, "
            f"this VAE {fingerprint_digest(fingerprint)}). It still runs, but results may be off: use the VAE it was "
            "trained with, or retrain the Bridge for this VAE.")
