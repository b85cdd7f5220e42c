"""The latent refiner and the preference loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from rsc.backbone import FrozenLDM
from rsc.losses import PreferenceLoss, per_sample_error
from rsc.testing import sd15_unet_config
from rsc.refiner import LatentRefiner, RefinerConfig, RefinerCorrection
from rsc.sampling import correction_step_indices, make_scheduler, window_timestep_range


def _small_refiner(seed: int = 0) -> LatentRefiner:
    torch.manual_seed(seed)
    return LatentRefiner(RefinerConfig(text_embedding_dim=32, hidden_channels=16, num_blocks=2, embedding_dim=32, norm_groups=4))


def test_untrained_refiner_is_the_identity_correction() -> None:
    refiner = _small_refiner()
    latents, text = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 32)
    assert torch.equal(refiner(latents, torch.tensor([1, 500, 999]), text), torch.zeros_like(latents))
    correction = RefinerCorrection(refiner, strength=3.0)
    assert torch.equal(correction(latents, torch.tensor([5, 5, 5]), text), latents)


def test_refiner_depends_on_timestep_and_prompt_once_trained() -> None:
    refiner = _small_refiner()
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.1)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    base = refiner(latents, torch.tensor([100, 100]), text)
    assert (refiner(latents, torch.tensor([900, 900]), text) - base).abs().max() > 1e-4
    assert (refiner(latents, torch.tensor([100, 100]), text.flip(0)) - base).abs().max() > 1e-4
    assert (refiner(latents, torch.tensor(100), text) - base).abs().max() == 0  # scalar t broadcasts


def test_text_pooling_starts_as_the_mean_and_learns_to_attend() -> None:
    refiner = _small_refiner()
    text = torch.randn(2, 5, 32)
    torch.testing.assert_close(refiner.pool_text(text), text.mean(dim=1))
    # A score that singles out token 3 (its embedding has a large first coordinate) pools ~that token.
    text[:, 3, 0] = 50.0
    with torch.no_grad():
        refiner.text_token_score[0].weight.fill_(1.0)
        refiner.text_token_score[0].bias.zero_()
        refiner.text_token_score[1].weight.zero_()
        refiner.text_token_score[1].weight[0, 0] = 10.0
    torch.testing.assert_close(refiner.pool_text(text), text[:, 3], atol=1e-3, rtol=0)


class _FixedDelta(torch.nn.Module):
    """A stand-in refiner whose output is a given tensor."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.delta


def test_dead_zone_drops_small_updates_and_shortens_large_ones() -> None:
    latents = torch.zeros(3, 4, 2, 2)
    latents[:, 0, 0, 0] = 10.0  # |z| = 10 per sample: a threshold of 0.03 is an update of norm 0.3
    delta = torch.zeros(3, 4, 2, 2)
    delta[0, 1, 0, 0] = 0.2   # inside the dead zone: no change at all
    delta[1, 1, 0, 0] = 0.6   # shortened by 0.3: half of it is applied
    delta[2, 2, 1, 1] = -3.0  # shortened by 0.3 of 3: 0.9 of it
    cond = torch.zeros(3, 1, 8)
    corrected = RefinerCorrection(_FixedDelta(delta), strength=2.0, threshold=0.03)(latents, torch.zeros(3), cond)  # type: ignore[arg-type]
    assert torch.equal(corrected[0], latents[0])
    torch.testing.assert_close(corrected[1], latents[1] + 2.0 * 0.5 * delta[1])
    torch.testing.assert_close(corrected[2], latents[2] + 2.0 * 0.9 * delta[2])
    plain = RefinerCorrection(_FixedDelta(delta), strength=2.0)(latents, torch.zeros(3), cond)  # type: ignore[arg-type]
    torch.testing.assert_close(plain, latents + 2.0 * delta)
    with pytest.raises(ValueError, match="threshold must be a number >= 0, got -0.1"):
        RefinerCorrection(_FixedDelta(delta), threshold=-0.1)  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    refiner = _small_refiner()
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.1)
    refiner.save_pretrained(tmp_path, extra_config={"strength": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "refiner.safetensors"]
    loaded = LatentRefiner.from_pretrained(tmp_path)
    assert loaded.config == refiner.config
    args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32))
    torch.testing.assert_close(loaded(*args), refiner(*args), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="refiner.safetensors"):
        LatentRefiner.from_pretrained(tmp_path / "missing")


def test_an_x0_input_refiner_reads_the_prediction_it_is_given_and_saves_the_switch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(text_embedding_dim=32, hidden_channels=16, num_blocks=1, embedding_dim=16,
                                          norm_groups=4, x0_input=True))
    assert refiner.conv_in.in_channels == 8
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.1)
    latents, t, text = torch.randn(2, 4, 8, 8), torch.tensor([300, 800]), torch.randn(2, 5, 32)
    x0 = torch.randn(2, 4, 8, 8)
    delta = refiner(latents, t, text, x0)
    assert (refiner(latents, t, text, -x0) - delta).abs().max() > 1e-3, "the x0-prediction must reach the output"
    with pytest.raises(ValueError, match="x0_input=True.*pass x0_prediction"):
        refiner(latents, t, text)
    with pytest.raises(ValueError, match=r"x0_prediction must have the latents' shape \(2, 4, 8, 8\), got \(2, 4, 4, 4\)"):
        refiner(latents, t, text, x0[..., :4, :4])
    with pytest.raises(ValueError, match="built without x0_input"):
        _small_refiner()(latents, t, text, x0)

    # The correction asks its predictor for x0 at the latents it corrects, with the same t and prompt.
    seen = []

    def predictor(z: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seen.append((z, timesteps, cond))
        return x0

    corrected = RefinerCorrection(refiner, strength=2.0, x0_predictor=predictor)(latents, t, text)
    torch.testing.assert_close(corrected, latents + 2.0 * delta)
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], (latents, t, text)))
    with pytest.raises(ValueError, match="pass x0_predictor"):
        RefinerCorrection(refiner)

    refiner.save_pretrained(tmp_path)
    loaded = LatentRefiner.from_pretrained(tmp_path)
    assert loaded.config.x0_input is True
    torch.testing.assert_close(loaded(latents, t, text, x0), delta, rtol=0, atol=0)
    with pytest.raises(ValueError, match="RefinerConfig.x0_input must be true or false, got 1"):
        RefinerConfig(x0_input=1)  # type: ignore[arg-type]


def test_refiner_is_below_three_percent_of_sd15_unet() -> None:
    with torch.device("meta"):
        unet_parameters = sum(p.numel() for p in UNet2DConditionModel(**sd15_unet_config()).parameters())
    refiner_parameters = LatentRefiner(RefinerConfig()).num_parameters()  # SD 1.x defaults
    assert unet_parameters > 850_000_000
    assert refiner_parameters / unet_parameters < 0.03


def test_bad_shapes_and_configs() -> None:
    refiner = _small_refiner()
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        refiner(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"text_embeddings must be \(B, L, 32\)"):
        refiner(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        RefinerConfig(hidden_channels=30, norm_groups=8)


def test_loss_against_hand_computed_value() -> None:
    loss_fn = PreferenceLoss(beta=10.0, lambda_reg=0.5, lambda_sft=0.25)
    policy_w, reference_w = torch.tensor([0.2, 0.5]), torch.tensor([0.3, 0.4])
    policy_l, reference_l = torch.tensor([0.6, 0.1]), torch.tensor([0.4, 0.3])
    delta = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    out = loss_fn(policy_w, reference_w, policy_l, reference_l, delta)
    margins = [(0.2 - 0.3) - (0.6 - 0.4), (0.5 - 0.4) - (0.1 - 0.3)]  # -0.3, 0.3
    per_pair = [-math.log(1 / (1 + math.exp(-(-5.0 * m)))) for m in margins]
    expected_pref = sum(per_pair) / 2  # the mean of per-pair log-sigmoids, not the log-sigmoid of the mean
    assert expected_pref != pytest.approx(-math.log(1 / (1 + math.exp(5.0 * sum(margins) / 2))))
    assert out.preference_loss.item() == pytest.approx(expected_pref, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected_pref + 0.5 * (1 + 1 + 4 + 0) / 4 + 0.25 * 0.35, rel=1e-6)
    torch.testing.assert_close(out.margin, torch.tensor(margins))
    assert out.accuracy.item() == 0.5
    assert out.winner_gap.item() == pytest.approx(0.0, abs=1e-7) and out.loser_gap.item() == pytest.approx(0.0, abs=1e-7)


def test_no_harm_term_counts_only_winners_made_worse() -> None:
    policy_w, reference_w = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.3, 0.4, 0.9])
    errors_l, delta = torch.tensor([0.4, 0.4, 0.4]), torch.zeros(3)
    plain = PreferenceLoss(beta=2.0, lambda_reg=0.0)(policy_w, reference_w, errors_l, errors_l, delta)
    guarded = PreferenceLoss(beta=2.0, lambda_reg=0.0, lambda_no_harm=3.0)(policy_w, reference_w, errors_l, errors_l, delta)
    # Only the first pair's winner got worse (by 0.2); the second improved, which is not rewarded.
    assert guarded.harm.item() == pytest.approx(0.2 / 3, rel=1e-6)
    assert guarded.loss.item() == pytest.approx(plain.loss.item() + 3.0 * 0.2 / 3, rel=1e-6)
    # Winners predicted better than by the frozen model get the same gradient with and without the term.
    gradients = []
    for weight in (0.0, 3.0):
        improved = torch.tensor([0.1, 0.1, 0.1], requires_grad=True)
        PreferenceLoss(beta=2.0, lambda_reg=0.0, lambda_no_harm=weight)(improved, reference_w, errors_l, errors_l, delta).loss.backward()
        gradients.append(improved.grad)
    torch.testing.assert_close(gradients[0], gradients[1])
    with pytest.raises(ValueError, match="lambda_no_harm must be a finite number >= 0, got -1.0"):
        PreferenceLoss(lambda_no_harm=-1.0)


def test_keep_term_regularises_only_the_winners_refiner_output() -> None:
    errors, delta = torch.tensor([0.3, 0.4]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    keep = PreferenceLoss(beta=2.0, lambda_reg=0.0, lambda_keep=0.5)
    out = keep(errors, errors, errors, errors, delta, winner_refiner_output=delta[:2])
    # Rows 0-1 are the winners' outputs: mean of (1, 1, 4, 4) = 2.5, the losers' rows (3, 4) do not count.
    assert out.keep.item() == pytest.approx(2.5)
    assert out.loss.item() == pytest.approx(math.log(2) + 0.5 * 2.5, rel=1e-6)
    with pytest.raises(ValueError, match="lambda_keep > 0 needs winner_refiner_output"):
        keep(errors, errors, errors, errors, delta)


def test_swapping_winner_and_loser_flips_the_margin() -> None:
    loss_fn = PreferenceLoss(beta=3.0)
    errors = [torch.rand(5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    delta = torch.zeros(5, 4)
    forward = loss_fn(errors[0], errors[1], errors[2], errors[3], delta)
    swapped = loss_fn(errors[2], errors[3], errors[0], errors[1], delta)
    torch.testing.assert_close(swapped.margin, -forward.margin)
    assert forward.accuracy + swapped.accuracy == pytest.approx(1.0)


def test_gradient_pushes_the_preferred_policy_error_down() -> None:
    loss_fn = PreferenceLoss(beta=5.0, lambda_reg=0.0)
    policy_w = torch.tensor([0.4, 0.7], requires_grad=True)
    policy_l = torch.tensor([0.5, 0.2], requires_grad=True)
    out = loss_fn(policy_w, torch.tensor([0.4, 0.6]), policy_l, torch.tensor([0.5, 0.3]), torch.zeros(2))
    out.loss.backward()
    assert (policy_w.grad > 0).all()  # gradient descent lowers the winner's error ...
    assert (policy_l.grad < 0).all()  # ... and raises the loser's


def test_zero_refiner_gives_log_two(tiny_sd_dir: Path) -> None:
    from rsc.module import RSCorrector

    module = RSCorrector(str(tiny_sd_dir), hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4,
                         lambda_reg=0.3)
    batch = {
        "anti_stereotypical_latents": torch.randn(3, 4, 16, 16),
        "stereotypical_latents": torch.randn(3, 4, 16, 16),
        "prompt_embeds": torch.randn(3, 77, 32),
    }
    output, delta = module.pair_step(batch, torch.Generator().manual_seed(0))
    assert torch.equal(delta, torch.zeros_like(delta))
    assert output.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert output.winner_gap.item() == 0.0 and output.loser_gap.item() == 0.0


def test_per_sample_error() -> None:
    target, prediction = torch.zeros(2, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(per_sample_error(target, prediction), torch.tensor([1.0, 1.0]))


def test_training_timesteps_match_the_corrected_sampling_steps(tiny_sd_dir: Path) -> None:
    scheduler = make_scheduler(FrozenLDM.from_pretrained(tiny_sd_dir).scheduler)
    for window in [(0.0, 0.5), (0.0, 0.3), (0.2, 0.8), (0.5, 1.0)]:
        low, high = window_timestep_range(window, 1000)
        for steps in (10, 20, 50):
            scheduler.set_timesteps(steps)
            corrected = [int(scheduler.timesteps[i]) for i in correction_step_indices(steps, window)]
            assert corrected and all(low - 20 <= t < high + 20 for t in corrected), (window, steps, corrected, low, high)
    assert window_timestep_range((0.0, 1.0)) == (0, 1000)
    with pytest.raises(ValueError):
        window_timestep_range((0.5, 0.5))
