import pytest
import torch

from training.dmd import (dmd_gradient, distribution_matching_loss, flow_matching_loss, loss_from_gradient,
                          sample_guidance, sample_timesteps, vsd_gradient)


def _step(x0, loss_fn, lr):
    """One plain gradient-descent step on x with a loss built from x."""
    x = x0.clone().requires_grad_(True)
    loss_fn(x).backward()
    return (x - lr * x.grad * x.numel()).detach()


@pytest.mark.parametrize("kind", ["dmd", "vsd"])
def test_step_moves_toward_real_x0_when_fake_is_identity(kind):
    x = torch.randn(4, 16, 4, 4)
    x0_real = torch.randn(4, 16, 4, 4)
    s = torch.full((4,), 0.5)
    # Fake score = identity (it predicts x itself): the only signal is the real teacher's.
    new = _step(x, lambda x_: distribution_matching_loss(kind, x_, x0_real, x_.detach(), s)[0], lr=0.1)
    before = (x - x0_real).flatten(1).norm(dim=1)
    after = (new - x0_real).flatten(1).norm(dim=1)
    assert (after < before).all()


def test_step_moves_away_from_fake_x0():
    x = torch.randn(4, 16, 4, 4)
    x0_real = x + 0.01 * torch.randn_like(x)
    x0_fake = x + torch.randn_like(x)
    new = _step(x, lambda x_: distribution_matching_loss("dmd", x_, x0_real, x0_fake, torch.rand(4))[0], lr=1e-3)
    assert ((new - x0_fake).flatten(1).norm(dim=1) > (x - x0_fake).flatten(1).norm(dim=1)).all()


def test_dmd_gradient_formula_normalisation_and_zero_when_scores_agree():
    x, r, f = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    g = dmd_gradient(x, r, f)
    expected = ((x - r) - (x - f)) / (x - r).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, expected)
    # Scale-free: the same configuration at 10x the latent scale gives the same gradient.
    torch.testing.assert_close(dmd_gradient(10 * x, 10 * r, 10 * f), g)
    assert dmd_gradient(x, r, r).abs().max() == 0


def test_dmd_gradient_is_finite_when_a_sample_equals_the_real_x0():
    x, f = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    r = x.clone()
    r[1] = torch.randn(4, 2, 2)
    g = dmd_gradient(x, r, f)  # sample 0: mean |p_real| = 0
    assert torch.isfinite(g).all() and g[0].abs().max() == 0 and g[1].abs().max() > 0


def test_loss_gradient_equals_grad_over_numel():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    grad = torch.randn(2, 4, 3, 3)
    loss_from_gradient(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_vsd_gradient_is_sigma_squared_eps_difference_for_a_flow():
    x0 = torch.randn(3, 4, 2, 2)
    n = torch.randn(3, 4, 2, 2)
    s = torch.tensor([0.1, 0.5, 0.9])
    sb = s.view(-1, 1, 1, 1)
    x_s = (1 - sb) * x0 + sb * n
    v_real, v_fake = torch.randn_like(x0), torch.randn_like(x0)
    eps = lambda v: x_s + (1 - sb) * v  # noqa: E731  rectified flow: eps from velocity
    x0_of = lambda v: x_s - sb * v  # noqa: E731
    torch.testing.assert_close(vsd_gradient(x0_of(v_real), x0_of(v_fake), s),
                               sb**2 * (eps(v_real) - eps(v_fake)), atol=1e-5, rtol=1e-5)


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="dmd, vsd"):
        distribution_matching_loss("sds", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))


def test_flow_matching_loss_is_zero_at_the_true_velocity():
    x0, n = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    assert flow_matching_loss(n - x0, x0, n).item() == 0
    assert flow_matching_loss(n + x0, x0, n).item() == pytest.approx(4 * x0.square().mean().item(), rel=1e-5)


class _TeacherS:
    def sample_s(self, n, generator=None, device=None, resolution=None):
        return torch.ones(n)  # all mass at the end: must be squeezed into the range


@pytest.mark.parametrize("dist", ["uniform", "logit_normal", "teacher"])
def test_timesteps_stay_in_range(dist):
    g = torch.Generator().manual_seed(0)
    s = sample_timesteps(2000, dist, generator=g, teacher=_TeacherS())
    assert s.shape == (2000,) and s.min() >= 0.02 and s.max() <= 0.98
    if dist == "uniform":
        assert s.min() < 0.05 and s.max() > 0.95
    if dist == "logit_normal":
        assert abs(s.median().item() - 0.5) < 0.05
    if dist == "teacher":
        torch.testing.assert_close(s, torch.full((2000,), 0.98))


def test_timesteps_are_reproducible_and_validated():
    a = sample_timesteps(8, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="uniform, logit_normal, teacher"):
        sample_timesteps(2, "cosine")
    with pytest.raises(ValueError, match="needs the teacher"):
        sample_timesteps(2, "teacher")
    with pytest.raises(ValueError, match="s_min < s_max"):
        sample_timesteps(2, s_min=0.9, s_max=0.1)


def test_guidance_fixed_or_per_sample_range():
    assert sample_guidance(4, 3.5) == 3.5
    g = sample_guidance(1000, (2.0, 8.0), generator=torch.Generator().manual_seed(0))
    assert g.shape == (1000,) and g.min() >= 2 and g.max() <= 8 and g.std() > 1
    with pytest.raises(ValueError, match="low <= high"):
        sample_guidance(2, (5.0, 1.0))
