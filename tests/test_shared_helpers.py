"""Helpers that now serve two callers: the face rule (builder and metrics), the callbacks' protocol, folder swaps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from rsc.atomic import write_folder_atomic
from rsc.callbacks.protocol import as_corrector
from rsc.classifiers.faces import FaceDetections, FacePolicy, MTCNNFaces
from rsc.datamodules.builder import FaceFilter


class _Detections:
    """A small confident face and a larger, less confident one."""

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[5, 5, 15, 15], [30, 20, 60, 56]], np.float32), np.array([0.999, 0.93], np.float32)


def test_builder_and_metrics_keep_the_same_face_and_crop_the_same_window() -> None:
    boxes, probs = _Detections().detect(Image.new("RGB", (80, 64)))
    assert FacePolicy().choose(boxes, probs) == (2, 1), "the largest counted face, not the most confident"
    assert FacePolicy(min_confidence=0.95).choose(boxes, probs) == (1, 0)

    check = FaceFilter(_Detections(), policy="at_least_one", crop=True).check(Image.new("RGB", (80, 64)))
    assert check.box == (30.0, 20.0, 60.0, 56.0)
    # Side 36 * 1.4 = 50.4 around the centre (45, 38): x from 19.8, y from 12.8, on whole pixels.
    assert check.image.size == (50, 50)
    window = MTCNNFaces.crop_boxes(
        _metrics_faces(), FaceDetections(torch.tensor([True]), torch.tensor([0.93]), torch.tensor([check.box])), 64, 80
    )[0]
    torch.testing.assert_close(window, torch.tensor([19.8, 12.8, 70.2, 63.2]))


def _metrics_faces() -> MTCNNFaces:
    faces = MTCNNFaces.__new__(MTCNNFaces)  # the rule only: no MTCNN weights needed
    faces.policy = FacePolicy()
    return faces


def test_callbacks_name_what_a_module_lacks() -> None:
    with pytest.raises(TypeError, match=r"FairnessValidation needs .* BoringModule lacks \['ldm', 'refiner', 'correction_window'"):
        as_corrector(type("BoringModule", (L.LightningModule,), {})(), "FairnessValidation")


def test_a_refused_folder_write_leaves_the_folder_alone(tmp_path: Path) -> None:
    target = tmp_path / "data"
    write_folder_atomic(target, lambda staging: (staging / "a.txt").write_text("one"))

    def refuse(directory: Path) -> None:
        raise FileExistsError(f"{directory} exists")

    with pytest.raises(FileExistsError):
        write_folder_atomic(target, lambda staging: (staging / "a.txt").write_text("two"), refuse)
    assert (target / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
