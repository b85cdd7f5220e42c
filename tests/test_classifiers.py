"""Attribute classifiers behind one interface (toy, FairFace, CLIP zero-shot, LAION aesthetic) and MTCNN faces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from rsc.classifiers import (
    STEREOTYPE_LABELS,
    CLIPEncoder,
    CLIPZeroShotClassifier,
    CombinedClassifier,
    FairFaceClassifier,
    LaionAestheticPredictor,
    MTCNNFaces,
    ToyClassifier,
)
from rsc.testing import save_random_clip
from rsc.classifiers.fairface import FAIRFACE_AGES, FAIRFACE_GENDERS, FAIRFACE_RACES_4, FAIRFACE_RACES_7
from rsc.images import uint8_to_tensor
from rsc.toy.faces import GENDERS, GROUPS, random_attributes, render_faces
from rsc.toy.world import SHIPPED_WORLD_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_random_clip(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def encoder(clip_dir: Path) -> CLIPEncoder:
    return CLIPEncoder(clip_dir)


# ---------------------------------------------------------------------------------------------- toy
def test_toy_classifier_reads_unit_images_and_recognises_renders() -> None:
    classifier = ToyClassifier(SHIPPED_WORLD_DIR / "classifier")
    assert classifier.labels == {"group": GROUPS, "gender": GENDERS, "stereotype": STEREOTYPE_LABELS}
    groups, genders, stereotypes = random_attributes(48, seed=7, stereotype_rate=0.5)
    images = (uint8_to_tensor(render_faces(groups, genders, stereotypes, seed=7)) + 1) / 2
    probabilities = classifier.predict(images, batch_size=20)
    assert {k: tuple(v.shape) for k, v in probabilities.items()} == {"group": (48, 4), "gender": (48, 2), "stereotype": (48, 2)}
    for value in probabilities.values():
        torch.testing.assert_close(value.sum(-1), torch.ones(48))
    assert (probabilities["group"].argmax(-1).numpy() == groups).mean() >= 0.95
    assert (probabilities["gender"].argmax(-1).numpy() == genders).mean() >= 0.95
    assert ((probabilities["stereotype"][:, 1] > 0.5).numpy() == stereotypes).mean() >= 0.95
    # Column 1 of the stereotype is exactly the wrapped model's sigmoid on [-1, 1] images.
    direct = classifier.model.predict(images * 2 - 1)
    torch.testing.assert_close(probabilities["stereotype"][:, 1], direct["stereotype"])
    torch.testing.assert_close(probabilities["group"], direct["group"])
    # Other sizes are resized to the model's 64x64 input.
    upscaled = F.interpolate(images[:4], size=(128, 128), mode="nearest")
    assert torch.equal(classifier.predict(upscaled)["group"].argmax(-1), probabilities["group"][:4].argmax(-1))


def test_classifier_errors_name_the_problem() -> None:
    classifier = ToyClassifier(SHIPPED_WORLD_DIR / "classifier")
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        classifier.predict(torch.rand(2, 64, 64))
    with pytest.raises(ValueError, match="'elf' is not a group label"):
        classifier.label_index("group", "elf")
    with pytest.raises(ValueError, match="exactly one of"):
        ToyClassifier()
    with pytest.raises(ValueError, match="given by both"):
        CombinedClassifier([classifier, ToyClassifier(model=classifier.model)])


# ---------------------------------------------------------------------------------------------- FairFace
def _random_fairface_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet34(weights=None, num_classes=18).state_dict()


def test_fairface_loads_pt_and_safetensors_weights_and_splits_outputs(tmp_path: Path) -> None:
    state = _random_fairface_state(0)
    torch.save(state, tmp_path / "res34_fair_align_multi_7_20190809.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "fairface.safetensors")
    # DataParallel checkpoints prefix every key with "module."
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pth")

    reference = torchvision.models.resnet34(weights=None, num_classes=18)
    reference.load_state_dict(state)
    reference.eval()
    images = torch.rand(3, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = reference((images - mean) / std)
    for name in ("res34_fair_align_multi_7_20190809.pt", "fairface.safetensors", "parallel.pth"):
        classifier = FairFaceClassifier(tmp_path / name)
        assert classifier.labels == {"race": FAIRFACE_RACES_7, "gender": FAIRFACE_GENDERS, "age": FAIRFACE_AGES}
        probabilities = classifier.predict(images)
        torch.testing.assert_close(probabilities["race"], logits[:, :7].softmax(-1))
        torch.testing.assert_close(probabilities["gender"], logits[:, 7:9].softmax(-1))
        torch.testing.assert_close(probabilities["age"], logits[:, 9:18].softmax(-1))
    four = FairFaceClassifier(tmp_path / "fairface.safetensors", race_labels=FAIRFACE_RACES_4).predict(images)
    torch.testing.assert_close(four["race"], logits[:, :4].softmax(-1))


def test_fairface_rejects_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FairFace weights: file .*missing.pt"):
        FairFaceClassifier(tmp_path / "missing.pt")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=18).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="r18.pt.*does not fit the ResNet architecture.*unexpected keys"):
        FairFaceClassifier(tmp_path / "r18.pt")
    torch.save({"note": "not weights"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt.*does not hold a state dict"):
        FairFaceClassifier(tmp_path / "junk.pt")


# ---------------------------------------------------------------------------------------------- CLIP
def test_clip_zero_shot_is_a_softmax_of_scaled_cosines(encoder: CLIPEncoder) -> None:
    classes = {
        "gender": {"woman": "a photo of a woman", "man": ["a photo of a man", "a portrait of a man"]},
        "mood": {"happy": "a happy face", "sad": "a sad face", "calm": "a calm face"},
    }
    classifier = CLIPZeroShotClassifier(encoder, classes)
    assert classifier.labels == {"gender": ("woman", "man"), "mood": ("happy", "sad", "calm")}
    images = torch.rand(5, 3, 40, 48)
    probabilities = classifier.predict(images)
    # By hand: normalised image embeddings against per-label mean prompt embeddings (re-normalised).
    with torch.no_grad():
        image = encoder.model.get_image_features(pixel_values=encoder.pixel_values(images)).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        woman = encoder.encode_texts(["a photo of a woman"])[0]
        man = encoder.encode_texts(["a photo of a man", "a portrait of a man"]).mean(0)
        man = man / man.norm()
    scale = encoder.model.logit_scale.exp()
    expected = (scale * image @ torch.stack([woman, man]).T).softmax(-1)
    torch.testing.assert_close(probabilities["gender"], expected)
    assert probabilities["mood"].shape == (5, 3)
    sharper = CLIPZeroShotClassifier(encoder, classes, logit_scale=1000.0).predict(images)["gender"]
    assert torch.equal(sharper.argmax(-1), expected.argmax(-1)) and sharper.max() > 0.99


def test_clip_preprocessing_matches_the_image_processor(encoder: CLIPEncoder, clip_dir: Path) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    images = torch.rand(2, 3, 32, 32)  # already at the processor's size: no resampling difference
    expected = processor(images=[image for image in images], return_tensors="pt", do_rescale=False)["pixel_values"]
    torch.testing.assert_close(encoder.pixel_values(images), expected, atol=1e-5, rtol=1e-5)
    assert encoder.pixel_values(torch.rand(2, 3, 64, 96)).shape == (2, 3, 32, 32)


def test_clip_missing_model_fails_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot load CLIP .*nowhere"):
        CLIPEncoder(tmp_path / "nowhere")


def test_laion_aesthetic_mlp_and_linear_heads(encoder: CLIPEncoder, clip_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    # LAION's improved predictor layout (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear) at width 32.
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 16), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1),
    )
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    linear = torch.nn.Linear(32, 1)
    save_file(linear.state_dict(), tmp_path / "linear.safetensors")
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        embeddings = encoder.encode_images(images)
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
        expected_mlp, expected_linear = mlp.eval()(embeddings).squeeze(-1), linear(embeddings).squeeze(-1)
        torch.testing.assert_close(LaionAestheticPredictor(encoder, tmp_path / "mlp.pth")(images), expected_mlp)
        torch.testing.assert_close(LaionAestheticPredictor(clip_dir, tmp_path / "linear.safetensors")(images), expected_linear)
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "vit_l.pth")
    with pytest.raises(ValueError, match="expects 768-d CLIP embeddings but CLIP .* gives 32-d"):
        LaionAestheticPredictor(encoder, tmp_path / "vit_l.pth")
    torch.save({"fc.weight": torch.zeros(1, 32)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth.*expected 'weight'/'bias'"):
        LaionAestheticPredictor(encoder, tmp_path / "odd.pth")


# ---------------------------------------------------------------------------------------------- faces
@pytest.fixture(scope="module")
def faces() -> MTCNNFaces:
    return MTCNNFaces(min_confidence=0.9, margin=0.2, crop_size=96)


def test_mtcnn_finds_the_astronaut_and_counts_blank_images(faces: MTCNNFaces) -> None:
    from skimage.data import astronaut

    photo = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 255
    batch = torch.stack([photo, torch.full_like(photo, 0.5), torch.zeros_like(photo)])
    crops, detections = faces(batch)
    assert detections.found.tolist() == [True, False, False]
    assert detections.confidence[0] > 0.99 and detections.confidence[1:].tolist() == [0.0, 0.0]
    assert torch.isnan(detections.boxes[1:]).all()
    x0, y0, x1, y1 = detections.boxes[0].tolist()
    # Eileen Collins' face sits at roughly x 180-270, y 60-175 of the 512x512 photo.
    assert 150 < x0 < 200 < 250 < x1 < 300 and 30 < y0 < 90 < 150 < y1 < 210
    window = faces.crop_boxes(detections, 512, 512)[0]
    side = max(x1 - x0, y1 - y0) * 1.4
    torch.testing.assert_close(window[2:] - window[:2], torch.tensor([side, side]), atol=1e-3, rtol=0)
    torch.testing.assert_close((window[:2] + window[2:]) / 2, torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2]), atol=1e-3, rtol=0)
    assert crops.shape == (3, 3, 96, 96)
    # The crop is the face region resized: compare with a plain crop-and-resize of the same window.
    left, top, right, bottom = (int(round(v)) for v in window.tolist())
    expected = F.interpolate(photo[None, :, top:bottom, left:right], size=(96, 96), mode="bilinear", antialias=True)
    assert (crops[0] - expected[0]).abs().mean() < 0.03
    # A blank image is resized whole (and reported as faceless, not dropped).
    torch.testing.assert_close(crops[1], torch.full((3, 96, 96), 0.5))


def test_largest_confident_face_is_kept_and_windows_stay_inside(faces: MTCNNFaces) -> None:
    from rsc.classifiers.faces import FaceDetections

    detections = FaceDetections(
        found=torch.tensor([True, True]),
        confidence=torch.tensor([0.99, 0.95]),
        boxes=torch.tensor([[0.0, 0.0, 20.0, 10.0], [90.0, 80.0, 100.0, 100.0]]),
    )
    windows = faces.crop_boxes(detections, 100, 100)
    # Side 20 * 1.4 = 28; the first window would start at -4/-9 and is shifted to the corner, the second to the far edge.
    torch.testing.assert_close(windows, torch.tensor([[0.0, 0.0, 28.0, 28.0], [72.0, 72.0, 100.0, 100.0]]))
