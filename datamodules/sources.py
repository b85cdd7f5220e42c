"""Where preference pairs come from: a ``save_to_disk`` folder, an image-folder layout or a Hub dataset id.

Each source is read as :class:`PreferenceSplit` objects, row by row, with the
images as :class:`ImageRef` (embedded bytes or a path) decoded only when asked
(:func:`decode_image`), so that validation can name the row and file of a bad
image. The layouts are described in :mod:`rsc.datamodules.preference`.

Why image folders are read here and not with ``datasets``' ``imagefolder``
builder: that builder links images through ``<column>_file_name`` metadata keys
(our layout names the columns ``anti_stereotypical`` / ``stereotypical``, the
schema's names, which users' files already use), it decodes or casts every
path while loading (a missing or broken image fails the whole load instead of
being reported per row and skippable with ``skip_invalid``), and its errors do
not name the metadata line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from rsc.datamodules.schema import IMAGE_COLUMNS, REQUIRED_COLUMNS
from rsc.hub import is_datasets_offline, looks_like_local_path

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class ImageProblem(Exception):
    """An image cell that cannot be used; ``reason`` is the short category counted by ``skip_invalid``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a row lives: embedded bytes and/or a file path."""

    data: bytes | None
    path: str | None

    def describe(self) -> str:
        """The file path, or a note that the image is embedded in the dataset."""
        return f"file {self.path}" if self.path else "embedded image"


def decode_image(ref: ImageRef | None) -> Image.Image:
    """Decode an image fully and convert it to RGB; raise ``ImageProblem`` with a reason otherwise."""
    if ref is None or (ref.data is None and not ref.path):
        raise ImageProblem("missing image path", "the cell is empty; expected an image (or a path to one)")
    if ref.data is None:
        try:
            is_file = Path(ref.path).is_file()  # type: ignore[arg-type]
        except OSError as error:  # e.g. a name too long for the file system: no such file can exist
            raise ImageProblem("missing image file", f"{ref.path!r} cannot be a file ({error.strerror})") from error
        if not is_file:
            raise ImageProblem("missing image file", f"{ref.path} does not exist")
    try:
        source = io.BytesIO(ref.data) if ref.data is not None else ref.path
        with Image.open(source) as image:  # type: ignore[arg-type]
            image.load()  # decode now: a truncated file only fails here
            mode = image.mode
            try:
                return image.convert("RGB")
            except Exception as error:  # noqa: BLE001 - PIL raises several types for unsupported modes
                raise ImageProblem(
                    "not RGB-convertible", f"image mode {mode!r} cannot be converted to RGB ({error})"
                ) from error
    except ImageProblem:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise ImageProblem(
            "unreadable image", f"PIL cannot decode it ({type(error).__name__}: {error}); expected a PNG/JPEG/... image"
        ) from error



class PreferenceSplit(ABC):
    """One split of a preference dataset, read row by row without decoding images eagerly."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """Number of rows (before skipping invalid ones)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies this split's content, for the cache key."""

    @abstractmethod
    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """The raw prompt and the image references of row ``index``."""

    def location(self, index: int) -> str:
        """Where row ``index`` is defined (for error messages)."""
        return ""


class HFPreferenceSplit(PreferenceSplit):
    """A split held by a ``datasets.Dataset`` (from ``save_to_disk`` or the Hub)."""

    def __init__(self, name: str, source: str, dataset: Any, kind: str, extra: dict[str, Any] | None = None) -> None:
        from datasets import Image as ImageFeature
        from datasets import Value

        super().__init__(name, source)
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"split {name!r} of dataset {source} lacks the required column(s) {missing}: it has "
                f"{dataset.column_names}; every preference dataset needs {list(REQUIRED_COLUMNS)} "
                "(see datamodules/schema.py)"
            )
        prompt_feature = dataset.features["prompt"]
        if not (isinstance(prompt_feature, Value) and prompt_feature.dtype in {"string", "large_string"}):
            raise ValueError(
                f"column 'prompt' of split {name!r} of dataset {source} has type {prompt_feature}, "
                "expected Value('string')"
            )
        for column in IMAGE_COLUMNS:
            if not isinstance(dataset.features[column], ImageFeature):
                raise ValueError(
                    f"column {column!r} of split {name!r} of dataset {source} has type {dataset.features[column]}, "
                    "expected a datasets.Image feature"
                )
        # The fingerprint is the content identity datasets maintains; take it before our in-memory casts.
        self._fingerprint = str(dataset._fingerprint)
        self._kind = kind
        self._extra = extra or {}
        # decode=False: we decode (and report failures) ourselves, row by row. The cast is in memory only.
        dataset = dataset.select_columns(list(REQUIRED_COLUMNS))
        for column in IMAGE_COLUMNS:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self._dataset = dataset

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return int(self._dataset.num_rows)

    def identity(self) -> dict[str, Any]:
        """``datasets`` fingerprint, row count and (for the Hub) id and revision."""
        return {"kind": self._kind, "fingerprint": self._fingerprint, "num_rows": self.num_rows, **self._extra}

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """Prompt and image references of row ``index``."""
        record = self._dataset[index]
        images: dict[str, ImageRef | None] = {}
        for column in IMAGE_COLUMNS:
            value = record[column]
            images[column] = None if value is None else ImageRef(value.get("bytes"), value.get("path"))
        return record["prompt"], images


class FolderPreferenceSplit(PreferenceSplit):
    """A split folder with ``metadata.jsonl`` or ``metadata.csv`` and image files relative to it."""

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(name, str(folder.parent))
        self.folder = folder
        present = [folder / filename for filename in METADATA_FILES if (folder / filename).is_file()]
        if not present:
            raise ValueError(f"split folder {folder} has no metadata file: expected one of {list(METADATA_FILES)}")
        if len(present) > 1:
            raise ValueError(f"split folder {folder} has both {present[0].name} and {present[1].name}; keep one")
        self.metadata_file = present[0]
        self._rows, columns = self._read_metadata(self.metadata_file)
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"{self.metadata_file} lacks the required column(s) {missing}: it has {sorted(columns)}; "
                f"every row needs {list(REQUIRED_COLUMNS)} (image columns as paths relative to {folder})"
            )

    @staticmethod
    def _read_metadata(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
        rows: list[tuple[int, dict[str, Any]]] = []
        columns: set[str] = set()
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = set(reader.fieldnames or [])
                # Line numbers are 1-based and line 1 is the header.
                rows = [(line + 2, dict(record)) for line, record in enumerate(reader)]
            return rows, columns
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {line_number} is not valid JSON: {error}") from error
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path} line {line_number} is a JSON {type(record).__name__}, expected an object with "
                        f"keys {list(REQUIRED_COLUMNS)}"
                    )
                columns.update(record)
                rows.append((line_number, record))
        return rows, columns

    @property
    def num_rows(self) -> int:
        """Number of metadata rows."""
        return len(self._rows)

    def _path(self, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return str(self.folder / str(value))

    def identity(self) -> dict[str, Any]:
        """Metadata content hash and every referenced image's path, size and mtime."""
        files: list[list[Any]] = []
        for _, record in self._rows:
            for column in IMAGE_COLUMNS:
                path = self._path(record.get(column))
                try:
                    stat = os.stat(path) if path else None
                except (OSError, ValueError):  # missing, a name too long, a NUL byte: validation reports the row
                    stat = None
                files.append([record.get(column), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        return {
            "kind": "imagefolder",
            "folder": str(self.folder.resolve()),
            "metadata": self.metadata_file.name,
            "metadata_sha256": hashlib.sha256(self.metadata_file.read_bytes()).hexdigest(),
            "images_sha256": digest,
            "num_rows": self.num_rows,
        }

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        """Prompt and image paths of row ``index``."""
        _, record = self._rows[index]
        images: dict[str, ImageRef | None] = {}
        for column in IMAGE_COLUMNS:
            path = self._path(record.get(column))
            images[column] = None if path is None else ImageRef(None, path)
        return record.get("prompt"), images

    def location(self, index: int) -> str:
        """The metadata file and line of row ``index``."""
        return f"{self.metadata_file} line {self._rows[index][0]}"


def load_preference_splits(
    dataset: str, splits: tuple[str, ...], revision: str | None = None
) -> dict[str, PreferenceSplit]:
    """Open ``splits`` of a preference dataset (save_to_disk folder, image folder or Hub id); see the module docstring.

    Raises ``ValueError`` for a missing or empty split or a missing required column,
    ``FileNotFoundError`` for a local path that does not exist and ``OSError`` for a Hub
    id that cannot be loaded (e.g. offline and not cached).
    """
    path = Path(dataset).expanduser()
    if path.is_dir():
        openers = _local_openers(path, splits)
    elif path.exists():
        raise ValueError(f"dataset {dataset} is a file; expected a dataset folder or a Hugging Face Hub dataset id")
    elif looks_like_local_path(dataset):
        raise FileNotFoundError(f"dataset {dataset} does not exist (expected a dataset folder or a Hub dataset id)")
    else:
        openers = _hub_openers(dataset, revision)
    missing = [name for name in splits if name not in openers]
    if missing:
        raise ValueError(
            f"dataset {dataset} has no split(s) {missing}: it has {sorted(openers)}; the datamodule needs "
            f"{list(splits)} (set train_split / val_split to use others)"
        )
    opened = {name: openers[name]() for name in splits}
    for name, split in opened.items():
        if split.num_rows == 0:
            raise ValueError(
                f"split {name!r} of dataset {dataset} is empty (0 rows); expected at least one preference pair"
            )
    return opened


def _local_openers(path: Path, splits: tuple[str, ...]) -> dict[str, Callable[[], PreferenceSplit]]:
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path / 'dataset_dict.json'} is not a valid DatasetDict index: {error}") from error
        return {name: (lambda name=name: _load_saved_split(path, name)) for name in names}
    if (path / "state.json").is_file():
        raise ValueError(
            f"{path} holds a single datasets.Dataset (state.json), not a DatasetDict with splits {list(splits)}; "
            "save a DatasetDict({'train': ..., 'validation': ...}) with save_to_disk"
        )
    openers: dict[str, Callable[[], PreferenceSplit]] = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if any((child / filename).is_file() for filename in METADATA_FILES):
            openers[child.name] = lambda child=child: FolderPreferenceSplit(child.name, child)
        elif (child / "state.json").is_file():
            openers[child.name] = lambda child=child: _load_saved_split(path, child.name)
    if not openers:
        raise ValueError(
            f"{path} is not a preference dataset: expected dataset_dict.json (DatasetDict.save_to_disk) or split "
            f"folders {list(splits)} each holding one of {list(METADATA_FILES)}"
        )
    return openers


def _load_saved_split(root: Path, name: str) -> PreferenceSplit:
    from datasets import Dataset

    folder = root / name
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"split {name!r} of dataset {root}: cannot read {folder / 'state.json'} ({error})") from error
    if not state.get("_data_files"):
        # datasets cannot load a split saved with no rows (it has no data file); report it as empty.
        return _EmptySplit(name, str(root))
    return HFPreferenceSplit(name, str(root), Dataset.load_from_disk(str(folder)), "save_to_disk")


class _EmptySplit(PreferenceSplit):
    """A split with no rows (rejected by :func:`load_preference_splits`)."""

    @property
    def num_rows(self) -> int:
        return 0

    def identity(self) -> dict[str, Any]:
        return {}

    def row(self, index: int) -> tuple[Any, dict[str, ImageRef | None]]:
        raise IndexError(index)


def _hub_openers(dataset_id: str, revision: str | None) -> dict[str, Callable[[], PreferenceSplit]]:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(dataset_id, revision=revision)
    except Exception as error:  # noqa: BLE001 - datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = is_datasets_offline()
        hint = (
            " Offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), so only datasets already in the local "
            "datasets cache load: load it once on a machine with internet access, or pass a local folder."
            if offline
            else ""
        )
        raise OSError(
            f"could not load the Hub dataset {dataset_id!r} (revision={revision!r}): "
            f"{type(error).__name__}: {error}.{hint}"
        ) from error
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise ValueError(f"Hub dataset {dataset_id!r} did not load as a DatasetDict with splits")
    extra = {"id": dataset_id, "revision": revision}
    return {
        name: (lambda name=name: HFPreferenceSplit(name, dataset_id, dataset_dict[name], "hub", extra))
        for name in dataset_dict
    }

