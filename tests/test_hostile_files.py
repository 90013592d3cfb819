"""Hostile files and inputs: every loader sniffs files the same way, headers are checked before anything is
built, inputs that would silently give NaN are refused, checkpoints look like normal files."""

import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bridge.checkpoint import (
    BridgeCheckpointError,
    load_bridge,
    read_bridge_metadata,
    save_bridge,
    save_safetensors_atomic,
)
from bridge.model import Bridge
from bridge.projector import Projector
from training.models import loading
from training.models.export import load_student_unet, save_student_unet
from training.models.tiny import tiny_unet, tiny_vae
from training.state import load_training_state, save_training_state
from training.student import OneStepStudent


@pytest.fixture(scope="module")
def student_vae():
    torch.manual_seed(0)
    return tiny_vae(4)


@pytest.fixture()
def bridge_file(tmp_path, student_vae):
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=student_vae, width=32, depth=2)
    path = tmp_path / "b.safetensors"
    save_bridge(path, bridge, training_summary={"steps": 1})
    return path


def _rewrite(src, dst, tensors=None, meta=None):
    """A copy of a safetensors file with some tensors and header fields replaced."""
    with safe_open(str(src), "pt") as f:
        old_meta = dict(f.metadata() or {})
        old = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**old, **(tensors or {})}, str(dst), metadata={**old_meta, **(meta or {})})
    return dst


def _header_length_128_mod_256(path):
    """Rewrite `path` with a padding header field so that its 8-byte header length starts with 0x80, the byte a
    pickle starts with. Still a perfectly valid safetensors file."""
    for n in range(256):
        _rewrite(path, path, meta={"padding": "x" * n})
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":
                return path
    raise AssertionError("no padding gave a header length of 128 mod 256")


def _tiny_state(path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(path, {"m": model}, {"opt": opt}, {}, {"step": 3})
    return {"m": torch.nn.Linear(3, 2)}, opt


# ------------------------------------------------------------------------------------------- one sniff

def test_valid_files_whose_header_length_looks_like_a_pickle_load_everywhere(tmp_path, bridge_file):
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(vae))
    _header_length_128_mod_256(vae)
    assert loading.detect_file_kind(vae) == "vae_4ch"

    _header_length_128_mod_256(bridge_file)
    assert read_bridge_metadata(bridge_file)["k"] == 2
    load_bridge(bridge_file)

    state = tmp_path / "state.safetensors"
    modules, opt = _tiny_state(state)
    _header_length_128_mod_256(state)
    assert load_training_state(state, modules, {"opt": opt}, {})["step"] == 3

    student = tmp_path / "student.safetensors"
    save_student_unet(student, OneStepStudent(tiny_unet()))
    _header_length_128_mod_256(student)
    load_student_unet(student)


_PIPE_SCRIPT = """
import os, sys, torch
from bridge.checkpoint import load_bridge, read_bridge_metadata
from training.models import loading
from training.models.export import read_student_metadata
from training.state import load_training_state
from training.models.text import TextCond
fifo = sys.argv[1]
loaders = {
    "load_bridge": lambda: load_bridge(fifo),
    "read_bridge_metadata": lambda: read_bridge_metadata(fifo),
    "load_training_state": lambda: load_training_state(fifo, {}, {}, {}),
    "detect_file_kind": lambda: loading.detect_file_kind(fifo),
    "read_student_metadata": lambda: read_student_metadata(fifo),
    "TextCond.load": lambda: TextCond.load(fifo),
}
for name, fn in loaders.items():
    print("trying", name, flush=True)
    try:
        fn()
        print("LOADED", name, flush=True)
    except ValueError as e:
        print("refused", name, "not a regular file" in str(e), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_at_once_by_every_loader(tmp_path):
    # In a subprocess: a loader that opens the pipe blocks (safetensors even with the GIL held) until killed.
    # (Loaders that import diffusers first are left out to keep it quick: they share detect_file_kind's check.)
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run([sys.executable, "-c", _PIPE_SCRIPT, str(fifo)], cwd=root, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a loader hangs on a named pipe: {(e.stdout or b'').decode()[-300:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("refused", "LOADED"))]
    names = ("load_bridge", "read_bridge_metadata", "load_training_state", "detect_file_kind",
             "read_student_metadata", "TextCond.load")
    assert lines == [f"refused {name} True" for name in names], proc.stdout + proc.stderr[-2000:]


def test_pickles_are_refused_by_content_with_a_conversion_hint(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "model.safetensors"
    evil.write_bytes(pickle.dumps(Boom(), protocol=4))
    for fn in (lambda: loading.detect_file_kind(evil), lambda: load_bridge(evil),
               lambda: load_training_state(evil, {}, {}, {})):
        with pytest.raises(ValueError, match=r"model.safetensors.*pickle.*detected from its content.*never "
                                             r"unpickles.*st\.save_file\(torch\.load"):
            fn()
    assert not (tmp_path / "pwned").exists()


def test_diffusers_folders_load_safetensors_only_and_bin_weights_are_refused(tmp_path):
    vae = tiny_vae(4)
    bin_only = tmp_path / "bin_only"
    vae.save_pretrained(bin_only, safe_serialization=False)
    assert os.path.exists(bin_only / "diffusion_pytorch_model.bin")
    with pytest.raises(loading.ModelLoadError, match=r"bin_only.*pickles.*never loads.*save_pretrained\(.*"
                                                     r"safe_serialization=True"):
        loading.load_vae(bin_only)

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    both = tmp_path / "both"
    vae.save_pretrained(both)  # safetensors; a hostile .bin beside it must never be opened
    with open(both / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(), f)
    loaded = loading.load_vae(both)
    assert torch.equal(loaded.decoder.conv_in.weight, vae.decoder.conv_in.weight)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------- Bridge headers

def _projector(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["projector"])


def test_a_bridge_header_asking_for_a_huge_projector_is_refused_before_anything_is_built(tmp_path, bridge_file,
                                                                                         monkeypatch):
    big = _rewrite(bridge_file, tmp_path / "big.safetensors",
                   meta={"projector": json.dumps({**_projector(bridge_file), "width": 4096, "depth": 1})})
    built = []
    real_init = Projector.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(Projector, "__init__", init)
    for fn in (read_bridge_metadata, load_bridge):
        with pytest.raises(BridgeCheckpointError, match="wrong shape"):
            fn(big)
    assert built and all(devices == {"meta"} for devices in built), "memory was allocated for the header's projector"

    absurd = _rewrite(bridge_file, tmp_path / "absurd.safetensors",
                      meta={"projector": json.dumps({**_projector(bridge_file), "width": 50000})})
    with pytest.raises(BridgeCheckpointError, match="width must be <= "):
        read_bridge_metadata(absurd)


def test_a_deeply_nested_training_summary_is_a_damaged_header_not_a_recursion_error(tmp_path, bridge_file):
    for depth in (100, 100_000):
        deep = _rewrite(bridge_file, tmp_path / f"deep{depth}.safetensors",
                        meta={"training_summary": "{\"a\": " + "[" * depth + "]" * depth + "}"})
        with pytest.raises(BridgeCheckpointError, match="training_summary.*nested deeper"):
            read_bridge_metadata(deep)
    listed = _rewrite(bridge_file, tmp_path / "list.safetensors", meta={"training_summary": "[1, 2]"})
    with pytest.raises(BridgeCheckpointError, match="training_summary.*JSON object"):
        load_bridge(listed)


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf")])
def test_a_latent_scale_that_would_make_every_latent_non_finite_is_refused(tmp_path, bridge_file, scale):
    with safe_open(str(bridge_file), "pt") as f:
        space = json.loads(f.metadata()["teacher_space"])
    bad = _rewrite(bridge_file, tmp_path / "bad.safetensors", meta={"teacher_space": json.dumps({**space,
                                                                                                "scale": scale})})
    with pytest.raises(BridgeCheckpointError, match="damaged Bridge header.*scale"):
        read_bridge_metadata(bad)
    with pytest.raises(BridgeCheckpointError, match="scale"):
        load_bridge(bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_not_cast(tmp_path, bridge_file, dtype):
    key = "projector.proj_out.weight"
    with safe_open(str(bridge_file), "pt") as f:
        shape = f.get_slice(key).get_shape()
    bad = _rewrite(bridge_file, tmp_path / "int.safetensors", tensors={key: torch.ones(shape, dtype=dtype)})
    for fn in (read_bridge_metadata, load_bridge):
        with pytest.raises(BridgeCheckpointError, match="not floating point.*proj_out.weight"):
            fn(bad)


def test_read_bridge_metadata_refuses_what_load_bridge_refuses(tmp_path, bridge_file):
    with safe_open(str(bridge_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    del tensors["projector.proj_in.bias"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(BridgeCheckpointError, match="missing tensor.*proj_in.bias"):
        read_bridge_metadata(tmp_path / "missing.safetensors")


def test_read_bridge_metadata_refuses_nan_weights_as_load_bridge_does(tmp_path, bridge_file):
    """Its docstring promises that a file it accepts loads: NaN/inf weights are refused at read time too."""
    key = "projector.proj_out.weight"
    with safe_open(str(bridge_file), "pt") as f:
        weight = f.get_tensor(key)
    for value in (float("nan"), float("inf")):
        bad_weight = weight.clone()
        bad_weight.view(-1)[0] = value
        bad = _rewrite(bridge_file, tmp_path / "nan.safetensors", tensors={key: bad_weight})
        for fn in (read_bridge_metadata, load_bridge):
            with pytest.raises(BridgeCheckpointError, match="NaN/inf weights.*proj_out.weight"):
                fn(bad)


@pytest.mark.parametrize("role,field,value", [("student", "channels", 16), ("teacher", "channels", 4),
                                              ("student", "scale", 1.0), ("teacher", "downscale", 16)])
def test_a_header_whose_space_contradicts_its_name_is_refused_before_anything_is_built(tmp_path, bridge_file,
                                                                                      monkeypatch, role, field, value):
    """A header claiming SD1.5 with 16 channels is a damaged file, refused before a projector is built, not later
    blamed on the user's VAE."""
    with safe_open(str(bridge_file), "pt") as f:
        space = json.loads(f.metadata()[f"{role}_space"])
    bad = _rewrite(bridge_file, tmp_path / "bad.safetensors",
                   meta={f"{role}_space": json.dumps({**space, field: value})})
    built = []
    monkeypatch.setattr(Projector, "__init__", lambda self, *a, **k: built.append(1))
    for fn in (read_bridge_metadata, load_bridge):
        with pytest.raises(BridgeCheckpointError) as e:
            fn(bad)
        message = str(e.value)
        assert "damaged Bridge header" in message and f"{role} space is named {space['name']!r}" in message
        assert f"{field} {value!r}" in message and "\n" not in message and str(tmp_path) not in message
    assert not built
    # A custom space (a name no table knows) is described by its numbers alone and still loads.
    custom = _rewrite(bridge_file, tmp_path / "custom.safetensors",
                      meta={f"{role}_space": json.dumps({**space, "name": "my_space"})})
    monkeypatch.undo()
    assert read_bridge_metadata(custom)[f"{role}_space"]["name"] == "my_space"


def test_distill_checks_the_bridge_before_loading_any_model(tmp_path, bridge_file):
    """Everything cheap before anything expensive: a bad Bridge fails before the (large) student or teacher."""
    from training.models.assemble import load_distill_models

    bad = _rewrite(bridge_file, tmp_path / "bad.safetensors",
                   tensors={"projector.proj_out.bias": torch.zeros(3)})
    with pytest.raises(BridgeCheckpointError, match="wrong shape"):
        load_distill_models(str(tmp_path / "no-student.safetensors"), str(bad), "sd35_medium",
                         teacher=str(tmp_path / "no-teacher.safetensors"))


# ------------------------------------------------------------------------------------------ Bridge inputs

def test_non_finite_or_empty_inputs_to_the_bridge_api_are_refused(student_vae):
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=student_vae, width=32, depth=2).eval()
    z = torch.randn(1, 4, 4, 4)
    assert torch.isfinite(bridge(z)).all()
    for value in (float("nan"), float("inf")):
        bad = z.clone()
        bad[0, 1, 2, 3] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            bridge(bad)
        image = torch.rand(1, 3, 32, 32)
        image[0, 0, 0, 0] = value
        with pytest.raises(ValueError, match="image holds NaN or inf"):
            bridge.project_image(image)
    # Finite but far outside any VAE's range: a non-finite output is refused with the likely cause, in one line.
    with pytest.raises(ValueError, match="finite student latent.*into NaN/inf.*far outside") as e:
        bridge(torch.full((1, 4, 4, 4), 1e30))
    assert "\n" not in str(e.value) and "1e+30" in str(e.value)
    with pytest.raises(ValueError, match="batch is empty"):
        bridge(torch.zeros(0, 4, 4, 4))
    with pytest.raises(ValueError, match="batch is empty"):
        bridge.project_image(torch.zeros(0, 3, 32, 32))
    student = OneStepStudent(tiny_unet())
    with pytest.raises(ValueError, match="batch is empty"):
        student(torch.zeros(0, 4, 8, 8), torch.zeros(0, 77, 32))


# ---------------------------------------------------------------------------------------------- hygiene

def test_checkpoints_get_the_permissions_of_a_normal_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_safetensors_atomic(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {})
        with open(tmp_path / "normal", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "normal").st_mode) == 0o644


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    from bridge.checkpoint import remove_stale_temporaries

    stale = [".train_state.safetensors.k2j_8x0a.tmp", ".bridge.safetensors.0123abcd.tmp"]
    kept = ["notes.tmp", ".hidden.tmp", "bridge.safetensors", ".x.safetensors.toolong12.tmp"]
    for n in stale + kept:
        (tmp_path / n).write_bytes(b"x")
    remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
