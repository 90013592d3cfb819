"""Teacher-corrected regression pairs (training/pairs.py) and the distiller's regression term."""

import pytest
import torch

from test_distill import _config, _metrics, _models, _StopAt, closed_form_world


def _pairs_file(path, student, n=64, latent=2, seed=0, prompts=("a", "b")):
    """Pairs onto a fixed pattern per prompt, in the closed-form world's student space."""
    from training.pairs import save_pairs

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, student.space.channels, latent, latent), generator=g)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    pattern = {p: torch.randn((student.space.channels, latent, latent), generator=g) for p in prompts}
    latents = torch.stack([pattern[p] for p in chosen]) + 0.1 * noise
    save_pairs(str(path), noise, latents, chosen, test=True)
    return str(path)


def test_regression_gradient_is_added_at_its_share_of_the_dmd_gradient(tmp_path):
    """The regression gradient is rescaled to regression_weight x the distribution-matching gradient's norm and added
    to it; its loss is the mse of the student's model-space output on the drawn pairs."""
    from training import loop
    from training.distill import DistillConfig, Distiller
    from training.models.text import TextCond
    from training.pairs import load_pairs

    student, _, _ = closed_form_world()
    path = _pairs_file(tmp_path / "p.safetensors", student)
    d = Distiller.__new__(Distiller)
    d.cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"], regression_pairs=path, regression_weight=0.5,
                          regression_batch=8)
    d.accel = loop.make_accelerator("no", cpu=True)
    d.device = torch.device("cpu")
    d.nan_guard = loop.NaNGuard(5)
    d.m = _models(student, None, None)
    d.generator = student
    d.student_params = student.trainable_parameters()
    noise, latents, prompts, _ = load_pairs(path, 4, 2)
    d.pairs = (noise, latents, torch.tensor([0 if p == "a" else 1 for p in prompts]))
    d.text = {"pairs_student": TextCond(prompt_embeds=torch.randn(2, 4, 32), pooled=None)}
    d.pair_embeds = d.text["pairs_student"].prompt_embeds  # what setup() puts on the device
    dmd = [torch.randn_like(p) for p in d.student_params]
    for p, g in zip(d.student_params, dmd):
        p.grad = g.clone()
    metrics = {}
    assert d._add_regression(torch.Generator().manual_seed(3), metrics)
    combined = [p.grad.clone() for p in d.student_params]

    # The same draw by hand: the regression gradient alone.
    idx = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(3))
    for p in d.student_params:
        p.grad = None
    loss = torch.nn.functional.mse_loss(student.forward_model(noise[idx], d.text["pairs_student"].prompt_embeds[
        d.pairs[2][idx]]), latents[idx])
    loss.backward()
    reg = [p.grad for p in d.student_params]
    n_dmd = torch.linalg.vector_norm(torch.stack([g.norm() for g in dmd]))
    n_reg = torch.linalg.vector_norm(torch.stack([g.norm() for g in reg]))
    assert metrics["regression_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["regression_scale"] == pytest.approx((0.5 * n_dmd / n_reg).item(), rel=1e-4)
    for c, g, r in zip(combined, dmd, reg):
        torch.testing.assert_close(c, g + 0.5 * n_dmd / n_reg * r, rtol=1e-4, atol=1e-4)  # two forwards: float noise
    # The added part's norm is half the distribution-matching gradient's.
    added = torch.linalg.vector_norm(torch.stack([(c - g).norm() for c, g in zip(combined, dmd)]))
    assert added.item() == pytest.approx(0.5 * n_dmd.item(), rel=1e-4)


def test_the_regression_term_pulls_the_student_onto_its_pairs(tmp_path):
    """30 distillation steps with a dominant regression term fit the pairs (loss down by more than half); the
    per-step regression figures are logged."""
    from training.distill import Distiller

    student, bridge, teacher = closed_form_world()
    path = _pairs_file(tmp_path / "pairs.safetensors", student)
    Distiller(_config(tmp_path / "run", steps=30, batch_size=8, fake_updates=1, regression_pairs=path,
                      regression_weight=5.0, regression_batch=32), _models(student, bridge, teacher)).run()
    rows = _metrics(tmp_path / "run")
    losses = [r["regression_loss"] for r in rows]
    assert all(r["regression_scale"] > 0 and r["dmd_grad_norm"] > 0 for r in rows)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("warmup", [0, 3], ids=["joint", "warmup-then-joint"])
def test_stop_and_resume_with_the_regression_term_repeats_the_uninterrupted_run(tmp_path, warmup):
    """Stopped inside the warm-up (or the joint steps) and resumed, the run repeats the uninterrupted one; the
    warm-up's steps query no teacher and leave the fake score as it was."""
    from training import loop
    from training.distill import Distiller

    path = _pairs_file(tmp_path / "pairs.safetensors", closed_form_world()[0])
    kw = dict(steps=4, batch_size=4, fake_updates=1, regression_pairs=path, regression_weight=0.7,
              regression_warmup_steps=warmup, regression_warmup_lr=1e-3)
    a = closed_form_world()
    Distiller(_config(tmp_path / "a", **kw), _models(*a)).run()
    stop = loop.StopFlag()
    b = closed_form_world()
    first = Distiller(_config(tmp_path / "b", **kw), _models(*b), progress=_StopAt(stop, 2), stop=stop).run()
    assert first["step"] == 2
    if warmup:  # two warm-up steps so far: the fake score is still at its initialisation (the teacher)
        fresh = closed_form_world()[2]
        fresh.add_fake_adapter()
        for p0, p in zip(fresh.fake_parameters(), b[2].fake_parameters()):
            torch.testing.assert_close(p0, p)
    c = closed_form_world()
    assert Distiller(_config(tmp_path / "b", **kw), _models(*c)).run()["resumed_from"] == 2
    rows_a, rows_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, warmup + 5))
    assert [bool(r.get("warmup")) for r in rows_b] == [True] * warmup + [False] * 4
    for ra, rb in zip(rows_a, rows_b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)
    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        torch.testing.assert_close(pa, pc, msg=name)


def test_bad_pairs_files_and_settings_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    from training.distill import DistillConfig, Distiller
    from training.errors import UserError
    from training.pairs import FORMAT

    student, bridge, teacher = closed_form_world()

    def distiller(path):
        return Distiller(_config(tmp_path / "run", regression_pairs=str(path)), _models(student, bridge, teacher))

    with pytest.raises(UserError, match="does not exist.*training.run pairs|does not exist"):
        distiller(tmp_path / "missing.safetensors")
    (tmp_path / "pairs.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(UserError, match="never loaded"):
        distiller(tmp_path / "pairs.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(UserError, match="unreadable or damaged"):
        distiller(tmp_path / "junk.safetensors")
    save_file({"noise": torch.zeros(2, 4, 2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a regression pairs file"):
        distiller(tmp_path / "other.safetensors")
    _pairs_file(tmp_path / "big.safetensors", student, latent=4)
    with pytest.raises(UserError, match=r"\[N, 4, 2, 2\].*resolution"):
        distiller(tmp_path / "big.safetensors")
    meta = {"format": FORMAT, "prompts": '["a"]'}
    save_file({"noise": torch.zeros(2, 4, 2, 2), "latents": torch.zeros(2, 4, 2, 2)}, str(tmp_path / "few.safetensors"),
              metadata=meta)
    with pytest.raises(UserError, match="prompts in its metadata"):
        distiller(tmp_path / "few.safetensors")
    meta = {"format": FORMAT, "prompts": '["a", "b"]'}
    save_file({"noise": torch.zeros(2, 4, 2, 2), "latents": torch.full((2, 4, 2, 2), float("nan"))},
              str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="NaN"):
        distiller(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError) as e:
        DistillConfig(out_dir=str(tmp_path), prompts=["a"], regression_pairs="", regression_weight=-1.0,
                      regression_batch=-1, regression_warmup_steps=3, regression_warmup_lr=0.0,
                      regression_n=0).validate()
    for text in ("regression_pairs must be", "regression_weight must be >= 0", "regression_batch",
                 "regression_warmup_steps needs pairs", "regression_warmup_lr must be > 0"):
        assert text in str(e.value)


def test_teacher_corrected_pairs_carry_the_teachers_background_and_keep_the_layout(tmp_path):
    """On the shipped shapes world (student base blind to the background word, teacher not): the pairs' targets
    follow the prompt's background where the student base's own samples do not, and keep its shape, colour and
    position; the file records its prompts and settings and the same seed makes the same pairs."""
    import json

    from safetensors import safe_open

    from training.pairs import load_pairs, make_pairs
    from training.shapes import models
    from training.shapes import run as shapes_run
    from training.shapes.adapters import RoundTripBridge
    from training.shapes.evaluate import score_images

    world = models.load_shapes_world(register=False)
    bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space, k=world.k)
    dm = shapes_run.distill_models(world, "cross", bridge)
    prompts = shapes_run.training_prompts()
    kw = dict(resolution=models.STUDENT_RESOLUTION, s0=0.9, student_steps=25, student_cfg=2.0, teacher_steps=18,
              guidance=1.5, batch_size=64, seed=5, progress=False)
    path = str(tmp_path / "pairs.safetensors")
    assert make_pairs(dm, prompts, 48, path, **kw)["n"] == 48
    noise, targets, chosen, meta = load_pairs(path, 4, 8)
    assert json.loads(meta["s0"]) == 0.9 and set(chosen) <= set(prompts)
    with torch.no_grad():
        base = world.sample_student(chosen, noise=noise)  # what the pairs started from: the base's own samples
    t = score_images(world.judge, world.decode_student(targets), chosen)
    b = score_images(world.judge, world.decode_student(base), chosen)
    assert b["background"] <= 0.5 and t["background"] >= 0.8, (b, t)
    for attribute in ("shape", "colour", "position"):
        assert t[attribute] >= 0.8, t
    once, again = str(tmp_path / "once.safetensors"), str(tmp_path / "again.safetensors")
    make_pairs(dm, prompts, 6, once, **kw)
    make_pairs(dm, prompts, 6, again, **kw)
    with safe_open(once, framework="pt") as f, safe_open(again, framework="pt") as g:
        torch.testing.assert_close(f.get_tensor("latents"), g.get_tensor("latents"))


@pytest.mark.filterwarnings("ignore:No demo Bridge")
def test_making_pairs_resumes_batch_by_batch_and_starts_over_for_other_settings(tmp_path):
    """Stopped after a batch, the next call continues there and makes exactly the uninterrupted pairs; a batch file
    that does not read is made again; other settings start the partial folder over; the callback sees every batch."""
    import os

    from training import loop
    from training.models.assemble import demo_distill_models
    from training.pairs import load_pairs, make_pairs

    dm = demo_distill_models(0)[0]
    prompts = ["a red circle", "a blue square", "a green star"]
    kw = dict(resolution=64, student_steps=2, teacher_steps=2, guidance=2.0, batch_size=2, seed=3, progress=False)
    whole = str(tmp_path / "whole.safetensors")
    assert make_pairs(dm, prompts, 5, whole, **kw)["complete"]
    path = str(tmp_path / "pairs.safetensors")
    partial = path + ".partial"
    stop, seen = loop.StopFlag(), []

    def callback(done, total):
        seen.append((done, total))
        stop.set()

    first = make_pairs(dm, prompts, 5, path, **kw, callback=callback, stop=stop)
    assert not first["complete"] and seen == [(1, 3)] and not os.path.exists(path)
    assert sorted(os.listdir(partial)) == ["batch_000000.safetensors", "job.json"]
    # The second batch made, then damaged (a disk error): read back as missing and made again.
    make_pairs(dm, prompts, 5, path, **kw, callback=callback, stop=stop)
    with open(os.path.join(partial, "batch_000001.safetensors"), "r+b") as f:
        f.truncate(20)
    seen.clear()
    done = make_pairs(dm, prompts, 5, path, **kw, callback=lambda k, n: seen.append((k, n)))
    assert done["complete"] and seen == [(2, 3), (3, 3)] and not os.path.exists(partial)
    assert done["seconds"] > 0
    for a, b in zip(load_pairs(whole, 4, 8), load_pairs(path, 4, 8)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, list):
            assert a == b
    # A partial folder of other settings is not continued: the pairs of the new settings come out.
    stop.clear()
    make_pairs(dm, prompts, 5, str(tmp_path / "other.safetensors"), **kw, callback=lambda k, n: stop.set(), stop=stop)
    os.replace(str(tmp_path / "other.safetensors.partial"), partial)
    os.remove(path)
    kw2 = dict(kw, seed=4)
    make_pairs(dm, prompts, 5, path, **kw2)
    make_pairs(dm, prompts, 5, str(tmp_path / "fresh.safetensors"), **kw2)
    assert torch.equal(load_pairs(path, 4, 8)[1], load_pairs(str(tmp_path / "fresh.safetensors"), 4, 8)[1])


def test_the_pairs_bar_counts_pairs_and_moves_after_every_sampler_step(tmp_path, monkeypatch):
    """Issue 24: a batch of pairs takes minutes on a busy CPU, so the bar (unit: pairs, with tqdm's ETA) advances
    after every student and teacher step, not once per batch; the pairs are the same with or without it."""
    import tqdm.auto

    from training.pairs import make_pairs
    from training.shapes import models
    from training.shapes import run as shapes_run
    from training.shapes.adapters import RoundTripBridge

    updates = []

    class Recorder(tqdm.auto.tqdm):
        def update(self, n=1):
            updates.append((self.total, self.unit, n))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    world = models.load_shapes_world(register=False)
    bridge = RoundTripBridge(world.student_vae, world.teacher_vae, world.student_space, world.teacher_space, k=world.k)
    dm = shapes_run.distill_models(world, "cross", bridge)
    kw = dict(resolution=models.STUDENT_RESOLUTION, s0=0.9, student_steps=3, student_cfg=2.0, teacher_steps=2,
              guidance=1.5, batch_size=4, seed=5)
    shown, quiet = str(tmp_path / "shown.safetensors"), str(tmp_path / "quiet.safetensors")
    make_pairs(dm, shapes_run.training_prompts(), 6, shown, progress=True, **kw)
    assert len(updates) == 2 * (3 + 2)  # two batches (4 + 2 pairs), five sampler steps each
    assert {(total, unit) for total, unit, _ in updates} == {(6, "pair")}
    assert sum(n for _, _, n in updates) == pytest.approx(6)
    make_pairs(dm, shapes_run.training_prompts(), 6, quiet, progress=False, **kw)
    from safetensors import safe_open

    with safe_open(shown, framework="pt") as f, safe_open(quiet, framework="pt") as g:
        assert torch.equal(f.get_tensor("latents"), g.get_tensor("latents"))
