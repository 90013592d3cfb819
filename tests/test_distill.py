"""Distillation: the closed-form teacher, and the trainer end to end on it and on tiny real models."""

from types import SimpleNamespace

import pytest
import torch

from training import dmd
from training.closed_form import ClosedFormTeacher


# ---------------------------------------------------------------------------------------------- closed form

def _random_teacher(shape=(16, 2, 2), rank=6, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    w = torch.randn(d, rank, generator=g) / rank**0.5
    cov = w @ w.T + 0.05 * torch.eye(d)
    mean = torch.randn(shape, generator=g)
    return ClosedFormTeacher(mean, cov, **kw), mean.reshape(-1), cov


def _posterior_mean(x_s, s, mean, cov):
    """Textbook Gaussian conditioning in float64: E[x0|x_s] = m + C_xy C_yy^-1 (y - E y) with y = (1-s) x0 + s n."""
    out = []
    for xi, si in zip(x_s.reshape(len(s), -1).double(), s.double()):
        c_xy = (1 - si) * cov.double()
        c_yy = (1 - si) ** 2 * cov.double() + si**2 * torch.eye(len(mean), dtype=torch.float64)
        out.append(mean.double() + c_xy @ torch.linalg.solve(c_yy, xi - (1 - si) * mean.double()))
    return torch.stack(out).float().reshape(x_s.shape)


def test_closed_form_x0_is_the_exact_posterior_mean_and_velocity_matches():
    teacher, mean, cov = _random_teacher()
    s = torch.tensor([0.05, 0.3, 0.7, 0.95])
    x_s = torch.randn(4, 16, 2, 2)
    x0 = teacher.predict_x0(x_s, s, None)
    torch.testing.assert_close(x0, _posterior_mean(x_s, s, mean, cov), atol=1e-4, rtol=1e-4)
    v = teacher.velocity(x_s, s, None)
    torch.testing.assert_close(x_s - s.view(-1, 1, 1, 1) * v, x0, atol=1e-4, rtol=1e-4)  # x0 = x_s - s v


def test_closed_form_samples_have_the_stated_moments_and_flow_matching_optimum():
    teacher, mean, cov = _random_teacher()
    x0 = teacher.sample(20000, generator=torch.Generator().manual_seed(1)).reshape(20000, -1)
    assert (x0.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(x0.T) - cov).abs().max() < 0.08
    # The exact denoiser has a lower flow-matching loss than a slightly perturbed one.
    x0 = x0[:512].reshape(512, 16, 2, 2)
    n = torch.randn_like(x0)
    s = torch.rand(512) * 0.96 + 0.02
    x_s = teacher.add_noise(x0, n, s)
    exact = dmd.flow_matching_loss(teacher.velocity(x_s, s, None), x0, n)
    teacher.model.mean += 0.3
    assert dmd.flow_matching_loss(teacher.velocity(x_s, s, None), x0, n) > exact


def test_guidance_is_true_cfg_on_the_conditional_mean():
    cond_proj = torch.randn(64, 8)
    teacher, _, _ = _random_teacher(cond_proj=cond_proj)
    cond = SimpleNamespace(prompt_embeds=torch.randn(3, 5, 8), pooled=torch.randn(3, 8))
    neg = SimpleNamespace(prompt_embeds=torch.zeros(3, 5, 8), pooled=torch.zeros(3, 8))
    x_s, s = torch.randn(3, 16, 2, 2), torch.tensor([0.2, 0.5, 0.8])
    c, u = teacher.predict_x0(x_s, s, cond), teacher.predict_x0(x_s, s, neg)
    assert (c - u).abs().max() > 0.01  # the condition moves the mean
    g = torch.tensor([1.0, 3.0, 7.5])
    torch.testing.assert_close(teacher.predict_x0(x_s, s, cond, neg_cond=neg, guidance=g),
                               u + g.view(-1, 1, 1, 1) * (c - u))
    torch.testing.assert_close(teacher.predict_x0(x_s, s, cond, neg_cond=neg, guidance=1.0), c)


def test_fake_adapter_starts_as_the_teacher_and_learns_another_gaussian():
    teacher, _, _ = _random_teacher()
    with pytest.raises(ValueError, match="add_fake_adapter"):
        with teacher.fake():
            pass
    teacher.add_fake_adapter(rank=4, alpha=4)
    x_s, s = torch.randn(8, 16, 2, 2), torch.rand(8)
    with torch.no_grad(), teacher.fake():
        fake_x0 = teacher.predict_x0(x_s, s, None)
    torch.testing.assert_close(fake_x0, teacher.predict_x0(x_s, s, None))
    torch.testing.assert_close(teacher.fake_moments()[1], teacher.target_moments()[1], atol=1e-4, rtol=1e-4)
    # Train the fake with the flow-matching loss on samples of a shifted, shrunk Gaussian.
    other, _, _ = _random_teacher(seed=3)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(teacher.fake_parameters(), lr=0.1)
    target_mean = other.target_moments()[0]
    err0 = (teacher.fake_moments()[0] - target_mean).norm()
    losses = []
    for _ in range(150):
        x0 = other.sample(64, generator=g)
        n = torch.randn(x0.shape, generator=g)
        s = dmd.sample_timesteps(64, generator=g)
        with teacher.fake():
            loss = dmd.flow_matching_loss(teacher.velocity(teacher.add_noise(x0, n, s), s, None), x0, n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])
    assert (teacher.fake_moments()[0] - target_mean).norm() < 0.3 * err0
    # The real teacher is untouched by the fake's training.
    torch.testing.assert_close(teacher.target_moments()[1], _random_teacher()[2], atol=1e-4, rtol=1e-4)


def test_closed_form_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[64,64\]"):
        ClosedFormTeacher(torch.zeros(16, 2, 2), torch.eye(10))
    with pytest.raises(ValueError, match="channels"):
        ClosedFormTeacher(torch.zeros(4, 2, 2), torch.eye(16))  # sd3 space has 16 channels
    teacher, _, _ = _random_teacher()
    with pytest.raises(ValueError, match=r"\[16, 2, 2\]"):
        teacher.predict_x0(torch.zeros(1, 16, 4, 4), torch.tensor([0.5]), None)


# ---------------------------------------------------------------------------------------------- trainer

@pytest.fixture
def trainer_deps():
    # The trainer builds on the loop, state and text modules: fail loudly if one is missing.
    import training.loop  # noqa: F401
    import training.models.text  # noqa: F401
    import training.state  # noqa: F401

def closed_form_world(seed: int = 0, latent: int = 2, n_target: int = 512, tap: str = "image"):
    """A tiny one-step student (SD1.5 UNet config), a tiny frozen SD1.5-style VAE decoder + random projector as
    the Bridge (k = 2) into a small 4-channel teacher space, and a closed-form teacher there.

    The teacher's Gaussian is fitted to the bridged image of a distribution the student can reach: its own
    initial samples, halved and shifted by a fixed pattern in SD1.5 raw space. Where the student must end up
    is therefore known, and its distance can be measured in the teacher's space."""
    from bridge.model import Bridge
    from bridge.spaces import LatentSpace, register_space
    from training.models.tiny import tiny_unet, tiny_vae
    from training.student import OneStepStudent

    space = register_space(LatentSpace("closed_form_test", 4, 8, 1.5305, 0.0609, 32))
    torch.manual_seed(seed)
    bridge = Bridge.create("sd15", space, k=2, student_vae=tiny_vae(4), tap=tap, width=32, depth=1,
                           stem_channels=8 if tap == "image" else 0, norm_groups=8)
    with torch.no_grad():
        bridge.projector.proj_out.weight.mul_(30)  # about unit-variance teacher latents from a random projector
    student = OneStepStudent(tiny_unet(block_out_channels=(32, 32)))
    pattern = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        z0 = student(student.make_noise(n_target, latent, generator=torch.Generator().manual_seed(1)),
                     torch.zeros(n_target, 4, 32))
        target = bridge.forward_model(0.5 * z0 + 0.5 * z0.std() * pattern)
    teacher = ClosedFormTeacher.from_samples(target, space=space, ridge=1e-3)
    return student, bridge, teacher


def _models(student, bridge, teacher, calls=None):
    from training.distill import DistillModels
    from training.models.text import TextCond

    def encode(width):
        def f(prompts):
            if calls is not None:
                calls.append(list(prompts))
            return TextCond(prompt_embeds=torch.zeros(len(prompts), 4, width), pooled=None)
        return f

    return DistillModels(student=student, bridge=bridge, teacher=teacher, encode_teacher=encode(8),
                         encode_student=encode(32), description={"test": "closed form"})


def _config(out_dir, **kw):
    from training.distill import DistillConfig

    # Plain DMD unless a test asks for pairs (the closed-form world has no teacher VAE to make the recipe's own).
    base = dict(out_dir=str(out_dir), prompts=["a", "b"], steps=60, batch_size=16, resolution=16, guidance=1.0,
                student_lr=3e-4, fake_lr=0.1, fake_updates=3, weight_decay=0.0, log_every=1, sample_every=1000,
                ckpt_every=1000, regression_n=0, regression_warmup_steps=0)
    base.update(kw)
    return DistillConfig(**base)


def _bridged_errors(student, bridge, teacher, n=2048):
    """Relative errors of the bridged student samples' mean and covariance against the teacher's."""
    mt, ct = teacher.target_moments()
    noise = student.make_noise(n, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x = bridge.forward_model(student(noise, torch.zeros(n, 4, 32))).flatten(1)
    return ((x.mean(0) - mt).norm() / mt.norm()).item(), ((torch.cov(x.T) - ct).norm() / ct.norm()).item()


def _metrics(out_dir):
    import json

    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("tap,options", [
    ("image", {}), ("features", {}),
    ("image", dict(grad_norm="student", grad_clip_relative=2.0, straight_through_clamp=True))],
    ids=["image", "features", "image-bridge-options"])
def test_distillation_moves_bridged_samples_to_the_teacher_distribution(tmp_path, trainer_deps, tap, options):
    """Issue 3 "Correctness": 60 steps (~10 s) of DMD against the closed-form teacher through the Bridge at
    least halve the mean error and cut the covariance error by a third, and the fake score's loss falls; through
    an 'image' Bridge and through a 'features' Bridge (the gradient then flows through the partial decode), and
    with the distiller's Bridge options (student-space normalisation, running-norm clip, straight-through clamp)."""
    from training.distill import Distiller

    student, bridge, teacher = closed_form_world(n_target=4096, tap=tap)
    assert bridge.tap == tap
    mean0, cov0 = _bridged_errors(student, bridge, teacher)
    assert mean0 > 0.3 and cov0 > 0.5  # a real distance to cover
    result = Distiller(_config(tmp_path, **options), _models(student, bridge, teacher)).run()
    assert result["step"] == 60 and not result.get("stopped_early")
    student.eval()
    mean1, cov1 = _bridged_errors(student, bridge, teacher)
    assert mean1 < 0.5 * mean0, (mean0, mean1)
    assert cov1 < 0.67 * cov0, (cov0, cov1)
    fake = [m["fake_loss"] for m in _metrics(tmp_path)]
    assert sum(fake[-20:]) / 20 < 0.9 * sum(fake[:5]) / 5, fake
    assert (tmp_path / "train_state.safetensors").exists()
    # The student checkpoint holds the trained generator.
    from training.models.export import load_student_unet

    loaded = load_student_unet(tmp_path / "student_unet.safetensors")
    noise = student.make_noise(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noise, torch.zeros(4, 4, 32)), student(noise, torch.zeros(4, 4, 32)))


class _StopAt:
    """Progress reporter that asks the trainer to stop after a given step (like a user's cancel)."""

    def __init__(self, stop, at):
        self.stop, self.at = stop, at

    def start(self, step):
        pass

    def update(self, step, metrics, preview=None):
        if step == self.at:
            self.stop.set()

    def close(self):
        pass


@pytest.mark.parametrize("options", [{}, dict(grad_norm="both", grad_clip_relative=1.5, student_cross_attention_lr=1e-3)],
                         ids=["dmd2", "running-clip-cross-attention-lr"])
def test_stop_saves_and_resume_repeats_the_uninterrupted_run(tmp_path, trainer_deps, options):
    from training import loop
    from training.distill import Distiller

    kw = dict(steps=6, batch_size=4, fake_updates=2, ema_decay=0.9, **options)  # the clip's running norm resumes too
    a = closed_form_world()
    Distiller(_config(tmp_path / "a", **kw), _models(*a)).run()

    b = closed_form_world()
    stop = loop.StopFlag()
    first = Distiller(_config(tmp_path / "b", **kw), _models(*b), progress=_StopAt(stop, 3), stop=stop).run()
    assert first["stopped_early"] and first["step"] == 3
    c = closed_form_world()  # a fresh process would rebuild everything from scratch
    second = Distiller(_config(tmp_path / "b", **kw), _models(*c)).run()
    assert second["resumed_from"] == 3 and second["step"] == 6
    # Training time counts both invocations: the first one's loop seconds (up to its stop checkpoint) come back.
    assert 0 < second["train_seconds"] - second["seconds"] <= first["train_seconds"]
    rows_a, rows_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)
    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        torch.testing.assert_close(pa, pc, msg=name)
    for pa, pc in zip(a[2].fake_parameters(), c[2].fake_parameters()):
        torch.testing.assert_close(pa, pc)
    with a[0].ema_weights(), c[0].ema_weights():
        torch.testing.assert_close(a[0].unet.conv_out.weight, c[0].unet.conv_out.weight)
    # Finished: running again does nothing.
    assert Distiller(_config(tmp_path / "b", **kw), _models(*closed_form_world())).run()["resumed_from"] == 6


def test_embeddings_are_cached_and_encoders_freed(tmp_path, trainer_deps):
    from training.distill import Distiller

    calls, freed = [], []
    models = _models(*closed_form_world(), calls=calls)
    models.free_text_encoders = lambda: freed.append(True)
    Distiller(_config(tmp_path, steps=1, batch_size=2, fake_updates=1, negative_prompt="blurry"), models).run()
    assert ["a", "b"] in calls and ["blurry"] in calls and freed
    n = len(calls)
    Distiller(_config(tmp_path, steps=2, batch_size=2, fake_updates=1, negative_prompt="blurry"),
              _models(*closed_form_world(), calls=calls)).run()
    assert len(calls) == n  # same prompts: read from the cache
    Distiller(_config(tmp_path, steps=3, batch_size=2, fake_updates=1, prompts=["a", "c"], negative_prompt="blurry"),
              _models(*closed_form_world(), calls=calls)).run()
    assert ["a", "c"] in calls[n:]  # prompts changed: encoded again


def test_bad_configs_and_mismatched_models_are_clear_errors(tmp_path, trainer_deps):
    from training.distill import DistillConfig, Distiller, read_prompts

    with pytest.raises(ValueError) as e:
        DistillConfig(out_dir=str(tmp_path), prompts=[], steps=-1, resolution=20, loss="sds", guidance=[5, 1],
                      timesteps="cosine", student_cross_attention_lr=-1e-3).validate()
    for text in ("prompts", "steps must be >= 0", "multiple of 8", "dmd, vsd", "low <= high", "uniform",
                 "student_cross_attention_lr"):
        assert text in str(e.value)
    (tmp_path / "p.txt").write_text("# comment\n\n a cat \nthe sea\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "the sea"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    student, bridge, _ = closed_form_world()
    sd3_teacher = ClosedFormTeacher(torch.zeros(16, 4, 4), torch.eye(256), space="sd3")
    with pytest.raises(ValueError, match="trained for this teacher"):
        Distiller(_config(tmp_path), _models(student, bridge, sd3_teacher))


_DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_distill as T
from training.distill import Distiller

out = sys.argv[1]
student, bridge, teacher = T.closed_form_world()
kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {{}}
d = Distiller(T._config(out, steps=3, batch_size=4, fake_updates=2, **kw), T._models(student, bridge, teacher))
d.run()
sums = {{"student": sum(p.double().sum().item() for p in student.parameters()),
        "fake": sum(p.double().sum().item() for p in teacher.fake_parameters()), "processes": d.accel.num_processes}}
with open(os.path.join(out, f"rank{{d.accel.process_index}}.json"), "w") as f:
    json.dump(sums, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, dict(gradient_accumulation=2, grad_norm="both")],
                         ids=["batch", "accumulation-student-space-normalisation"])
def test_two_cpu_processes_train_one_model_with_ddp(tmp_path, trainer_deps, options):
    """accelerate's DDP on 2 CPU processes (ACCELERATE_USE_CPU=1 makes `--multi_gpu` use gloo on the CPU):
    both processes end with identical student and fake-score weights, and only the main one logs; also with
    gradient accumulation (the all-reduce on the last micro-batch only)."""
    import json
    import os

    from conftest import launch_two_cpu_processes

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    proc = launch_two_cpu_processes([str(script), str(tmp_path), json.dumps(options)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2
    assert ranks[0]["student"] == ranks[1]["student"] and ranks[0]["fake"] == ranks[1]["fake"]
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.slow
def test_demo_command_runs_end_to_end_and_resumes(tmp_path, monkeypatch, trainer_deps):
    """`python -m training.run distill --demo` on the tiny SD1.5/SD3.5 world: checkpoints, previews, export."""
    from PIL import Image

    from training.run import main

    monkeypatch.chdir(tmp_path)  # the demo writes runs/distill-demo under the working directory
    args = ["distill", "--demo", "--fake-updates", "2", "--sample-every", "2", "--log-every", "1"]
    with pytest.warns(UserWarning, match="untrained"):
        assert main(args + ["--steps", "2", "--no-export"]) == 0
    out = tmp_path / "runs" / "distill-demo"
    with pytest.warns(UserWarning, match="untrained"):
        assert main(args + ["--steps", "4"]) == 0
    # The demo's recipe: 40 warm-up steps on its 16 pairs, then the DMD steps; resumed at 42, not restarted.
    assert [m["step"] for m in _metrics(out)] == list(range(1, 45))
    assert [bool(m.get("warmup")) for m in _metrics(out)] == [True] * 40 + [False] * 4
    for name in ("student_unet.safetensors", "train_state.safetensors", "student_sd15.safetensors",
                 "student_sd15/model_index.json", "cache/teacher.safetensors", "samples/step_000004.png"):
        assert (out / name).exists(), name
    grid = Image.open(out / "samples" / "step_000004.png")
    # 4 preview prompts x 2 seeds at the teacher's 128 px, in two rows: SD1.5 decode, and through the Bridge
    # decoded by the teacher VAE.
    assert grid.width >= 8 * 128 and grid.height >= 2 * 128


def test_nan_steps_are_skipped_and_counted_then_training_stops(tmp_path, trainer_deps):
    from training.distill import Distiller

    student, bridge, teacher = closed_form_world()
    real_predict, calls = teacher.predict_x0, []

    def flaky(x_s, s, cond, neg_cond=None, guidance=None):
        calls.append(1)
        out = real_predict(x_s, s, cond, neg_cond=neg_cond, guidance=guidance)
        return out * float("nan") if len(calls) in (3, 4) else out  # step 2's real and fake x0

    teacher.predict_x0 = flaky
    before = [p.detach().clone() for p in student.parameters()]
    result = Distiller(_config(tmp_path / "a", steps=3, batch_size=2, fake_updates=1),
                       _models(student, bridge, teacher)).run()
    assert result["nan_skipped"] == 1 and result["step"] == 3
    assert [m["step"] for m in _metrics(tmp_path / "a")] == [1, 3]  # the skipped step logs nothing
    assert any((a != b).any() for a, b in zip(before, student.parameters()))
    assert all(torch.isfinite(p).all() for p in student.parameters())

    student, bridge, teacher = closed_form_world()
    real_predict = teacher.predict_x0
    teacher.predict_x0 = lambda *a, **k: real_predict(*a, **k) * float("nan")
    with pytest.raises(Exception, match="(?i)nan|non-finite"):
        Distiller(_config(tmp_path / "b", steps=10, batch_size=2, fake_updates=1, max_nan_steps=3),
                  _models(student, bridge, teacher)).run()


def test_pull_back_statistics_and_student_space_normalisation(tmp_path):
    """grad_norm "student": each sample's gradient arriving at the student's latent is rescaled to the batch's mean
    norm before it flows into the student; the per-sample norm statistics are logged either way."""
    from training import loop
    from training.distill import DistillConfig, Distiller

    base = torch.randn(2, 4, 3, 3)
    g = torch.randn(2, 4, 3, 3)
    g[1] *= 4 / g[1].norm() * g[0].norm()  # sample 1's pulled-back gradient is 4x sample 0's
    for mode in ("teacher", "student"):
        d = Distiller.__new__(Distiller)
        d.cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"], grad_norm=mode)
        d.accel = loop.make_accelerator("no", cpu=True)
        a = torch.nn.Parameter(torch.ones(2, 1, 1, 1))
        z = a * base
        z_in = z.detach().requires_grad_(True)
        z_in.grad = g.clone()
        metrics = {}
        d._pull_back(z, z_in, metrics)
        norms = g.flatten(1).norm(dim=1)
        assert metrics["pullback_norm_max_over_median"] == pytest.approx(float(norms.max() / norms.median()))
        assert metrics["pullback_norm_cv"] == pytest.approx(float(norms.std() / norms.mean()), rel=1e-5)
        scale = norms.mean() / norms if mode == "student" else torch.ones(2)
        expected = (g * base).flatten(1).sum(1) * scale
        torch.testing.assert_close(a.grad.flatten(), expected)


def test_running_norm_clip_cuts_only_outliers(tmp_path):
    from training.distill import CLIP_EMA, DistillConfig, Distiller

    d = Distiller.__new__(Distiller)
    d.cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"], grad_clip_relative=2.0)
    d.clip_norm = [0.0, 0]
    assert d._clip_threshold() == float("inf")  # nothing to compare with yet
    d.clip_norm = [(1 - CLIP_EMA) * 3.0, 1]  # one step of norm 3: the bias-corrected mean is 3
    assert d._clip_threshold() == pytest.approx(6.0)
    d.cfg = DistillConfig(out_dir=str(tmp_path), prompts=["a"], grad_clip=1.0)
    assert d._clip_threshold() == 1.0  # fixed clip when the relative one is off


def test_straight_through_clamp_passes_saturated_gradients():
    from bridge.model import decode_to_image01
    from training.models.tiny import tiny_vae

    vae = tiny_vae(4).requires_grad_(False)
    z = (torch.randn(1, 4, 2, 2) * 30).requires_grad_(True)  # large latents: many saturated pixels
    plain = decode_to_image01(vae, z)
    st = decode_to_image01(vae, z, straight_through=True)
    torch.testing.assert_close(plain, st)  # the same forward value
    saturated = (plain == 0) | (plain == 1)
    assert saturated.any()
    (g_plain,) = torch.autograd.grad(plain.sum(), z)
    (g_st,) = torch.autograd.grad(st.sum(), z)
    assert not torch.allclose(g_plain, g_st)  # the clamp's zero gradient on saturated pixels is gone
    raw = (vae.decode(z).sample + 1) / 2
    (g_raw,) = torch.autograd.grad(raw.sum(), z)
    torch.testing.assert_close(g_st, g_raw)  # backward as if there were no clamp


def test_time_budget_ends_the_run_and_a_finished_run_stays_finished(tmp_path, trainer_deps):
    from training.distill import Distiller

    kw = dict(steps=1000, batch_size=2, fake_updates=1, max_train_seconds=1e-6)
    first = Distiller(_config(tmp_path, **kw), _models(*closed_form_world())).run()
    assert first["time_budget_reached"] and first["step"] == 1  # at least one step, then the budget ends it
    assert (tmp_path / "student_unet.safetensors").exists() and (tmp_path / "train_state.safetensors").exists()
    again = Distiller(_config(tmp_path, **kw), _models(*closed_form_world())).run()
    assert again["resumed_from"] == 1 and again["step"] == 1


def test_a_budget_spent_between_steps_still_saves_the_last_step(tmp_path, trainer_deps, monkeypatch):
    """The budget found spent right after a step's own reading (the clock runs on): the run ends saved at that step
    (it used to read the budget again in the loop's condition and stop before saving; a benchmark's time-budgeted
    row then had no student file)."""
    from training.distill import Distiller

    readings = []

    def spent_after_the_first_reading(self):
        readings.append(1)
        return len(readings) > 1

    monkeypatch.setattr(Distiller, "_out_of_time", spent_after_the_first_reading)
    kw = dict(steps=1000, batch_size=2, fake_updates=1, max_train_seconds=60.0)
    first = Distiller(_config(tmp_path, **kw), _models(*closed_form_world())).run()
    assert first["time_budget_reached"] and first["step"] == 2
    assert (tmp_path / "student_unet.safetensors").exists()
    again = Distiller(_config(tmp_path, **kw), _models(*closed_form_world())).run()
    assert again["resumed_from"] == 2 and again["step"] == 2  # nothing lost, nothing run again

def test_demo_command_with_a_student_lora_writes_the_lora_file(tmp_path, monkeypatch, trainer_deps, capsys):
    """`distill --student-lora-rank R`: beside the checkpoints, <out>/student_lora.safetensors in the kohya layout
    (lora_unet_* with lora_down / lora_up / alpha), rank R, every attention projection of the UNet."""
    import json
    import os

    from safetensors import safe_open

    from training.models.tiny import tiny_unet
    from training.run import main

    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="untrained"):
        assert main(["distill", "--demo", "--steps", "1", "--fake-updates", "1", "--sample-every", "1",
                     "--student-lora-rank", "4", "--student-lr", "1e-3", "--no-export", "--regression-n", "0"]) == 0
    lora = tmp_path / "runs" / "distill-demo" / "student_lora.safetensors"
    shown = f"Student LoRA (kohya layout, for the base SD1.5 model): {os.path.join('runs', 'distill-demo', lora.name)}"
    assert shown in capsys.readouterr().out
    with safe_open(str(lora), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["training_summary"])["steps"] == 1
        downs = [f.get_tensor(k) for k in keys if k.endswith(".lora_down.weight")]
    targets = [n for n, _ in tiny_unet().named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert {k.split(".")[0] for k in keys} == {"lora_unet_" + n.replace(".", "_") for n in targets}
    assert all(d.shape[0] == 4 for d in downs)


def test_a_damaged_embedding_cache_is_encoded_again(tmp_path, trainer_deps):
    """Issue 14: an empty cache.json or a truncated embedding file (a crash mid-write) re-encodes, not a traceback."""
    from training.distill import Distiller

    calls = []
    kw = dict(steps=1, batch_size=2, fake_updates=1)
    Distiller(_config(tmp_path, **kw), _models(*closed_form_world(), calls=calls)).run()
    n = len(calls)
    (tmp_path / "cache" / "cache.json").write_text("")
    Distiller(_config(tmp_path, resume=False, **kw),
              _models(*closed_form_world(), calls=calls)).run()
    assert len(calls) == 2 * n  # encoded again
    emb = tmp_path / "cache" / "teacher.safetensors"
    emb.write_bytes(emb.read_bytes()[:-50])
    Distiller(_config(tmp_path, resume=False, **kw), _models(*closed_form_world(), calls=calls)).run()
    assert len(calls) == 3 * n


def test_a_failure_mid_training_saves_the_last_finished_step(tmp_path, trainer_deps):
    """Issue 14: an error after some steps (here the disk filling up at the first preview) leaves a resumable state
    at the last finished step, and the error raised is the original one."""
    import errno

    from training.distill import Distiller

    d = Distiller(_config(tmp_path, steps=5, batch_size=2, fake_updates=1, sample_every=3),
                  _models(*closed_form_world()))

    def full_disk(step, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    d.preview = full_disk
    with pytest.raises(OSError, match="No space left"):
        d.run()
    resumed = Distiller(_config(tmp_path, steps=5, batch_size=2, fake_updates=1, sample_every=100),
                        _models(*closed_form_world())).run()
    assert resumed["resumed_from"] == 3 and resumed["step"] == 5


def _flux_world(family="flux_dev"):
    """A tiny SD1.5 student, a Bridge into the Flux space and a tiny Flux transformer teacher (real classes)."""
    from bridge.model import Bridge
    from training.models.tiny import tiny_flux_transformer, tiny_unet, tiny_vae
    from training.student import OneStepStudent
    from training.teachers import make_teacher

    torch.manual_seed(0)
    bridge = Bridge.create("sd15", "flux", k=2, student_vae=tiny_vae(4), width=32, depth=1, stem_channels=8,
                           norm_groups=8)
    model = tiny_flux_transformer(guidance_embeds=family == "flux_dev").requires_grad_(False)
    return OneStepStudent(tiny_unet(block_out_channels=(32, 32))), bridge, make_teacher(family, model)


def _flux_models(student, bridge, teacher, description=None):
    from training.distill import DistillModels
    from training.models.text import TextCond

    return DistillModels(
        student=student, bridge=bridge, teacher=teacher,
        encode_teacher=lambda p: TextCond(torch.zeros(len(p), 4, 64), torch.zeros(len(p), 32)),
        encode_student=lambda p: TextCond(torch.zeros(len(p), 4, 32)), description=description or {"test": "flux"})


@pytest.mark.parametrize("fake_guidance", [None, 1.0])
def test_flux_fake_score_is_trained_and_queried_at_its_guidance(tmp_path, trainer_deps, fake_guidance):
    """Flux dev (guidance embedding): by default the fake score takes the real score's guidance, per sample, both
    where it is queried and in every fake update; a set fake_guidance is used in both places instead."""
    from training.distill import Distiller

    student, bridge, teacher = _flux_world()
    calls = {"predict": [], "velocity": []}
    predict, velocity = teacher.predict_x0, teacher.velocity

    def rec_predict(x_s, s, cond, neg_cond=None, guidance=None):
        calls["predict"].append((teacher._fake_on, guidance))
        return predict(x_s, s, cond, neg_cond=neg_cond, guidance=guidance)

    def rec_velocity(x_s, s, cond, guidance=None):
        calls["velocity"].append(guidance)
        return velocity(x_s, s, cond, guidance=guidance)

    teacher.predict_x0, teacher.velocity = rec_predict, rec_velocity
    cfg = _config(tmp_path, steps=1, batch_size=3, fake_updates=3, guidance=[2.0, 6.0], fake_guidance=fake_guidance)
    Distiller(cfg, _flux_models(student, bridge, teacher)).run()
    (real_on, real_g), (fake_on, fake_g) = calls["predict"]
    assert not real_on and fake_on
    assert isinstance(real_g, torch.Tensor) and real_g.shape == (3,) and ((2 <= real_g) & (real_g <= 6)).all()
    if fake_guidance is None:
        assert fake_g is real_g
        assert calls["velocity"][0] is real_g  # the first update reuses the step's samples and their guidance
        assert all(isinstance(g, torch.Tensor) and ((2 <= g) & (g <= 6)).all() for g in calls["velocity"])
        assert not torch.equal(calls["velocity"][1], real_g)  # fresh samples, fresh guidance
    else:
        assert fake_g == 1.0 and calls["velocity"] == [1.0] * 3


def test_adversarial_teacher_is_warned_about_at_start_and_in_the_summary(tmp_path, trainer_deps, capsys):
    from training.distill import Distiller

    student, bridge, teacher = _flux_world("flux_schnell")
    d = Distiller(_config(tmp_path, steps=1, batch_size=2, fake_updates=1),
                  _flux_models(student, bridge, teacher, {"teacher": "flux1-schnell.safetensors"}))
    d.run()
    out = capsys.readouterr().out
    assert out.count("warning: the teacher is Flux schnell, an adversarially distilled") == 1
    from training.models.export import read_student_metadata

    summary = read_student_metadata(str(tmp_path / "student_unet.safetensors"))["training_summary"]
    assert "adversarially distilled" in summary["warnings"][0]


def test_fake_guidance_is_checked(tmp_path):
    with pytest.raises(ValueError, match="fake_guidance"):
        _config(tmp_path, fake_guidance=-1.0).validate()
    _config(tmp_path, fake_guidance=1.0).validate()


def test_an_offloaded_teacher_is_not_moved_and_its_fake_lora_trains(tmp_path, trainer_deps):
    """Distiller.setup leaves an offloaded teacher where its hooks keep it (diffusers refuses `.to` on it), and the
    fake LoRA peft adds afterwards trains (here the offload hooks run with the CPU as both devices)."""
    from training.distill import Distiller
    from training.models.loading import offload_blocks

    student, bridge, teacher = _flux_world()
    assert offload_blocks(teacher.model, "cpu", cpu_too=True)
    moves = []
    teacher.model.to = lambda *a, **kw: moves.append((a, kw))  # noqa: the instance's own `to`, to see calls
    d = Distiller(_config(tmp_path, steps=1, batch_size=2, fake_updates=2, fake_lr=1e-2),
                  _flux_models(student, bridge, teacher))
    d.prepare()
    assert moves == []
    lora = [p.detach().clone() for p in teacher.fake_parameters()]
    assert d.train_step(0) is not None
    assert any(not torch.equal(a, b) for a, b in zip(lora, teacher.fake_parameters()))


def _real_latents(tmp_path, bridge, n=16, shift=2.0):
    """'Real' teacher latents the discriminator can tell from the Bridge's outputs: shifted noise of their shape."""
    from training.distill import save_real_latents

    with torch.no_grad():
        shape = bridge.forward_model(torch.randn(1, 4, 2, 2)).shape[1:]
    latents = shift + torch.randn((n, *shape), generator=torch.Generator().manual_seed(5))
    return save_real_latents(str(tmp_path / "real.safetensors"), latents)


def test_gan_term_trains_its_head_reaches_the_student_and_resumes(tmp_path, trainer_deps):
    """DMD2's GAN term (Flux dev teacher, real class): the head on the fake score's last hidden states learns to tell
    real latents from the Bridge's outputs, its generator loss changes the student's update (against the same run
    without it), and a stopped run resumes to the uninterrupted one (the head is in the training state)."""
    from training import loop
    from training.distill import Distiller

    real = _real_latents(tmp_path, _flux_world()[1])
    kw = dict(steps=6, batch_size=4, fake_updates=2, fake_lr=1e-2, gan_weight=1.0, gan_disc_weight=1.0,
              gan_real_latents=real)
    d = Distiller(_config(tmp_path / "a", **kw), _flux_models(*(a := _flux_world())))
    d.run()
    rows = _metrics(tmp_path / "a")
    assert all({"gan_g", "gan_d_real", "gan_d_fake"} <= set(r) for r in rows)
    # The shifted real latents are easy to tell apart: by the end the head is right on most of both.
    assert rows[-1]["gan_d_real"] > 0.6 and rows[-1]["gan_d_fake"] > 0.6

    # The same run with a negligible generator weight draws the same random numbers and trains the same head: the
    # students differ only by the generator term.
    plain = _flux_world()
    Distiller(_config(tmp_path / "plain", **dict(kw, gan_weight=1e-12)), _flux_models(*plain)).run()
    assert any(not torch.allclose(p, q) for p, q in zip(a[0].parameters(), plain[0].parameters()))

    stop = loop.StopFlag()
    first = Distiller(_config(tmp_path / "b", **kw), _flux_models(*_flux_world()), progress=_StopAt(stop, 3),
                      stop=stop).run()
    assert first["stopped_early"]
    c = _flux_world()
    d2 = Distiller(_config(tmp_path / "b", **kw), _flux_models(*c))
    assert d2.run()["resumed_from"] == 3
    for ra, rb in zip(rows, _metrics(tmp_path / "b")):
        assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6)
    for pa, pc in zip(a[0].parameters(), c[0].parameters()):
        torch.testing.assert_close(pa, pc)
    for pa, pc in zip(d.gan_head.parameters(), d2.gan_head.parameters()):
        torch.testing.assert_close(pa, pc)


def test_gan_term_input_is_checked(tmp_path, trainer_deps):
    from training.distill import Distiller, save_real_latents
    from training.errors import UserError

    with pytest.raises(ValueError, match="gan_real_latents"):
        _config(tmp_path, gan_weight=1e-3).validate()
    with pytest.raises(ValueError, match="is not a file"):
        _config(tmp_path, gan_weight=1e-3, gan_real_latents=str(tmp_path / "missing.safetensors")).validate()
    with pytest.raises(ValueError, match="gan_weight"):
        _config(tmp_path, gan_weight=-1.0).validate()
    wrong = save_real_latents(str(tmp_path / "wrong.safetensors"), torch.zeros(4, 3, 4, 4))  # 3 channels, not 16
    with pytest.raises(UserError, match="expected finite teacher latents"):
        Distiller(_config(tmp_path / "w", steps=1, gan_weight=1e-3, gan_real_latents=wrong),
                  _flux_models(*_flux_world())).run()
    # A teacher without the output projection the head reads: a clear refusal, not a crash mid-step.
    real = save_real_latents(str(tmp_path / "real.safetensors"), torch.zeros(4, 4, 4, 4))
    with pytest.raises(UserError, match="proj_out"):
        Distiller(_config(tmp_path / "c", steps=1, gan_weight=1e-3, gan_real_latents=real),
                  _models(*closed_form_world())).run()
