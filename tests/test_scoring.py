"""Teacher scoring math (training/scoring.py) on a closed-form teacher.

The "teacher" knows the data exactly: under the positive prompt latents are N(mu_pos, v I), under the
negative one N(mu_neg, v I). Its x0 prediction is then the exact posterior mean, so what a good score must
say is known in advance.
"""

import pytest
import torch

from training.scoring import (RANK_BY, TeacherScores, flow_add_noise, parse_levels, seed_noise,
                              teacher_scores)

SHAPE = (4, 6, 6)
VAR = 0.25


def gaussian_teacher(mu_pos: float, mu_neg: float, var: float = VAR):
    """Exact E[x0 | x_s] for x_s = (1-s) x0 + s n with x0 ~ N(mu, var) per element."""
    calls = []

    def denoise(x, sigma, which):
        calls.append((which, x.clone(), sigma.clone()))
        mu = mu_pos if which == "positive" else mu_neg
        s = sigma.view(-1, 1, 1, 1)
        c = (1 - s) * var / ((1 - s) ** 2 * var + s ** 2)
        return mu + c * (x - (1 - s) * mu)

    denoise.calls = calls
    return denoise


def samples(mu: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mu + VAR ** 0.5 * torch.randn((n, *SHAPE), generator=g)


def test_plausible_samples_have_lower_denoise_error():
    teacher = gaussian_teacher(mu_pos=1.0, mu_neg=-1.0)
    good = samples(1.0, 3, seed=1)
    bad = samples(1.0, 3, seed=2) + 3.0  # far outside what the teacher has seen
    x0 = torch.cat([bad[:1], good, bad[1:]])  # good ones at 1..3
    scores = teacher_scores(x0, teacher, sigmas=[0.3, 0.6], seeds=[0, 1])
    assert len(scores) == 6
    assert scores.denoise_error[1:4].max() < scores.denoise_error[[0, 4, 5]].min()
    assert sorted(scores.select(3, by="denoise_error")) == [1, 2, 3]


def test_alignment_says_which_prompt_explains_the_sample():
    teacher = gaussian_teacher(mu_pos=1.0, mu_neg=-1.0)
    x0 = torch.cat([samples(1.0, 2, seed=3), samples(-1.0, 2, seed=4)])
    scores = teacher_scores(x0, teacher, sigmas=[0.5, 0.8], seeds=[7])
    assert (scores.text_alignment[:2] > 0.2).all()  # the prompt helps a lot
    assert (scores.text_alignment[2:] < 0).all()  # the negative explains these better
    assert scores.order("text_alignment")[:2] in ([0, 1], [1, 0])
    # A teacher that ignores the prompt sees no alignment at all.
    neutral = teacher_scores(x0, gaussian_teacher(0.0, 0.0), sigmas=[0.5], seeds=[7])
    assert torch.allclose(neutral.text_alignment, torch.zeros(4))


def test_scores_match_a_hand_computation():
    teacher = gaussian_teacher(mu_pos=0.5, mu_neg=0.0)
    x0 = samples(0.5, 1, seed=5)
    s, seed = 0.4, 11
    scores = teacher_scores(x0, teacher, sigmas=[s], seeds=[seed])
    n = seed_noise(SHAPE, seed)
    x = (1 - s) * x0 + s * n
    c = (1 - s) * VAR / ((1 - s) ** 2 * VAR + s ** 2)
    e_pos = ((0.5 + c * (x - (1 - s) * 0.5)) - x0).square().mean()
    e_neg = ((c * x) - x0).square().mean()
    assert scores.denoise_error.item() == pytest.approx(e_pos.item(), rel=1e-5)
    assert scores.text_alignment.item() == pytest.approx(((e_neg - e_pos) / e_neg).item(), rel=1e-5)
    # The teacher saw exactly the noised latent and the level as a per-sample tensor, once per prompt.
    assert [c[0] for c in teacher.calls] == ["positive", "negative"]
    assert torch.allclose(teacher.calls[0][1], x) and teacher.calls[0][2].tolist() == pytest.approx([s])


def test_a_samples_score_does_not_depend_on_its_batch():
    teacher = gaussian_teacher(mu_pos=1.0, mu_neg=-1.0)
    x0 = samples(1.0, 3, seed=6)
    alone = teacher_scores(x0[2:], teacher, sigmas=[0.3, 0.7], seeds=[0, 1])
    batch = teacher_scores(x0, teacher, sigmas=[0.3, 0.7], seeds=[0, 1])
    assert torch.allclose(alone.denoise_error, batch.denoise_error[2:])
    assert torch.allclose(alone.text_alignment, batch.text_alignment[2:])
    again = teacher_scores(x0, teacher, sigmas=[0.3, 0.7], seeds=[0, 1])
    assert torch.equal(again.denoise_error, batch.denoise_error)
    other = teacher_scores(x0, teacher, sigmas=[0.3, 0.7], seeds=[2, 3])
    assert not torch.equal(other.denoise_error, batch.denoise_error)


def test_noising_is_pluggable_and_progress_is_reported():
    """An EPS-style teacher (x = x0 + sigma n) brings its own noising; the math does not assume flow."""
    seen = []

    def eps_noise(x0, noise, sigma):
        return x0 + sigma.view(-1, 1, 1, 1) * noise

    def denoise(x, sigma, which):
        seen.append(x)
        return torch.zeros_like(x)

    x0 = torch.ones(2, *SHAPE)
    progress = []
    scores = teacher_scores(x0, denoise, sigmas=[2.0, 5.0, 9.0], seeds=[0, 1], add_noise=eps_noise,
                            levels=[0.2, 0.5, 0.9], callback=lambda d, t: progress.append((d, t)))
    assert progress == [(i, 6) for i in range(1, 7)]
    assert torch.allclose(seen[0], x0 + 2.0 * seed_noise(SHAPE, 0))
    assert scores.levels == (0.2, 0.5, 0.9) and scores.sigmas == (2.0, 5.0, 9.0)
    assert torch.allclose(scores.denoise_error, torch.ones(2))  # predicting zeros for ones
    assert scores.error_per_level.shape == (3, 2)


def test_flow_add_noise_matches_the_rectified_flow_convention():
    x0, n = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    x = flow_add_noise(x0, n, torch.tensor([0.0, 0.25]))
    assert torch.allclose(x[0], x0[0]) and torch.allclose(x[1], torch.full((1, 2, 2), 0.75 * 2 - 0.25))


def _scores(err, align):
    err, align = torch.tensor(err), torch.tensor(align)
    return TeacherScores(err, align, err[None], align[None], levels=(0.5,), sigmas=(0.5,), seeds=(0,))


def test_ranking_and_selection():
    s = _scores([3.0, 1.0, 2.0, 0.5], [0.1, 0.2, 0.4, -0.3])
    assert s.order("denoise_error") == [3, 1, 2, 0]
    assert s.order("text_alignment") == [2, 1, 0, 3]
    # combined = mean rank: sample 1 is 2nd and 2nd, sample 2 is 3rd and 1st, sample 3 1st and 4th.
    assert s.order("combined") == [1, 2, 3, 0]
    assert s.select(2) == [1, 2]
    assert s.select(10) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="positive integer"):
        s.select(0)
    with pytest.raises(ValueError, match="combined"):
        s.order("best")
    assert set(RANK_BY) == {"combined", "denoise_error", "text_alignment"}


def test_format_lists_every_sample_with_its_rank():
    text = _scores([3.0, 1.0], [0.1, 0.2]).format("denoise_error")
    lines = text.splitlines()
    assert "rank by denoise_error" in lines[0] and "levels 0.5; sigmas 0.5; seeds 0;" in lines[0]
    assert len(lines) == 4
    assert lines[2].split() == ["0", "3", "+0.1", "2"]
    assert lines[3].split() == ["1", "1", "+0.2", "1"]


def test_parse_levels():
    assert parse_levels("0.3, 0.5,0.7") == [0.3, 0.5, 0.7]
    assert parse_levels("0.25;0.75") == [0.25, 0.75]
    with pytest.raises(ValueError, match="No noise levels"):
        parse_levels(" , ")
    with pytest.raises(ValueError, match="not a number"):
        parse_levels("0.3, half")
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        parse_levels("0.5, 1.0")


def test_bad_inputs_are_refused():
    teacher = gaussian_teacher(0.0, 0.0)
    with pytest.raises(ValueError, match=r"\[B,C"):
        teacher_scores(torch.zeros(5), teacher, [0.5], [0])
    with pytest.raises(ValueError, match="at least one"):
        teacher_scores(torch.zeros(1, *SHAPE), teacher, [], [0])
    with pytest.raises(ValueError, match="level labels"):
        teacher_scores(torch.zeros(1, *SHAPE), teacher, [0.5], [0], levels=[0.1, 0.2])
