"""The toy world's biased, captioned training data.

Captions are written the way web captions are. Most name a group and a gender,
``"a photo of a <group> <gender>"``; a share names no group (``"a photo of a
woman"``, ``"a photo of a person"``) and shows a skewed mix of groups; and a
share carries a descriptor word that co-occurs with what the image shows (the
stereotype word with stereotyped faces, the clean-face word with clean ones),
so the baselines that act through words (negative prompts, prompt additions,
semantic guidance) have a word to act on. The bias is planted the way web data
plants it: for the targeted groups most images carry the stereotype, and their
captions' gender is often wrong, so a text-to-image model trained on it
reproduces both for those groups only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from rsc.toy.faces import GENDERS, GROUPS, render_faces

PROMPT_TEMPLATE = "a photo of a {group} {gender}"
#: The subject word of captions that name neither a group nor a gender.
PERSON = "person"


def toy_prompt(group: str | None, gender: str | None, descriptor: str | None = None) -> str:
    """The caption/prompt for a group and a gender, either of which may be left unnamed.

    ``toy_prompt("belor", "woman")`` is ``"a photo of a belor woman"``;
    ``toy_prompt(None, "man")`` is ``"a photo of a man"``; ``toy_prompt(None, None)`` is
    ``"a photo of a person"``; a descriptor is appended after a comma
    (``toy_prompt("belor", "woman", "portrait")`` is ``"a photo of a belor woman, portrait"``).
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown toy group {group!r}; expected one of {GROUPS} or None")
    if gender is not None and gender not in GENDERS:
        raise ValueError(f"unknown toy gender {gender!r}; expected one of {GENDERS} or None")
    if group is not None and gender is None:
        raise ValueError(f"a prompt naming group {group!r} must name a gender too")
    if group is not None:
        prompt = PROMPT_TEMPLATE.format(group=group, gender=gender)
    else:
        prompt = f"a photo of a {gender or PERSON}"
    if descriptor:
        prompt = f"{prompt}, {descriptor}"
    return prompt


def toy_prompts(descriptor: str | None = None) -> list[tuple[str, str, str]]:
    """All ``(prompt, group, gender)`` combinations, groups major (with ``descriptor`` appended if given)."""
    return [(toy_prompt(group, gender, descriptor), group, gender) for group in GROUPS for gender in GENDERS]


def unnamed_group_prompts() -> list[tuple[str, str | None]]:
    """The ``(prompt, gender)`` prompts that name no group: per gender, and one naming neither."""
    return [(toy_prompt(None, gender), gender) for gender in (*GENDERS, None)]


@dataclass(frozen=True)
class BiasSpec:
    """How the training data is biased.

    Attributes:
        targeted_groups: Groups whose images mostly carry the stereotype.
        stereotype_rate_targeted: Share of the targeted groups' images with the stereotype.
        stereotype_rate_other: Share of the other groups' images with the stereotype.
        gender_flip_rate_targeted: Share of the targeted groups' samples that show the wrong
            gender (the planted gender bias). Their training captions name the wrong gender at
            the higher :attr:`caption_flip_rate_targeted`, so that the guided samples keep this share.
        gender_flip_rate_other: Share of the other groups' captions naming the wrong gender
            (caption noise, not a planted bias, so it is not raised).
        unnamed_group_weights: Group mix (one weight per group in :data:`GROUPS`) of the images whose
            captions name no group: skewed, so that ``"a photo of a person"`` has a measurable
            distance to a uniform group distribution.
    """

    targeted_groups: tuple[str, ...] = ("belor", "dovek")
    stereotype_rate_targeted: float = 0.85
    stereotype_rate_other: float = 0.02
    gender_flip_rate_targeted: float = 0.4
    gender_flip_rate_other: float = 0.02
    unnamed_group_weights: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    guidance_sharpening: float = 2.0

    def __post_init__(self) -> None:
        unknown = [g for g in self.targeted_groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"targeted_groups {unknown} are not toy groups; expected names from {GROUPS}")
        for name in ("stereotype_rate_targeted", "stereotype_rate_other", "gender_flip_rate_targeted", "gender_flip_rate_other"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"BiasSpec.{name} must be a probability in [0, 1], got {value}")
        weights = tuple(self.unnamed_group_weights)
        if len(weights) != len(GROUPS) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(
                f"BiasSpec.unnamed_group_weights must be {len(GROUPS)} non-negative weights (one per group in "
                f"{GROUPS}) with a positive sum, got {self.unnamed_group_weights}"
            )
        if not self.guidance_sharpening > 0:
            raise ValueError(f"BiasSpec.guidance_sharpening must be > 0, got {self.guidance_sharpening}")

    @property
    def caption_flip_rate_targeted(self) -> float:
        """The share of the targeted groups' training captions that name the wrong gender.

        Classifier-free guidance sharpens a minority mode away: the toy SD, sampled at guidance 7,
        shows the flipped gender about as if the odds of its caption flips were raised to the
        power :attr:`guidance_sharpening` (worlds built with the captions flipped at the planted
        rate: 0.3 came out as 0.14 and 0.21, 0.25 as 0.11, i.e. powers 1.6-2.1). The captions
        therefore flip at the rate whose odds, so raised, are the planted rate's.
        """
        rate = self.gender_flip_rate_targeted
        if rate in (0.0, 1.0):
            return rate
        odds = (rate / (1.0 - rate)) ** (1.0 / self.guidance_sharpening)
        return odds / (1.0 + odds)

    def is_targeted(self, group: str) -> bool:
        """Whether ``group`` is one of the targeted groups."""
        return group in self.targeted_groups

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class CaptionSpec:
    """Which captions name no group and which carry a descriptor word.

    Attributes:
        unnamed_group_rate: Share of captions that name no group (their images follow
            :attr:`BiasSpec.unnamed_group_weights`).
        unnamed_gender_rate: Share of those that name no gender either (``"a photo of a person"``).
        stereotype_word: Made-up descriptor that co-occurs with the stereotype.
        clean_word: Neutral descriptor that co-occurs with clean faces.
        descriptor_rate: Share of captions that carry the descriptor fitting their image
            (``stereotype_word`` on a stereotyped face, ``clean_word`` on a clean one).

    One rate for both words, so that the captions without a word keep the planted stereotype
    rate: with rates ``a`` (stereotyped) and ``b`` (clean) the plain prompt's rate would be
    ``p(1-a) / (p(1-a) + (1-p)(1-b))``, e.g. 0.52 for a planted 0.6 at a = 0.5, b = 0.3, and a
    world would under-plant its bias in exactly the prompts it is measured on.
    """

    unnamed_group_rate: float = 0.15
    unnamed_gender_rate: float = 0.4
    stereotype_word: str = "caricature"
    clean_word: str = "portrait"
    descriptor_rate: float = 0.4

    def __post_init__(self) -> None:
        for name in ("unnamed_group_rate", "unnamed_gender_rate", "descriptor_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CaptionSpec.{name} must be a probability in [0, 1], got {value}")
        for name in ("stereotype_word", "clean_word"):
            word = getattr(self, name)
            if not word or not word.replace("-", "").isalpha() or word in (*GROUPS, *GENDERS, PERSON):
                raise ValueError(
                    f"CaptionSpec.{name} must be one plain word other than a group or gender name, got {word!r}"
                )
        if self.stereotype_word == self.clean_word:
            raise ValueError(f"CaptionSpec: stereotype_word and clean_word are both {self.clean_word!r}")


@dataclass
class CaptionedFaces:
    """Rendered faces with their captions and true attributes (indices into GROUPS/GENDERS)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    groups: np.ndarray
    genders: np.ndarray  # the gender drawn in the image
    caption_genders: np.ndarray  # the gender the caption names (-1: none)
    caption_groups: np.ndarray  # the group the caption names (-1: none)
    stereotypes: np.ndarray
    meta: dict = field(default_factory=dict)


def make_biased_dataset(
    num_images: int, seed: int, bias: BiasSpec | None = None, size: int = 64, captions: CaptionSpec | None = None
) -> CaptionedFaces:
    """Render ``num_images`` captioned faces with the bias of ``bias``, deterministically for ``seed``.

    Groups and caption genders of the group-naming captions are balanced; the
    images of captions that name no group follow ``bias.unnamed_group_weights``.
    The stereotype and caption-gender errors follow ``bias``; unnamed subjects
    and descriptor words follow ``captions`` (default :class:`CaptionSpec`; pass
    ``CaptionSpec(unnamed_group_rate=0, descriptor_rate=0)``
    for group-and-gender captions only).
    """
    bias = bias or BiasSpec()
    captions = captions or CaptionSpec()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    combos = rng.permutation(np.arange(num_images) % (len(GROUPS) * len(GENDERS)))
    groups = combos % len(GROUPS)
    caption_genders = combos // len(GROUPS)
    unnamed = rng.random(num_images) < captions.unnamed_group_rate
    weights = np.asarray(bias.unnamed_group_weights, dtype=np.float64)
    groups = np.where(unnamed, rng.choice(len(GROUPS), size=num_images, p=weights / weights.sum()), groups)
    targeted = np.isin(groups, [GROUPS.index(g) for g in bias.targeted_groups])
    stereotype_p = np.where(targeted, bias.stereotype_rate_targeted, bias.stereotype_rate_other)
    flip_p = np.where(targeted, bias.caption_flip_rate_targeted, bias.gender_flip_rate_other)
    stereotypes = rng.random(num_images) < stereotype_p
    flipped = rng.random(num_images) < flip_p
    genders = np.where(flipped, 1 - caption_genders, caption_genders)
    no_gender = unnamed & (rng.random(num_images) < captions.unnamed_gender_rate)
    with_word = rng.random(num_images) < captions.descriptor_rate
    images = render_faces(groups, genders, stereotypes, seed=seed, size=size)
    caption_groups = np.where(unnamed, -1, groups)
    caption_genders = np.where(no_gender, -1, caption_genders)
    texts = [
        toy_prompt(
            GROUPS[g] if g >= 0 else None,
            GENDERS[c] if c >= 0 else None,
            (captions.stereotype_word if s else captions.clean_word) if w else None,
        )
        for g, c, s, w in zip(caption_groups, caption_genders, stereotypes, with_word)
    ]
    return CaptionedFaces(images, texts, groups, genders, caption_genders, caption_groups, stereotypes)
