"""The full toy world (shipped in rsc/toy/world): it is the world the current code builds and meets its targets
(that its SD reproduces its manifest: tests/test_demo_refiner.py).

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


# That the shipped SD still samples its manifest's statistics is checked in tests/test_demo_refiner.py, on the
# uncorrected half of the demo's re-measured efficacy report (the same images; sampling them twice costs minutes).
