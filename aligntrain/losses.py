"""Losses: a registry of small pure functions over log-probabilities.

Every function takes summed completion log-probs (never logits) and returns one loss per example;
the training loop decides how per-example losses are averaged over an accumulated batch.

Notation (shapes in brackets; B = pairs in the batch):
    pi_c, pi_r    [B]  log pi_theta(y_w | x), log pi_theta(y_l | x): policy, chosen / rejected completion
    ref_c, ref_r  [B]  the same under the frozen reference pi_ref
    n_c, n_r      [B]  completion lengths in tokens
    h = (pi_c - ref_c) - (pi_r - ref_r)       the implicit reward margin divided by beta
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of preference pairs (all [B], float32)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def without_reference(self) -> "PairLogps":
        """`reference_free`: an implicit reference that gives every completion the same probability."""
        zero = torch.zeros_like(self.policy_chosen)
        return PairLogps(self.policy_chosen, self.policy_rejected, zero, zero, self.chosen_tokens, self.rejected_tokens)


PreferenceLoss = Callable[[PairLogps, float, float], torch.Tensor]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register(name: str) -> Callable[[PreferenceLoss], PreferenceLoss]:
    def add(fn: PreferenceLoss) -> PreferenceLoss:
        PREFERENCE_LOSSES[name] = fn
        return fn

    return add


def sft_loss(token_logps_sum: torch.Tensor, n_tokens: torch.Tensor | int) -> torch.Tensor:
    """Token-mean negative log-likelihood over every trained token of the batch.

        L_SFT = -(1/N) * sum_i sum_{t in completion_i} log pi_theta(y_t | y_<t)

    token_logps_sum: [B] summed log-probs of the trained tokens of each sequence.
    n_tokens: N, the number of trained tokens of the *whole accumulated batch* (all micro-batches,
    all processes), so that a long sequence weighs as much as its tokens, not as one example.
    """
    return -token_logps_sum.sum() / n_tokens


def _margin(b: PairLogps) -> torch.Tensor:
    return (b.policy_chosen - b.reference_chosen) - (b.policy_rejected - b.reference_rejected)


@register("dpo")
def dpo_loss(b: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7), conservative when label_smoothing = eps > 0 (cDPO).

        L_DPO  = -log sigmoid(beta * h)
        L_cDPO = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps is the assumed probability that a preference label is flipped; eps = 0 is plain DPO.
    Returns [B].
    """
    h = beta * _margin(b)
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


@register("ipo")
def ipo_loss(b: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with beta as the regulariser tau:

        L_IPO = (h_avg - 1 / (2 * tau))^2,   h_avg = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r

    The log-ratios are averaged per completion token, as the IPO authors did for their reported
    results (and as TRL does); with summed log-probs the target margin 1/(2 tau) would have to
    grow with completion length. Returns [B].
    """
    chosen = (b.policy_chosen - b.reference_chosen) / b.chosen_tokens.clamp(min=1)
    rejected = (b.policy_rejected - b.reference_rejected) / b.rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


@register("hinge")
def hinge_loss(b: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge loss on the reward margin (SLiC, Zhao et al. 2023, Eq. 2 with delta = 1/beta, as in RSO):

        L_hinge = max(0, 1 - beta * h)

    Returns [B].
    """
    return torch.relu(1.0 - beta * _margin(b))


def preference_rewards(b: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards r = beta * (log pi_theta - log pi_ref) of chosen and rejected, detached. [B] each."""
    chosen = beta * (b.policy_chosen - b.reference_chosen).detach()
    rejected = beta * (b.policy_rejected - b.reference_rejected).detach()
    return chosen, rejected
