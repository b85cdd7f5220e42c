"""The LightningModule that trains a latent refiner against a frozen Stable Diffusion."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from rsc.backbone import DTYPES, FrozenLDM
from rsc.config import MAX_SEED, check_number
from rsc.export import sampling_strength, sampling_threshold, sampling_window
from rsc.losses import PreferenceLoss, PreferenceLossOutput, per_sample_error
from rsc.numerics import NumericsGuard, non_finite_tensors
from rsc.refiner import LatentRefiner, RefinerConfig, RefinerCorrection
from rsc.sampling import check_window, window_timestep_range


class RSCorrector(L.LightningModule):
    """Trains a :class:`~rsc.refiner.LatentRefiner` on preference pairs; the backbone stays frozen.

    Only the refiner's parameters reach the optimizer and the checkpoint; the
    checkpoint records ``backbone`` (Hub id or path) so the model can be rebuilt.

    Args:
        backbone: Hub id, diffusers folder or single-file checkpoint of the frozen SD.
        backbone_config: For single-file backbones: the diffusers folder with its configs.
        backbone_dtype: dtype of the frozen weights ("float32", "float16", "bfloat16").
        hidden_channels: Refiner block width.
        num_blocks: Refiner residual blocks.
        embedding_dim: Refiner conditioning width.
        norm_groups: Refiner GroupNorm groups.
        x0_input: The refiner also reads the frozen model's x0-prediction at z_t
            (:class:`rsc.refiner.RefinerConfig`); training gets it free from the reference term.
        correction_window: Fractions (start, end) of the sampling trajectory that are corrected
            (0 = pure noise); training draws timesteps from the same window.
        sampling_window: The window at sampling time (validation, the end-of-fit report, the export;
            ``None``: ``correction_window``). A window that runs on past the trained one lets the refiner
            undo a stereotype that comes back in the later steps, after the trained window let go.
        strength: s in ``z_t + s * R(z_t, t, c)`` at training time, and at sampling time unless
            ``sampling_strength`` is set.
        sampling_strength: s at sampling time: what validation, the end-of-fit report and the export use
            (``None``: ``strength``). Like a guidance scale, a dial between how much is corrected and how
            much of the image is kept, set without retraining.
        sampling_threshold: Dead zone of the correction at sampling time, relative to the latent's norm
            (see :class:`rsc.refiner.RefinerCorrection`): an update smaller than this fraction of |z_t|
            is dropped and larger ones are shortened by it. 0 = off.
        beta: Preference inverse temperature.
        lambda_reg: Weight of the refiner-magnitude regulariser.
        lambda_sft: Weight of the policy error on the preferred sample.
        lambda_no_harm: Weight of the "do no harm" term: the per-pair excess of the corrected
            prediction's error on the preferred sample over the frozen model's.
        lambda_keep: Weight of the refiner's mean squared output on the preferred samples' latents
            (trajectories that already lead to an anti-stereotypical image are left alone).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up.
        gradient_checkpointing: Recompute UNet activations in the backward pass (saves GPU memory).
        compile_refiner: ``torch.compile`` the refiner.
        seed: Seed of the validation noise (validation is deterministic).
        max_consecutive_skipped_steps: A step with a non-finite loss or gradient is skipped and
            counted (``train/skipped_steps``); this many in a row stop the run (:mod:`rsc.numerics`).
    """

    def __init__(
        self,
        backbone: str,
        backbone_config: str | None = None,
        backbone_dtype: str = "float32",
        hidden_channels: int = 128,
        num_blocks: int = 4,
        embedding_dim: int = 256,
        norm_groups: int = 32,
        x0_input: bool = False,
        correction_window: tuple[float, float] = (0.0, 0.5),
        sampling_window: tuple[float, float] | None = None,
        strength: float = 1.0,
        sampling_strength: float | None = None,
        sampling_threshold: float = 0.0,
        beta: float = 1000.0,
        lambda_reg: float = 0.1,
        lambda_sft: float = 0.0,
        lambda_no_harm: float = 0.0,
        lambda_keep: float = 0.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        compile_refiner: bool = False,
        seed: int = 0,
        max_consecutive_skipped_steps: int = 10,
    ) -> None:
        super().__init__()
        if backbone_dtype not in DTYPES:
            raise ValueError(f"backbone_dtype must be one of {sorted(DTYPES)}, got {backbone_dtype!r}")
        # Checked before the backbone loads, so a typo in a config costs no loading time.
        check_number("strength", strength)
        if sampling_strength is not None:
            check_number("sampling_strength", sampling_strength)
        check_number("sampling_threshold", sampling_threshold, minimum=0)
        if sampling_window is not None:
            check_window(sampling_window, name="sampling_window")
        check_number("learning_rate", learning_rate, positive=True)
        check_number("weight_decay", weight_decay, minimum=0)
        check_number("warmup_steps", warmup_steps, minimum=0, integer=True)
        check_number("seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
        self.loss_fn = PreferenceLoss(  # checks the loss weights
            beta=beta, lambda_reg=lambda_reg, lambda_sft=lambda_sft, lambda_no_harm=lambda_no_harm, lambda_keep=lambda_keep
        )
        self.save_hyperparameters()
        self.ldm = FrozenLDM.from_pretrained(backbone, config=backbone_config, dtype=DTYPES[backbone_dtype])
        if gradient_checkpointing:
            self.ldm.unet.enable_gradient_checkpointing()
        self.refiner = LatentRefiner(
            RefinerConfig(
                latent_channels=self.ldm.latent_channels,
                text_embedding_dim=self.ldm.text_embedding_dim,
                hidden_channels=hidden_channels,
                num_blocks=num_blocks,
                embedding_dim=embedding_dim,
                norm_groups=norm_groups,
                x0_input=x0_input,
            )
        )
        # A compiled *function*, not a module attribute: a second module reference would
        # duplicate the refiner's weights in every checkpoint.
        self._refiner_forward = torch.compile(self.refiner.forward) if compile_refiner else self.refiner.forward
        self.timestep_range = window_timestep_range(
            correction_window, self.ldm.noise_scheduler.config.num_train_timesteps
        )
        # The backbone is rebuilt from hparams; checkpoints hold the refiner only.
        self.strict_loading = False
        self.numerics = NumericsGuard(max_consecutive_skipped_steps)
        self._skip_step = False

    # ------------------------------------------------------------------ the step
    def pair_step(
        self,
        batch: dict[str, Tensor],
        generator: torch.Generator | None = None,
        draws: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[PreferenceLossOutput, Tensor]:
        """Loss on a batch of pairs: one timestep and noise per pair, winner and loser through one UNet call each.

        ``draws`` (timesteps (B,), noise (B, C, h, w)) if given, else both drawn from ``generator``.
        """
        winners, losers = batch["anti_stereotypical_latents"], batch["stereotypical_latents"]
        text = batch["prompt_embeds"]
        pairs = winners.shape[0]
        if draws is None:
            low, high = self.timestep_range
            draws = (torch.randint(low, high, (pairs,), generator=generator, device="cpu"),
                     torch.randn(winners.shape, generator=generator, device="cpu"))
        timesteps, noise = draws[0].to(winners.device), draws[1].to(winners.device, winners.dtype)
        clean = torch.cat([winners, losers])
        timesteps, text = torch.cat([timesteps, timesteps]), torch.cat([text, text])
        noisy = self.ldm.add_noise(clean, torch.cat([noise, noise]), timesteps)
        with torch.no_grad():
            reference_x0 = self.ldm.predict_x0(noisy, timesteps, text)
        if self.refiner.config.x0_input:
            delta = self._refiner_forward(noisy, timesteps, text, reference_x0)
        else:
            delta = self._refiner_forward(noisy, timesteps, text)
        policy = per_sample_error(clean, self.ldm.predict_x0(noisy + self.hparams.strength * delta, timesteps, text))
        reference = per_sample_error(clean, reference_x0)
        output = self.loss_fn(
            policy[:pairs], reference[:pairs], policy[pairs:], reference[pairs:], delta, winner_refiner_output=delta[:pairs]
        )
        return output, delta

    def _log_output(self, prefix: str, output: PreferenceLossOutput, delta: Tensor, batch_size: int) -> None:
        on_step = prefix == "train"
        values = {
            "preference_loss": output.preference_loss,
            "preference_accuracy": output.accuracy,
            "winner_error_gap": output.winner_gap,
            "loser_error_gap": output.loser_gap,
            "refiner_rms": delta.detach().float().pow(2).mean().sqrt(),
        }
        self.log_dict(
            {f"{prefix}/{name}": value for name, value in values.items()},
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=False,
            batch_size=batch_size,
            sync_dist=not on_step,
        )
        self.log(f"{prefix}/loss", output.loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=not on_step)

    def pair_draws(self, indices: Tensor, latent_shape: tuple[int, ...], epoch: int) -> tuple[Tensor, Tensor]:
        """Each pair's training timestep and noise, from a generator seeded by (seed, epoch, its dataset index).

        Not by the step, the rank or the batch: a resumed run draws what an uninterrupted one
        would, and W processes with batch B/W draw what one process with batch B draws.
        """
        low, high = self.timestep_range
        timesteps, noise = [], []
        for index in indices.tolist():
            seed = (self.hparams.seed * 1_000_003 + epoch) * 10_000_019 + int(index)
            generator = torch.Generator().manual_seed(seed % 2**64)  # large seeds wrap instead of overflowing
            timesteps.append(torch.randint(low, high, (1,), generator=generator))
            noise.append(torch.randn(latent_shape, generator=generator))
        return torch.cat(timesteps), torch.stack(noise)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step on a batch of preference pairs (timesteps and noise from :meth:`pair_draws`)."""
        latents = batch["anti_stereotypical_latents"]
        draws = self.pair_draws(batch["index"], tuple(latents.shape[1:]), self.current_epoch)
        output, delta = self.pair_step(batch, draws=draws)
        self._log_output("train", output, delta, batch["prompt_embeds"].shape[0])
        return self._guard_loss(output.loss)

    # ------------------------------------------------------------------ the numerics guard
    def _guard_loss(self, loss: Tensor) -> Tensor:
        finite = bool(torch.isfinite(loss.detach()).all())
        # All ranks skip together, or one rank's optimizer would step on the others' gradients alone.
        self._skip_step = not self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self._skip_step:
            self.numerics.skip(self.global_step, f"loss = {loss.item()}")
            # A zero loss on the parameters: every rank still runs a backward (DDP all-reduces in it).
            loss = sum((parameter.sum() for parameter in self.refiner.parameters()), torch.zeros((), device=self.device)) * 0.0
        self.log("train/skipped_steps", float(self.numerics.skipped), on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step (no gradient, so AdamW leaves weights and moments alone) on a non-finite loss or gradient."""
        if not self._skip_step:
            bad = non_finite_tensors((name, parameter.grad) for name, parameter in self.refiner.named_parameters())
            if not bad:
                self.numerics.ok()
                return
            # Gradients are all-reduced already, so every rank sees the same ones and decides alike.
            self.numerics.skip(self.global_step, f"non-finite gradient of refiner.{bad[0]} ({len(bad)} tensor(s))")
        self._skip_step = False
        for parameter in self.refiner.parameters():
            parameter.grad = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The same loss with noise and timesteps fixed by the row indices (identical every epoch)."""
        generator = torch.Generator().manual_seed((self.hparams.seed * 7_919 + int(batch["index"][0]) + 1) % 2**64)
        output, delta = self.pair_step(batch, generator)
        self._log_output("val", output, delta, batch["prompt_embeds"].shape[0])

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> Any:
        """AdamW over the refiner's parameters only, with linear warm-up."""
        optimizer = torch.optim.AdamW(
            self.refiner.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone's weights: the checkpoint names it in ``hyper_parameters['backbone']``."""
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("ldm.")
        }
        checkpoint["numerics_guard"] = self.numerics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skipped-step counters."""
        self.numerics.load_state_dict(checkpoint.get("numerics_guard", {}))

    @property
    def correction_window(self) -> tuple[float, float]:
        """Fractions (start, end) of the sampling trajectory that are corrected at sampling time (0 = pure noise):
        ``sampling_window``, else the trained ``correction_window``."""
        return sampling_window(self.hparams)

    @property
    def sampling_strength(self) -> float:
        """The strength of the correction at sampling time (``sampling_strength``, else the training ``strength``)."""
        return sampling_strength(self.hparams)

    @sampling_strength.setter
    def sampling_strength(self, strength: float) -> None:
        """Set the sampling strength (e.g. :class:`rsc.callbacks.calibration.SamplingCalibration`'s choice); it is
        saved with the hyper-parameters, so later checkpoints and the export carry it."""
        check_number("sampling_strength", strength)
        self.hparams["sampling_strength"] = float(strength)

    @property
    def sampling_threshold(self) -> float:
        """The dead zone of the correction at sampling time (``sampling_threshold``; 0 = off)."""
        return sampling_threshold(self.hparams)

    def correction(self, strength: float | None = None) -> RefinerCorrection:
        """The trained refiner as a sampler correction (default: :attr:`sampling_strength`)."""
        return RefinerCorrection(
            self.refiner, self.sampling_strength if strength is None else strength, self.sampling_threshold,
            x0_predictor=self.ldm.predict_x0,
        )

    def export_config(self) -> dict[str, Any]:
        """What a frontend needs besides the weights: window, strength, the backbone it was trained for (and its config folder)."""
        return {
            "correction_window": list(self.correction_window),
            "strength": self.sampling_strength,
            "threshold": self.sampling_threshold,
            "backbone": self.hparams.backbone,
            "backbone_config": self.hparams.backbone_config,
            "prediction_type": self.ldm.prediction_type,
        }
