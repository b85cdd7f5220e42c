"""Preference losses for the latent refiner.

rsc's formulation (DESIGN.md): for a pair (x_w anti-stereotypical, x_l
stereotypical) noised with the same t and eps, e_m(x) is the mean squared
error of model m's prediction of the clean latent; the policy m=theta runs
the frozen UNet on the corrected latent, the reference m=ref on the
uncorrected one. The refiner should lower the error on x_w relative to the
reference more than on x_l:

    margin = (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))
    L_pref = mean_pairs[ -log sigmoid(-beta / 2 * margin) ]
    L      = L_pref + lambda_reg * mean ||R||^2 + lambda_sft * mean e_theta(w)
             + lambda_no_harm * mean relu(e_theta(w) - e_ref(w))
             + lambda_keep * mean ||R(z_t^w)||^2

The log-sigmoid is taken per pair, then averaged. The "do no harm" term
penalises only a *worse* prediction of the preferred sample than the frozen
model's: unlike the SFT term it does not reward pulling every prompt towards
its particular winners, which changes images the correction should leave
alone and narrows their diversity. The "keep" term regularises the refiner's
output on the preferred samples' noisy latents only: a trajectory that already
leads to an anti-stereotypical image (most of a fairly treated prompt's
samples) should be left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rsc.config import check_number


def per_sample_error(target: Tensor, prediction: Tensor) -> Tensor:
    """Mean squared error per sample over all non-batch dimensions: (B, ...) -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PreferenceLossOutput:
    """The loss and what is logged with it (all scalars except ``margin``, which is per pair)."""

    loss: Tensor
    preference_loss: Tensor
    regularization: Tensor
    sft: Tensor
    harm: Tensor
    keep: Tensor
    margin: Tensor
    accuracy: Tensor
    winner_gap: Tensor
    loser_gap: Tensor


class PreferenceLoss(torch.nn.Module):
    """The per-pair log-sigmoid preference loss with a refiner-magnitude regulariser and an optional SFT term.

    Args:
        beta: Inverse temperature of the preference (larger = sharper).
        lambda_reg: Weight of the mean squared refiner output.
        lambda_sft: Weight of the policy error on the preferred sample.
        lambda_no_harm: Weight of the per-pair excess of the policy error over the reference error
            on the preferred sample (zero where the correction does no harm to it).
        lambda_keep: Weight of the mean squared refiner output on the preferred samples' latents.
    """

    def __init__(
        self, beta: float = 1000.0, lambda_reg: float = 0.1, lambda_sft: float = 0.0, lambda_no_harm: float = 0.0,
        lambda_keep: float = 0.0,
    ) -> None:
        super().__init__()
        check_number("beta", beta, positive=True)
        for name, value in (
            ("lambda_reg", lambda_reg), ("lambda_sft", lambda_sft), ("lambda_no_harm", lambda_no_harm), ("lambda_keep", lambda_keep)
        ):
            check_number(name, value, minimum=0)
        self.beta, self.lambda_reg, self.lambda_sft = beta, lambda_reg, lambda_sft
        self.lambda_no_harm, self.lambda_keep = lambda_no_harm, lambda_keep

    def forward(
        self,
        policy_error_w: Tensor,
        reference_error_w: Tensor,
        policy_error_l: Tensor,
        reference_error_l: Tensor,
        refiner_output: Tensor,
        winner_refiner_output: Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Loss from per-pair errors (each (B,)) and the refiner's outputs for the batch (any shape).

        ``winner_refiner_output`` (the refiner's outputs on the preferred samples' latents) is
        required when ``lambda_keep > 0``.
        """
        winner_gap = policy_error_w - reference_error_w
        loser_gap = policy_error_l - reference_error_l
        margin = winner_gap - loser_gap
        preference = -F.logsigmoid(-0.5 * self.beta * margin).mean()
        regularization = refiner_output.float().pow(2).mean()
        sft = policy_error_w.mean()
        harm = F.relu(winner_gap).mean()
        if winner_refiner_output is None:
            if self.lambda_keep > 0:
                raise ValueError("lambda_keep > 0 needs winner_refiner_output, the refiner's outputs on the preferred latents")
            keep = torch.zeros((), device=regularization.device)
        else:
            keep = winner_refiner_output.float().pow(2).mean()
        loss = (
            preference + self.lambda_reg * regularization + self.lambda_sft * sft
            + self.lambda_no_harm * harm + self.lambda_keep * keep
        )
        return PreferenceLossOutput(
            loss=loss,
            preference_loss=preference.detach(),
            regularization=regularization.detach(),
            sft=sft.detach(),
            harm=harm.detach(),
            keep=keep.detach(),
            margin=margin.detach(),
            accuracy=(margin < 0).float().mean().detach(),
            winner_gap=winner_gap.mean().detach(),
            loser_gap=loser_gap.mean().detach(),
        )
