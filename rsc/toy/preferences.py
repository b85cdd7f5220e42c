"""The toy preference dataset: stereotypical and anti-stereotypical samples of the toy SD, paired by prompt.

The classifier sorts the toy SD's own samples: those that show the prompt's
group but carry the stereotype or the wrong gender are *stereotypical*; those
that show the prompt's group and gender without the stereotype are
*anti-stereotypical*. Each stereotypical sample is paired with an
anti-stereotypical sample of the same prompt, so a pair differs in the
stereotype and not in image style. When a prompt has too few clean samples,
clean procedural renders fill the gap (as real users pair SD samples with
real photos), marked ``anti_stereotypical_source="render"``.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image

from datamodules.schema import PREFERENCE_FEATURES
from rsc.toy.data import toy_prompts
from rsc.toy.evaluate import ToySamples
from rsc.toy.faces import GENDERS, GROUPS, render_faces


def build_preference_pairs(
    samples: ToySamples,
    seed: int,
    min_anti_stereotypical: int = 32,
    validation_fraction: float = 0.1,
) -> DatasetDict:
    """Pair the stereotypical samples of each prompt with anti-stereotypical ones; split train/validation.

    Args:
        samples: Classified samples of the toy SD (every toy prompt).
        seed: Seed for the pairing, the fallback renders and the split.
        min_anti_stereotypical: Top up a prompt's clean samples with procedural renders to this many.
        validation_fraction: Share of pairs in the validation split (at least one pair).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
    images = samples.to_uint8()
    group_ok = samples.predicted_groups == samples.groups
    gender_ok = samples.predicted_genders == samples.genders
    stereotyped = samples.stereotyped
    rows: list[dict] = []
    for prompt_index, (prompt, group, gender) in enumerate(toy_prompts()):
        in_prompt = np.array([p == prompt for p in samples.prompts])
        winners = np.flatnonzero(in_prompt & group_ok & gender_ok & ~stereotyped)
        losers = np.flatnonzero(in_prompt & group_ok & (stereotyped | ~gender_ok))
        if len(losers) == 0:
            continue
        pool: list[tuple[np.ndarray, str, int]] = [(images[i], "model", int(samples.seeds[i])) for i in winners]
        missing = max(0, min_anti_stereotypical - len(pool))
        if missing:
            renders = render_faces(
                [GROUPS.index(group)] * missing,
                [GENDERS.index(gender)] * missing,
                [False] * missing,
                seed=seed * 1000 + prompt_index,
            )
            pool += [(render, "render", -1) for render in renders]
        order = rng.permutation(len(pool))
        for position, loser in enumerate(rng.permutation(losers)):
            winner_image, winner_source, winner_seed = pool[order[position % len(pool)]]
            reasons = [name for name, bad in (("stereotype", stereotyped[loser]), ("gender", not gender_ok[loser])) if bad]
            rows.append(
                {
                    "prompt": prompt,
                    "anti_stereotypical": Image.fromarray(winner_image),
                    "stereotypical": Image.fromarray(images[loser]),
                    "group": group,
                    "gender": gender,
                    "anti_stereotypical_source": winner_source,
                    "stereotypical_source": "model",
                    "anti_stereotypical_seed": winner_seed,
                    "stereotypical_seed": int(samples.seeds[loser]),
                    "rejection": "+".join(reasons),
                }
            )
    if len(rows) < 2:
        raise ValueError(f"only {len(rows)} preference pairs could be formed; the toy SD shows no bias to correct")
    order = rng.permutation(len(rows))
    num_validation = max(1, int(round(validation_fraction * len(rows))))
    split = {
        "validation": [rows[i] for i in sorted(order[:num_validation])],
        "train": [rows[i] for i in sorted(order[num_validation:])],
    }
    return DatasetDict(
        {name: Dataset.from_list(split[name], features=PREFERENCE_FEATURES) for name in ("train", "validation")}
    )
