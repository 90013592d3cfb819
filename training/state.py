"""Resumable training state in ONE safetensors file (never pickle).

Tensors:  "module/<name>/<state-dict key>"  trained weights (and buffers, e.g. EMA shadows) of each module
          "t/<n>"                            every tensor found inside optimizer / scheduler states and `extra`
Header:   format="cross-space-training-state", format_version, and "state": JSON of everything that is not a
          tensor (param_groups, step counters, scheduler state, extra), with tensors replaced by references.

With `trainable_only` a module contributes its buffers and the parameters that are trained: those with
requires_grad, or optimized by one of the given optimizers (peft switches requires_grad off on a LoRA adapter
while it is disabled, yet its weights are trained). Frozen weights, such as a big teacher, are never written.
Training draws its randomness from `loop.step_generator(seed, step, ...)`, so no RNG state is stored.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ._bridge import checkpoint, files

FORMAT = "cross-space-training-state"
FORMAT_VERSION = 1
_FRESH = "this state was written for a different model/config; use a fresh --out folder or the matching config"


class TrainingStateError(ValueError):
    """A training-state file that cannot be resumed from; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------- JSON <-> tensors

def _encode(obj, tensors: dict[str, torch.Tensor]):
    """JSON-able copy of `obj`; tensors move into `tensors` and are referenced by name. Tuples and
    non-string dict keys (optimizer state is keyed by int) are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        name = f"t/{len(tensors)}"
        tensors[name] = obj.detach()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state (use numbers, strings, lists, "
                    "dicts, tuples or tensors)")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- module tensors

def _module_tensors(module: nn.Module, optimized: set[int], trainable_only: bool) -> dict[str, torch.Tensor]:
    """The state-dict entries of `module` that belong in a training state."""
    params = {id(p) for p in module.parameters()}
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        is_param = id(t) in params
        if trainable_only and is_param and not (t.requires_grad or id(t) in optimized):
            continue
        out[key] = t.detach()
    return out


def _optimizer_kind(opt) -> str:
    """The optimizer's class (through accelerate's wrapper): states of different optimizers do not mix."""
    inner = getattr(opt, "optimizer", opt)
    return f"{type(inner).__module__}.{type(inner).__name__}"


def _optimized_ids(optimizers: dict) -> set[int]:
    return {id(p) for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}


def save_training_state(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        schedulers: dict, extra: dict, trainable_only: bool = True) -> None:
    """Write modules' trained weights, optimizer and scheduler states and `extra` to one .safetensors file,
    atomically (a crash leaves the previous state intact)."""
    tensors: dict[str, torch.Tensor] = {}
    optimized = _optimized_ids(optimizers)
    module_keys = {}
    for name, module in modules.items():
        entries = _module_tensors(module, optimized, trainable_only)
        module_keys[name] = sorted(entries)
        for key, t in entries.items():
            tensors[f"module/{name}/{key}"] = t
    state = {
        "trainable_only": trainable_only,
        "modules": module_keys,
        "optimizers": {name: _encode(opt.state_dict(), tensors) for name, opt in optimizers.items()},
        "schedulers": {name: _encode(s.state_dict(), tensors) for name, s in schedulers.items()},
        "extra": _encode(dict(extra), tensors),
        "optimizer_kinds": {name: _optimizer_kind(opt) for name, opt in optimizers.items()},
    }
    # safetensors refuses tensors that share memory (tied weights appear twice in a state dict): copy repeats.
    seen = set()
    for key, t in tensors.items():
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr in seen:
            tensors[key] = t.to("cpu", copy=True)  # on the CPU: saving must not allocate GPU memory
        elif ptr is not None:
            seen.add(ptr)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(state)}
    checkpoint.save_safetensors_atomic(path, tensors, metadata)


# ---------------------------------------------------------------------------------------------- loading

def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state JSON, tensors) of a validated training-state file. Pickles are refused before any parser sees them."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.lexists(path):
        raise TrainingStateError(f"Training state not found: {path!r}. Start without resuming, or point at the "
                                 "run folder that holds it.")
    files.check_safetensors_file(path, TrainingStateError, what="Training state",
                                 corrupt_hint="Delete it to start over, or restore it from a backup.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TrainingStateError(f"{name!r} is not a readable safetensors file (truncated or corrupt: {e}). Delete "
                                 "it to start over, or restore it from a backup.") from None
    if meta.get("format") != FORMAT:
        raise TrainingStateError(f"{name!r} is a safetensors file but not a training state (no 'format: {FORMAT}' "
                                 "in its header). Resume from the train_state.safetensors a trainer wrote.")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise TrainingStateError(f"{name!r} has training-state format version {meta.get('format_version')!r}; this "
                                 f"version reads {FORMAT_VERSION}. Start a fresh run or use the matching version.")
    try:
        state = json.loads(meta["state"])
        kinds = state.get("optimizer_kinds", {})  # absent in states written before it was recorded
        state = {k: state[k] for k in ("trainable_only", "modules", "optimizers", "schedulers", "extra")}
        state["optimizer_kinds"] = kinds
    except (KeyError, ValueError, TypeError) as e:
        raise TrainingStateError(f"{name!r} has a damaged header ({type(e).__name__}: {e}). Delete it to start "
                                 "over.") from None
    return state, tensors


def read_module_tensors(path, module: str) -> dict[str, torch.Tensor]:
    """One saved module's tensors ({key: tensor}, keys as in its state dict) from a validated training state, for
    tools that inspect a run (e.g. its fake score) without rebuilding the trainer."""
    state, tensors = _read(path)
    if module not in state["modules"]:
        raise TrainingStateError(f"{os.path.basename(os.fspath(path))!r} holds modules {sorted(state['modules'])}, "
                                 f"not {module!r}.")
    return {k: tensors[f"module/{module}/{k}"] for k in state["modules"][module]}


def _same_names(kind: str, saved, given, name: str) -> None:
    if sorted(saved) != sorted(given):
        raise TrainingStateError(f"{name!r}: the file holds {kind} {sorted(saved)} but this run has "
                                 f"{sorted(given)}; {_FRESH}.")


def load_training_state(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        schedulers: dict) -> dict:
    """Restore what `save_training_state` wrote into the given (freshly built) objects; returns `extra`.

    Everything is checked before anything is changed, so a refused file leaves the objects untouched."""
    state, tensors = _read(path)
    name = os.path.basename(os.fspath(path))
    _same_names("modules", state["modules"], modules, name)
    _same_names("optimizers", state["optimizers"], optimizers, name)
    _same_names("schedulers", state["schedulers"], schedulers, name)
    try:
        opt_states = {k: _decode(v, tensors) for k, v in state["optimizers"].items()}
        sched_states = {k: _decode(v, tensors) for k, v in state["schedulers"].items()}
        extra = _decode(state["extra"], tensors)
    except KeyError as e:
        raise TrainingStateError(f"{name!r} is damaged: tensor {e} is missing. Delete it to start over.") from None

    optimized = _optimized_ids(optimizers)
    module_states = {}
    for mod_name, module in modules.items():
        expected = _module_tensors(module, optimized, bool(state["trainable_only"]))
        saved_keys = state["modules"][mod_name]
        if sorted(expected) != saved_keys:
            diff = sorted(set(expected) ^ set(saved_keys))
            raise TrainingStateError(f"{name!r}: module {mod_name!r} has different weights than the saved one "
                                     f"(e.g. {diff[:3]}); {_FRESH}.")
        sd = {}
        for key, t in expected.items():
            saved = tensors.get(f"module/{mod_name}/{key}")
            if saved is None:
                raise TrainingStateError(f"{name!r} is damaged: weights of {mod_name}.{key} are missing.")
            if saved.shape != t.shape:
                raise TrainingStateError(f"{name!r}: {mod_name}.{key} has shape {list(saved.shape)} in the file but "
                                         f"{list(t.shape)} here; {_FRESH}.")
            sd[key] = saved
        module_states[mod_name] = sd

    for opt_name, opt in optimizers.items():
        saved_kind = state["optimizer_kinds"].get(opt_name)
        kind = _optimizer_kind(opt)
        if saved_kind is not None and saved_kind != kind:
            raise TrainingStateError(f"{name!r}: optimizer {opt_name!r} was {saved_kind.rsplit('.', 1)[-1]} in the "
                                     f"file but is {kind.rsplit('.', 1)[-1]} here; resume with the same optimizer "
                                     "setting (--optimizer), or use a fresh --out folder.")
        _check_optimizer(name, opt_name, opt, opt_states[opt_name])

    for mod_name, module in modules.items():
        module.load_state_dict(module_states[mod_name], strict=False)
    for opt_name, opt in optimizers.items():
        opt.load_state_dict(opt_states[opt_name])
    for sched_name, sched in schedulers.items():
        sched.load_state_dict(sched_states[sched_name])
    return extra


_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")


def _check_optimizer(name: str, opt_name: str, opt: torch.optim.Optimizer, saved: dict) -> None:
    """Same groups, same parameter counts, per-parameter state shaped like its parameter."""
    try:
        groups, per_param = saved["param_groups"], saved["state"]
    except (KeyError, TypeError):
        raise TrainingStateError(f"{name!r}: optimizer {opt_name!r} state is damaged; {_FRESH}.") from None
    ours = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in groups]
    if ours != theirs:
        raise TrainingStateError(f"{name!r}: optimizer {opt_name!r} has parameter groups of sizes {theirs} in the "
                                 f"file but {ours} here; {_FRESH}.")
    params = {i: p for g_saved, g in zip(groups, opt.param_groups) for i, p in zip(g_saved["params"], g["params"])}
    for idx, entry in per_param.items():
        p = params.get(idx)
        if p is None:
            raise TrainingStateError(f"{name!r}: optimizer {opt_name!r} has state for an unknown parameter; {_FRESH}.")
        for key, v in entry.items():
            # Per-element moments are shaped like their parameter; other entries (bitsandbytes' quantisation maps
            # and block scales) are not.
            if key in _PER_ELEMENT and isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                raise TrainingStateError(f"{name!r}: optimizer {opt_name!r} state {key!r} has shape {list(v.shape)} "
                                         f"but the parameter has {list(p.shape)}; {_FRESH}.")
