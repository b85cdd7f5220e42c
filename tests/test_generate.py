"""`python -m rsc.generate`: PNGs with sidecars, side-by-side comparisons, resuming, clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rsc.generate as generate_module
from rsc.backbone import FrozenLDM
from rsc.export import ExportInfo, export_refiner, file_sha256
from rsc.identity import BackboneConfigs
from rsc.generate import main as generate_main
from rsc.generate import parse_seeds
from rsc.refiner import LatentRefiner, RefinerConfig
from rsc.sampling import sample


@pytest.fixture(scope="module")
def refiner_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(latent_channels=4, text_embedding_dim=32, hidden_channels=8, num_blocks=1,
                                          embedding_dim=8, norm_groups=4))
    torch.nn.init.normal_(refiner.conv_out.weight, std=0.05)
    configs = BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler)
    info = ExportInfo.from_training(
        {"correction_window": [0.0, 0.5], "strength": 1.5, "backbone": str(tiny_sd_dir)}, configs
    )
    return export_refiner(refiner, tmp_path_factory.mktemp("refiner") / "refiner", info)


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# two prompts\na photo of a cat\n\na dog on a beach\n")
    return path


def _run(refiner_dir: Path, prompts: Path, out: Path, *extra: str):  # noqa: ANN202
    return generate_main(["--refiner", str(refiner_dir), "--prompts", str(prompts), "--out", str(out),
                          "--num-per-prompt", "2", "--steps", "3", "--batch-size", "3", "--device", "cpu",
                          "--no-progress", *extra])


def _pixel_difference(first: Path, second: Path) -> int:
    arrays = [np.asarray(Image.open(path), dtype=np.int16) for path in (first, second)]
    return int(np.abs(arrays[0] - arrays[1]).max())


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.iterdir())}


def _same_image(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> bool:
    """Equal up to one grey level: another batch composition changes float rounding (~1e-6), which can flip a uint8."""
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max()) <= 1


def test_writes_images_sidecars_and_comparisons(refiner_dir: Path, prompts_file: Path, tiny_sd_dir: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = _run(refiner_dir, prompts_file, out, "--compare", "--guidance", "6.5")
    assert (summary.generated, summary.skipped) == (4, 0)
    stems = ["0000_a-photo-of-a-cat_seed0", "0000_a-photo-of-a-cat_seed1",
             "0001_a-dog-on-a-beach_seed0", "0001_a-dog-on-a-beach_seed1"]
    expected_files = sorted(f"{stem}{suffix}" for stem in stems for suffix in (".png", "_compare.png", ".json"))
    assert sorted(path.name for path in out.iterdir()) == expected_files

    sidecar = json.loads((out / f"{stems[2]}.json").read_text())
    assert sidecar["prompt"] == "a dog on a beach" and sidecar["seed"] == 0
    assert (sidecar["steps"], sidecar["guidance"], sidecar["strength"]) == (3, 6.5, 1.5)
    assert sidecar["refiner_sha256"] == file_sha256(refiner_dir / "refiner.safetensors")
    assert sidecar["backbone"] == str(tiny_sd_dir) and sidecar["scheduler"] == "DDIMScheduler"
    assert sidecar["image"] == f"{stems[2]}.png" and sidecar["compare_image"] == f"{stems[2]}_compare.png"

    # The PNGs are rsc's sampler's images: corrected on the right of the comparison, uncorrected on the left.
    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    exported_correction = generate_module.load_refiner_for(
        refiner_dir, BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler)).correction()
    kwargs = dict(steps=3, guidance_scale=6.5, progress=False)
    corrected = sample(ldm, ["a dog on a beach"], [0], correction=exported_correction,
                       correction_window=(0.0, 0.5), **kwargs).to_pil()[0]
    plain = sample(ldm, ["a dog on a beach"], [0], **kwargs).to_pil()[0]
    image = Image.open(out / f"{stems[2]}.png")
    assert _same_image(image, corrected)
    comparison = Image.open(out / f"{stems[2]}_compare.png")
    assert comparison.size == (64 + 4 + 64, 64)
    assert _same_image(np.asarray(comparison)[:, :64], plain)
    assert _same_image(np.asarray(comparison)[:, 68:], corrected)
    assert not _same_image(plain, corrected)


def test_resumes_only_what_is_missing(refiner_dir: Path, prompts_file: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    _run(refiner_dir, prompts_file, reference)

    # A run killed while writing its third image leaves two finished images and no partial files.
    real_save, saved = generate_module._save_png, []

    def dying_save(image: Image.Image, path: Path) -> None:
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(image, path)

    monkeypatch.setattr(generate_module, "_save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _run(refiner_dir, prompts_file, out)
    monkeypatch.setattr(generate_module, "_save_png", real_save)
    assert len(list(out.glob("*.png"))) == 2 and len(list(out.glob("*.json"))) == 2
    assert not list(out.glob(".*")), "atomic writes leave no temporary files"

    summary = _run(refiner_dir, prompts_file, out)
    assert (summary.generated, summary.skipped) == (2, 2)
    assert _snapshot(out).keys() == _snapshot(reference).keys()
    for name in _snapshot(reference):
        if name.endswith(".png"):
            # Other batch compositions change float rounding only: at most one grey level.
            assert _pixel_difference(out / name, reference / name) <= 1, f"{name} differs from an uninterrupted run"

    # Delete one image and another image's sidecar: exactly those two are made again.
    before = _snapshot(out)
    (out / "0000_a-photo-of-a-cat_seed1.png").unlink()
    (out / "0001_a-dog-on-a-beach_seed0.json").unlink()
    summary = _run(refiner_dir, prompts_file, out)
    assert (summary.generated, summary.skipped) == (2, 2)
    after = _snapshot(out)
    remade = {name for name in after if after[name][0] != before[name][0]}
    assert remade == {"0000_a-photo-of-a-cat_seed1.png", "0000_a-photo-of-a-cat_seed1.json",
                      "0001_a-dog-on-a-beach_seed0.png", "0001_a-dog-on-a-beach_seed0.json"}
    assert all(_pixel_difference(out / name, reference / name) <= 1 for name in remade if name.endswith(".png"))

    # Nothing left to do; asking for comparisons later makes just those.
    assert _run(refiner_dir, prompts_file, out).generated == 0
    assert _run(refiner_dir, prompts_file, out, "--compare").generated == 4


def test_other_settings_in_the_output_folder_stop_the_run(refiner_dir: Path, prompts_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _run(refiner_dir, prompts_file, out)
    with pytest.raises(SystemExit) as exit_info:
        _run(refiner_dir, prompts_file, out, "--strength", "0.5")
    assert exit_info.value.code == 2
    assert "other settings (strength: 1.5 there, 0.5 now)" in capsys.readouterr().err
    assert _run(refiner_dir, prompts_file, out, "--strength", "0.5", "--overwrite").generated == 4


def test_input_errors(refiner_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(refiner_dir, tmp_path / "missing.txt", tmp_path / "out")
    assert exit_info.value.code == 2 and "missing.txt does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n   \n")
    with pytest.raises(SystemExit):
        _run(refiner_dir, empty, tmp_path / "out")
    assert "empty.txt holds no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path / "no_refiner", prompts_file, tmp_path / "out")
    assert "cannot read refiner config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parse_seeds() -> None:
    assert parse_seeds("0-3,10, 7") == [0, 1, 2, 3, 10, 7]
    with pytest.raises(ValueError, match="'5-2' is not a seed"):
        parse_seeds("5-2")
    with pytest.raises(ValueError, match="'x' is not a seed"):
        parse_seeds("1,x")
