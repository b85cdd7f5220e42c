"""Methods that act through the prompt alone: ``none``, ``negative_prompt``, ``prompt_addition``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import Tensor

from rsc.methods.base import Method, SamplingSettings, register

if TYPE_CHECKING:
    from rsc.callbacks.measures import ValidationPrompt


@register
class NoCorrection(Method):
    """Plain sampling: the uncorrected model every other method is compared with."""

    name = "none"

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images of the prompts as they are."""
        return self._sample([p.prompt for p in prompts], seeds, sampling)


@register
class NegativePrompt(Method):
    """A negative prompt replaces the empty unconditional prompt of classifier-free guidance (no extra UNet pass).

    Args:
        negative_prompt: The words to steer away from, e.g. the stereotype's descriptor word.
    """

    name = "negative_prompt"

    def __init__(self, negative_prompt: str = "caricature") -> None:
        super().__init__()
        self.negative_prompt = negative_prompt

    def options(self) -> dict[str, Any]:
        """The negative prompt."""
        return {"negative_prompt": self.negative_prompt}

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images with the negative prompt in the unconditional branch."""
        return self._sample([p.prompt for p in prompts], seeds, sampling, negative_prompt=self.negative_prompt)


@register
class PromptAddition(Method):
    """Words appended to every prompt, e.g. a descriptor of clean faces.

    Args:
        addition: Appended verbatim (include the separator, e.g. ``", portrait"``).
    """

    name = "prompt_addition"

    def __init__(self, addition: str = ", portrait") -> None:
        super().__init__()
        self.addition = addition

    def options(self) -> dict[str, Any]:
        """The appended words."""
        return {"addition": self.addition}

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images of the extended prompts."""
        return self._sample([p.prompt + self.addition for p in prompts], seeds, sampling)
