import os
import pickle
import random
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bridge.checkpoint import (
    BridgeCheckpointError,
    check_decoder_fingerprint,
    decoder_fingerprint,
    load_bridge,
    read_bridge_metadata,
    save_bridge,
    save_safetensors_atomic,
)
from bridge.model import Bridge
from bridge.spaces import LatentSpace
from training.models.tiny import tiny_vae

SMALL = dict(width=32, depth=2)


@pytest.fixture(scope="module")
def student_vae():
    torch.manual_seed(0)
    return tiny_vae(4)


@pytest.fixture()
def saved(tmp_path, student_vae):
    torch.manual_seed(3)
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=student_vae, **SMALL)
    with torch.no_grad():  # non-trivial weights everywhere, as after training
        for p in bridge.projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "b.safetensors"
    save_bridge(path, bridge, training_summary={"steps": 7, "loss": 0.25})
    return path, bridge


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# ------------------------------------------------------------------------------------------ round trip

def test_save_load_round_trip_gives_identical_outputs(saved, student_vae):
    path, bridge = saved
    loaded = load_bridge(path, student_vae=student_vae)
    assert (loaded.k, loaded.student_space, loaded.teacher_space) == (2, bridge.student_space, bridge.teacher_space)
    assert loaded.projector.config == bridge.projector.config
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z), bridge(z))
    assert not loaded.training


def test_metadata_holds_everything_needed(saved, student_vae):
    path, bridge = saved
    meta = read_bridge_metadata(path)
    assert meta["format"] == "cross-space-bridge" and meta["format_version"] == 2 and meta["tap"] == "image"
    assert meta["student_space"] == bridge.student_space.to_dict()
    assert meta["teacher_space"] == bridge.teacher_space.to_dict()
    assert meta["k"] == 2 and meta["projector"] == bridge.projector.config.to_dict()
    assert meta["training_summary"] == {"steps": 7, "loss": 0.25}
    assert meta["decoder_fingerprint"] == decoder_fingerprint(student_vae)  # taken from the Bridge's VAE


def test_custom_spaces_and_k1_round_trip(tmp_path):
    teacher = LatentSpace("custom_teacher_test", 16, 8, 0.7, 0.2, 256)  # not registered anywhere
    bridge = Bridge.create("sd15", teacher, k=1, width=16, depth=1, stem_channels=0)
    path = tmp_path / "custom.safetensors"
    save_bridge(path, bridge)
    loaded = load_bridge(path)
    assert loaded.teacher_space == teacher and loaded.k == 1 and loaded.student_vae is None
    img = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.project_image(img), bridge.project_image(img))
    assert read_bridge_metadata(path)["decoder_fingerprint"] is None


def test_load_to_dtype(saved):
    path, _ = saved
    loaded = load_bridge(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.projector.parameters())


# ------------------------------------------------------------------------------------------ atomic writes

def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    save_safetensors_atomic(path, {"a": torch.zeros(2)}, {"v": "1"})
    save_safetensors_atomic(path, {"a": torch.ones(3)}, {"v": "2"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"v": "2"} and f.get_tensor("a").tolist() == [1, 1, 1]
    assert os.listdir(path.parent) == ["x.safetensors"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors_atomic(path, {"a": torch.zeros(2)}, {"v": "1"})
    shared = torch.zeros(4)
    with pytest.raises(Exception):
        save_safetensors_atomic(path, {"a": shared, "b": shared}, {"v": "2"})  # shared memory: refused
    with pytest.raises(ValueError, match="metadata keys and values must be strings"):
        save_safetensors_atomic(path, {"a": torch.zeros(1)}, {"v": 2})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"v": "1"}
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_save_refuses_non_safetensors_names_and_bad_summaries(tmp_path, saved):
    _, bridge = saved
    with pytest.raises(ValueError, match=r"Bridge checkpoints are \.safetensors files; got .*b\.pt"):
        save_bridge(tmp_path / "b.pt", bridge)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_bridge(tmp_path / "b.safetensors", bridge, training_summary={"x": object()})


# ------------------------------------------------------------------------------------------ refusals

def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BridgeCheckpointError, match="not found"):
        load_bridge(tmp_path / "nope.safetensors")
    with pytest.raises(BridgeCheckpointError, match="is a folder"):
        load_bridge(tmp_path)


@pytest.mark.parametrize("name", ["bridge.ckpt", "bridge.pt", "bridge.pth", "bridge.bin"])
def test_pickle_extensions_are_refused_without_unpickling(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not even opened")
    with pytest.raises(BridgeCheckpointError, match="pickle.*never unpickles.*Convert it to .safetensors"):
        load_bridge(path)


def test_pickle_and_zip_content_is_refused_whatever_the_name(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch should-never-exist",))

    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(Boom(), protocol=4))
    with pytest.raises(BridgeCheckpointError, match="detected from its content"):
        load_bridge(disguised)
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"w": torch.zeros(1)}, zipped)  # torch's default zip container
    with pytest.raises(BridgeCheckpointError, match="detected from its content"):
        read_bridge_metadata(zipped)
    assert not os.path.exists("should-never-exist")


def test_a_vae_is_not_a_bridge(tmp_path, student_vae):
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in student_vae.state_dict().items()}, str(path))
    with pytest.raises(BridgeCheckpointError, match="not a Cross-Space Bridge.*looks like a VAE"):
        load_bridge(path)


def test_unknown_format_version(tmp_path, saved):
    path = _rewrite(saved[0], tmp_path / "v3.safetensors", edit_meta=lambda m: m.update(format_version="3"))
    with pytest.raises(BridgeCheckpointError, match="format version 3.*reads versions 1, 2.*update the node pack"):
        load_bridge(path)


# ------------------------------------------------------------------------------------------ the tap (version 2)

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_a_version_1_file_loads_and_behaves_as_before():
    """tests/data/bridge_v1.safetensors was written by the version-1 code (before the tap existed), with the
    output it gave then for a fixed image: it still loads, as an 'image' Bridge, and gives the same output."""
    from safetensors.torch import load_file

    path = os.path.join(DATA, "bridge_v1.safetensors")
    with safe_open(path, "pt") as f:
        raw = f.metadata()
    assert raw["format_version"] == "1" and "tap" not in raw and "input_norm" not in raw["projector"]
    meta = read_bridge_metadata(path)
    assert meta["format_version"] == 1 and meta["tap"] == "image"
    bridge = load_bridge(path)
    assert bridge.tap == "image" and bridge.projector.config.input_norm == 0
    io = load_file(os.path.join(DATA, "bridge_v1_io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(bridge.project_image(io["image01"]), io["project_image"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reads the decoder's image .*tap 'image'.*use project_image"):
        bridge.project_features(torch.zeros(1, 32, 8, 8))


@pytest.mark.parametrize("k", [1, 2])
def test_features_bridge_round_trip(tmp_path, student_vae, k):
    torch.manual_seed(4)
    bridge = Bridge.create("sd15", "sd3", k=k, student_vae=student_vae, tap="features", **SMALL)
    with torch.no_grad():
        for p in bridge.projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "f.safetensors"
    save_bridge(path, bridge)
    meta = read_bridge_metadata(path)
    assert meta["tap"] == "features" and meta["format_version"] == 2 and meta["projector"]["input_norm"] == 1
    loaded = load_bridge(path, student_vae=student_vae)
    assert loaded.tap == "features" and loaded.projector.config == bridge.projector.config
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z), bridge(z))
        assert loaded(z).shape == (2, 16, 8 * k, 8 * k)
    # Without a VAE it still loads (ComfyUI runs the partial decode on its own VAE).
    assert load_bridge(path).tap == "features"


def test_damaged_or_inconsistent_tap_header(tmp_path, student_vae):
    bridge = Bridge.create("sd15", "sd3", k=2, student_vae=student_vae, tap="features", **SMALL)
    path = tmp_path / "f.safetensors"
    save_bridge(path, bridge)
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_meta=lambda m: m.update(tap="pixels"))
    with pytest.raises(BridgeCheckpointError, match="damaged Bridge header.*tap 'pixels'.*image, features"):
        read_bridge_metadata(bad)
    missing = _rewrite(path, tmp_path / "missing.safetensors", edit_meta=lambda m: m.pop("tap"))
    with pytest.raises(BridgeCheckpointError, match="damaged Bridge header.*tap None"):
        load_bridge(missing)
    swapped = _rewrite(path, tmp_path / "swapped.safetensors", edit_meta=lambda m: m.update(tap="image"))
    with pytest.raises(BridgeCheckpointError, match="impossible Bridge.*reads RGB images"):
        load_bridge(swapped)


def test_missing_unexpected_and_misshapen_tensors(tmp_path, saved):
    src = saved[0]
    missing = _rewrite(src, tmp_path / "m.safetensors", lambda t: t.pop("projector.proj_out.weight"))
    with pytest.raises(BridgeCheckpointError, match="1 missing tensor.*projector.proj_out.weight"):
        load_bridge(missing)
    extra = _rewrite(src, tmp_path / "u.safetensors", lambda t: t.update({"projector.extra": torch.zeros(1)}))
    with pytest.raises(BridgeCheckpointError, match="1 unexpected tensor.*projector.extra"):
        load_bridge(extra)
    shaped = _rewrite(src, tmp_path / "s.safetensors",
                      lambda t: t.update({"projector.proj_in.bias": torch.zeros(7)}))
    with pytest.raises(BridgeCheckpointError, match=r"wrong shape \(projector.proj_in.bias: file \[7\], expected \[32\]"):
        load_bridge(shaped)


def test_damaged_header_fields(tmp_path, saved):
    bad_k = _rewrite(saved[0], tmp_path / "k.safetensors", edit_meta=lambda m: m.update(k="3"))
    with pytest.raises(BridgeCheckpointError, match="impossible Bridge.*must be 1 or 2"):
        load_bridge(bad_k)
    no_space = _rewrite(saved[0], tmp_path / "s.safetensors", edit_meta=lambda m: m.pop("teacher_space"))
    with pytest.raises(BridgeCheckpointError, match="damaged Bridge header"):
        read_bridge_metadata(no_space)


def test_truncated_and_corrupt_files(tmp_path, saved):
    data = saved[0].read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(BridgeCheckpointError, match="truncated or corrupt"):
        load_bridge(truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(random.Random(0).randbytes(2000))
    with pytest.raises(BridgeCheckpointError, match="truncated or corrupt"):
        load_bridge(garbage)
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(BridgeCheckpointError, match="truncated or corrupt"):
        load_bridge(empty)
    nan = _rewrite(saved[0], tmp_path / "n.safetensors",
                   lambda t: t["projector.proj_out.bias"].fill_(float("nan")))
    with pytest.raises(BridgeCheckpointError, match="NaN/inf"):
        load_bridge(nan)


# ------------------------------------------------------------------------------------------ fingerprint

def _ldm_layout(vae, prefix="first_stage_model.", dtype=None):
    """The same decoder weights under different names and order, attention weights as 1x1 convs, plus
    unrelated encoder / UNet weights: what an original-layout checkpoint holds."""
    sd = vae.state_dict()
    items = [(k, v) for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))]
    random.Random(1).shuffle(items)
    out = {}
    for i, (k, v) in enumerate(items):
        if v.ndim == 2:  # Linear q/k/v/proj in diffusers -> conv 1x1 in the original layout
            v = v[:, :, None, None]
        group = "post_quant_conv" if k.startswith("post_quant_conv.") else "decoder"
        out[f"{prefix}{group}.w{i}"] = v.clone() if dtype is None else v.to(dtype)
    out[f"{prefix}encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    return out


def test_fingerprint_ignores_layout_names_and_order(student_vae):
    fp = decoder_fingerprint(student_vae)
    assert decoder_fingerprint(student_vae.state_dict()) == fp
    assert decoder_fingerprint(_ldm_layout(student_vae)) == fp  # full-checkpoint prefix
    assert decoder_fingerprint(_ldm_layout(student_vae, prefix="")) == fp  # bare VAE file / ComfyUI VAE
    # The encoder is not part of it: another encoder, same decoder -> same fingerprint.
    other = tiny_vae(4)
    other.decoder.load_state_dict(student_vae.decoder.state_dict())
    other.post_quant_conv.load_state_dict(student_vae.post_quant_conv.state_dict())
    assert decoder_fingerprint(other) == fp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fingerprint_survives_half_precision(student_vae, dtype):
    stored = {"decoder_fingerprint": decoder_fingerprint(student_vae)}
    assert check_decoder_fingerprint(stored, decoder_fingerprint(_ldm_layout(student_vae, dtype=dtype))) is None


def test_a_fine_tuned_decoder_gives_a_warning_not_an_error(student_vae):
    tuned = tiny_vae(4)
    tuned.load_state_dict(student_vae.state_dict())
    with torch.no_grad():  # a fine-tune: every decoder weight moves by ~5 % of its tensor's RMS
        for p in tuned.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.square().mean().sqrt())
    fp, fp_tuned = decoder_fingerprint(student_vae), decoder_fingerprint(tuned)
    assert fp != fp_tuned
    message = check_decoder_fingerprint({"decoder_fingerprint": fp}, fp_tuned)
    assert message and "different student VAE decoder" in message and "retrain" in message
    assert check_decoder_fingerprint({"decoder_fingerprint": None}, fp_tuned) is None  # nothing recorded
    assert "Could not compare" in check_decoder_fingerprint({"decoder_fingerprint": "garbage"}, fp)


def test_load_warns_on_another_vae_only(saved, student_vae):
    path, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_bridge(path, student_vae=student_vae)
    with pytest.warns(UserWarning, match="different student VAE decoder"):
        bridge = load_bridge(path, student_vae=tiny_vae(4))
    with torch.no_grad():
        assert bridge(torch.randn(1, 4, 8, 8)).shape == (1, 16, 16, 16)  # still works


def test_fingerprint_needs_decoder_weights():
    with pytest.raises(ValueError, match="No VAE decoder weights found"):
        decoder_fingerprint({"model.diffusion_model.x": torch.zeros(3)})


def test_a_full_disk_while_saving_names_the_file(tmp_path, monkeypatch):
    """safetensors reports ENOSPC without the file name: the atomic save re-raises it as an OSError naming the file,
    so the CLI's one error line says which file could not be written; no temporary is left behind."""
    import errno

    import safetensors
    import safetensors.torch

    from bridge.checkpoint import save_safetensors_atomic
    from training.errors import explain

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "bridge.safetensors"
    with pytest.raises(OSError) as info:
        save_safetensors_atomic(target, {"a": torch.zeros(1)}, {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(target) in str(explain(info.value)) and "disk is full" in str(explain(info.value))
    assert list(tmp_path.iterdir()) == []
