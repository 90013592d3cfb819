"""Issue 14, per class: what the library refuses (with the file or option and the fix) and what it repairs."""

import json
import math
import os

import pytest
import torch


# ---------------------------------------------------------------------------------------------- config values

def _bridge_config(tmp_path, **kw):
    from training.bridge_train import BridgeTrainConfig

    base = dict(out_dir=str(tmp_path / "run"), images=str(tmp_path), steps=10, student_res=64, teacher_res=128)
    base.update(kw)
    return BridgeTrainConfig(**base)


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", 0), ("val_every", 0), ("student_res", 0), ("student_res", 7), ("student_res", 63),
    ("lr", math.inf), ("lr", math.nan), ("lr", -1e-4), ("attn_weight", math.nan), ("attn_weight", -0.1),
    ("grad_clip", -1.0), ("grad_clip", math.nan), ("grad_clip", 0.0), ("warmup_steps", -5), ("weight_decay", math.inf),
    ("seed", 2**70), ("seed", -1), ("val_fraction", math.nan), ("steps", 2.5), ("steps", True),
])
def test_bridge_config_refuses_zero_nan_inf_and_negative_values(tmp_path, field, value):
    kw = {field: value}
    if field == "student_res":
        kw["teacher_res"] = 2 * value
    with pytest.raises(ValueError, match=field):
        _bridge_config(tmp_path, **kw).validate()
    _bridge_config(tmp_path).validate()  # the defaults pass


def test_bridge_config_needs_teacher_latents_the_transformer_can_patch(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        _bridge_config(tmp_path, k=1, student_res=72, teacher_res=72).validate()
    _bridge_config(tmp_path, k=1, student_res=64, teacher_res=64).validate()


@pytest.mark.parametrize("field,value", [
    ("guidance", math.nan), ("guidance", math.inf), ("guidance", -1.0), ("guidance", [2.0, math.nan]),
    ("student_lr", math.inf), ("fake_lr", math.nan), ("grad_clip", math.nan), ("fake_alpha", 0.0),
    ("fake_alpha", math.inf), ("weight_decay", -0.1), ("val_seeds", []), ("val_seeds", ["a"]), ("seed", 2**70),
    ("sample_every", 0), ("batch_size", 0), ("resolution", 0), ("resolution", -8), ("s_min", math.nan),
    ("ema_decay", math.nan), ("val_prompts", []),
])
def test_distill_config_refuses_zero_nan_inf_and_negative_values(tmp_path, field, value):
    from training.distill import DistillConfig

    cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"], **{field: value})
    with pytest.raises(ValueError, match=field if field != "val_seeds" or value == [] else "each of val_seeds"):
        cfg.validate()
    DistillConfig(out_dir=str(tmp_path), prompts=["a"]).validate()


# ---------------------------------------------------------------------------------------------- files

def test_non_utf8_prompts_file_names_the_file_and_the_fix(tmp_path):
    from training.distill import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts\.txt.*not UTF-8.*save it as UTF-8"):
        read_prompts(str(path))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    from training.loop import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    log = JsonlLogger(path, resume_step=2)
    log.log({"step": 3, "loss": 0.3})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.3
    # A complete last line without its newline is kept, and the next line does not run into it.
    path.write_text('{"step": 1}\n{"step": 2}')
    JsonlLogger(path, resume_step=2).log({"step": 3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_an_image_over_the_decompression_limit_is_refused_by_name(tmp_path, monkeypatch):
    from PIL import Image

    from training import data

    for i in range(3):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(tmp_path / f"img_{i}.png")
    assert len(data.scan_images(tmp_path)) == 3
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is more than twice that: PIL refuses to open
    with pytest.raises(ValueError, match=r"img_0\.png.*too large.*downscale it"):
        data.scan_images(tmp_path)


def test_output_folder_that_is_a_file_or_unwritable_is_refused_first(tmp_path):
    from training.errors import UserError, output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        output_dir(tmp_path / "f")
    with pytest.raises(UserError, match="part of the path is a file"):
        output_dir(tmp_path / "f" / "sub")
    assert output_dir(tmp_path / "a" / "b") == str(tmp_path / "a" / "b") and (tmp_path / "a" / "b").is_dir()


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    from training.models.export import export_diffusers
    from training.models.tiny import tiny_clip_text, tiny_clip_tokenizer, tiny_unet, tiny_vae

    folder = tmp_path_factory.mktemp("sd15") / "model"
    export_diffusers(folder, tiny_unet(), tiny_vae(4), tiny_clip_text("L"), tiny_clip_tokenizer())
    return folder


@pytest.mark.parametrize("index", ["", "[1, 2]", "{not json", b"\xff\xfe"])
def test_damaged_model_index_names_the_file(sd15_folder, tmp_path, index):
    import shutil

    from training.models import loading

    folder = tmp_path / "m"
    shutil.copytree(sd15_folder, folder)
    path = folder / "model_index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(loading.ModelLoadError, match="model_index.json"):
        loading.load_sd15(folder, components=("vae",))


def test_diffusers_folder_with_a_missing_weight_is_refused_not_left_on_meta(sd15_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from training.models import loading

    folder = tmp_path / "m"
    shutil.copytree(sd15_folder, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["decoder.conv_in.bias"]
    save_file(sd, weights)
    with pytest.raises(loading.ModelLoadError, match=r"incomplete vae/.*decoder\.conv_in\.bias.*re-download"):
        loading.load_sd15(folder, components=("vae",), device="cpu")


def test_sampling_more_than_memory_holds_is_one_error_line(sd15_folder, tmp_path, capsys):
    from training.run import main

    rc = main(["sample", "--student", str(sd15_folder), "--prompt", "a cat", "--resolution", str(8 * 10**6),
               "--device", "cpu", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Out of memory" in err and "--resolution" in err, err[-2000:]
    assert os.listdir(tmp_path / "s") == []


def test_a_corrupt_student_checkpoint_is_refused_by_name(tmp_path):
    from training.models.assemble import load_student_for_sampling

    path = tmp_path / "student_unet.safetensors"
    tensors = {"w": torch.zeros(1000)}
    from safetensors.torch import save_file

    save_file(tensors, path)
    path.write_bytes(path.read_bytes()[:-200])  # truncated
    with pytest.raises(ValueError, match=r"student_unet\.safetensors.*not a readable safetensors"):
        load_student_for_sampling(str(path), None, "cpu")
