"""The real-data preference builder: prompts, references, MTCNN face filter, pairing and atomic output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from rsc.datamodules import builder
from rsc.datamodules.builder import (
    BuildConfig,
    FaceFilter,
    build_preference_dataset,
    expand_prompts,
    read_reference_labels,
)
from rsc.datamodules.preference import PreferenceDataModule
from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.classifiers.faces import MTCNNFaceDetector
from rsc.backbone import FrozenLDM
from rsc.toy.faces import GENDERS, GROUPS, render_faces

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_preference_dataset.py"


class FlatImageDetector:
    """Stands in for MTCNN on 64x64 toy renders, where MTCNN finds some faces and misses others.

    Any image with visible structure holds one face (the central box); a flat image holds none.
    """

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        array = np.asarray(image.convert("L"), dtype=np.float32)
        if array.std() < 1.0:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        w, h = image.size
        return np.array([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], np.float32), np.array([0.99], np.float32)


class ScriptedDetector:
    """Returns fixed probabilities, one box per probability."""

    def __init__(self, probs: list[float]) -> None:
        self.probs = probs

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.array([[10 + 5 * i, 10, 30 + 5 * i, 40] for i in range(len(self.probs))], np.float32).reshape(-1, 4)
        return boxes, np.array(self.probs, np.float32)


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNFaceDetector:
    return MTCNNFaceDetector(device="cpu")


@pytest.fixture(scope="module")
def tiny_ldm(tiny_sd_dir: Path) -> FrozenLDM:
    return FrozenLDM.from_pretrained(tiny_sd_dir)


@pytest.fixture()
def references(tmp_path: Path) -> Path:
    """Toy renders labelled FairFace-style, plus a flat grey image (no face) and a group outside the config."""
    folder = tmp_path / "references"
    (folder / "faces").mkdir(parents=True)
    groups, genders = [1, 1, 1, 1, 3, 3, 3, 3, 0], [0, 1, 0, 1, 0, 1, 0, 1, 0]
    faces = render_faces(groups, genders, [False] * len(groups), seed=11)
    lines = ["file_name,group,gender"]
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / "faces" / f"{i}.png")
        lines.append(f"faces/{i}.png,{GROUPS[groups[i]]},{GENDERS[genders[i]]}")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "faces" / "grey.png")
    lines.append(f"faces/grey.png,{GROUPS[1]},{GENDERS[0]}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def _config(**overrides) -> BuildConfig:
    settings = dict(
        template="a photo of a {group} {gender}",
        groups=["belor", "dovek"],
        genders=["woman", "man"],
        samples_per_prompt=3,
        steps=1,
        guidance_scale=3.0,
        validation_fraction=0.25,
    )
    settings.update(overrides)
    return BuildConfig.from_dict(settings)


# ---------------------------------------------------------------------------------------------- config and prompts
def test_expand_prompts_with_prompt_words_and_professions() -> None:
    config = BuildConfig.from_dict(
        {"groups": ["group_a", "group_b"], "genders": ["F", "M"], "prompt_words": {"F": "woman", "M": "man"}}
    )
    specs = expand_prompts(config)
    assert [s.prompt for s in specs] == [
        "a photo of a group_a woman", "a photo of a group_a man", "a photo of a group_b woman", "a photo of a group_b man",
    ]
    assert (specs[1].group, specs[1].gender) == ("group_a", "M")

    by_profession = expand_prompts(
        BuildConfig.from_dict({"template": "a photo of a {group} {profession}", "groups": ["group_a"], "professions": ["doctor", "chef"]})
    )
    assert [s.prompt for s in by_profession] == ["a photo of a group_a doctor", "a photo of a group_a chef"]
    assert by_profession[0].pairing_key == ("group_a", None)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"template": "a photo of a {gender}", "genders": ["F"]}, "must contain {group}"),
        ({"template": "a {group} {age}", "groups": ["a"]}, r"unknown placeholder\(s\) \['age'\]"),
        ({"groups": ["a"]}, r"uses \{gender\} but `genders` is empty"),
        ({"groups": ["a"], "genders": ["F"], "sample_per_prompt": 3}, r"unknown setting\(s\) \['sample_per_prompt'\]"),
        ({"groups": ["a"], "genders": ["F"], "validation_fraction": 0.0}, "validation_fraction"),
    ],
)
def test_config_errors_name_the_setting(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BuildConfig.from_dict(settings)


def test_config_from_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("groups: [group_a]\ngenders: [F, M]\nsamples_per_prompt: 5\n")
    (tmp_path / "c.json").write_text(json.dumps({"groups": ["group_a"], "genders": ["F"], "steps": 7}))
    assert BuildConfig.from_file(tmp_path / "c.yaml").samples_per_prompt == 5
    assert BuildConfig.from_file(tmp_path / "c.json").steps == 7
    (tmp_path / "bad.yaml").write_text("groups: [a]\ngenders: [F]\ntemplte: x\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown setting\(s\) \['templte'\]"):
        BuildConfig.from_file(tmp_path / "bad.yaml")


def test_reference_label_errors(references: Path) -> None:
    assert len(read_reference_labels(references)) == 10
    labels = references / "labels.csv"
    text = labels.read_text()
    labels.write_text(text.replace("faces/3.png", "faces/missing.png"))
    with pytest.raises(ValueError, match=r"labels\.csv line 5: file_name 'faces/missing\.png'"):
        read_reference_labels(references)
    labels.write_text(text.replace("file_name,group,gender", "file,group,gender"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['file_name'\]"):
        read_reference_labels(references)


# ---------------------------------------------------------------------------------------------- faces
def test_face_filter_policies_confidence_and_crop() -> None:
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    assert FaceFilter(ScriptedDetector([])).check(image).reason == "no face"
    assert FaceFilter(ScriptedDetector([0.5])).check(image).reason == "no face"
    two = FaceFilter(ScriptedDetector([0.99, 0.97])).check(image)
    assert (two.keep, two.num_faces, two.reason) == (False, 2, "multiple faces")
    assert FaceFilter(ScriptedDetector([0.99, 0.97]), policy="at_least_one").check(image).keep
    # A low-confidence second face does not count.
    assert FaceFilter(ScriptedDetector([0.99, 0.3])).check(image).keep
    cropped = FaceFilter(ScriptedDetector([0.99]), crop=True, crop_margin=0.25).check(image)
    assert cropped.keep and cropped.image.size == (45, 45) and cropped.box == (10.0, 10.0, 30.0, 40.0)


def test_real_mtcnn_finds_the_astronaut_and_not_a_grey_image(mtcnn: MTCNNFaceDetector) -> None:
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut())
    check = FaceFilter(mtcnn, crop=True).check(photo)
    assert check.keep and check.num_faces == 1
    x0, y0, x1, y1 = check.box
    # The face sits at roughly x 180-270, y 60-175 of the 512x512 photo.
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 210
    assert check.image.size[0] == check.image.size[1] and 100 < check.image.size[0] < 250

    grey = FaceFilter(mtcnn).check(Image.new("RGB", (256, 256), (128, 128, 128)))
    assert (grey.keep, grey.num_faces, grey.reason) == (False, 0, "no face")


# ---------------------------------------------------------------------------------------------- building
def test_build_pairs_samples_with_matching_references(
    tiny_ldm: FrozenLDM, tiny_sd_dir: Path, references: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "prefs"
    config = _config()
    report = build_preference_dataset(
        tiny_ldm, config, references, out, FaceFilter(FlatImageDetector()), batch_size=4, progress=False
    )
    assert report.prompts == 4 and report.generated == 12
    assert report.generated_dropped == {}
    # The grey reference has no face; the ardan reference is not needed by any prompt and is not checked.
    assert report.references_dropped == {"no face": 1}
    assert report.pairs == {"train": 9, "validation": 3}
    assert sorted(p.name for p in out.parent.iterdir()) == ["prefs"], "no temporary folders may be left behind"
    assert json.loads((out / "build_report.json").read_text())["pairs"] == report.pairs

    dataset = load_from_disk(str(out))
    assert dataset["train"].features == PREFERENCE_FEATURES
    labels = {
        line.split(",")[0]: tuple(line.split(",")[1:])
        for line in (references / "labels.csv").read_text().splitlines()[1:]
    }
    pixels = {
        name: np.array(Image.open(references / name).convert("RGB")) for name in labels if name != "faces/grey.png"
    }
    for split in ("train", "validation"):
        for row in dataset[split]:
            assert row["stereotypical_source"] == "model" and row["anti_stereotypical_source"] == "photo"
            assert row["prompt"] == f"a photo of a {row['group']} {row['gender']}"
            # The reference is a photo labelled with the prompt's group and gender.
            anti = np.array(row["anti_stereotypical"])
            matches = [name for name, array in pixels.items() if np.array_equal(array, anti)]
            assert len(matches) == 1 and labels[matches[0]] == (row["group"], row["gender"])
    # The stereotypical image is exactly the SD sample for its prompt and seed.
    row = dataset["validation"][0]
    # Sampled as the builder did (the prompt's 3 seeds in one batch): batch composition moves float rounding.
    expected = tiny_ldm.sample([row["prompt"]] * 3, [0, 1, 2], steps=1, guidance_scale=3.0, batch_size=4, progress=False)
    assert np.array_equal(np.array(row["stereotypical"]), np.array(expected.to_pil()[row["stereotypical_seed"]]))
    alone = tiny_ldm.sample([row["prompt"]], [row["stereotypical_seed"]], steps=1, guidance_scale=3.0, progress=False)
    assert np.abs(np.array(row["stereotypical"], np.int16) - np.array(alone.to_pil()[0], np.int16)).max() <= 1

    # The datamodule trains on it as is.
    dm = PreferenceDataModule(str(out), str(tiny_sd_dir), cache_dir=str(tmp_path / "cache"), progress=False)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (9, 3)

    # An existing output is kept unless overwrite is asked for, and checked before any sampling.
    class NoSampling:
        def sample(self, *args, **kwargs):
            raise AssertionError("must fail before sampling")

    with pytest.raises(FileExistsError, match="overwrite"):
        build_preference_dataset(NoSampling(), config, references, out, None)  # type: ignore[arg-type]
    smaller = _config(groups=["belor"], samples_per_prompt=2)
    report = build_preference_dataset(tiny_ldm, smaller, references, out, None, overwrite=True, progress=False)
    assert report.pairs == {"train": 3, "validation": 1}
    assert load_from_disk(str(out))["train"].num_rows == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["prefs"]


def test_real_mtcnn_rejects_faceless_samples(
    tiny_ldm: FrozenLDM, references: Path, tmp_path: Path, mtcnn: MTCNNFaceDetector
) -> None:
    # The tiny random SD draws noise: MTCNN finds no face, so nothing can be paired, and the error says why.
    with pytest.raises(ValueError, match=r"from 3 samples \(dropped by the face filter: \{'no face': 3\}"):
        build_preference_dataset(
            tiny_ldm, _config(groups=["belor"], genders=["woman"]), references,
            tmp_path / "out" / "prefs", FaceFilter(mtcnn), progress=False,
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_script_builds_from_config_file_and_flags(tiny_sd_dir: Path, references: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("build_preference_dataset", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    config_file = tmp_path / "prompts.yaml"
    config_file.write_text("template: 'a photo of a {group} {gender}'\ngroups: [belor]\ngenders: [F, M]\nsteps: 2\n")
    out = tmp_path / "prefs"
    # --genders overrides the file's F/M to match labels.csv; --prompt-word rephrases one label in the prompts only.
    code = script.main([
        "--backbone", str(tiny_sd_dir), "--references", str(references), "--out", str(out),
        "--config", str(config_file), "--genders", "woman", "man", "--samples-per-prompt", "2",
        "--prompt-word", "woman=lady", "--face-filter", "none", "--device", "cpu", "--no-progress",
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == {"train": 3, "validation": 1}
    dataset = load_from_disk(str(out))
    prompts = set(dataset["train"]["prompt"]) | set(dataset["validation"]["prompt"])
    assert prompts == {"a photo of a belor lady", "a photo of a belor man"}
    assert set(dataset["train"]["gender"]) | set(dataset["validation"]["gender"]) == {"woman", "man"}
    assert builder.BuildConfig.from_dict(report["config"]).steps == 2
