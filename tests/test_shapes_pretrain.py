"""Shapes world: the rebuild command end to end (quick schedule), loading a world, determinism, the shipped judge."""

import json
import os

import pytest
import torch

from training.shapes import models
from training.shapes.evaluate import eval_prompts
from training.shapes.judge import load_judge, prompt_accuracy
from training.shapes.pretrain import main as pretrain_main
from training.shapes.render import make_split


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    assert pretrain_main(["--out", str(out), "--quick", "--jobs", "1"]) == 0
    return out


def test_quick_pretrain_writes_a_loadable_world(quick_world):
    for name in models.COMPONENTS:
        folder = quick_world / name
        assert (folder / "config.json").is_file(), name
        assert any(f.endswith(".safetensors") for f in os.listdir(folder)), name
        assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pkl")) for f in os.listdir(folder)), name
    report = json.loads((quick_world / "report.json").read_text())
    assert report["quick"] is True
    for stage in ("text_encoders", "judge", "student_vae", "teacher_vae", "latents", "teacher_phase1",
                  "teacher_phase2", "teacher_phase3", "student_base", "evaluation"):
        assert report["timings_s"][stage] >= 0
    assert report["total_s"] >= max(report["wall_s"].values())
    for row in ("teacher", "student_base", "student_base_one_step"):
        assert 0 <= report["evaluation"][row]["accuracy"] <= 1
        assert report["evaluation"][row]["fd"] >= 0

    world = models.load_shapes_world(str(quick_world), register=False)
    assert world.student_space.name == "shapes_student" and world.student_space.channels == 4
    assert world.teacher_space.name == "shapes_teacher" and world.teacher_space.channels == 16
    assert world.k == 2
    assert world.teacher_transformer.config.dual_attention_layers and world.teacher_transformer.config.qk_norm
    assert world.student_unet.config.cross_attention_dim == 32
    prompts = eval_prompts(2)
    g = torch.Generator().manual_seed(0)
    zt = world.sample_teacher(prompts, generator=g, steps=2)
    zs = world.sample_student(prompts, generator=g, steps=1, cfg=1.0)
    assert zt.shape == (2, 16, 16, 16) and zs.shape == (2, 4, 8, 8)
    assert world.decode_teacher(zt).shape == (2, 3, 128, 128)
    assert world.decode_student(zs).shape == (2, 3, 64, 64)
    s = world.sample_teacher_s(4000, generator=torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1
    assert s.median() == pytest.approx(0.75, abs=0.03)  # logit-normal median 0.5, shifted by 3 -> 0.75
    # The latent-space numbers were measured: model-space latents of real images have about unit std.
    images, _, _ = make_split("validation", 16, 64)
    from training.shapes.trainers import encode_latents
    z = world.student_space.to_model(encode_latents(world.student_vae, images))
    assert torch.isfinite(z).all()


def test_load_shapes_world_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain"):
        models.load_shapes_world(str(tmp_path))


def test_training_stages_are_deterministic():
    from training.shapes.trainers import train_vae

    def run():
        torch.manual_seed(0)
        return train_vae(models.build_student_vae(), 64, steps=2, batch_size=2, seed=5, log=None)

    a, b = run(), run()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_only_reruns_stages_and_gives_the_full_rebuilds_world(tmp_path):
    """--only teacher_phase3 student_base on a world built without them == the full rebuild (weights equal)."""
    from safetensors.torch import load_file

    def weights(folder, name):
        f = next(x for x in os.listdir(folder / name) if x.endswith(".safetensors"))
        return load_file(str(folder / name / f))

    full, partial = tmp_path / "full", tmp_path / "partial"
    assert pretrain_main(["--out", str(full), "--quick", "--jobs", "1"]) == 0
    assert pretrain_main(["--out", str(partial), "--quick", "--jobs", "1", "--teacher-phase3-steps", "0",
                          "--student-caption-noise", ""]) == 0
    before = weights(partial, "teacher_transformer")
    assert pretrain_main(["--out", str(partial), "--quick", "--jobs", "1", "--only", "teacher_phase3",
                          "student_base"]) == 0
    for name in ("teacher_transformer", "student_unet"):
        a, b = weights(full, name), weights(partial, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert any(not torch.equal(before[k], v) for k, v in weights(partial, "teacher_transformer").items())
    report = json.loads((partial / "report.json").read_text())
    assert report["rebuilt_stages"] == ["teacher_phase3", "student_base"]
    # A kept stage's settings must match: otherwise it would not be the same world.
    with pytest.raises(ValueError, match="--only needs the settings"):
        pretrain_main(["--out", str(partial), "--quick", "--jobs", "1", "--only", "student_base", "--teacher-lr", "0.5"])
    # A teacher phase starts from the one before: rerunning phase 2 alone would leave phase 3 stale.
    with pytest.raises(ValueError, match="every phase after"):
        pretrain_main(["--out", str(partial), "--quick", "--jobs", "1", "--only", "teacher_phase2"])


def test_student_captions_carry_no_information_about_the_noisy_attribute():
    """The knowledge gap: the student base's background word is independent of the image's background, every
    caption stays valid, and the other attributes are untouched."""
    from training.shapes.pretrain import noisy_captions
    from training.shapes.render import parse_caption, sample_scenes

    scenes = sample_scenes(3000, "train", seed=7)
    noisy = [parse_caption(c) for c in noisy_captions(scenes, "background", seed=11)]
    true = [scenes.attributes(i) for i in range(len(scenes))]
    for a, b in zip(noisy, true):
        assert (a["shape"], a["colour"], a["position"]) == (b["shape"], b["colour"], b["position"])
        assert a["background"] != a["colour"]
    agree = sum(a["background"] == b["background"] for a, b in zip(noisy, true)) / len(true)
    assert agree == pytest.approx(1 / 5, abs=0.03)  # chance among the 5 colours a background can take
    with pytest.raises(ValueError, match="student_caption_noise"):
        noisy_captions(scenes, "size", seed=0)


SHIPPED = os.path.isdir(os.path.join(models.DEFAULT_DIR, "judge"))


@pytest.mark.skipif(not SHIPPED, reason="no shipped world")
def test_shipped_world_meets_its_targets():
    """The shipped report: teacher >= 90% prompt accuracy (the issue's bar), student base clearly weaker, one-step
    student base far weaker; and the shipped weights reproduce the teacher's figure on a fresh sample."""
    report = json.loads(open(os.path.join(models.DEFAULT_DIR, "report.json")).read())
    assert not report["quick"]
    ev = report["evaluation"]
    assert ev["teacher"]["accuracy"] >= 0.9
    assert ev["student_base"]["accuracy"] < ev["teacher"]["accuracy"] - 0.03
    assert ev["student_base_one_step"]["accuracy"] < 0.5
    # The knowledge gap (world version 2): the student base draws the background at chance (1 in 5 colours) while
    # the teacher gets it right, and the teacher is at least as good as the student base on every attribute.
    world = models.load_shapes_world(register=False)
    assert world.config["version"] == 2 and world.config["knowledge_gap"]["attribute"] == "background"
    assert ev["student_base"]["background"] <= 0.2 + 0.1
    assert ev["teacher"]["background"] >= 0.9
    for attribute in ("shape", "colour", "background", "position"):
        assert ev["teacher"][attribute] >= ev["student_base"][attribute], attribute
    from training.shapes.evaluate import evaluate_generators

    teacher_only = {"teacher": lambda p, g: world.decode_teacher(world.sample_teacher(p, generator=g))}
    fresh = evaluate_generators(world, teacher_only, n=40, seed=7, batch_size=40)  # 40 prompts: about +-0.05
    assert fresh["teacher"]["accuracy"] >= 0.8


@pytest.mark.skipif(not SHIPPED, reason="no shipped world")
def test_shipped_judge_reads_held_out_renders():
    judge = load_judge(os.path.join(models.DEFAULT_DIR, "judge"))
    for res in (64, 128):
        images, captions, _ = make_split("test", 200, res, seed=123)
        assert prompt_accuracy(judge, images, captions)["accuracy"] >= 0.98
