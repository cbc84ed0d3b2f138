"""The preference and RL objectives, as pure functions of log-probabilities.

Every function here takes per-example (or per-token) log-probabilities that a recipe computed with
the policy (the model with its adapter) and, where the objective has one, the reference (the same
model with the adapter disabled), and returns per-example losses plus the statistics worth logging.
Nothing here touches a model, a tokenizer or the data: the tests check each formula against a hand
computation on fixed numbers, and the recipes only decide which log-probs to feed in.

Conventions: ``*_logps`` are summed token log-probs of a completion given its prompt, shape ``[B]``;
``*_avg_logps`` are the same divided by the completion's token count (the length-normalised form
IPO, ORPO and SimPO use). Reference quantities must come in without gradient.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """Per-pair losses ``[B]`` and the implicit rewards of chosen and rejected (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margins = self.chosen_rewards - self.rejected_rewards
        return {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
        }


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> PairLoss:
    """DPO, sigmoid form (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):

        h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
        loss = -log sigmoid(beta * h)

    Implicit rewards: ``beta * (log pi(y|x) - log ref(y|x))`` for chosen and rejected."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, ref_chosen_avg_logps, ref_rejected_avg_logps, beta: float) -> PairLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17), on length-normalised log-probs as in the paper's experiments and TRL:

        h = (avg log pi(y_w|x) - avg log ref(y_w|x)) - (avg log pi(y_l|x) - avg log ref(y_l|x))
        loss = (h - 1 / (2 * beta))^2

    The square regresses the margin to ``1/(2 beta)`` instead of pushing it to infinity."""
    chosen = policy_chosen_avg_logps - ref_chosen_avg_logps
    rejected = policy_rejected_avg_logps - ref_rejected_avg_logps
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, beta: float) -> PairLoss:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eq. 6-7), reference-free; ``beta`` is the paper's lambda:

        log odds(y|x) = avg log p(y|x) - log(1 - exp(avg log p(y|x)))
        L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        loss = NLL(y_w|x) + beta * L_OR

    ``chosen_nll`` is the per-pair mean token NLL of the chosen completion (the SFT term).
    Rewards, as TRL logs them: ``beta * avg log p``."""
    # log1p(-exp(x)) is log(1 - p); clamp keeps it finite when a completion is certain (p -> 1).
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        torch.log1p(-torch.exp(chosen_avg_logps).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(rejected_avg_logps).clamp(max=1 - 1e-6))
    )
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return PairLoss(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta: float, gamma: float) -> PairLoss:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6): length-normalised reward with a target margin ``gamma``:

        loss = -log sigmoid(beta * avg log pi(y_w|x) - beta * avg log pi(y_l|x) - gamma)"""
    losses = -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)
    return PairLoss(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


# --- KTO ---------------------------------------------------------------------------------------------


def kto_reference_point(policy_mismatched_logps, ref_mismatched_logps) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", sec. 4.1): a biased estimate of KL(pi || ref) from completions paired with prompts
    they do not answer, ``max(0, mean(log pi - log ref))``, without gradient (as in the paper and TRL)."""
    return (policy_mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps, ref_logps, desirable, reference_point, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8), per example with label ``desirable`` (bool ``[B]``):

        r = log pi(y|x) - log ref(y|x)
        desirable:    loss = w_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  loss = w_U * (1 - sigmoid(beta * (z0 - r)))

    Returns ``(losses [B], rewards [B] = beta * r detached)``."""
    ratio = policy_logps - ref_logps
    desirable = desirable.to(torch.bool)
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - reference_point)), torch.sigmoid(beta * (reference_point - ratio)))
    weight = torch.where(desirable, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    return weight * (1 - value), beta * ratio.detach()


# --- GRPO --------------------------------------------------------------------------------------------


def grpo_advantages(rewards, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, outcome
    supervision): ``rewards`` ``[G * n]`` holds ``n = num_generations`` consecutive completions of
    each prompt, and each gets ``(r - mean(group)) / (std(group) + eps)`` (sample std, as TRL). A
    group whose completions all scored the same has zero advantage: it teaches nothing."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def grpo_loss(token_logps, old_token_logps, ref_token_logps, advantages, mask, beta: float, epsilon: float = 0.2):
    """GRPO (DeepSeekMath, eq. 3) on tokens ``[B, T]`` with completion ``mask``:

        ratio_t = exp(log pi_t - log pi_old_t)
        surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
        kl_t = exp(log ref_t - log pi_t) - (log ref_t - log pi_t) - 1        (the k3 estimator)
        loss_i = sum_t mask * (beta * kl_t - surrogate_t) / sum_t mask    (per completion i; the
                                                                         recipe averages over them)

    With one optimisation pass per batch of samples, ``old_token_logps`` is the detached policy
    itself: the ratio is 1 but its gradient is the policy gradient ``A * grad log pi``.
    Returns ``(losses [B], KL per completion [B] detached)``."""
    ratio = torch.exp(token_logps - old_token_logps)
    surrogate = torch.min(ratio * advantages[:, None], ratio.clamp(1 - epsilon, 1 + epsilon) * advantages[:, None])
    delta = ref_token_logps - token_logps
    kl = torch.exp(delta) - delta - 1
    mask = mask.to(token_logps.dtype)
    lengths = mask.sum(dim=1).clamp(min=1)
    per_token = beta * kl - surrogate
    losses = (per_token * mask).sum(dim=1) / lengths
    return losses, ((kl * mask).sum(dim=1) / lengths).detach()
