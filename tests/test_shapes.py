"""Shapes world: rendering, captions, tokenizer, text encoders, judge metrics."""

import pytest
import torch

from training.shapes import render as R
from training.shapes import text as T
from training.shapes.judge import Judge, frechet_distance, prompt_accuracy


def test_render_is_deterministic_per_split_and_seed():
    a, caps_a, _ = R.make_split("train", 24, 32, seed=3)
    b, caps_b, _ = R.make_split("train", 24, 32, seed=3)
    c, caps_c, _ = R.make_split("validation", 24, 32, seed=3)
    assert torch.equal(a, b) and caps_a == caps_b
    assert not torch.equal(a, c) and caps_a != caps_c
    assert a.shape == (24, 3, 32, 32) and a.min() >= 0 and a.max() <= 1


def test_captions_match_attributes_and_parse_back():
    scenes = R.sample_scenes(200, "test", seed=1)
    for i, caption in enumerate(scenes.captions()):
        attrs = R.parse_caption(caption)
        assert attrs == scenes.attributes(i)
        assert attrs["colour"] != attrs["background"]
    assert R.caption_of(dict(shape="triangle", colour="red", background="blue", position="top left")) == \
        "a red triangle on a blue background, top left"
    assert len(R.all_captions()) == len(set(R.all_captions())) == 4 * 6 * 5 * 5


@pytest.mark.parametrize("bad", ["a red dog on a blue background, top left", "a red circle on a red background, center",
                                 "hello"])
def test_parse_caption_rejects_bad_captions(bad):
    with pytest.raises(ValueError, match="(?i)caption"):
        R.parse_caption(bad)


def test_render_draws_the_caption():
    """Colours where they should be: the shape's colour at its centre, the background in the far corner."""
    scenes = R.scenes_from_captions(["a red square on a blue background, top left",
                                     "a yellow circle on a black background, bottom right"])
    img = R.render(scenes, 64)
    red, blue = torch.tensor(R.COLOURS["red"]), torch.tensor(R.COLOURS["blue"])
    yellow, black = torch.tensor(R.COLOURS["yellow"]), torch.tensor(R.COLOURS["black"])
    cx, cy = (int((R.POSITIONS["top left"][k] + scenes.offset[0, k]) * 64) for k in (0, 1))
    assert torch.allclose(img[0, :, cy, cx], red, atol=1e-5)
    assert torch.allclose(img[0, :, 63, 63], blue, atol=1e-5)
    cx, cy = (int((R.POSITIONS["bottom right"][k] + scenes.offset[1, k]) * 64) for k in (0, 1))
    assert torch.allclose(img[1, :, cy, cx], yellow, atol=1e-5)
    assert torch.allclose(img[1, :, 0, 0], black, atol=1e-5)
    # Anti-aliased: edge pixels mix the two colours.
    assert ((img[0] - blue.view(3, 1, 1)).abs().sum(0) > 0.05).logical_and(
        (img[0] - red.view(3, 1, 1)).abs().sum(0) > 0.05).any()


def test_render_is_resolution_consistent():
    """A 128 px render averaged down to 64 px is (almost) the 64 px render: same scene at any resolution."""
    scenes = R.sample_scenes(16, "train", seed=5)
    big = torch.nn.functional.avg_pool2d(R.render(scenes, 128), 2)
    assert (big - R.render(scenes, 64)).abs().mean() < 0.01


def test_tokenizer_round_trip_and_errors():
    tok = T.build_tokenizer()
    captions = R.all_captions()
    ids = T.tokenize(tok, captions)
    assert ids.shape == (len(captions), T.MAX_LENGTH)
    assert [tok.decode(row, skip_special_tokens=True) for row in ids] == captions
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert T.tokenize(tok, [""])[0, 1] == tok.eos_token_id  # the empty prompt (CFG) is start + end
    with pytest.raises(ValueError, match="outside the shapes vocabulary"):
        T.tokenize(tok, ["a purple dog"])


def test_text_encoders_differ_per_caption_and_between_roles():
    tok = T.build_tokenizer()
    prompts = ["a red circle on a blue background, center", "a red circle on a blue background, top left",
               "a green circle on a blue background, center"]
    teacher, student = T.build_text_encoder("teacher"), T.build_text_encoder("student")
    embeds, pooled = T.encode_teacher(prompts, tok, teacher)
    hidden = T.encode_student(prompts, tok, student)
    assert embeds.shape == (3, T.MAX_LENGTH, 64) and pooled.shape == (3, 64) and hidden.shape == (3, T.MAX_LENGTH, 32)
    for x in (embeds, pooled, hidden):
        flat = x.flatten(1)
        assert torch.cdist(flat, flat).triu(1)[torch.ones(3, 3).triu(1).bool()].min() > 1e-3
    # Frozen and seeded: rebuilding gives the same encoder.
    assert torch.equal(T.encode_teacher(prompts, tok, T.build_text_encoder("teacher"))[0], embeds)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="teacher' or 'student"):
        T.build_text_encoder("vae")


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) < 0.1
    # Shifted mean by 1 in every dim: FD ~ 8 (|mu|^2); scaled by 2: FD ~ 8 * (2 - 1)^2.
    assert frechet_distance(a, b + 1) == pytest.approx(8, rel=0.1)
    assert frechet_distance(a, 2 * b) == pytest.approx(8, rel=0.1)


def test_prompt_accuracy_needs_every_attribute():
    judge = Judge()
    with torch.no_grad():  # a judge that always answers index 0 for every attribute
        judge.head.weight.zero_()
        judge.head.bias.zero_()
        for start in (0, 4, 10, 16):
            judge.head.bias[start] = 1.0
    images = torch.rand(2, 3, 64, 64)
    # Judged as "a red circle on a red background, top left" both times: each caption gets 3 of 4 right.
    first = "a red circle on a green background, top left"
    res = prompt_accuracy(judge, images, [first, "a green square on a red background, center"])
    assert res["shape"] == res["colour"] == res["background"] == res["position"] == 0.5
    assert res["accuracy"] == 0.0
    with pytest.raises(ValueError, match="captions"):
        prompt_accuracy(judge, images, [first])
