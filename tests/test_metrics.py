"""The torchmetrics Metric classes of callbacks/metrics.py, against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from rsc.callbacks import metrics as m
from rsc.classifiers.clip import CLIPEncoder
from rsc.testing import save_random_clip

GROUPS = ("ardan", "belor", "cyran")
NAN = float("nan")


def _values(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


def _assert_values(result: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    got = _values(result)
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), (key, got[key], value)


def test_attribute_consistency_counts_matches_per_group() -> None:
    metric = m.AttributeConsistency(GROUPS, name="gender_consistency")
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9], [0.8, 0.2], [0.4, 0.6]])
    targets = torch.tensor([0, 0, 0, 1, -1, 1, 1])  # image 4's prompt names no gender
    groups = torch.tensor([0, 0, 0, 1, 1, 1, -1])  # image 6's prompt names no group
    metric.update(probabilities[:4], targets[:4], groups[:4])
    metric.update(probabilities[4:], targets[4:], groups[4:], valid=torch.tensor([True, False, True]))
    # ardan: 2 of 3 match; belor: image 3 matches, 4 has no target, 5 is not a face -> 1/1; cyran: none;
    # all: ardan 2/3 + belor 1/1 + ungrouped image 6 (match) -> 4/5.
    _assert_values(metric.compute(), {
        "gender_consistency/ardan": 2 / 3, "gender_consistency/belor": 1.0, "gender_consistency/cyran": NAN,
        "gender_consistency/all": 4 / 5, "gender_consistency/gap": 1 - 2 / 3,
    })
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()["gender_consistency/all"]))


def test_stereotype_rate_thresholds_probabilities() -> None:
    metric = m.StereotypeRate(GROUPS, threshold=0.5)
    metric.update(torch.tensor([0.9, 0.5, 0.51, 0.1, 0.7, 0.2]), torch.tensor([0, 0, 1, 1, 2, 2]))
    metric.update(torch.tensor([0.95]), torch.tensor([0]))
    # 0.5 is not above the threshold: ardan 2/3, belor 1/2, cyran 1/2.
    _assert_values(metric.compute(), {
        "stereotype_rate/ardan": 2 / 3, "stereotype_rate/belor": 0.5, "stereotype_rate/cyran": 0.5,
        "stereotype_rate/all": 4 / 7, "stereotype_rate/gap": 2 / 3 - 0.5,
    })
    with pytest.raises(ValueError, match=r"group_ids must be .* in \[-1, 2\]"):
        metric.update(torch.tensor([0.9]), torch.tensor([3]))


def test_face_detection_rate_and_confidence() -> None:
    metric = m.FaceDetection(GROUPS)
    found = torch.tensor([True, False, True, True, False, False])
    confidence = torch.tensor([0.99, 0.0, 0.91, 0.95, 0.0, 0.0], dtype=torch.float64)
    metric.update(found, confidence, torch.tensor([0, 0, 1, 1, 2, -1]))
    _assert_values(metric.compute(), {
        "face_detection_rate/ardan": 0.5, "face_detection_rate/belor": 1.0, "face_detection_rate/cyran": 0.0,
        "face_detection_rate/all": 3 / 6, "face_detection_rate/gap": 1.0,
        "face_confidence/ardan": 0.99, "face_confidence/belor": (0.91 + 0.95) / 2, "face_confidence/cyran": NAN,
        "face_confidence/all": (0.99 + 0.91 + 0.95) / 3, "face_confidence/gap": 0.99 - 0.93,
    })


def test_aesthetic_score_mean_and_gap() -> None:
    metric = m.AestheticScore(GROUPS)
    metric.update(torch.tensor([5.0, 6.0, 4.0, 7.5, 3.0]), torch.tensor([0, 0, 1, 2, 2]))
    _assert_values(metric.compute(), {
        "aesthetic/ardan": 5.5, "aesthetic/belor": 4.0, "aesthetic/cyran": 5.25,
        "aesthetic/all": 25.5 / 5, "aesthetic/gap": 1.5,
    })


def test_distribution_fairness_kl_gap_and_low_confidence() -> None:
    metric = m.DistributionFairness(["doctor", "nurse", "pilot"], num_classes=2, low_confidence=0.6)
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.3, 0.7], [0.7, 0.3], [0.2, 0.8]])
    metric.update(probabilities, torch.tensor([0, 0, 0, 0, 1, 1]))
    # doctor: predicted [0, 0, 0, 1] -> f = (3/4, 1/4); KL = 3/4 ln(2 * 3/4) + 1/4 ln(2 * 1/4); one top prob < 0.6.
    # nurse: (1/2, 1/2) -> KL 0, gap 0. pilot: no images -> NaN, left out of the means.
    kl_doctor = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    _assert_values(metric.compute(), {
        "kl_to_uniform/doctor": kl_doctor, "kl_to_uniform/nurse": 0.0, "kl_to_uniform/pilot": NAN,
        "kl_to_uniform/mean": kl_doctor / 2,
        "pairwise_gap/doctor": 0.5, "pairwise_gap/nurse": 0.0, "pairwise_gap/pilot": NAN, "pairwise_gap/mean": 0.25,
        "low_confidence/doctor": 0.25, "low_confidence/nurse": 0.0, "low_confidence/pilot": NAN,
        "low_confidence/mean": 0.125,
    })


def test_distribution_fairness_over_three_classes() -> None:
    metric = m.DistributionFairness(["person"], num_classes=3)
    metric.update(torch.eye(3)[[0, 0, 1, 0]], torch.zeros(4, dtype=torch.long))
    # f = (3/4, 1/4, 0): KL = 3/4 ln(9/4) + 1/4 ln(3/4); pairs |1/2|, |3/4|, |1/4| -> mean 1/2.
    values = _values(metric.compute())
    assert values["kl_to_uniform/person"] == pytest.approx(0.75 * math.log(2.25) + 0.25 * math.log(0.75))
    assert values["pairwise_gap/person"] == pytest.approx(0.5)
    # Uniform over the three classes: both measures vanish.
    metric.reset()
    metric.update(torch.eye(3), torch.zeros(3, dtype=torch.long))
    assert _values(metric.compute())["kl_to_uniform/person"] == pytest.approx(0.0, abs=1e-12)


def test_ssim_preservation_per_group_matches_per_image_ssim() -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    generator = torch.Generator().manual_seed(0)
    uncorrected = torch.rand(4, 3, 32, 32, generator=generator)
    corrected = uncorrected.clone()
    corrected[2:] = (corrected[2:] + 0.3 * torch.rand(2, 3, 32, 32, generator=generator)).clamp(0, 1)
    metric = m.SSIMPreservation(GROUPS)
    metric.update(corrected, uncorrected, torch.tensor([0, 0, 1, 1]))
    values = _values(metric.compute())
    # Identical images have SSIM exactly 1; a changed group matches torchmetrics' batch SSIM of its images.
    assert values["ssim/ardan"] == pytest.approx(1.0, abs=1e-6)
    changed = float(ssim(corrected[2:], uncorrected[2:], data_range=1.0))
    assert values["ssim/belor"] == pytest.approx(changed, abs=1e-6) and changed < 0.95
    assert values["ssim/all"] == pytest.approx((2 + 2 * changed) / 4, abs=1e-6)
    assert math.isnan(values["ssim/cyran"])


def test_lpips_preservation_loads_local_backbone_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    metric = m.LPIPSPreservation(GROUPS, backbone_weights=tmp_path / "alexnet.pth")
    # The backbone's first conv is the saved one (not torchvision's random init of this process).
    assert torch.equal(metric.net.net.slice1[0].weight, alexnet.features[0].weight)
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 64, 64, generator=generator), torch.rand(3, 3, 64, 64, generator=generator)
    metric.update(torch.cat([a[:1], a[1:]]), torch.cat([a[:1], b[1:]]), torch.tensor([0, 1, 1]))
    values = _values(metric.compute())
    assert values["lpips/ardan"] == pytest.approx(0.0, abs=1e-7)  # identical images
    with torch.no_grad():
        per_image = metric.net(a[1:], b[1:], normalize=True).reshape(-1)
    assert values["lpips/belor"] == pytest.approx(float(per_image.mean()), rel=1e-6) and values["lpips/belor"] > 0
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth.*lack \['features.0.bias'"):
        m.LPIPSPreservation(GROUPS, backbone_weights=tmp_path / "partial.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    assert m.find_local_lpips_backbone("alex") is None
    cached = tmp_path / "empty_hub" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert m.find_local_lpips_backbone("alex") == cached


def test_prompt_fidelity_is_a_clip_score_per_group(tmp_path: Path) -> None:
    save_random_clip(tmp_path / "clip", seed=0)
    encoder = CLIPEncoder(tmp_path / "clip")
    metric = m.PromptFidelity(encoder, GROUPS)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = ["a photo of a cat", "a photo of a dog", "a red car", "a photo of a cat"]
    metric.update(images[:3], prompts[:3], torch.tensor([0, 0, 1]))
    metric.update(images[3:], prompts[3:], torch.tensor([-1]))
    with torch.no_grad():
        image = encoder.encode_images(images)
        text = encoder.encode_texts(prompts)
    cosine = (image * text).sum(-1)
    scores = 100 * cosine
    values = _values(metric.compute())
    assert values["clip_score/ardan"] == pytest.approx(max(float(scores[:2].mean()), 0.0), abs=1e-4)
    assert values["clip_score/belor"] == pytest.approx(max(float(scores[2]), 0.0), abs=1e-4)
    assert values["clip_score/all"] == pytest.approx(max(float(scores.mean()), 0.0), abs=1e-4)
    assert math.isnan(values["clip_score/cyran"])


class _TwoFeatures(torch.nn.Module):
    """Features (mean of channel 0, mean of channel 1): FID/KID become computable by hand."""

    num_features = 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :2].mean(dim=(2, 3))


def _images_with_features(features: list[tuple[float, float]]) -> torch.Tensor:
    images = torch.zeros(len(features), 3, 8, 8)
    for index, (first, second) in enumerate(features):
        images[index, 0], images[index, 1] = first, second
    return images


def test_fid_and_kid_with_a_local_feature_extractor() -> None:
    real = _images_with_features([(0.0, 0.0), (0.2, 0.4), (0.4, 0.0), (0.2, 0.4)])
    fake = _images_with_features([(0.5, 0.1), (0.7, 0.1), (0.5, 0.1), (0.7, 0.1)])
    fid = FrechetInceptionDistance(feature=_TwoFeatures(), reset_real_features=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    # real: mean (0.2, 0.2), variances (0.08/3, 0.16/3), covariance 0; fake: mean (0.6, 0.1), variances (0.04/3, 0).
    # Diagonal covariances: FID = |mu_r - mu_f|^2 + sum_k (sigma_r,k - sigma_f,k)^2.
    expected = (0.4**2 + 0.1**2) + (math.sqrt(0.08 / 3) - math.sqrt(0.04 / 3)) ** 2 + (math.sqrt(0.16 / 3)) ** 2
    assert float(fid.compute()) == pytest.approx(expected, abs=1e-5)
    # reset_real_features=False keeps the reference set across validation runs.
    fid.reset()
    fid.update(real, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-5)

    kid = KernelInceptionDistance(feature=_TwoFeatures(), subsets=1, subset_size=4, degree=1, gamma=1.0, coef=1.0)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    # k(x, y) = x.y + 1: the constant cancels in the unbiased MMD^2, which leaves the linear kernel's.
    r, f = _TwoFeatures()(real).double(), _TwoFeatures()(fake).double()

    def within(x: torch.Tensor) -> float:
        gram = x @ x.T
        return float((gram.sum() - gram.diagonal().sum()) / (len(x) * (len(x) - 1)))

    expected_kid = within(r) + within(f) - 2 * float((r @ f.T).mean())
    assert float(kid.compute()[0]) == pytest.approx(expected_kid, abs=1e-6)
