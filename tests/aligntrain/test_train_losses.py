"""Losses against hand-computed values, and against TRL 1.16 on identical log-probs (where trl is installed)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from aligntrain.losses import PREFERENCE_LOSSES, PairLogps, dpo_loss, hinge_loss, ipo_loss, preference_rewards, sft_loss


def pairs(pc, pr, rc, rr, nc=(2.0, 2.0), nr=(4.0, 4.0)) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return PairLogps(t(pc), t(pr), t(rc), t(rr), t(nc), t(nr))


# pair 0: policy prefers chosen more than the reference does (h = +2); pair 1: the reverse (h = -2)
BATCH = pairs([-10.0, -12.0], [-12.0, -10.0], [-11.0, -11.0], [-11.0, -11.0])
BETA = 0.5  # beta * h = +1 and -1


def test_registry_holds_the_preference_losses():
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo", "hinge"}


def test_config_accepts_exactly_sft_and_the_registered_losses():
    from typing import get_args, get_type_hints

    from aligntrain.config import TASK_OF_LOSS, LossConfig

    accepted = set(get_args(get_type_hints(LossConfig)["name"]))
    assert accepted == {"sft"} | set(PREFERENCE_LOSSES)
    assert set(TASK_OF_LOSS) == accepted


def test_dpo_is_minus_log_sigmoid_of_the_scaled_margin():
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e)
    expected = [math.log1p(math.exp(-1)), math.log1p(math.e)]
    assert dpo_loss(BATCH, BETA).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.3132617, 1.3132617], abs=1e-7)


def test_conservative_dpo_mixes_in_the_flipped_label():
    # (1 - 0.1) * 0.3132617 + 0.1 * 1.3132617 = 0.4132617, and symmetrically for the second pair
    assert dpo_loss(BATCH, BETA, label_smoothing=0.1).tolist() == pytest.approx([0.4132617, 1.2132617], abs=1e-6)


def test_ipo_averages_log_ratios_per_token():
    # pair 0: (+1/2) - (-1/4) = 0.75, target 1/(2*0.5) = 1 -> (0.75 - 1)^2 = 0.0625
    # pair 1: (-1/2) - (+1/4) = -0.75                      -> (-0.75 - 1)^2 = 3.0625
    assert ipo_loss(BATCH, BETA).tolist() == pytest.approx([0.0625, 3.0625], abs=1e-6)


def test_hinge_is_zero_beyond_the_margin():
    assert hinge_loss(BATCH, BETA).tolist() == pytest.approx([0.0, 2.0], abs=1e-6)


def test_rewards_are_scaled_log_ratios():
    chosen, rejected = preference_rewards(BATCH, BETA)
    assert chosen.tolist() == pytest.approx([0.5, -0.5])
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_reference_free_drops_the_reference():
    skewed = pairs([-10.0], [-12.0], [-9.0], [-13.0])  # with reference: h = -1 - 1 = -2; without: h = +2
    assert dpo_loss(skewed, BETA).tolist() == pytest.approx([math.log1p(math.e)], abs=1e-6)
    assert dpo_loss(skewed.without_reference(), BETA).tolist() == pytest.approx([math.log1p(math.exp(-1))], abs=1e-6)
    chosen, rejected = preference_rewards(skewed.without_reference(), BETA)
    assert (chosen.item(), rejected.item()) == pytest.approx((-5.0, -6.0))


def test_sft_is_the_token_mean_nll_over_the_accumulated_batch():
    # two sequences with summed log-probs -3 and -5 over 4 trained tokens in total: 8 / 4 = 2
    assert sft_loss(torch.tensor([-3.0, -5.0]), 4).item() == pytest.approx(2.0)
    # two micro-batches normalised by the same global count add up to the whole batch's loss
    assert (sft_loss(torch.tensor([-3.0]), 4) + sft_loss(torch.tensor([-5.0]), 4)).item() == pytest.approx(2.0)


def test_losses_are_differentiable_in_the_policy_log_probs():
    b = pairs([-10.0, -12.0], [-12.0, -10.0], [-11.0, -11.0], [-11.0, -11.0])
    b.policy_chosen.requires_grad_(True)
    dpo_loss(b, BETA).sum().backward()
    # d/dpi_c of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    expected = [-BETA / (1 + math.e), -BETA / (1 + math.exp(-1))]
    assert b.policy_chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


# -- TRL 1.16 on identical log-probs ------------------------------------------------------------------

def trl_loss_and_metrics(loss_type: str, beta: float, logps: PairLogps):
    """Run TRL's own DPOTrainer._compute_loss with a stand-in model that returns our per-token
    log-probs, so both implementations see exactly the same numbers."""
    trl = pytest.importorskip("trl")
    if trl.__version__.split(".")[0] != "1":
        pytest.skip(f"compares against TRL 1.x, found {trl.__version__}")
    from accelerate import Accelerator
    from trl import DPOTrainer

    n = logps.policy_chosen.shape[0]
    width = int(max(logps.chosen_tokens.max(), logps.rejected_tokens.max())) + 1
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    lengths = torch.cat([logps.chosen_tokens, logps.rejected_tokens]).long()
    for i, length in enumerate(lengths.tolist()):
        completion_mask[i, 1:1 + length] = 1
    per_token = torch.zeros(2 * n, width - 1)
    per_token[:, 0] = torch.cat([logps.policy_chosen, logps.policy_rejected])  # TRL sums over the sequence

    def model(**kwargs):
        zeros = torch.zeros(2 * n, width - 1)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long), "attention_mask": torch.ones(2 * n, width),
              "completion_mask": completion_mask, "ref_chosen_logps": logps.reference_chosen,
              "ref_rejected_logps": logps.reference_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("ours,theirs", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
@pytest.mark.parametrize("reference_free", [False, True])
def test_matches_trl_on_identical_log_probs(ours, theirs, reference_free):
    g = torch.Generator().manual_seed(0)
    n = 16
    logps = PairLogps(-torch.rand(n, generator=g) * 40, -torch.rand(n, generator=g) * 40,
                      -torch.rand(n, generator=g) * 40, -torch.rand(n, generator=g) * 40,
                      torch.randint(1, 30, (n,), generator=g).float(), torch.randint(1, 30, (n,), generator=g).float())
    if reference_free:  # TRL has no reference_free flag: its equivalent is a reference of log-prob 0
        logps = logps.without_reference()
    beta = 0.1
    trl_loss, trl_metrics = trl_loss_and_metrics(theirs, beta, logps)
    assert PREFERENCE_LOSSES[ours](logps, beta, 0.0).mean().item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    chosen, rejected = preference_rewards(logps, beta)
    ours_metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                    "rewards/accuracies": (chosen > rejected).float().mean().item(),
                    "rewards/margins": (chosen - rejected).mean().item(),
                    "logps/chosen": logps.policy_chosen.mean().item(), "logps/rejected": logps.policy_rejected.mean().item()}
    for name, value in ours_metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
