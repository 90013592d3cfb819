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
