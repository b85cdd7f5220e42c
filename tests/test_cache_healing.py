"""The latent cache heals itself: damaged files are detected by the manifest, reported in one line and rebuilt."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsc.datamodules.cache import CACHE_FILE, KEY_FILE, MANIFEST_FILE
from rsc.datamodules.preference import PreferenceDataModule

TENSORS = ("anti_stereotypical_latents", "stereotypical_latents", "prompt_embeds", "prompt_index", "row_index")


def _datamodule(dataset: Path, backbone: Path, cache: Path) -> PreferenceDataModule:
    return PreferenceDataModule(str(dataset), str(backbone), cache_dir=str(cache), progress=False)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses, with other numbers
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    path.write_text("{not json")


DAMAGE = {
    "truncated latents": (CACHE_FILE, _truncate, "truncated"),
    "corrupted latents": (CACHE_FILE, _flip_a_byte, "corrupted"),
    "deleted latents": (CACHE_FILE, Path.unlink, "is missing"),
    "corrupted key": (KEY_FILE, lambda p: p.write_text(p.read_text().replace('"split"', '"splyt"')), "corrupted"),
    "garbled manifest": (MANIFEST_FILE, _garble, "unreadable"),
    "half-written (no manifest)": (MANIFEST_FILE, Path.unlink, "no manifest.json"),
}


@pytest.fixture(scope="module")
def built(tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    cache = tmp_path_factory.mktemp("cache")
    datamodule = _datamodule(tiny_prefs_dir, tiny_sd_dir, cache)
    datamodule.prepare_data()
    datamodule.setup("fit")
    folder = datamodule.cache_plans()["train"].folder
    return {name: getattr(datamodule.train_dataset, name) for name in TENSORS}, folder, cache


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_is_reported_in_one_line_and_rebuilt(
    damage: str, built, tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    expected, folder, cache = built
    copy = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, copy)
    target = copy / folder.relative_to(cache)
    name, harm, words = DAMAGE[damage]
    harm(target / name)
    datamodule = _datamodule(tiny_prefs_dir, tiny_sd_dir, copy)
    with caplog.at_level(logging.WARNING, logger="rsc.datamodules.preference"):
        datamodule.prepare_data()
        datamodule.setup("fit")
    messages = [record.getMessage() for record in caplog.records if "damaged" in record.getMessage()]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "split 'train'" in messages[0] and words in messages[0], messages[0]
    for tensor in TENSORS:
        assert torch.equal(getattr(datamodule.train_dataset, tensor), expected[tensor]), tensor
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert manifest["files"][CACHE_FILE]["size"] == (target / CACHE_FILE).stat().st_size


BUILD = """
import logging, sys, time
import rsc.datamodules.cache as cache
from rsc.datamodules.preference import PreferenceDataModule
original = cache.encode_split
def slow(*args, **kwargs):
    print("building", flush=True)
    time.sleep(3)  # long enough for the other process to arrive while this one builds
    return original(*args, **kwargs)
import rsc.datamodules.preference as preference
preference.encode_split = slow
datamodule = PreferenceDataModule(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], progress=False)
datamodule.prepare_data()
datamodule.setup("fit")
print("rows", len(datamodule.train_dataset), flush=True)
"""


def test_two_processes_building_one_cache(tiny_sd_dir: Path, tiny_prefs_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-c", BUILD, str(tiny_prefs_dir), str(tiny_sd_dir), str(tmp_path / "cache")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "rows 24" in out
    # Each split is built once, by whichever process took its lock first; nothing is reported damaged.
    assert sum(out.count("building") for out, _ in outputs) == 2
    assert not any("damaged" in err for _, err in outputs)
