"""Property-based tests (hypothesis): any input either works or fails with a ValueError naming the field and value."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rsc.export import ExportInfo
from rsc.sampling import correction_step_indices, window_timestep_range

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
ANY_WINDOW = st.one_of(
    st.tuples(st.floats(), st.floats()),
    st.lists(st.floats(allow_nan=False, min_value=-1, max_value=2), max_size=4),
    JSON,
)


@given(st.integers(min_value=1, max_value=200), ANY_WINDOW)
def test_correction_window_works_or_names_the_window(num_steps: int, window: object) -> None:
    try:
        steps = correction_step_indices(num_steps, window)  # type: ignore[arg-type]
    except ValueError as error:
        assert "correction window" in str(error) and repr(window) in str(error)
        return
    start, end = (float(value) for value in window)  # type: ignore[union-attr]
    assert steps == [i for i in range(num_steps) if start <= i / num_steps < end]


@given(st.tuples(st.floats(0, 1), st.floats(0, 1)), st.integers(min_value=10, max_value=2000))
def test_training_timesteps_cover_the_window(window: tuple[float, float], timesteps: int) -> None:
    start, end = window
    try:
        low, high = window_timestep_range(window, timesteps)
    except ValueError as error:
        assert not start < end and repr(window) in str(error)
        return
    assert 0 <= low < high <= timesteps  # a valid, non-empty range of the scheduler's 0 .. T-1
    assert math.isclose(low, timesteps * (1 - end), abs_tol=1)
    assert high == min(max(round(timesteps * (1 - start)), low + 1), timesteps)


def _config(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(payload))
    return path


VALID = {"correction_window": [0.2, 0.5], "strength": 1.0, "backbone": "rsc/toy/world/sd"}


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(VALID)), JSON)
def test_refiner_config_field_works_or_is_named(tmp_path: Path, field: str, value: object) -> None:
    path = _config(tmp_path, {**VALID, field: value})
    try:
        info = ExportInfo.from_config_file(path)
    except ValueError as error:
        assert str(path) in str(error) and field in str(error) and repr(value) in str(error), str(error)
        return
    assert getattr(info, field) == (tuple(value) if field == "correction_window" else value)  # type: ignore[arg-type]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(JSON)
def test_any_json_as_refiner_config_works_or_says_why(tmp_path: Path, payload: object) -> None:
    path = _config(tmp_path, payload)
    with pytest.raises(ValueError, match="config|lacks"):
        ExportInfo.from_config_file(path)


# ---------------------------------------------------------------- the preference-schema validator
# One image cell of a metadata row, by kind; the reason validation must give for it (None: usable).
CELL_REASONS = {
    "image": None,
    "cmyk image": None,  # not RGB, but convertible: usable
    "absent": "missing image path",
    "blank": "missing image path",
    "missing file": "missing image file",
    "truncated": "unreadable image",
    "not an image": "unreadable image",
}
# Any string as a path, including NUL bytes and names too long for the file system.
PATH_TEXT = st.one_of(
    st.text(max_size=20), st.text(alphabet="ab\x00/.", max_size=40), st.text(alphabet="ab", min_size=256, max_size=300)
)
CELL = st.one_of(st.sampled_from(sorted(CELL_REASONS)), PATH_TEXT.map(lambda text: ("path", text)))
PROMPT = st.one_of(st.text(max_size=12), st.none(), st.integers(), st.lists(st.integers(), max_size=2))
ROW = st.tuples(PROMPT, CELL, CELL)


def _png(mode: str = "RGB") -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new(mode, (8, 8), (10, 20, 30, 40) if mode == "CMYK" else (10, 20, 30)).save(
        buffer, format="JPEG" if mode == "CMYK" else "PNG"
    )
    return buffer.getvalue()


def _cell(folder: Path, name: str, kind: object) -> tuple[object, str | None]:
    """Write the files of one cell; return (the metadata value, or ``absent``) and the expected problem reason."""
    if isinstance(kind, tuple):  # an arbitrary string as a path: a file of that name never exists here
        text = kind[1]
        return text, ("missing image path" if not text.strip() else "missing image file")
    files = {"image": _png(), "cmyk image": _png("CMYK"), "truncated": _png()[:40], "not an image": b"not an image"}
    if kind in files:
        (folder / name).write_bytes(files[kind])  # type: ignore[index]
        return name, CELL_REASONS[kind]  # type: ignore[index]
    value = {"absent": "absent", "blank": "  ", "missing file": f"gone-{name}"}[kind]  # type: ignore[index]
    return value, CELL_REASONS[kind]  # type: ignore[index]


def _write_split(folder: Path, rows: list[tuple[object, object, object]]) -> list[str | None]:
    """A ``metadata.jsonl`` split of ``rows``; return each row's first expected problem as "column: reason"."""
    folder.mkdir(parents=True)
    expected: list[str | None] = []
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as handle:
        for index, (prompt, winner, loser) in enumerate(rows):
            record: dict[str, object] = {"prompt": prompt}
            problems = [] if isinstance(prompt, str) and prompt.strip() else ["prompt: empty prompt"]
            for column, kind in (("anti_stereotypical", winner), ("stereotypical", loser)):
                value, reason = _cell(folder, f"img-{index}-{column}.png", kind)
                if value != "absent":
                    record[column] = value
                if reason:
                    problems.append(f"{column}: {reason}")
            handle.write(json.dumps(record) + "\n")
            expected.append(problems[0] if problems else None)
    return expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ROW, min_size=1, max_size=5))
def test_validator_keeps_exactly_the_usable_rows_and_names_every_other(tmp_path_factory, rows) -> None:
    """Any metadata rows: ``skip_invalid`` keeps exactly the usable ones and reports the others by row, column and
    reason; without it the first bad row raises a ValueError naming it; never another exception."""
    from rsc.datamodules.sources import load_preference_splits
    from rsc.datamodules.validation import validate_split

    root = tmp_path_factory.mktemp("prefs")
    expected = _write_split(root / "train", rows)
    _write_split(root / "validation", rows[:1])
    if any(all(row[column] == "absent" for row in rows[:1]) for column in (1, 2)):  # no row has the column
        with pytest.raises(ValueError, match="metadata.jsonl lacks the required column"):
            load_preference_splits(str(root), ("train", "validation"))
        return
    split = load_preference_splits(str(root), ("train", "validation"))["train"]
    assert split.identity()["num_rows"] == len(rows)  # the cache key of any split can be taken
    usable = [index for index, problem in enumerate(expected) if problem is None]

    if usable:
        kept, problems = validate_split(split, skip_invalid=True, progress=False)
        assert kept == usable
        assert [(p.row, f"{p.column}: {p.reason}") for p in problems] == [
            (index, problem) for index, problem in enumerate(expected) if problem is not None
        ]
    else:
        with pytest.raises(ValueError, match="has no valid rows left"):
            validate_split(split, skip_invalid=True, progress=False)

    bad = [index for index, problem in enumerate(expected) if problem is not None]
    if not bad:
        assert validate_split(split, progress=False)[0] == list(range(len(rows)))
        return
    with pytest.raises(ValueError) as raised:
        validate_split(split, progress=False)
    column, reason = expected[bad[0]].split(": ", 1)  # type: ignore[union-attr]
    message = str(raised.value)
    assert f"row {bad[0]}, column {column!r}" in message and reason in message
    assert f"metadata.jsonl line {bad[0] + 1}" in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(JSON, min_size=1, max_size=4))
def test_any_metadata_lines_load_or_name_the_file_and_line(tmp_path_factory, records) -> None:
    """Arbitrary JSON values as metadata lines: the split opens, or a ValueError names the file (and the line)."""
    from rsc.datamodules.sources import load_preference_splits

    root = tmp_path_factory.mktemp("prefs")
    for name in ("train", "validation"):
        (root / name).mkdir()
        (root / name / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    metadata = root / "train" / "metadata.jsonl"
    objects = [record for record in records if isinstance(record, dict)]
    try:
        split = load_preference_splits(str(root), ("train", "validation"))["train"]
    except ValueError as error:
        if len(objects) < len(records):
            first = next(line for line, record in enumerate(records, 1) if not isinstance(record, dict))
            assert f"{metadata} line {first} is a JSON" in str(error)
        else:
            assert f"{metadata} lacks the required column(s)" in str(error)
        return
    assert split.num_rows == len(records)
    assert all({"prompt", "anti_stereotypical", "stereotypical"} <= set(record) for record in objects)


# ---------------------------------------------------------------- rsc.fit's config parsing
def _finite(value: object, low: float = -math.inf, strict: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (value > low if strict else value >= low)


def _int(value: object, low: int, high: float = 2**16) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# What each field accepts, written independently of rsc's checks: a value that parses is a value that can train.
FIT_FIELDS: dict[str, object] = {
    "model.strength": lambda v: _finite(v),
    "model.sampling_strength": lambda v: v is None or _finite(v),
    "model.sampling_threshold": lambda v: _finite(v, 0),
    "model.beta": lambda v: _finite(v, 0, strict=True),
    "model.lambda_reg": lambda v: _finite(v, 0),
    "model.lambda_sft": lambda v: _finite(v, 0),
    "model.lambda_no_harm": lambda v: _finite(v, 0),
    "model.lambda_keep": lambda v: _finite(v, 0),
    "model.learning_rate": lambda v: _finite(v, 0, strict=True),
    "model.weight_decay": lambda v: _finite(v, 0),
    "model.warmup_steps": lambda v: _int(v, 0, math.inf),
    "model.seed": lambda v: _int(v, 0, 2**63 - 1),
    "model.max_consecutive_skipped_steps": lambda v: _int(v, 1, math.inf),
    "model.correction_window": lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1,
    "model.hidden_channels": lambda v: _int(v, 1) and v % 16 == 0,  # configs/toy.yaml: 16 groups
    "model.norm_groups": lambda v: _int(v, 1) and 64 % v == 0,  # 64 hidden channels
    "model.num_blocks": lambda v: _int(v, 1),
    "model.embedding_dim": lambda v: _int(v, 1),
    "model.backbone_dtype": lambda v: v in {"float32", "float16", "bfloat16"},
    "model.x0_input": lambda v: isinstance(v, bool),
    "data.batch_size": lambda v: _int(v, 1, math.inf),
    "data.encode_batch_size": lambda v: _int(v, 1, math.inf),
    "data.num_workers": lambda v: _int(v, 0, math.inf),
    "data.seed": lambda v: _int(v, 0, 2**63 - 1),
    "data.train_split": lambda v: v != "validation",  # configs/toy.yaml's val_split
}
FIT_VALUE_TEXT = st.one_of(
    st.integers(-3, 130).map(str),
    st.integers(2**62, 2**65).map(str),
    st.floats().map(repr),  # nan, inf, 1e+308, -0.0 ...
    st.text(max_size=6),
    st.sampled_from(["true", "false", "yes", "null", "[]", "[0.1, 0.5]", "[0.5, 0.1]", "[0, 1]", "[0.2]", "{}", "float16", "validation"]),
)


def _mentions(message: str, text: str, value: object) -> bool:
    """Whether an error message shows the value the user gave (as typed, or as parsed)."""
    squeeze = lambda s: "".join(s.split()).replace("[", "(").replace("]", ")")  # noqa: E731
    if not text.strip():
        return True  # nothing visible to show (jsonargparse prints "Got value: " and an empty line)
    shown = {text.strip(), repr(text), repr(value), str(value), squeeze(text)}
    return any(form and (form in message or form in squeeze(message)) for form in shown)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(FIT_FIELDS)), FIT_VALUE_TEXT)
@example("model.sampling_strength", "")  # a draw that once turned CI red: blank is refused, not read as null
def test_fit_config_field_trains_or_is_named(monkeypatch, capsys, tmp_path, field: str, text: str) -> None:
    """``python -m rsc.fit --config configs/toy.yaml --<field>=<anything>``: the model, data and trainer build exactly
    when the value is usable, else the run ends with status 2 and a message naming the field and the value."""
    import yaml
    from lightning.pytorch import Trainer

    from rsc.fit import main as fit_main

    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)  # parsing and building is the subject here
    capsys.readouterr()
    overrides = ["--model.hidden_channels=64"] if field == "model.norm_groups" else []
    args = ["--config", "configs/toy.yaml", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--data.progress=false", *overrides, f"--{field}={text}"]
    try:
        # Blank text stays a string: jsonargparse refuses "--model.sampling_strength=" for a float | None field,
        # where YAML would read it as null.
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # "nan", "inf", "1e400": jsonargparse reads floats beyond YAML's
    try:
        cli = fit_main(args)
    except SystemExit as exit:
        message = capsys.readouterr().err
        assert exit.code == 2 and "Traceback" not in message
        name = field.split(".")[1]
        assert name in message or name.replace("_", " ") in message, message
        assert _mentions(message, text, value), message
        with contextlib.suppress(TypeError, ValueError):
            assert not FIT_FIELDS[field](value), f"{field}={text!r} is usable but was refused: {message}"  # type: ignore[operator]
        return
    section, name = field.split(".")
    built = (cli.model if section == "model" else cli.datamodule).hparams[name]
    assert FIT_FIELDS[field](tuple(built) if name == "correction_window" else built), (  # type: ignore[operator]
        f"{field}={text!r} was accepted as {built!r}, which cannot train"
    )
