"""The full toy world (shipped in rsc/toy/world): its statistics hold, match its manifest, and reproduce.

The rebuild test takes about ten minutes on two cores; it is marked slow and still runs in CI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from rsc.toy.classifier import ToyAttributeClassifier, evaluate_classifier
from rsc.toy.evaluate import sample_toy_prompts, toy_statistics
from rsc.toy.faces import random_attributes, render_faces
from rsc.toy.world import SHIPPED_WORLD_DIR, ToyWorldConfig, build_toy_world, load_toy_world


@pytest.fixture(scope="module")
def shipped():  # noqa: ANN201
    return load_toy_world(SHIPPED_WORLD_DIR)


def assert_toy_world_statistics(manifest: dict) -> None:
    """The acceptance criteria of the toy world, on a manifest's recorded statistics."""
    statistics = manifest["statistics"]
    for head, accuracy in statistics["classifier_heldout_accuracy"].items():
        assert accuracy >= 0.95, (head, accuracy)
    targeted = set(manifest["config"]["bias"]["targeted_groups"])
    per_group = statistics["per_group"]
    for prompt, rates in statistics["per_prompt"].items():
        assert rates["images"] >= 64, prompt
    for group, rates in per_group.items():
        assert rates["group_match"] >= 0.85, (group, rates)
        if group in targeted:
            assert rates["stereotype_rate"] >= 0.5, (group, rates)
        else:
            assert rates["stereotype_rate"] <= 0.10, (group, rates)
    targeted_consistency = max(per_group[g]["gender_consistency"] for g in targeted)
    other_consistency = min(r["gender_consistency"] for g, r in per_group.items() if g not in targeted)
    assert targeted_consistency + 0.15 <= other_consistency, (targeted_consistency, other_consistency)


def test_shipped_world_is_the_current_full_world(shipped) -> None:  # noqa: ANN001
    # Otherwise the demo would rebuild it: a code change that alters the world must ship a rebuilt one.
    assert shipped.manifest["fingerprint"] == ToyWorldConfig.full().fingerprint()
    sizes = shipped.manifest["sizes"]
    pipeline = StableDiffusionPipeline.from_pretrained(shipped.sd_path)
    assert sum(p.numel() for p in pipeline.unet.parameters()) == sizes["unet_parameters"]
    assert sum(p.numel() for p in pipeline.vae.parameters()) == sizes["vae_parameters"]
    assert sum(p.numel() for p in pipeline.text_encoder.parameters()) == sizes["text_encoder_parameters"]
    preferences = shipped.load_preferences()
    assert {s: preferences[s].num_rows for s in preferences} == sizes["preference_pairs"]
    assert min(sizes["preference_pairs"].values()) >= 20


def test_shipped_world_statistics_meet_the_criteria(shipped) -> None:  # noqa: ANN001
    assert_toy_world_statistics(shipped.manifest)


def test_shipped_classifier_on_fresh_renders(shipped) -> None:  # noqa: ANN001
    groups, genders, stereotypes = random_attributes(800, seed=4242)
    images = render_faces(groups, genders, stereotypes, seed=4242)
    accuracy = evaluate_classifier(shipped.load_classifier(), images, groups, genders, stereotypes)
    assert min(accuracy.values()) >= 0.95, accuracy


@pytest.mark.slow
def test_shipped_sd_reproduces_its_manifest(shipped) -> None:  # noqa: ANN001
    manifest = shipped.manifest
    samples = sample_toy_prompts(
        shipped.load_backbone(),
        shipped.load_classifier(),
        manifest["config"]["eval_samples_per_prompt"],
        first_seed=manifest["statistics"]["eval_seeds"][0],
        steps=manifest["config"]["sampling_steps"],
        guidance_scale=manifest["config"]["guidance_scale"],
        progress=False,
    )
    measured = toy_statistics(samples)["per_prompt"]
    for prompt, rates in manifest["statistics"]["per_prompt"].items():
        for name in ("group_match", "gender_consistency", "stereotype_rate"):
            # One image of 64 may flip across BLAS builds; more would mean the world changed.
            assert abs(measured[prompt][name] - rates[name]) <= 1.5 / rates["images"], (prompt, name)


@pytest.mark.slow
def test_rebuild_with_the_same_seed_reproduces_the_statistics(shipped, tmp_path) -> None:  # noqa: ANN001
    rebuilt = build_toy_world(tmp_path / "world", ToyWorldConfig.full(seed=shipped.manifest["seed"]), progress=False)
    assert rebuilt.manifest["fingerprint"] == shipped.manifest["fingerprint"]
    assert_toy_world_statistics(rebuilt.manifest)
    for group, rates in shipped.manifest["statistics"]["per_group"].items():
        for name in ("group_match", "gender_consistency", "stereotype_rate"):
            assert abs(rebuilt.manifest["statistics"]["per_group"][group][name] - rates[name]) <= 0.05, (group, name)
    print(json.dumps({"rebuild_seconds": rebuilt.manifest["build_seconds"]}))
    assert np.isfinite(rebuilt.manifest["build_seconds"])
