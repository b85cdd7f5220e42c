"""Tests of the toy attribute classifier (rsc.toy.classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsc.toy.classifier import (
    ToyAttributeClassifier,
    ToyClassifierConfig,
    augment_images,
    evaluate_classifier,
    train_toy_classifier,
)
from rsc.images import uint8_to_tensor
from rsc.toy.faces import GENDERS, GROUPS, random_attributes, render_faces


@pytest.fixture(scope="module")
def trained() -> tuple[ToyAttributeClassifier, dict[str, float]]:
    # Small budget (~10 s on 2 cores); the default budget reaches 1.00 on every head.
    return train_toy_classifier(num_images=1500, epochs=2, seed=0, progress=False, num_eval_images=600)


def test_trained_classifier_is_accurate_on_held_out_faces(
    trained: tuple[ToyAttributeClassifier, dict[str, float]],
) -> None:
    model, acc = trained
    assert set(acc) == {"group", "gender", "stereotype"}
    for head, value in acc.items():
        assert value >= 0.95, (head, acc)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # Independent check on a fresh render seed, including degraded (blurred, noisy) images.
    g, ge, st = random_attributes(300, seed=1234)
    imgs = render_faces(g, ge, st, seed=1234)
    fresh = evaluate_classifier(model, imgs, g, ge, st)
    assert min(fresh.values()) >= 0.95, fresh
    x = augment_images(uint8_to_tensor(imgs), torch.Generator().manual_seed(0))
    p = model.predict(x)
    assert (p["group"].argmax(-1).numpy() == g).mean() >= 0.95
    assert (p["gender"].argmax(-1).numpy() == ge).mean() >= 0.9
    assert ((p["stereotype"].numpy() > 0.5) == st).mean() >= 0.9


def test_training_is_deterministic_and_leaves_global_rng_alone() -> None:
    kw = dict(num_images=96, epochs=1, seed=3, batch_size=32, base_channels=4, progress=False, num_eval_images=16)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    m1, acc1 = train_toy_classifier(**kw)
    assert torch.equal(torch.rand(3), expected_next)
    m2, acc2 = train_toy_classifier(**kw)
    assert acc1 == acc2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3, _ = train_toy_classifier(**{**kw, "seed": 4})
    assert not torch.equal(m3.state_dict()["heads.group.weight"], s1["heads.group.weight"])


def test_forward_and_predict_shapes() -> None:
    torch.manual_seed(0)
    model = ToyAttributeClassifier(ToyClassifierConfig(base_channels=4))
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    out = model(x)
    assert out["group"].shape == (5, len(GROUPS))
    assert out["gender"].shape == (5, len(GENDERS))
    assert out["stereotype"].shape == (5,)
    model.train()
    p = model.predict(x)
    assert model.training  # training flag restored
    assert not p["group"].requires_grad
    torch.testing.assert_close(p["group"].sum(-1), torch.ones(5))
    torch.testing.assert_close(p["gender"].sum(-1), torch.ones(5))
    assert ((p["stereotype"] > 0) & (p["stereotype"] < 1)).all()
    model.eval()
    torch.testing.assert_close(p["stereotype"], torch.sigmoid(model(x)["stereotype"]))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 64, 64\), got \(5, 3, 32, 32\)"):
        model(torch.zeros(5, 3, 32, 32))


def test_default_size_is_small() -> None:
    n = ToyAttributeClassifier().num_parameters()
    assert 50_000 < n < 1_000_000


def test_uint8_to_tensor_range_and_layout() -> None:
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    imgs[0, 1, 2] = (0, 128, 255)
    t = uint8_to_tensor(imgs)
    assert t.shape == (2, 3, 64, 64) and t.dtype == torch.float32
    torch.testing.assert_close(t[0, :, 1, 2], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    assert t.min() >= -1 and t.max() <= 1
    with pytest.raises(ValueError, match=r"uint8"):
        uint8_to_tensor(imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        uint8_to_tensor(imgs[0])


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = ToyAttributeClassifier(ToyClassifierConfig(base_channels=6))
    # Make the batch-norm statistics non-trivial so they must be saved too.
    model.train()
    model(torch.rand(8, 3, 64, 64) * 2 - 1)
    model.eval()
    out = tmp_path / "clf"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"base_channels": 6, "image_size": 64, "num_genders": 2, "num_groups": 4}
    loaded = ToyAttributeClassifier.from_pretrained(out)
    assert not loaded.training
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Overwriting in place works and leaves no temporary files.
    loaded.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_missing_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*config\.json.*model\.safetensors"):
        ToyAttributeClassifier.from_pretrained(missing)
    ToyAttributeClassifier(ToyClassifierConfig(base_channels=4)).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        ToyAttributeClassifier.from_pretrained(tmp_path / "c")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"base_channels must be a positive integer, got 0"):
        ToyClassifierConfig(base_channels=0)
    with pytest.raises(ValueError, match=r"unknown ToyClassifierConfig keys \['width'\]"):
        ToyClassifierConfig.from_dict({"width": 3})


def test_evaluate_classifier_counts_and_validation() -> None:
    model = ToyAttributeClassifier(ToyClassifierConfig(base_channels=4))
    g, ge, st = random_attributes(10, seed=0)
    imgs = render_faces(g, ge, st, seed=0)
    p = model.predict(uint8_to_tensor(imgs))
    acc = evaluate_classifier(model, imgs, g, ge, st, batch_size=3)
    assert acc["group"] == pytest.approx((p["group"].argmax(-1).numpy() == g).mean())
    assert acc["gender"] == pytest.approx((p["gender"].argmax(-1).numpy() == ge).mean())
    assert acc["stereotype"] == pytest.approx(((p["stereotype"].numpy() > 0.5) == st).mean())
    with pytest.raises(ValueError, match=r"expected 10 labels per head.*groups=9"):
        evaluate_classifier(model, imgs, g[:9], ge, st)


def test_train_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_images must be an integer >= 1, got 0"):
        train_toy_classifier(num_images=0, progress=False)
