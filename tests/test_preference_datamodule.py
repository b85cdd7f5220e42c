"""PreferenceDataModule: sources, validation, the latent cache, batches and DDP sharding."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from PIL import Image

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler as ShardedEvalSampler

from rsc.datamodules.cache import BATCH_KEYS, CACHE_FILE
from rsc.datamodules.preference import PreferenceDataModule
from rsc.datamodules.schema import PREFERENCE_FEATURES
from rsc.backbone import FrozenLDM
from rsc.images import uint8_to_tensor
from rsc.testing import build_random_sd
from rsc.toy.faces import render_faces

PROMPTS = ("a photo of a belor woman", "a photo of a dovek man")
TOY_WORLD = Path(__file__).resolve().parents[1] / "rsc" / "toy" / "world"


def _faces(n: int, seed: int, stereotype: bool, size: int) -> np.ndarray:
    return render_faces([i % 4 for i in range(n)], [i % 2 for i in range(n)], [stereotype] * n, seed=seed, size=size)


def _rows(n: int, seed: int, size: int = 96) -> list[dict]:
    anti, stereo = _faces(n, seed, False, size), _faces(n, seed, True, size)
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "anti_stereotypical": Image.fromarray(anti[i]),
            "stereotypical": Image.fromarray(stereo[i]),
            "group": "belor",
            "gender": "woman",
            "anti_stereotypical_source": "render",
            "stereotypical_source": "render",
            "anti_stereotypical_seed": -1,
            "stereotypical_seed": -1,
            "rejection": "stereotype",
        }
        for i in range(n)
    ]


def _dataset(rows: list[dict]) -> Dataset:
    if not rows:  # from_list([]) loses the schema
        return Dataset.from_dict({name: [] for name in PREFERENCE_FEATURES}, features=PREFERENCE_FEATURES)
    return Dataset.from_list(rows, features=PREFERENCE_FEATURES)


def _save(rows: dict[str, list[dict]], folder: Path) -> Path:
    DatasetDict({name: _dataset(split) for name, split in rows.items()}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small save_to_disk preference dataset of 96x96 toy renders (resized to the tiny SD's 64)."""
    return _save({"train": _rows(6, seed=1), "validation": _rows(5, seed=2)}, tmp_path_factory.mktemp("prefs") / "prefs")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _datamodule(dataset: Path | str, backbone: Path, cache: Path, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(dataset), str(backbone), cache_dir=str(cache), progress=False, **kwargs)


def test_cached_latents_and_embeddings_equal_hand_encoding(prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    before = _snapshot(prefs_dir)
    dm = _datamodule(prefs_dir, tiny_sd_dir, tmp_path, batch_size=4, encode_batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert _snapshot(prefs_dir) == before, "nothing may be written into the dataset folder"

    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    row = load_from_disk(str(prefs_dir))["train"][3]
    with torch.no_grad():
        for column in ("anti_stereotypical", "stereotypical"):
            assert row[column].size == (96, 96)
            resized = np.array(row[column].convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
            expected = ldm.encode_images(uint8_to_tensor(resized[None]))[0]
            torch.testing.assert_close(dm.train_dataset[3][f"{column}_latents"], expected)
        expected_text = ldm.encode_prompt([row["prompt"]], do_classifier_free_guidance=False).cond[0]
    torch.testing.assert_close(dm.train_dataset[3]["prompt_embeds"], expected_text)
    # Prompts are encoded once each: 6 rows share 2 prompts.
    assert dm.train_dataset.prompt_embeds.shape[0] == 2
    assert dm.train_dataset.prompts == list(PROMPTS)
    assert dm.latent_shape == (4, 16, 16) and dm.text_shape == (77, 32)
    assert dm.image_size == 64

    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock")
    assert len(files) == 6 and all(f.startswith("latents/") and f.endswith((CACHE_FILE, "key.json", "manifest.json"))
                                   for f in files)
    key = json.loads(next(tmp_path.rglob("key.json")).read_text())
    assert set(key) >= {"key", "backbone", "dataset", "split", "image_size", "rsc", "format"}


def test_second_prepare_is_a_cache_hit_without_the_backbone(
    prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _datamodule(prefs_dir, tiny_sd_dir, tmp_path)
    first.prepare_data()
    first.setup("fit")

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load the backbone")

    monkeypatch.setattr(FrozenLDM, "from_pretrained", refuse)
    second = _datamodule(prefs_dir, tiny_sd_dir, tmp_path)
    second.prepare_data()
    second.setup("fit")
    for name in ("train_dataset", "val_dataset"):
        a, b = getattr(first, name), getattr(second, name)
        for attribute in ("anti_stereotypical_latents", "stereotypical_latents", "prompt_embeds", "prompt_index", "row_index"):
            assert torch.equal(getattr(a, attribute), getattr(b, attribute))


def test_cache_key_depends_on_backbone_dataset_and_split(
    prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_sd = tmp_path / "sd_seed1"
    build_random_sd(seed=1).save_pretrained(other_sd)
    monkeypatch.setenv("RSC_CACHE", str(tmp_path / "env_cache"))
    base = PreferenceDataModule(str(prefs_dir), str(tiny_sd_dir), progress=False).cache_plans()
    assert base["train"].folder.parent == tmp_path / "env_cache" / "latents"
    same = PreferenceDataModule(str(prefs_dir), str(tiny_sd_dir), progress=False).cache_plans()
    other = PreferenceDataModule(str(prefs_dir), str(other_sd), progress=False).cache_plans()
    assert {p.key for p in base.values()} == {p.key for p in same.values()}
    assert base["train"].key != base["validation"].key
    assert base["train"].key != other["train"].key
    assert base["train"].payload["backbone"]["configs"] == other["train"].payload["backbone"]["configs"]

    changed = _save({"train": _rows(6, seed=7), "validation": _rows(5, seed=2)}, tmp_path / "changed")
    changed_plans = PreferenceDataModule(str(changed), str(tiny_sd_dir), progress=False).cache_plans()
    assert changed_plans["train"].key != base["train"].key


def _unreadable(rows: list[dict], index: int, column: str) -> None:
    rows[index][column] = {"bytes": b"these bytes are not an image", "path": None}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing column", ["'stereotypical'", "split 'train'", "required column"]),
        ("missing split", ["'validation'", "no split"]),
        ("empty split", ["'validation'", "empty"]),
        ("empty prompt", ["split 'train'", "row 2", "'prompt'", "empty prompt"]),
        ("unreadable image", ["split 'validation'", "row 1", "'anti_stereotypical'", "unreadable image"]),
    ],
)
def test_validation_errors_name_split_row_and_column(
    case: str, expected: list[str], tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, validation = _rows(3, seed=3, size=64), _rows(2, seed=4, size=64)
    splits: dict[str, list[dict]] = {"train": train, "validation": validation}
    if case == "missing column":
        dataset = DatasetDict({n: Dataset.from_list(s, features=PREFERENCE_FEATURES) for n, s in splits.items()})
        dataset["train"] = dataset["train"].remove_columns("stereotypical")
        dataset.save_to_disk(str(tmp_path / "data"))
        folder = tmp_path / "data"
    else:
        if case == "missing split":
            del splits["validation"]
        elif case == "empty split":
            splits["validation"] = []
        elif case == "empty prompt":
            train[2]["prompt"] = "   "
        else:
            _unreadable(validation, 1, "anti_stereotypical")
        folder = _save(splits, tmp_path / "data")

    def refuse(*args, **kwargs):
        raise AssertionError("validation must fail before the backbone is loaded")

    monkeypatch.setattr(FrozenLDM, "from_pretrained", refuse)
    with pytest.raises(ValueError) as error:
        _datamodule(folder, tiny_sd_dir, tmp_path / "cache").prepare_data()
    for fragment in expected:
        assert fragment in str(error.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob(CACHE_FILE))


def test_not_rgb_convertible_image_is_reported(tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = _rows(3, seed=3, size=64)
    train[1]["stereotypical"] = train[1]["stereotypical"].convert("P")
    folder = _save({"train": train, "validation": _rows(2, seed=4, size=64)}, tmp_path / "data")
    original = Image.Image.convert

    # Every mode Pillow can save converts to RGB, so the failure of an exotic decoder is simulated on palette images.
    def convert(self, mode=None, *args, **kwargs):
        if self.mode == "P" and mode == "RGB":
            raise ValueError("conversion from P to RGB not supported")
        return original(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", convert)
    with pytest.raises(ValueError, match=r"split 'train', row 1, column 'stereotypical'.*not RGB-convertible.*'P'"):
        _datamodule(folder, tiny_sd_dir, tmp_path / "cache").prepare_data()


def test_skip_invalid_counts_reasons_and_the_cache_remembers(tiny_sd_dir: Path, tmp_path: Path) -> None:
    train = _rows(7, seed=5, size=64)
    _unreadable(train, 1, "stereotypical")
    _unreadable(train, 4, "anti_stereotypical")
    train[5]["prompt"] = ""
    folder = _save({"train": train, "validation": _rows(3, seed=6, size=64)}, tmp_path / "data")

    with pytest.raises(ValueError, match=r"row 1, column 'stereotypical'"):
        _datamodule(folder, tiny_sd_dir, tmp_path / "cache").prepare_data()

    dm = _datamodule(folder, tiny_sd_dir, tmp_path / "cache", skip_invalid=True)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.skipped == {"train": {"empty prompt": 1, "unreadable image": 2}, "validation": {}}
    assert dm.train_dataset.row_index.tolist() == [0, 2, 3, 6]

    # A later run on the same cache restores the summary, and still refuses without skip_invalid.
    again = _datamodule(folder, tiny_sd_dir, tmp_path / "cache", skip_invalid=True)
    again.setup("fit")
    assert again.skipped == dm.skipped
    with pytest.raises(ValueError, match=r"3 invalid row\(s\).*row 1, column 'stereotypical'"):
        _datamodule(folder, tiny_sd_dir, tmp_path / "cache").prepare_data()


def _write_imagefolder(root: Path, split: str, n: int, seed: int, fmt: str) -> list[dict]:
    anti, stereo = _faces(n, seed, False, 80), _faces(n, seed, True, 80)
    (root / split / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.fromarray(anti[i]).save(root / split / "images" / f"{i}_anti.png")
        Image.fromarray(stereo[i]).save(root / split / "images" / f"{i}_stereo.png")
        records.append(
            {"prompt": PROMPTS[i % 2], "anti_stereotypical": f"images/{i}_anti.png",
             "stereotypical": f"images/{i}_stereo.png", "group": "belor", "gender": "woman"}
        )
    if fmt == "jsonl":
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        lines = ["prompt,anti_stereotypical,stereotypical,group,gender"]
        lines += [",".join(str(r[k]) for k in ("prompt", "anti_stereotypical", "stereotypical", "group", "gender")) for r in records]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    return records


def test_imagefolder_layout(tiny_sd_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder_prefs"
    _write_imagefolder(root, "train", 4, seed=8, fmt="jsonl")
    records = _write_imagefolder(root, "validation", 3, seed=9, fmt="csv")
    before = _snapshot(root)
    dm = _datamodule(root, tiny_sd_dir, tmp_path / "cache")
    dm.prepare_data()
    dm.setup("validate")
    assert _snapshot(root) == before
    assert len(dm.val_dataset) == 3 and dm.train_dataset is None

    ldm = FrozenLDM.from_pretrained(tiny_sd_dir)
    image = Image.open(root / "validation" / records[2]["stereotypical"]).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    with torch.no_grad():
        expected = ldm.encode_images(uint8_to_tensor(np.array(image)[None]))[0]
    torch.testing.assert_close(dm.val_dataset[2]["stereotypical_latents"], expected)

    # A missing image: the error names the metadata file and line, the row, the column and the file.
    (root / "train" / "images" / "2_stereo.png").unlink()
    with pytest.raises(ValueError) as error:
        _datamodule(root, tiny_sd_dir, tmp_path / "cache").prepare_data()
    message = str(error.value)
    for fragment in ("split 'train'", "row 2", "'stereotypical'", "metadata.jsonl line 3", "2_stereo.png", "missing image file"):
        assert fragment in message


def test_imagefolder_missing_required_column(tiny_sd_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder_prefs"
    _write_imagefolder(root, "train", 2, seed=8, fmt="jsonl")
    _write_imagefolder(root, "validation", 2, seed=9, fmt="csv")
    csv_file = root / "validation" / "metadata.csv"
    csv_file.write_text(csv_file.read_text().replace("prompt,", "caption,", 1))
    with pytest.raises(ValueError, match=r"metadata\.csv lacks the required column\(s\) \['prompt'\]"):
        _datamodule(root, tiny_sd_dir, tmp_path / "cache").prepare_data()


def test_hub_dataset_ids(prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError, match=r"'someorg/no-such-preferences'.*Offline mode is on"):
        _datamodule("someorg/no-such-preferences", tiny_sd_dir, tmp_path / "cache").prepare_data()

    import datasets

    calls = []

    def fake_load_dataset(path: str, revision: str | None = None, **kwargs):
        calls.append((path, revision))
        return load_from_disk(str(prefs_dir))

    # The same code path as a cached Hub dataset: datasets.load_dataset returns a DatasetDict.
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = _datamodule("someorg/preferences", tiny_sd_dir, tmp_path / "cache", dataset_revision="v1")
    dm.prepare_data()
    dm.setup("fit")
    assert calls[0] == ("someorg/preferences", "v1")
    assert dm.cache_plans()["train"].payload["dataset"]["id"] == "someorg/preferences"
    assert dm.cache_plans()["train"].payload["dataset"]["revision"] == "v1"
    assert len(dm.train_dataset) == 6


def test_local_path_errors(tiny_sd_dir: Path, tmp_path: Path, prefs_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _datamodule(tmp_path / "nowhere" / "prefs", tiny_sd_dir, tmp_path / "cache").prepare_data()
    single = tmp_path / "single"
    load_from_disk(str(prefs_dir))["train"].save_to_disk(str(single))
    with pytest.raises(ValueError, match="single datasets.Dataset"):
        _datamodule(single, tiny_sd_dir, tmp_path / "cache").prepare_data()


def test_batches_have_the_documented_keys_and_shapes(prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    dm = _datamodule(prefs_dir, tiny_sd_dir, tmp_path, batch_size=4)
    dm.setup("fit")  # setup alone builds a missing cache
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch) == BATCH_KEYS
    assert batch["anti_stereotypical_latents"].shape == (4, 4, 16, 16)
    assert batch["stereotypical_latents"].shape == (4, 4, 16, 16)
    assert batch["prompt_embeds"].shape == (4, 77, 32)
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.long
    for key in BATCH_KEYS[:3]:
        assert batch[key].dtype == torch.float32
    indices = torch.cat([b["index"] for b in dm.val_dataloader()])
    assert indices.tolist() == list(range(5))


def test_validation_shards_are_disjoint_and_cover_everything(prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    dm = _datamodule(prefs_dir, tiny_sd_dir, tmp_path, batch_size=2)
    dm.setup("fit")
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.val_dataloader()
        # A DistributedSampler instance, so Lightning does not wrap it in a padding sampler of its own.
        assert isinstance(loader.sampler, ShardedEvalSampler)
        seen.append(torch.cat([batch["index"] for batch in loader]).tolist())
    assert seen == [[0, 2, 4], [1, 3]]
    assert sorted(seen[0] + seen[1]) == list(range(len(dm.val_dataset)))


def test_shipped_toy_world_preferences(tmp_path: Path) -> None:
    dm = PreferenceDataModule(
        str(TOY_WORLD / "preferences"), str(TOY_WORLD / "sd"), cache_dir=str(tmp_path), batch_size=8, progress=False
    )
    dm.prepare_data()
    dm.setup("fit")
    pairs = json.loads((TOY_WORLD / "manifest.json").read_text())["sizes"]["preference_pairs"]
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (pairs["train"], pairs["validation"])
    assert dm.latent_shape == (4, 16, 16) and dm.text_shape == (16, 64)
    assert dm.skipped == {"train": {}, "validation": {}}
    assert not any(p.name.startswith(("cache-", "tmp")) for p in (TOY_WORLD / "preferences").rglob("*"))
    assert os.path.getsize(dm.cache_plans()["train"].file) > 0


_DDP_SCRIPT = '''
import json, sys, torch, lightning as L
from rsc.datamodules.preference import PreferenceDataModule

dataset, backbone, cache, out = sys.argv[1:5]


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen = {"train": [], "validation": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"] += batch["index"].tolist()
        return self.layer(batch["anti_stereotypical_latents"].mean((2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["validation"] += batch["index"].tolist()

    def on_train_epoch_end(self):
        with open(f"{out}/rank{self.global_rank}.json", "w") as handle:
            json.dump(self.seen, handle)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    data = PreferenceDataModule(dataset, backbone, batch_size=2, cache_dir=cache, progress=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recorder(), data)
'''


@pytest.mark.slow
def test_real_ddp_two_cpu_processes(prefs_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes: validation shards are exact (uneven, 3 + 2 rows, no hang); training is sharded by Lightning."""
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), str(prefs_dir), str(tiny_sd_dir), str(tmp_path / "cache"), str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["validation"] for r in ranks] == [[0, 2, 4], [1, 3]]
    # Lightning's DistributedSampler pads training to 3 + 3 rows: each rank a shard, together every row.
    assert all(len(r["train"]) == 3 for r in ranks)
    assert set(ranks[0]["train"]) | set(ranks[1]["train"]) == set(range(6))
