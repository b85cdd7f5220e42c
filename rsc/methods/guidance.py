"""``classifier_guidance``: gradient guidance on the predicted clean image with a differentiable attribute classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from rsc.methods.base import Method, MethodContext, SamplingSettings, register

if TYPE_CHECKING:
    from rsc.callbacks.measures import ValidationPrompt


@register
class ClassifierGuidance(Method):
    """eps' = eps - scale * sqrt(1 - alpha_bar_t) * grad_{z_t} log p(targets | D(x0_hat(z_t))) at every step.

    ``x0_hat`` is the clean latent implied by the (guided) noise prediction, held fixed under the
    gradient, so a step costs one VAE decode, one classifier pass and their backward, but no UNet
    backward. The classifier is the evaluation's (toy: its stereotype and gender heads; real: any
    differentiable :class:`~rsc.classifiers.base.AttributeClassifier`). Epsilon-prediction backbones only.

    Args:
        scale: Guidance scale (0: the ``none`` images).
        targets: Fixed ``{attribute: label}`` to push every image towards, e.g. ``{"stereotype": "absent"}``.
        prompt_attributes: ``{prompt field: classifier attribute}``: push each image towards the value its
            prompt names (e.g. ``{"gender": "gender"}``); prompts that name none are not pushed.
    """

    name = "classifier_guidance"

    def __init__(
        self,
        scale: float = 20.0,
        targets: dict[str, str] | None = None,
        prompt_attributes: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.targets = dict(targets) if targets is not None else {"stereotype": "absent"}
        self.prompt_attributes = dict(prompt_attributes) if prompt_attributes is not None else {"gender": "gender"}

    def options(self) -> dict[str, Any]:
        """Scale and targets."""
        return {"scale": self.scale, "targets": self.targets, "prompt_attributes": self.prompt_attributes}

    def setup(self, context: MethodContext) -> None:
        """Check the classifier knows every attribute and label, and that the backbone predicts epsilon."""
        super().setup(context)
        classifier = context.classifier
        if classifier is None:
            raise ValueError("method classifier_guidance needs the evaluation's classifier (none was given)")
        for attribute, label in self.targets.items():
            classifier.label_index(attribute, label)  # raises naming the known attributes / labels
        for field, attribute in self.prompt_attributes.items():
            if field not in ("group", "gender"):
                raise ValueError(f"method classifier_guidance: prompt_attributes key {field!r} must be 'group' or 'gender'")
            if attribute not in classifier.labels:
                raise ValueError(f"method classifier_guidance: prompt_attributes[{field!r}]={attribute!r} is not an "
                                 f"attribute of {type(classifier).__name__} (it has {sorted(classifier.labels)})")
        if context.ldm.prediction_type != "epsilon":
            raise ValueError(f"method classifier_guidance supports epsilon-prediction backbones, this one predicts "
                             f"{context.ldm.prediction_type!r}")

    def _target_columns(self, prompts: Sequence[ValidationPrompt]) -> dict[str, Tensor]:
        """Per attribute, the (N,) label column to push each image towards (-1: not pushed)."""
        classifier = self.context.classifier
        assert classifier is not None
        columns = {attribute: torch.full((len(prompts),), classifier.label_index(attribute, label))
                   for attribute, label in self.targets.items()}
        for field, attribute in self.prompt_attributes.items():
            values = [getattr(p, field) for p in prompts]
            columns[attribute] = torch.tensor(
                [classifier.label_index(attribute, v) if v is not None else -1 for v in values])
        return columns

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Guided images."""
        ldm, classifier = self.context.ldm, self.context.classifier
        assert classifier is not None
        columns = {name: column.to(ldm.device) for name, column in self._target_columns(prompts).items()}

        def guide(noise_pred: Tensor, latents: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
            timesteps = timestep.expand(len(latents)).to(latents.device)
            with torch.enable_grad():
                z = latents.detach().requires_grad_(True)
                x0 = ldm.x0_from_output(z, timesteps, noise_pred.detach())
                images = (ldm.decode_latents(x0).float() / 2 + 0.5).clamp(0, 1)
                probabilities = classifier(images)
                objective = z.new_zeros(())
                for attribute, column in columns.items():
                    chosen = probabilities[attribute].gather(1, column.clamp(min=0)[:, None]).squeeze(1)
                    objective = objective + (chosen.clamp(min=1e-8).log() * (column >= 0)).sum()
                (gradient,) = torch.autograd.grad(objective, z)
            sqrt_one_minus = (1 - ldm.alphas_cumprod[timesteps.long()]).sqrt().reshape(-1, 1, 1, 1)
            return noise_pred - self.scale * sqrt_one_minus.to(noise_pred) * gradient.to(noise_pred)

        # The classifier is a FrozenJudge: batch norm uses (and never updates) its running statistics while guiding.
        return self._sample([p.prompt for p in prompts], seeds, sampling, guidance=guide)
