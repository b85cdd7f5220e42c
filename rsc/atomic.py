"""Atomic writes of files and whole folders: readers (and killed runs) never see a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    On error the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        yield Path(temporary)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes: how a manifest tells a whole file from a damaged one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- folders
# Fixed sibling names (not random) so the next write finds what a killed one left.
_STAGING_SUFFIX = ".rsc-new"
_ASIDE_SUFFIX = ".rsc-old"


def staging_folder(directory: str | os.PathLike[str]) -> Path:
    """``.<name>.rsc-new`` beside ``directory``: where :func:`write_folder_atomic` writes the new content."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{_STAGING_SUFFIX}"


def aside_folder(directory: str | os.PathLike[str]) -> Path:
    """``.<name>.rsc-old`` beside ``directory``: where the old content waits during the swap."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{_ASIDE_SUFFIX}"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file or folder to disk where the platform allows it (a folder cannot be opened on Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def recover_folder(directory: str | os.PathLike[str]) -> None:
    """Undo what a :func:`write_folder_atomic` killed mid-way left beside ``directory``.

    * ``.<name>.rsc-old`` without ``<name>``: killed between the two renames; the
      old folder is renamed back (the staged new one is complete, but the old is
      the one a reader last saw).
    * ``.<name>.rsc-old`` beside ``<name>``: killed after the swap; the old one is deleted.
    * ``.<name>.rsc-new``: a staged folder that was never swapped in; deleted.
    """
    directory = Path(directory)
    aside, staging = aside_folder(directory), staging_folder(directory)
    if aside.exists():
        if directory.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, directory)
    if staging.exists():
        shutil.rmtree(staging)


def write_folder_atomic(
    directory: str | os.PathLike[str],
    write: Callable[[Path], None],
    check_replaceable: Callable[[Path], None] | None = None,
) -> Path:
    """Replace ``directory`` as a whole by what ``write(staging)`` puts into an empty staging folder.

    The content is written into the sibling ``.<name>.rsc-new``, flushed, and
    swapped in: an existing ``directory`` is renamed to ``.<name>.rsc-old``, the
    new folder renamed to ``directory``, then the old one deleted. Readers see
    the old folder or the new one, never a mix. If the process is killed:

    * while writing: ``directory`` is untouched; ``.rsc-new`` is left over;
    * between the renames: ``directory`` is missing, the old one is in ``.rsc-old``;
    * before the old one is deleted: ``directory`` is new, ``.rsc-old`` is left over.

    The next call (or :func:`recover_folder`) puts each of these right before it
    starts; ``check_replaceable(directory)`` then runs (raise to refuse the
    replacement). A failed ``write`` (an exception) removes ``.rsc-new`` at once.
    Two writers of one folder at the same time are not supported.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(directory)
    if check_replaceable is not None:
        check_replaceable(directory)
    staging, aside = staging_folder(directory), aside_folder(directory)
    staging.mkdir()
    try:
        write(staging)
        # The renames must not reach the disk before the files' contents.
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                fsync_path(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        os.rename(directory, aside)
    os.rename(staging, directory)
    fsync_path(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------- weights beside a config
def write_safetensors_atomic(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a state dict as safetensors (CPU, contiguous copies), atomically."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata={"format": "pt"})


def require_files(directory: str | os.PathLike[str], names: Iterable[str], writer: str) -> Path:
    """``directory`` as a Path, or FileNotFoundError naming the first of ``names`` it lacks and who writes them."""
    directory = Path(directory)
    names = list(names)
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found: a folder written by {writer} holds {' and '.join(names)}"
            )
    return directory
