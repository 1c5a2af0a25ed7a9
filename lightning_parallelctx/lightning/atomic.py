"""Checkpoint directories that appear only when complete (file-system work of one process).

A save writes into ``.<name>.partial`` next to the final path, fsyncs every file, writes the
completion marker ``COMPLETE`` last, fsyncs the directory and renames it to ``<name>``. A process
killed at any point before the rename leaves only the ``.partial`` directory, which no loader and no
``ckpt_path="last"`` lookup ever picks (its name has no ``.ckpt``/``last`` in the place Lightning
looks, and it has no marker); the next save to the same name deletes it.

Replacing an existing checkpoint (``last.ckpt`` is re-saved every time) cannot be one rename of a
non-empty directory: the old one is first renamed to ``.<name>.old``, the new one renamed in, the
old one deleted. A process killed between those two renames leaves ``.<name>.old`` complete:
:func:`resolve_complete` falls back to it, so a checkpoint is never lost.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def old_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the entry is synced.
    try:
        fsync_file(path)
    except OSError:  # some file systems (and Windows) cannot open directories: best effort
        pass


def begin(final: Path) -> Path:
    """Rank 0, before anyone writes: a fresh, empty ``.partial`` directory (a killed save's is dropped)."""
    tmp = partial_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(final: Path, unsynced: "list[Path] | None" = None, marker_text: str = "") -> None:
    """Rank 0, after every rank's files are written and synced: fsync ``unsynced`` (all files when
    None), mark ``.partial`` complete and move it to ``final``."""
    tmp = partial_dir(final)
    for f in unsynced if unsynced is not None else [f for f in tmp.rglob("*") if f.is_file()]:
        fsync_file(f)
    marker = tmp / MARKER
    marker.write_text(marker_text)
    fsync_file(marker)
    fsync_dir(tmp)
    old = old_dir(final)
    if final.exists() or final.is_symlink():
        if old.exists():
            shutil.rmtree(old)
        if final.is_dir() and not final.is_symlink():
            os.rename(final, old)
        else:
            final.unlink()
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def resolve_complete(path: Path) -> Path:
    """``path`` if complete, else the complete ``.old`` copy a save killed mid-replacement left."""
    if is_complete(path):
        return path
    old = old_dir(path)
    if not path.exists() and is_complete(old):
        return old
    return path


def remove(path: Path) -> None:
    """Delete a checkpoint and whatever a killed save of it left."""
    for p in (path, partial_dir(path), old_dir(path)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
