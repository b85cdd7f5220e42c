"""Build a real preference dataset: stereotypical SD samples paired with labelled reference photos.

The pipeline, for users with a real Stable Diffusion and a labelled face set:

1. **Prompts** from a template and attribute lists, e.g. ``"a photo of a {group} {gender}"``
   or ``"a photo of a {group} {profession}"`` (:func:`expand_prompts`). Group and
   gender names are the labels of the reference set; ``prompt_words`` maps a label
   to the words used in the prompt where they differ.
2. **Stereotypical samples** (x_l): images the frozen SD draws for each prompt
   (:func:`generate_samples`). rsc treats what the uncorrected model draws for a
   prompt as the stereotyped side; it does not classify samples.
3. **Anti-stereotypical references** (x_w): photos from a folder with a
   ``labels.csv`` of ``file_name,group,gender`` (FairFace-style;
   :func:`read_reference_labels`), paired with samples whose prompt names the same
   group (and gender, when the template names one).
4. **Face filter** (:class:`FaceFilter`): facenet-pytorch's MTCNN
   (:class:`rsc.classifiers.faces.MTCNNFaceDetector`) keeps images with exactly one
   (or at least one) confident face, optionally cropped to it by the same rule as the
   metrics' face crops (:class:`rsc.classifiers.faces.FacePolicy`); images without a
   face are counted and dropped, on both sides.
5. **Output**: a ``DatasetDict`` (``train``/``validation``) with the columns of
   :mod:`rsc.datamodules.schema`, written with ``save_to_disk`` into a temporary folder
   next to ``out`` and renamed into place, plus ``build_report.json``.

``scripts/build_preference_dataset.py`` is the command-line front end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from PIL import Image

from rsc.atomic import write_folder_atomic
from rsc.classifiers.faces import FacePolicy
from rsc.datamodules.build_config import BuildConfig, PromptSpec, expand_prompts, read_reference_labels
from rsc.datamodules.schema import PREFERENCE_FEATURES, SPLITS

if TYPE_CHECKING:
    from datasets import DatasetDict

    from rsc.backbone import FrozenLDM

FaceCount = Literal["exactly_one", "at_least_one"]



# ---------------------------------------------------------------------------------------------- faces
class FaceDetector(Protocol):
    """Anything that finds faces: boxes (K, 4) as x0, y0, x1, y1 pixels and probabilities (K,)."""

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and probabilities of the faces in an RGB image (K = 0 when there are none)."""
        ...


@dataclass(frozen=True)
class FaceCheck:
    """The face filter's verdict on one image."""

    keep: bool
    num_faces: int
    reason: str | None
    image: Image.Image
    box: tuple[float, float, float, float] | None = None


class FaceFilter:
    """Keep images with exactly one (or at least one) counted face; optionally crop to the kept one.

    Which faces count, which is kept and the crop window follow :class:`rsc.classifiers.faces.FacePolicy`,
    the rule the metrics' face crops follow too, so training data is cropped as evaluation crops.
    """

    def __init__(
        self,
        detector: FaceDetector,
        min_confidence: float = FacePolicy.min_confidence,
        policy: FaceCount = "exactly_one",
        crop: bool = False,
        crop_margin: float = FacePolicy.margin,
    ) -> None:
        """Args: detector: finds faces (e.g. :class:`rsc.classifiers.faces.MTCNNFaceDetector`);
        min_confidence: a face counts from this probability on; policy: ``"exactly_one"`` or
        ``"at_least_one"`` counted face; crop: return the crop around the kept face; crop_margin: crop
        margin as a fraction of the face box's larger side."""
        if policy not in ("exactly_one", "at_least_one"):
            raise ValueError(f"policy must be 'exactly_one' or 'at_least_one', got {policy!r}")
        self.faces = FacePolicy(min_confidence, crop_margin)
        self.detector = detector
        self.policy = policy
        self.crop = crop

    def check(self, image: Image.Image) -> FaceCheck:
        """Detect faces in ``image`` and decide whether to keep it."""
        image = image.convert("RGB")
        boxes, probs = self.detector.detect(image)
        count, kept_index = self.faces.choose(boxes, probs)
        if kept_index is None:
            return FaceCheck(False, 0, "no face", image)
        if count > 1 and self.policy == "exactly_one":
            return FaceCheck(False, count, "multiple faces", image)
        box = tuple(float(v) for v in np.asarray(boxes)[kept_index])
        kept = self.faces.crop_image(image, box) if self.crop else image  # type: ignore[arg-type]
        return FaceCheck(True, count, None, kept, box)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GeneratedSample:
    """One SD sample for one prompt."""

    spec: PromptSpec
    seed: int
    image: Image.Image


def generate_samples(
    ldm: FrozenLDM, specs: Sequence[PromptSpec], config: BuildConfig, batch_size: int = 8, progress: bool = True
) -> Iterator[GeneratedSample]:
    """Sample ``config.samples_per_prompt`` images per prompt, prompt by prompt (bounded memory).

    Sample ``j`` of a prompt uses seed ``config.first_seed + j``; an image depends only on
    its prompt and seed, so a rerun with more samples extends the same set.
    """
    seeds = [config.first_seed + j for j in range(config.samples_per_prompt)]
    for spec in specs:
        output = ldm.sample(
            [spec.prompt] * len(seeds),
            seeds,
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            scheduler=config.scheduler,
            batch_size=batch_size,
            progress=progress,
        )
        for seed, image in zip(seeds, output.to_pil()):
            yield GeneratedSample(spec, seed, image)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class BuildReport:
    """What a build did: counts per stage and where the dataset went."""

    out: str
    config: dict[str, Any]
    prompts: int = 0
    generated: int = 0
    generated_dropped: dict[str, int] = field(default_factory=dict)
    references: int = 0
    references_dropped: dict[str, int] = field(default_factory=dict)
    unpaired_samples: int = 0
    prompts_without_references: list[str] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def _save_png(image: Image.Image, folder: Path, name: str) -> str:
    path = folder / f"{name}.png"
    image.save(path, format="PNG")
    return str(path)


def split_rows(rows: list[dict[str, Any]], validation_fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Random train/validation split (at least one validation row), each split in its original order."""
    if len(rows) < 2:
        raise ValueError(f"need at least 2 preference pairs to make train and validation splits, got {len(rows)}")
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(len(rows))
    num_validation = min(len(rows) - 1, max(1, int(round(validation_fraction * len(rows)))))
    validation = sorted(order[:num_validation].tolist())
    train = sorted(order[num_validation:].tolist())
    return {"train": [rows[i] for i in train], "validation": [rows[i] for i in validation]}


def save_dataset_atomically(
    dataset: DatasetDict,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``save_to_disk`` into a staging folder next to ``out``, then swap it in (:func:`rsc.atomic.write_folder_atomic`).

    Readers never see a half-written dataset; an existing ``out`` is replaced only with
    ``overwrite=True``. ``extra_files`` maps file names to text written beside the splits
    (e.g. a build report).
    """
    out = Path(out).expanduser()

    def refuse_unless_overwrite(directory: Path) -> None:
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")

    def write(staging: Path) -> None:
        dataset.save_to_disk(str(staging))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")

    return write_folder_atomic(out, write, refuse_unless_overwrite)


def build_preference_dataset(
    ldm: FrozenLDM,
    config: BuildConfig,
    references_folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    face_filter: FaceFilter | None,
    labels_file: str = "labels.csv",
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Generate, face-filter, pair, split and save a preference dataset; see the module docstring.

    Args:
        ldm: The frozen SD whose samples are the stereotypical side.
        config: Prompts, sampling and split settings.
        references_folder: Folder of reference photos with ``labels_file``.
        out: Destination of the ``DatasetDict`` (``save_to_disk`` layout).
        face_filter: Applied to samples and references; ``None`` keeps every image (pre-filtered data).
        labels_file: Name of the labels CSV inside ``references_folder``.
        batch_size: Images per sampling batch.
        overwrite: Replace an existing ``out``.
        progress: Show progress bars.
    """
    from datasets import Dataset, DatasetDict
    from tqdm.auto import tqdm

    started = time.perf_counter()
    config.validate()
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        # Checked before hours of sampling, not only at the end.
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    specs = expand_prompts(config)
    references = read_reference_labels(references_folder, labels_file)
    report = BuildReport(out=str(out), config=config.to_dict(), prompts=len(specs), references=len(references))

    out.parent.mkdir(parents=True, exist_ok=True)
    # Images are written as PNGs here and embedded by save_to_disk, so memory stays bounded.
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.images-"))
    try:
        pools: dict[tuple[str, str | None], list[str]] = {}
        reference_drops: Counter[str] = Counter()
        needed_groups = {spec.group for spec in specs}
        for index, reference in enumerate(tqdm(references, desc="checking references", disable=not progress)):
            if reference.group not in needed_groups:
                continue
            with Image.open(reference.path) as opened:
                image = opened.convert("RGB")
            path = str(reference.path)
            if face_filter is not None:
                check = face_filter.check(image)
                if not check.keep:
                    reference_drops[check.reason or "rejected"] += 1
                    continue
                if face_filter.crop:
                    path = _save_png(check.image, work, f"reference-{index:06d}")
            for key in ((reference.group, reference.gender), (reference.group, None)):
                pools.setdefault(key, []).append(path)
        report.references_dropped = dict(reference_drops)

        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
        # Each pool is walked in a seeded random order, so references are used evenly.
        orders = {key: rng.permutation(len(pool)).tolist() for key, pool in pools.items()}
        used: Counter[tuple[str, str | None]] = Counter()
        generated_drops: Counter[str] = Counter()
        rows: list[dict[str, Any]] = []
        missing_prompts: set[str] = set()
        for number, sample in enumerate(generate_samples(ldm, specs, config, batch_size, progress)):
            report.generated += 1
            image = sample.image
            if face_filter is not None:
                check = face_filter.check(image)
                if not check.keep:
                    generated_drops[check.reason or "rejected"] += 1
                    continue
                image = check.image
            key = sample.spec.pairing_key
            if key not in pools:
                report.unpaired_samples += 1
                missing_prompts.add(sample.spec.prompt)
                continue
            reference_path = pools[key][orders[key][used[key] % len(pools[key])]]
            used[key] += 1
            rows.append(
                {
                    "prompt": sample.spec.prompt,
                    "anti_stereotypical": {"path": reference_path, "bytes": None},
                    "stereotypical": {"path": _save_png(image, work, f"sample-{number:07d}"), "bytes": None},
                    "group": sample.spec.group,
                    "gender": sample.spec.gender,
                    "anti_stereotypical_source": "photo",
                    "stereotypical_source": "model",
                    "anti_stereotypical_seed": -1,
                    "stereotypical_seed": sample.seed,
                    "rejection": "stereotype",
                }
            )
        report.generated_dropped = dict(generated_drops)
        report.prompts_without_references = sorted(missing_prompts)
        if len(rows) < 2:
            raise ValueError(
                f"only {len(rows)} preference pair(s) could be formed from {report.generated} samples "
                f"(dropped by the face filter: {report.generated_dropped}; unpaired for lack of references: "
                f"{report.unpaired_samples}; references dropped: {report.references_dropped}). Check that the "
                "reference labels match the config's groups/genders and that the samples show faces."
            )
        splits = split_rows(rows, config.validation_fraction, config.seed)
        report.pairs = {name: len(split) for name, split in splits.items()}
        dataset = DatasetDict(
            {name: Dataset.from_list(splits[name], features=PREFERENCE_FEATURES) for name in SPLITS}
        )
        report.seconds = round(time.perf_counter() - started, 1)
        report_text = json.dumps(report.to_dict(), indent=2) + "\n"
        save_dataset_atomically(dataset, out, overwrite=overwrite, extra_files={"build_report.json": report_text})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
