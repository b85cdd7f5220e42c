"""What a preference-dataset build makes: its settings (:class:`BuildConfig`), prompts and labelled references.

Read by :mod:`rsc.datamodules.builder`, which generates, filters, pairs and saves.
"""

from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

TEMPLATE_FIELDS: tuple[str, ...] = ("group", "gender", "profession")
LABEL_COLUMNS: tuple[str, ...] = ("file_name", "group", "gender")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BuildConfig:
    """What to generate and how to pair it; read from JSON/YAML with :meth:`from_file`.

    Attributes:
        template: Prompt template with ``{group}`` and optionally ``{gender}`` and/or ``{profession}``.
        groups: Group labels exactly as written in the reference ``labels.csv``.
        genders: Gender labels as in ``labels.csv`` (needed when the template has ``{gender}``).
        professions: Words for ``{profession}``.
        prompt_words: Label -> words in the prompt, where they differ (e.g. a label ``Female`` -> ``woman``).
        samples_per_prompt: SD samples drawn per prompt (before face filtering).
        first_seed: Sample ``j`` of every prompt uses seed ``first_seed + j``.
        steps: Sampling steps.
        guidance_scale: Classifier-free guidance scale.
        scheduler: A diffusers scheduler class name, or ``None`` for the model's own.
        validation_fraction: Share of pairs in the validation split (at least one pair).
        seed: Seed of the pairing and of the split.
    """

    template: str = "a photo of a {group} {gender}"
    groups: list[str] = field(default_factory=list)
    genders: list[str] = field(default_factory=list)
    professions: list[str] = field(default_factory=list)
    prompt_words: dict[str, str] = field(default_factory=dict)
    samples_per_prompt: int = 16
    first_seed: int = 0
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str | None = None
    validation_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BuildConfig:
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file whose keys are this class's fields."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got a {type(data).__name__}")
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> BuildConfig:
        """Build from a mapping, rejecting unknown keys (typos would otherwise be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{origin}: unknown setting(s) {unknown}; known settings are {sorted(known)}")
        config = cls(**data)
        config.validate(origin)
        return config

    def placeholders(self) -> list[str]:
        """The template's placeholders, in order of appearance."""
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]

    def validate(self, origin: str = "config") -> None:
        """Raise ``ValueError`` naming the field when the settings cannot build a dataset."""
        names = self.placeholders()
        unknown = sorted(set(names) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(
                f"{origin}: template {self.template!r} has unknown placeholder(s) {unknown}; "
                f"allowed: {list(TEMPLATE_FIELDS)}"
            )
        if "group" not in names:
            raise ValueError(f"{origin}: template {self.template!r} must contain {{group}}: pairs are matched by group")
        for name, values in (("group", self.groups), ("gender", self.genders), ("profession", self.professions)):
            if name in names and not values:
                raise ValueError(f"{origin}: template uses {{{name}}} but `{name}s` is empty; list the values to use")
            if len(set(values)) != len(values):
                raise ValueError(f"{origin}: `{name}s` has duplicates: {values}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"{origin}: samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.steps < 1:
            raise ValueError(f"{origin}: steps must be >= 1, got {self.steps}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"{origin}: validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the attribute labels it names (``None`` where the template has no such placeholder)."""

    prompt: str
    group: str
    gender: str | None = None
    profession: str | None = None

    @property
    def pairing_key(self) -> tuple[str, str | None]:
        """References must match this (group, gender); gender ``None`` matches any."""
        return self.group, self.gender


def expand_prompts(config: BuildConfig) -> list[PromptSpec]:
    """Every combination of the template's attributes, in the order of the config's lists."""
    config.validate()
    names = config.placeholders()
    words = config.prompt_words
    specs = []
    for group in config.groups:
        for gender in config.genders if "gender" in names else [None]:
            for profession in config.professions if "profession" in names else [None]:
                values = {
                    "group": words.get(group, group),
                    "gender": words.get(gender, gender) if gender is not None else "",
                    "profession": profession or "",
                }
                prompt = " ".join(config.template.format(**values).split())
                specs.append(PromptSpec(prompt, group, gender, profession))
    return specs



# ---------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ReferenceImage:
    """A labelled reference photo."""

    path: Path
    group: str
    gender: str


def read_reference_labels(folder: str | os.PathLike[str], labels_file: str = "labels.csv") -> list[ReferenceImage]:
    """Read ``folder/labels_file`` (CSV with ``file_name,group,gender``; paths relative to ``folder``).

    Raises ``ValueError`` naming the file and line for a missing column, an empty
    cell or a file that does not exist.
    """
    folder = Path(folder)
    labels_path = folder / labels_file
    if not labels_path.is_file():
        raise FileNotFoundError(
            f"reference folder {folder} has no {labels_file} (expected columns {list(LABEL_COLUMNS)})"
        )
    references = []
    with labels_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in LABEL_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{labels_path} lacks column(s) {missing}: it has {reader.fieldnames}; expected {list(LABEL_COLUMNS)}"
            )
        for line, record in enumerate(reader, start=2):
            empty = [column for column in LABEL_COLUMNS if not (record.get(column) or "").strip()]
            if empty:
                raise ValueError(f"{labels_path} line {line}: empty {empty}; every row needs {list(LABEL_COLUMNS)}")
            path = folder / record["file_name"].strip()
            if not path.is_file():
                raise ValueError(
                    f"{labels_path} line {line}: file_name {record['file_name']!r} -> {path} does not exist"
                )
            references.append(ReferenceImage(path, record["group"].strip(), record["gender"].strip()))
    if not references:
        raise ValueError(f"{labels_path} lists no images")
    return references
