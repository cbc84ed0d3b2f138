"""Each objective against a hand computation (plain ``math``, the papers' formulas) on fixed log-probs,
and the gradients that make each one learn in the right direction."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.recipes import losses

# Two pairs: summed log-probs of chosen / rejected under the policy and the reference, and lengths.
PC, PR = [-12.0, -30.5], [-15.0, -28.0]
RC, RR = [-13.0, -29.0], [-14.0, -29.5]
LEN_C, LEN_R = [4, 10], [5, 8]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_is_the_sigmoid_loss_on_the_log_ratio_margin():
    out = losses.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert out.losses[i].item() == pytest.approx(-_logsig(0.1 * h), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(0.1 * (PC[i] - RC[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(0.1 * (PR[i] - RR[i]))
    # Pair 0: h = 1 - (-1) = 2 > 0; pair 1: h = -1.5 - 1.5 = -3 < 0.
    assert out.metrics()["rewards/accuracies"] == 0.5
    assert out.metrics()["rewards/margins"] == pytest.approx(0.1 * (2 - 3) / 2)


def test_dpo_at_the_reference_is_log_two_and_its_gradient_prefers_chosen():
    chosen, rejected = t([-5.0]).requires_grad_(), t([-6.0]).requires_grad_()
    out = losses.dpo_loss(chosen, rejected, t([-5.0]), t([-6.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log(2))
    out.losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.25) and rejected.grad.item() == pytest.approx(0.25)  # -beta * sigmoid(0)


def test_ipo_regresses_the_length_normalised_margin_to_one_over_two_beta():
    avg = lambda xs, ns: [x / n for x, n in zip(xs, ns)]  # noqa: E731
    pc, pr, rc, rr = avg(PC, LEN_C), avg(PR, LEN_R), avg(RC, LEN_C), avg(RR, LEN_R)
    out = losses.ipo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.25)
    for i in range(2):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert out.losses[i].item() == pytest.approx((h - 2.0) ** 2, rel=1e-12)
    # Its minimum is at margin 1/(2 beta), not at infinity.
    at_target = losses.ipo_loss(t([2.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.25)
    assert at_target.losses.item() == 0.0


def test_orpo_is_chosen_nll_plus_lambda_times_the_odds_ratio_loss():
    c_avg, r_avg, nll = [-0.4, -2.0], [-1.1, -0.3], [0.4, 2.0]
    out = losses.orpo_loss(t(c_avg), t(r_avg), t(nll), beta=0.2)
    for i in range(2):
        log_odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
        expected = nll[i] - 0.2 * _logsig(log_odds(c_avg[i]) - log_odds(r_avg[i]))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(0.2 * c_avg[i])


def test_orpo_stays_finite_when_a_completion_is_certain():
    out = losses.orpo_loss(t([0.0]), t([-1.0]), t([0.0]), beta=0.1)
    assert torch.isfinite(out.losses).all()


def test_simpo_is_the_length_normalised_margin_minus_gamma():
    c_avg, r_avg = [-0.5, -1.5], [-0.9, -1.0]
    out = losses.simpo_loss(t(c_avg), t(r_avg), beta=2.0, gamma=0.5)
    for i in range(2):
        assert out.losses[i].item() == pytest.approx(-_logsig(2.0 * c_avg[i] - 2.0 * r_avg[i] - 0.5), rel=1e-12)
    # The target margin: equal rewards still cost more than log 2 (gamma > 0 demands a gap).
    assert losses.simpo_loss(t([-1.0]), t([-1.0]), beta=2.0, gamma=0.5).losses.item() > math.log(2)


def test_kto_reference_point_is_the_clamped_mean_mismatched_log_ratio():
    assert losses.kto_reference_point(t([-10.0, -12.0]), t([-11.0, -12.0])).item() == pytest.approx(0.5)
    assert losses.kto_reference_point(t([-10.0]), t([-9.0])).item() == 0.0  # KL estimates below 0 clamp
    z = losses.kto_reference_point(t([-10.0]).requires_grad_(), t([-11.0]))
    assert not z.requires_grad


def test_kto_desirable_and_undesirable_values_around_the_reference_point():
    policy, ref, z0, beta = [-10.0, -10.0, -7.0], [-11.0, -11.0, -8.0], 0.3, 0.5
    labels = torch.tensor([True, False, False])
    row_losses, rewards = losses.kto_loss(t(policy), t(ref), labels, torch.tensor(z0, dtype=torch.float64), beta, 1.5, 0.75)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r = [p - q for p, q in zip(policy, ref)]
    assert row_losses[0].item() == pytest.approx(1.5 * (1 - sig(beta * (r[0] - z0))), rel=1e-12)
    assert row_losses[1].item() == pytest.approx(0.75 * (1 - sig(beta * (z0 - r[1]))), rel=1e-12)
    assert row_losses[2].item() == pytest.approx(0.75 * (1 - sig(beta * (z0 - r[2]))), rel=1e-12)
    assert rewards.tolist() == pytest.approx([beta * x for x in r])


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    logps = t([-5.0, -5.0]).requires_grad_()
    row_losses, _ = losses.kto_loss(logps, t([-5.0, -5.0]), torch.tensor([True, False]), torch.tensor(0.0, dtype=torch.float64), 0.1)
    row_losses.sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]


def test_grpo_advantages_are_normalised_within_each_group():
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = losses.grpo_advantages(rewards, num_generations=4)
    std = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 0, 1]) / 3)  # sample std of the first group
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4  # a group where every completion scored the same teaches nothing


def test_grpo_loss_on_policy_is_the_masked_policy_gradient_plus_k3_kl():
    logps = t([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]]).requires_grad_()
    ref = t([[-1.5, -2.0, -0.1], [-0.4, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, beta = t([1.0, -2.0]), 0.1
    per, kl = losses.grpo_loss(logps, logps.detach(), ref, adv, mask, beta)
    k3 = lambda p, q: math.exp(q - p) - (q - p) - 1  # noqa: E731
    rows = [[(-1.0, -1.5), (-2.0, -2.0), (-0.5, -0.1)], [(-0.2, -0.4), (-3.0, -1.0)]]
    for i, row in enumerate(rows):
        # ratio = 1 on policy, so the surrogate is the advantage itself on every token.
        expected = sum(beta * k3(p, q) - adv[i].item() for p, q in row) / len(row)
        assert per[i].item() == pytest.approx(expected, rel=1e-12)
        assert kl[i].item() == pytest.approx(sum(k3(p, q) for p, q in row) / len(row), rel=1e-12)
    per.sum().backward()
    # Policy gradient: d/dlogp of -A*ratio is -A/len (plus the KL's beta*(1 - exp(ref - logp))/len);
    # masked tokens get nothing.
    assert logps.grad[0, 1].item() == pytest.approx(-1.0 / 3)
    assert logps.grad[1, 0].item() == pytest.approx((2.0 + beta * (1 - math.exp(-0.4 + 0.2))) / 2)
    assert logps.grad[1, 2].item() == 0.0


def test_grpo_clips_the_ratio_away_from_the_sampling_policy():
    logps = t([[0.0]]).requires_grad_()
    old = t([[-1.0]])  # ratio e > 1 + eps with a positive advantage: clipped, no gradient
    per, _ = losses.grpo_loss(logps, old, logps.detach(), t([1.0]), torch.tensor([[1]]), beta=0.0, epsilon=0.2)
    assert per.item() == pytest.approx(-1.2)
    per.sum().backward()
    assert logps.grad.item() == 0.0
