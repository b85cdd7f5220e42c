"""The full toy world (shipped in rsc/toy/world): it is the world the current code builds, meets its targets,
and its SD reproduces its manifest.

A full rebuild takes about half an hour on two cores, so it is not a test: `bash scripts/rebuild_toy_world.sh`
rebuilds and compares (run it before landing a change to rsc/toy; the fingerprint test below fails until then).
"""

from __future__ import annotations


import pytest
from diffusers import StableDiffusionPipeline

from rsc.toy.classifier import evaluate_classifier
from rsc.toy.data import toy_prompts
from rsc.toy.faces import random_attributes, render_faces
from rsc.toy.world import SHIPPED_WORLD_DIR, ToyWorldConfig, load_toy_world


@pytest.fixture(scope="module")
def shipped():  # noqa: ANN201
    return load_toy_world(SHIPPED_WORLD_DIR)


def assert_toy_world_statistics(manifest: dict) -> None:
    """The acceptance criteria of the toy world, on a manifest's recorded statistics and targets."""
    missed = {name: check for name, check in manifest["targets"].items() if not check["ok"]}
    assert not missed, missed
    statistics = manifest["statistics"]
    for prompt, rates in statistics["per_prompt"].items():
        assert rates["images"] >= 64, prompt
    # The checks the manifest states are the ones the issue asks for (recomputed here, not trusted).
    targeted = set(manifest["config"]["bias"]["targeted_groups"])
    assert statistics["vae_psnr_db"] >= 28.0
    for prompt, group, _ in toy_prompts():
        rates = statistics["per_prompt"][prompt]
        assert rates["group_match"] >= 0.9, (prompt, rates)
        if group in targeted:
            assert rates["stereotype_rate"] >= 0.6, (prompt, rates)
            assert statistics["per_group"][group]["gender_consistency"] <= 0.7, (group, statistics["per_group"][group])
        else:
            assert rates["render_quality"] - rates["quality"] <= 1.0, (prompt, rates)
    for view, accuracy in statistics["classifier_heldout_accuracy"].items():
        assert min(accuracy.values()) >= (0.98 if view == "renders" else 0.95), (view, accuracy)


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
def test_shipped_sd_reproduces_its_manifest(shipped, shipped_demo_measured: dict) -> None:  # noqa: ANN001
    # The demo's efficacy report, measured again, samples the uncorrected SD with the manifest's evaluation
    # settings: the same images the world's statistics were computed from.
    manifest = shipped.manifest
    sampling = shipped_demo_measured["sampling"]
    assert (sampling["samples_per_prompt"], sampling["first_seed"], sampling["steps"], sampling["guidance_scale"]) == (
        manifest["config"]["eval_samples_per_prompt"], manifest["statistics"]["eval_seeds"][0],
        manifest["config"]["sampling_steps"], manifest["config"]["guidance_scale"])
    measured = {row["prompt"]: row for row in shipped_demo_measured["per_prompt"].values()}
    assert set(measured) == set(manifest["statistics"]["per_prompt"])
    for prompt, rates in manifest["statistics"]["per_prompt"].items():
        for name in ("group_match", "gender_consistency", "stereotype_rate"):
            # One image of 64 may flip across BLAS builds; more would mean the world changed.
            assert abs(measured[prompt][name][0] - rates[name]) <= 1.5 / rates["images"], (prompt, name)
