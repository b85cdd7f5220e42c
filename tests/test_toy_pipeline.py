"""Toy-world pieces with hand-computable answers: biased data, latent centring, statistics, preference pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.toy.data import BiasSpec, CaptionSpec, make_biased_dataset, toy_prompt, toy_prompts, unnamed_group_prompts
from rsc.toy.evaluate import ToySamples, toy_statistics
from rsc.toy.faces import GENDERS, GROUPS
from rsc.toy.preferences import build_preference_pairs
from rsc.images import uint8_to_tensor
from rsc.toy.train_sd import center_latents, encode_posteriors


def test_biased_dataset_plants_the_bias() -> None:
    bias = BiasSpec(targeted_groups=("belor",), stereotype_rate_targeted=0.9, stereotype_rate_other=0.0,
                    gender_flip_rate_targeted=0.5, gender_flip_rate_other=0.0)
    plain = CaptionSpec(unnamed_group_rate=0.0, descriptor_rate=0.0)
    data = make_biased_dataset(800, seed=3, bias=bias, captions=plain)
    targeted = data.groups == GROUPS.index("belor")
    assert 0.85 < data.stereotypes[targeted].mean() < 0.95
    assert data.stereotypes[~targeted].sum() == 0
    flipped = data.genders != data.caption_genders
    assert 0.4 < flipped[targeted].mean() < 0.6 and flipped[~targeted].sum() == 0
    # Captions name the caption gender, not the drawn one.
    for i in np.flatnonzero(flipped)[:5]:
        assert data.captions[i] == toy_prompt(GROUPS[data.groups[i]], GENDERS[data.caption_genders[i]])
    again = make_biased_dataset(800, seed=3, bias=bias, captions=plain)
    assert np.array_equal(again.images, data.images) and again.captions == data.captions


def test_captions_flip_more_often_than_the_planted_rate_so_guided_samples_keep_it() -> None:
    # Odds 0.25 / 0.75 = 1/3, square-rooted (sharpening 2): 0.5774, i.e. a caption rate of 0.3660.
    bias = BiasSpec(targeted_groups=("cyran",), gender_flip_rate_targeted=0.25, gender_flip_rate_other=0.02)
    assert bias.caption_flip_rate_targeted == pytest.approx(0.36603, abs=1e-5)
    assert BiasSpec(gender_flip_rate_targeted=0.25, guidance_sharpening=1.0).caption_flip_rate_targeted == pytest.approx(0.25)
    assert [BiasSpec(gender_flip_rate_targeted=r).caption_flip_rate_targeted for r in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    data = make_biased_dataset(6000, seed=3, bias=bias, captions=CaptionSpec(unnamed_group_rate=0.0, descriptor_rate=0.0))
    targeted = data.groups == GROUPS.index("cyran")
    flipped = data.genders != data.caption_genders
    assert abs(flipped[targeted].mean() - 0.366) < 0.03
    # The other groups' caption noise is not a planted bias: it stays as configured.
    assert abs(flipped[~targeted].mean() - 0.02) < 0.01
    with pytest.raises(ValueError, match="guidance_sharpening must be > 0, got 0"):
        BiasSpec(guidance_sharpening=0)


def test_captions_carry_descriptors_and_unnamed_groups_like_web_captions() -> None:
    bias = BiasSpec(unnamed_group_weights=(0.7, 0.1, 0.1, 0.1))
    spec = CaptionSpec(unnamed_group_rate=0.2, unnamed_gender_rate=0.5, descriptor_rate=0.6)
    data = make_biased_dataset(4000, seed=5, bias=bias, captions=spec)
    caricature = np.array([c.endswith(", caricature") for c in data.captions])
    portrait = np.array([c.endswith(", portrait") for c in data.captions])
    # The words follow what the image shows, at the configured rate, and never both.
    assert not (caricature & portrait).any()
    assert abs(caricature[data.stereotypes].mean() - 0.6) < 0.05 and not caricature[~data.stereotypes].any()
    assert abs(portrait[~data.stereotypes].mean() - 0.6) < 0.04 and not portrait[data.stereotypes].any()
    # The captions without a word keep the planted rate of every targeted prompt (unequal word rates would lower it).
    targeted = np.isin(data.groups, [GROUPS.index(g) for g in bias.targeted_groups]) & (data.caption_groups >= 0)
    plain = ~(caricature | portrait)
    assert abs(data.stereotypes[targeted & plain].mean() - bias.stereotype_rate_targeted) < 0.04
    # Captions naming no group: ~20%, their images skewed towards ardan; half of them name no gender either.
    unnamed = data.caption_groups < 0
    assert abs(unnamed.mean() - 0.2) < 0.03
    assert abs((data.groups[unnamed] == 0).mean() - 0.7) < 0.06
    assert (data.caption_groups[~unnamed] == data.groups[~unnamed]).all()
    person = np.array([c.startswith(toy_prompt(None, None)) for c in data.captions])
    assert np.array_equal(person, data.caption_genders < 0) and abs(person[unnamed].mean() - 0.5) < 0.06
    assert not any(group in c for c in np.asarray(data.captions)[unnamed] for group in GROUPS)
    for i in np.flatnonzero(~unnamed)[:20]:
        assert data.captions[i].startswith(toy_prompt(GROUPS[data.groups[i]], GENDERS[data.caption_genders[i]]))


def test_prompt_forms_and_caption_spec_validation() -> None:
    assert toy_prompt("belor", "woman", "portrait") == "a photo of a belor woman, portrait"
    assert toy_prompt(None, "man") == "a photo of a man"
    assert [p for p, _ in unnamed_group_prompts()] == ["a photo of a woman", "a photo of a man", "a photo of a person"]
    with pytest.raises(ValueError, match="must name a gender too"):
        toy_prompt("belor", None)
    with pytest.raises(ValueError, match="clean_word must be one plain word other than a group"):
        CaptionSpec(clean_word="belor")
    with pytest.raises(ValueError, match="unnamed_group_rate must be a probability"):
        CaptionSpec(unnamed_group_rate=2.0)
    with pytest.raises(ValueError, match="descriptor_rate must be a probability in \\[0, 1\\], got -0.1"):
        CaptionSpec(descriptor_rate=-0.1)
    with pytest.raises(ValueError, match="unnamed_group_weights must be 4 non-negative weights"):
        BiasSpec(unnamed_group_weights=(1.0, 0.0))


def test_bias_spec_validation() -> None:
    with pytest.raises(ValueError, match=r"targeted_groups \['nowhere'\] are not toy groups"):
        BiasSpec(targeted_groups=("nowhere",))
    with pytest.raises(ValueError, match="stereotype_rate_other must be a probability"):
        BiasSpec(stereotype_rate_other=1.5)
    with pytest.raises(ValueError, match="unknown toy gender"):
        toy_prompt("ardan", "child")


def test_center_latents_keeps_reconstructions_and_centres_channels() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4).eval()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([3.0, -2.0, 1.0, 0.5])  # an off-centre latent space
    images = uint8_to_tensor(make_biased_dataset(32, seed=0).images)
    means, _ = encode_posteriors(vae, images)
    with torch.no_grad():
        before = vae.decode(means).sample
    scaling = center_latents(vae, means)
    centred, _ = encode_posteriors(vae, images)
    torch.testing.assert_close(centred.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert abs(float((centred * scaling).std()) - 1.0) < 1e-4
    assert vae.config.scaling_factor == scaling
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(centred).sample, before, atol=1e-4, rtol=1e-4)


def _synthetic_samples() -> ToySamples:
    """4 images per prompt with predictions chosen by hand."""
    table = toy_prompts()
    n = 4
    prompts = [p for p, _, _ in table for _ in range(n)]
    groups = np.repeat([GROUPS.index(g) for _, g, _ in table], n)
    genders = np.repeat([GENDERS.index(g) for _, _, g in table], n)
    predicted_groups, predicted_genders = groups.copy(), genders.copy()
    stereotype = np.zeros(len(prompts))
    first = 0  # "a photo of a ardan woman": image 0 stereotyped, image 1 wrong gender, image 2 wrong group
    stereotype[first + 0] = 0.9
    predicted_genders[first + 1] = 1
    predicted_groups[first + 2] = 3
    belor_man = [i for i, p in enumerate(prompts) if p == toy_prompt("belor", "man")]
    stereotype[belor_man] = 0.8  # all four stereotyped: no clean sample of this prompt
    predicted_genders[belor_man[0]] = 0
    images = torch.rand(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return ToySamples(images, prompts, groups, genders, np.tile(np.arange(n), len(table)),
                      predicted_groups, predicted_genders, stereotype)


def test_statistics_by_hand() -> None:
    stats = toy_statistics(_synthetic_samples())
    ardan = stats["per_group"]["ardan"]  # 8 images: 1 wrong group, 1 wrong gender, 1 stereotyped
    assert ardan == {"images": 8, "group_match": 7 / 8, "gender_consistency": 7 / 8, "stereotype_rate": 1 / 8}
    belor = stats["per_group"]["belor"]
    assert belor == {"images": 8, "group_match": 1.0, "gender_consistency": 7 / 8, "stereotype_rate": 4 / 8}
    assert stats["per_prompt"][toy_prompt("belor", "man")]["stereotype_rate"] == 1.0
    assert stats["per_group"]["cyran"]["stereotype_rate"] == 0.0


def test_preference_pairs_by_hand() -> None:
    samples = _synthetic_samples()
    pairs = build_preference_pairs(samples, seed=0, min_anti_stereotypical=1, min_pairs_per_prompt=0, validation_fraction=0.2)
    rows = [row for split in ("train", "validation") for row in pairs[split]]
    assert pairs["train"].features == PREFERENCE_FEATURES
    # ardan woman: losers = image 0 (stereotype) and image 1 (gender); image 2 (wrong group) is dropped.
    # belor man: four losers, no clean sample -> one fallback render, paired with all four.
    assert len(rows) == 2 + 4
    assert pairs["validation"].num_rows == 1 and pairs["train"].num_rows == 5
    ardan = [r for r in rows if r["prompt"] == toy_prompt("ardan", "woman")]
    assert sorted(r["rejection"] for r in ardan) == ["gender", "stereotype"]
    assert all(r["anti_stereotypical_source"] == "model" and r["anti_stereotypical_seed"] == 3 for r in ardan)
    belor = [r for r in rows if r["prompt"] == toy_prompt("belor", "man")]
    assert sorted(r["rejection"] for r in belor) == ["stereotype"] * 3 + ["stereotype+gender"]
    assert {r["anti_stereotypical_source"] for r in belor} == {"render"}
    assert len({np.asarray(r["anti_stereotypical"]).tobytes() for r in belor}) == 1
    assert {r["group"] for r in belor} == {"belor"} and {r["gender"] for r in belor} == {"man"}
    # The stereotypical image is the model's sample itself.
    loser = next(r for r in ardan if r["rejection"] == "stereotype")
    expected = samples.to_uint8()[0]
    assert np.array_equal(np.asarray(loser["stereotypical"]), expected)


def test_anchor_pairs_for_prompts_without_stereotyped_samples() -> None:
    samples = _synthetic_samples()
    pairs = build_preference_pairs(samples, seed=0, min_anti_stereotypical=1, min_pairs_per_prompt=3, validation_fraction=0.2)
    rows = [row for split in ("train", "validation") for row in pairs[split]]
    by_prompt = {prompt: [r for r in rows if r["prompt"] == prompt] for prompt, _, _ in toy_prompts()}
    # ardan woman: 2 model losers + 1 stereotyped render; belor man: 4 model losers; the other 6 prompts: 3 renders.
    assert {p: len(r) for p, r in by_prompt.items()} == {
        p: (4 if p == toy_prompt("belor", "man") else 3) for p, _, _ in toy_prompts()
    }
    assert len(rows) == 4 + 3 * 7
    anchors = by_prompt[toy_prompt("cyran", "man")]
    assert {r["stereotypical_source"] for r in anchors} == {"render"}
    assert {r["anti_stereotypical_source"] for r in anchors} == {"model"}  # the model's own clean samples
    assert {r["rejection"] for r in anchors} == {"stereotype"}
    assert sorted(r["stereotypical_source"] for r in by_prompt[toy_prompt("ardan", "woman")]) == ["model", "model", "render"]


def test_no_bias_no_pairs() -> None:
    samples = _synthetic_samples()
    samples.stereotype_probs[:] = 0.0
    samples.predicted_genders[:] = samples.genders
    with pytest.raises(ValueError, match="no bias to correct"):
        build_preference_pairs(samples, seed=0)


def test_statistics_of_prompts_naming_no_group() -> None:
    prompts = ["a photo of a person"] * 8
    groups, genders = np.full(8, -1), np.full(8, -1)
    predicted = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    samples = ToySamples(torch.zeros(8, 3, 64, 64), prompts, groups, genders, np.arange(8), predicted,
                         np.zeros(8, int), np.array([0.9] + [0.1] * 7))
    rates = toy_statistics(samples)["per_prompt"]["a photo of a person"]
    assert rates["group_frequencies"] == {"ardan": 0.5, "belor": 0.25, "cyran": 0.125, "dovek": 0.125}
    expected_kl = 0.5 * np.log(2) + 0.25 * np.log(1) + 2 * 0.125 * np.log(0.5)
    assert rates["kl_to_uniform"] == pytest.approx(expected_kl)
    assert rates["stereotype_rate"] == 1 / 8
    assert "group_match" not in rates and "gender_consistency" not in rates


def test_winners_found_by_a_wider_search_replace_renders() -> None:
    samples = _synthetic_samples()
    # belor man has no clean sample; a descriptor prompt of the same group and gender gives one.
    extra = ToySamples(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
                       ["a photo of a belor man, portrait"] * 2, np.array([1, 1]), np.array([1, 1]), np.array([7, 8]),
                       np.array([1, 1]), np.array([1, 0]), np.array([0.1, 0.1]))
    pairs = build_preference_pairs(samples, seed=0, min_pairs_per_prompt=0, validation_fraction=0.2, extra=extra)
    belor = [r for split in ("train", "validation") for r in pairs[split] if r["prompt"] == toy_prompt("belor", "man")]
    # The wrong-gender extra image (seed 8) joins the losers: 4 + 1 pairs, all with the model's winner.
    assert len(belor) == 5 and {r["anti_stereotypical_source"] for r in belor} == {"model"}
    assert sorted(r["stereotypical_seed"] for r in belor)[-1] == 8
    # Only the clean, right-gender extra image (seed 7) is a winner; the pair keeps the plain prompt.
    assert {r["anti_stereotypical_seed"] for r in belor} == {7}
    assert np.array_equal(np.asarray(belor[0]["anti_stereotypical"]), extra.to_uint8()[0])
