"""The toy world's biased, captioned training data.

Captions name a group and a gender, ``"a photo of a <group> <gender>"``. The
bias is planted the way web data plants it: for the targeted groups most
images carry the stereotype, and their captions' gender is often wrong, so a
text-to-image model trained on it reproduces both for those groups only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from rsc.toy.faces import GENDERS, GROUPS, render_faces

PROMPT_TEMPLATE = "a photo of a {group} {gender}"


def toy_prompt(group: str, gender: str) -> str:
    """The caption/prompt for a group and a gender."""
    if group not in GROUPS:
        raise ValueError(f"unknown toy group {group!r}; expected one of {GROUPS}")
    if gender not in GENDERS:
        raise ValueError(f"unknown toy gender {gender!r}; expected one of {GENDERS}")
    return PROMPT_TEMPLATE.format(group=group, gender=gender)


def toy_prompts() -> list[tuple[str, str, str]]:
    """All ``(prompt, group, gender)`` combinations, groups major."""
    return [(toy_prompt(group, gender), group, gender) for group in GROUPS for gender in GENDERS]


@dataclass(frozen=True)
class BiasSpec:
    """How the training data is biased.

    Attributes:
        targeted_groups: Groups whose images mostly carry the stereotype.
        stereotype_rate_targeted: Share of the targeted groups' images with the stereotype.
        stereotype_rate_other: Share of the other groups' images with the stereotype.
        gender_flip_rate_targeted: Share of the targeted groups' captions naming the wrong gender.
        gender_flip_rate_other: The same for the other groups.
    """

    targeted_groups: tuple[str, ...] = ("belor", "dovek")
    stereotype_rate_targeted: float = 0.85
    stereotype_rate_other: float = 0.02
    gender_flip_rate_targeted: float = 0.4
    gender_flip_rate_other: float = 0.02

    def __post_init__(self) -> None:
        unknown = [g for g in self.targeted_groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"targeted_groups {unknown} are not toy groups; expected names from {GROUPS}")
        for name in ("stereotype_rate_targeted", "stereotype_rate_other", "gender_flip_rate_targeted", "gender_flip_rate_other"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"BiasSpec.{name} must be a probability in [0, 1], got {value}")

    def is_targeted(self, group: str) -> bool:
        """Whether ``group`` is one of the targeted groups."""
        return group in self.targeted_groups

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass
class CaptionedFaces:
    """Rendered faces with their captions and true attributes (indices into GROUPS/GENDERS)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    groups: np.ndarray
    genders: np.ndarray  # the gender drawn in the image
    caption_genders: np.ndarray  # the gender the caption names
    stereotypes: np.ndarray
    meta: dict = field(default_factory=dict)


def make_biased_dataset(num_images: int, seed: int, bias: BiasSpec | None = None, size: int = 64) -> CaptionedFaces:
    """Render ``num_images`` captioned faces with the bias of ``bias``, deterministically for ``seed``.

    Groups and caption genders are balanced; the stereotype and caption-gender
    errors follow ``bias``.
    """
    bias = bias or BiasSpec()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    combos = rng.permutation(np.arange(num_images) % (len(GROUPS) * len(GENDERS)))
    groups = combos % len(GROUPS)
    caption_genders = combos // len(GROUPS)
    targeted = np.isin(groups, [GROUPS.index(g) for g in bias.targeted_groups])
    stereotype_p = np.where(targeted, bias.stereotype_rate_targeted, bias.stereotype_rate_other)
    flip_p = np.where(targeted, bias.gender_flip_rate_targeted, bias.gender_flip_rate_other)
    stereotypes = rng.random(num_images) < stereotype_p
    flipped = rng.random(num_images) < flip_p
    genders = np.where(flipped, 1 - caption_genders, caption_genders)
    images = render_faces(groups, genders, stereotypes, seed=seed, size=size)
    captions = [toy_prompt(GROUPS[g], GENDERS[c]) for g, c in zip(groups, caption_genders)]
    return CaptionedFaces(images, captions, groups, genders, caption_genders, stereotypes)
