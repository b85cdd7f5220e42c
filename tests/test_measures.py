"""The diversity and per-group KID metrics against values computed by hand, and the measurement's input checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchmetrics.image.kid import poly_mmd

from rsc.callbacks.measures import Judges, ValidationPrompt, measure
from rsc.callbacks.metrics import Diversity, GroupKID
from rsc.classifiers import ToyClassifier
from rsc.toy.classifier import ToyAttributeClassifier, ToyClassifierConfig


def test_diversity_is_the_rms_pairwise_distance_per_prompt() -> None:
    torch.manual_seed(0)
    features, prompt_ids = torch.randn(9, 5).double(), torch.tensor([0, 1, 0, 0, 1, 0, 1, 1, 2])
    metric = Diversity(["a", "b", "c"], feature_dim=5)
    metric.update(features[:4], prompt_ids[:4])  # two updates: states add up
    metric.update(features[4:], prompt_ids[4:])
    values = metric.compute()
    for index, name in enumerate("ab"):
        rows = features[prompt_ids == index]
        pairs = [((x - y) ** 2).sum() for x, y in itertools.combinations(rows, 2)]
        assert float(values[f"diversity/{name}"]) == pytest.approx(float(torch.stack(pairs).mean().sqrt()), rel=1e-9)
    assert torch.isnan(values["diversity/c"])  # a single image has no pair
    assert float(values["diversity/mean"]) == pytest.approx((float(values["diversity/a"]) + float(values["diversity/b"])) / 2)


def test_group_kid_equals_torchmetrics_mmd_and_ignores_update_order() -> None:
    torch.manual_seed(1)
    fake, real = torch.randn(12, 6).double(), torch.randn(12, 6).double() + 0.5  # KID compares equal-size subsets
    groups = torch.tensor([0] * 6 + [1] * 6)
    first = GroupKID(["x", "y"], subset_size=100, subsets=2)
    first.add_references(real[:6], 0)
    first.add_references(real[6:], 1)
    first.update(fake, groups, torch.arange(12))
    values = first.compute()
    assert float(values["kid/x"]) == pytest.approx(float(poly_mmd(real[:6], fake[:6])), rel=1e-9)
    assert float(values["kid/y"]) == pytest.approx(float(poly_mmd(real[6:], fake[6:])), rel=1e-9)
    # Subsets smaller than the sets: the draws follow the images' order, not the update order.
    small = [GroupKID(["x", "y"], subset_size=4, subsets=5) for _ in range(2)]
    for metric in small:
        metric.add_references(real[:6], 0)
        metric.add_references(real[6:], 1)
    small[0].update(fake, groups, torch.arange(12))
    reverse = torch.arange(11, -1, -1)
    small[1].update(fake[reverse], groups[reverse], reverse)
    assert float(small[0].compute()["kid/x"]) == float(small[1].compute()["kid/x"])


def test_measure_names_a_missing_attribute() -> None:
    classifier = ToyClassifier(model=ToyAttributeClassifier(ToyClassifierConfig(base_channels=4)))
    judges = Judges(classifier=classifier, gender_attribute="sex")
    prompts = [ValidationPrompt("a photo of a belor man", group="belor", gender="man")]
    with pytest.raises(ValueError, match=r"evaluate\.gender_attribute='sex' is not an attribute of ToyClassifier"):
        measure(judges, prompts, torch.zeros(2, dtype=torch.long), torch.arange(2), torch.rand(2, 3, 16, 16), where="evaluate")
    judges = Judges(classifier=classifier)
    with pytest.raises(ValueError, match=r"prompts\[0\]\.group='zorin'"):
        judges.groups([ValidationPrompt("a photo of a zorin", group="zorin")], "evaluate")


def test_judging_never_moves_the_judges_batch_norm_statistics() -> None:
    """A measurement must not depend on what was measured before (the uncorrected images before the corrected ones)."""
    torch.manual_seed(0)
    classifier = ToyClassifier(model=ToyAttributeClassifier(ToyClassifierConfig(base_channels=4)))
    judges = Judges(classifier=classifier)
    classifier.train()  # what a parent module or a trainer may ask: a judge stays in eval mode
    assert not any(module.training for module in classifier.modules())
    prompts = [ValidationPrompt("a photo of a ardan woman", group="ardan", gender="woman"),
               ValidationPrompt("a photo of a belor man", group="belor", gender="man")]
    prompt_ids = torch.tensor([0] * 4 + [1] * 4)
    first, other = torch.rand(8, 3, 64, 64), torch.rand(8, 3, 64, 64) * 0.3
    before = judges.classifier.predict(first)
    first_report = measure(judges, prompts, prompt_ids, torch.arange(8), first)
    measure(judges, prompts, prompt_ids, torch.arange(8), other, baseline=first)
    judges.features(other)
    for name, probabilities in judges.classifier.predict(first).items():
        torch.testing.assert_close(probabilities, before[name], rtol=0, atol=0)
    assert measure(judges, prompts, prompt_ids, torch.arange(8), first) == first_report
