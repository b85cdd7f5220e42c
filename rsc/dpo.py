"""Diffusion-DPO fine-tuning of a LoRA on the frozen UNet: the fine-tuning baseline that rsc is compared with.

``DiffusionDPO`` trains a peft LoRA (added with diffusers' ``add_adapter``, as
diffusers' own LoRA training does) on a copy of the backbone's UNet with the
Diffusion-DPO loss (Wallace et al. 2023) on the same preference pairs rsc
trains on: for a pair (x_w preferred, x_l rejected), one t and one noise,

    e_m(x) = || target - UNet_m(x_t, t, c) ||^2   (target: epsilon, or v for v-prediction)
    L = -log sigmoid( -beta/2 * [ (e_lora(w) - e_ref(w)) - (e_lora(l) - e_ref(l)) ] )

with the reference being the same UNet with the adapter disabled. It is
:class:`rsc.losses.PreferenceLoss` on noise-prediction errors (no refiner, so
no regulariser). Unlike rsc it changes the model's weights.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor

from rsc.backbone import FrozenLDM
from rsc.losses import PreferenceLoss, per_sample_error

#: The attention projections diffusers' LoRA scripts adapt.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class DiffusionDPO(L.LightningModule):
    """A LoRA on a copy of ``ldm``'s UNet, trained with the Diffusion-DPO loss on cached preference batches.

    Args:
        ldm: The frozen backbone (shared, not changed: the LoRA goes on a copy of its UNet).
        rank: LoRA rank.
        alpha: LoRA alpha.
        beta: Inverse temperature of the preference.
        learning_rate: AdamW learning rate.
        seed: Seed of the adapter's initial weights and of the per-step timesteps and noise.
    """

    def __init__(self, ldm: FrozenLDM, rank: int = 4, alpha: float = 4.0, beta: float = 2500.0,
                 learning_rate: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        from peft import LoraConfig

        self.save_hyperparameters(ignore=["ldm"])
        self.ldm = ldm
        self.unet = copy.deepcopy(ldm.unet)
        # init_lora_weights=True: B = 0, so the untrained adapter leaves the UNet's output unchanged. A is random:
        # drawn from `seed`, so that an adapter cached by its configuration is one the configuration reproduces.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGETS))
        self.loss_fn = PreferenceLoss(beta=beta, lambda_reg=0.0)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable adapter weights."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _errors(self, noisy: Tensor, timesteps: Tensor, text: Tensor, target: Tensor) -> Tensor:
        output = self.unet(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return per_sample_error(target, output)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The Diffusion-DPO loss on a batch of pairs (noise from a generator seeded by the step)."""
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        winners, losers, text = batch["anti_stereotypical_latents"], batch["stereotypical_latents"], batch["prompt_embeds"]
        pairs = winners.shape[0]
        steps = self.ldm.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (pairs,), generator=generator).to(winners.device)
        noise = torch.randn(winners.shape, generator=generator).to(winners.device, winners.dtype)
        clean, noise, timesteps = torch.cat([winners, losers]), torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        noisy = self.ldm.add_noise(clean, noise, timesteps)
        target = noise if self.ldm.prediction_type == "epsilon" else self.ldm.noise_scheduler.get_velocity(clean, noise, timesteps)
        text = torch.cat([text, text])
        policy = self._errors(noisy, timesteps, text, target)
        with torch.no_grad():
            self.unet.disable_adapters()
            try:
                reference = self._errors(noisy, timesteps, text, target)
            finally:
                self.unet.enable_adapters()
        output = self.loss_fn(policy[:pairs], reference[:pairs], policy[pairs:], reference[pairs:], noise.new_zeros(()))
        self.log_dict({"train/loss": output.loss.detach(), "train/preference_accuracy": output.accuracy}, on_step=True,
                      batch_size=pairs)
        return output.loss

    def configure_optimizers(self) -> Any:
        """AdamW on the adapter only."""
        return torch.optim.AdamW(self.lora_parameters(), lr=self.hparams.learning_rate)

    def adapted_ldm(self) -> FrozenLDM:
        """The backbone with the adapted UNet (the other components shared)."""
        ldm = self.ldm
        return FrozenLDM(ldm.vae, ldm.text_encoder, ldm.tokenizer, self.unet.eval(), ldm.scheduler, source=ldm.source)
