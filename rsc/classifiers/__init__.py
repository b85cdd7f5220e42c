"""Attribute classifiers behind one interface (images -> per-attribute probabilities), and face handling.

* :class:`~rsc.classifiers.base.AttributeClassifier`: the interface; :class:`~rsc.classifiers.base.CombinedClassifier`
  reads several as one.
* :class:`~rsc.classifiers.toy.ToyClassifier`: the toy world's group / gender / stereotype classifier.
* :class:`~rsc.classifiers.base.AestheticPredictor`: the interface of per-image quality scores (images -> (N,)).
* :class:`~rsc.classifiers.toy.ToyFacialQuality`: the toy world's facial-quality judge (0-10), an aesthetic predictor.
* :class:`~rsc.classifiers.fairface.FairFaceClassifier`: FairFace's ResNet-34 (race, gender, age) from a local file.
* :class:`~rsc.classifiers.clip.CLIPZeroShotClassifier`: CLIP zero-shot over user-given class prompts.
* :class:`~rsc.classifiers.aesthetic.LaionAestheticPredictor`: LAION-style aesthetic score (not a classifier).
* :class:`~rsc.classifiers.faces.MTCNNFaces`: detect, keep the largest face, crop with a margin.
"""

from rsc.classifiers.aesthetic import LaionAestheticPredictor
from rsc.classifiers.base import STEREOTYPE_LABELS, AestheticPredictor, AttributeClassifier, CombinedClassifier
from rsc.classifiers.clip import CLIPEncoder, CLIPZeroShotClassifier
from rsc.classifiers.fairface import FairFaceClassifier
from rsc.classifiers.faces import FaceDetections, MTCNNFaces
from rsc.classifiers.toy import ToyClassifier, ToyFacialQuality

__all__ = [
    "STEREOTYPE_LABELS",
    "AestheticPredictor",
    "AttributeClassifier",
    "CLIPEncoder",
    "CLIPZeroShotClassifier",
    "CombinedClassifier",
    "FaceDetections",
    "FairFaceClassifier",
    "LaionAestheticPredictor",
    "MTCNNFaces",
    "ToyClassifier",
    "ToyFacialQuality",
]
