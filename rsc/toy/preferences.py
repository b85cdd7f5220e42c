"""The toy preference dataset: stereotypical and anti-stereotypical samples of the toy SD, paired by prompt.

The classifier sorts the toy SD's own samples: those that show the prompt's
group but carry the stereotype or the wrong gender are *stereotypical*; those
that show the prompt's group and gender without the stereotype are
*anti-stereotypical*. Each stereotypical sample is paired with an
anti-stereotypical sample of the same group and gender, so a pair differs in
the stereotype and not in image style: both sides are the model's own
drawings, and the refiner learns to correct the model's images rather than to
paint renders. Extra candidates (``extra``) widen the search, e.g. samples of
the same group and gender prompted with the clean-face descriptor, which the
model more often draws clean. Procedural renders fill a side only where the
model gives no image for it (marked ``*_source="render"``): clean renders when
a prompt has fewer than ``min_anti_stereotypical`` clean samples, stereotyped
renders when a prompt (of a group the model treats fairly) has fewer than
``min_pairs_per_prompt`` stereotyped ones, so the refiner also learns where to
change nothing.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image

from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.toy.data import toy_prompts
from rsc.toy.evaluate import ToySamples
from rsc.toy.faces import GENDERS, GROUPS, render_faces


def build_preference_pairs(
    samples: ToySamples,
    seed: int,
    min_anti_stereotypical: int = 1,
    min_pairs_per_prompt: int = 24,
    validation_fraction: float = 0.1,
    extra: ToySamples | None = None,
) -> DatasetDict:
    """Pair the stereotypical samples of each prompt with anti-stereotypical ones; split train/validation.

    Every prompt gets at least ``min_pairs_per_prompt`` pairs. Where the model rarely
    produces the stereotype (the non-targeted groups), stereotyped procedural renders of
    the prompt's group and gender stand in for the missing stereotypical samples, paired
    with the model's own clean samples: these anchor pairs tell the refiner what to leave
    alone, since the model's output is already the preferred side.

    Args:
        samples: Classified samples of the toy SD (every toy prompt).
        seed: Seed for the pairing, the fallback renders and the split.
        min_anti_stereotypical: Top up a prompt's clean samples with clean renders to this many.
        min_pairs_per_prompt: Top up a prompt's stereotypical samples with stereotyped renders to this many.
        validation_fraction: Share of pairs in the validation split (at least one pair).
        extra: More classified samples (of any prompts naming a group and a gender) whose images join the
            winner and loser pools of their group and gender; the pairs still carry the plain prompt.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
    if extra is not None:
        samples = samples.concat(extra)
    images = samples.to_uint8()
    group_ok = samples.predicted_groups == samples.groups
    gender_ok = samples.predicted_genders == samples.genders
    stereotyped = samples.stereotyped
    if not (group_ok & (stereotyped | ~gender_ok)).any():
        raise ValueError("no sample is stereotyped or gender-inconsistent: the toy SD shows no bias to correct")
    rows: list[dict] = []
    for prompt_index, (prompt, group, gender) in enumerate(toy_prompts()):
        in_prompt = (samples.groups == GROUPS.index(group)) & (samples.genders == GENDERS.index(gender))
        winners = np.flatnonzero(in_prompt & group_ok & gender_ok & ~stereotyped)
        losers = np.flatnonzero(in_prompt & group_ok & (stereotyped | ~gender_ok))
        attributes = ([GROUPS.index(group)], [GENDERS.index(gender)])

        def renders(count: int, stereotype: bool, render_seed: int) -> list[np.ndarray]:
            return list(render_faces(attributes[0] * count, attributes[1] * count, [stereotype] * count, seed=render_seed))

        winner_pool: list[tuple[np.ndarray, str, int]] = [(images[i], "model", int(samples.seeds[i])) for i in winners]
        winner_pool += [(r, "render", -1) for r in renders(max(0, min_anti_stereotypical - len(winner_pool)), False, seed * 1000 + prompt_index)]
        loser_pool: list[tuple[np.ndarray, str, int, str]] = []
        for i in losers:
            reasons = [name for name, bad in (("stereotype", stereotyped[i]), ("gender", not gender_ok[i])) if bad]
            loser_pool.append((images[i], "model", int(samples.seeds[i]), "+".join(reasons)))
        missing = max(0, min_pairs_per_prompt - len(loser_pool))
        loser_pool += [(r, "render", -1, "stereotype") for r in renders(missing, True, seed * 1000 + 500 + prompt_index)]
        order = rng.permutation(len(winner_pool))
        for position, loser_index in enumerate(rng.permutation(len(loser_pool))):
            winner_image, winner_source, winner_seed = winner_pool[order[position % len(winner_pool)]]
            loser_image, loser_source, loser_seed, rejection = loser_pool[loser_index]
            rows.append(
                {
                    "prompt": prompt,
                    "anti_stereotypical": Image.fromarray(winner_image),
                    "stereotypical": Image.fromarray(loser_image),
                    "group": group,
                    "gender": gender,
                    "anti_stereotypical_source": winner_source,
                    "stereotypical_source": loser_source,
                    "anti_stereotypical_seed": winner_seed,
                    "stereotypical_seed": loser_seed,
                    "rejection": rejection,
                }
            )
    if len(rows) < 2:
        raise ValueError(f"only {len(rows)} preference pairs could be formed; need at least 2 for train and validation")
    order = rng.permutation(len(rows))
    num_validation = max(1, int(round(validation_fraction * len(rows))))
    split = {
        "validation": [rows[i] for i in sorted(order[:num_validation])],
        "train": [rows[i] for i in sorted(order[num_validation:])],
    }
    return DatasetDict(
        {name: Dataset.from_list(split[name], features=PREFERENCE_FEATURES) for name in ("train", "validation")}
    )
