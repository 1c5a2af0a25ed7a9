"""Checkpoint directories that appear only when complete (file-system work of one process).

A save writes into ``.<name>.partial`` next to the final path, fsyncs every file, writes the
completion marker ``COMPLETE`` last, fsyncs the directory and renames it to ``<name>``. A process
killed at any point before the rename leaves only the ``.partial`` directory, which no loader and no
``ckpt_path="last"`` lookup ever picks (its name has no ``.ckpt``/``last`` in the place Lightning
looks, and it has no marker); the next save to the same name deletes it.

Replacing an existing checkpoint (``last.ckpt`` is re-saved every time) cannot be one rename of a
non-empty directory: the old one is first renamed to ``.<name>.old``, the new one renamed in, the
old one deleted. A process killed between those two renames leaves no ``<name>``, a marked (complete)
``.<name>.partial`` and the complete ``.<name>.old``: :func:`recover` moves the newest complete one
back to ``<name>`` (resume_path.py calls it before Lightning resolves ``ckpt_path="last"``, which
lists only ``last*.ckpt`` names) and :func:`resolve_complete` picks the same one, so a checkpoint
is never lost.
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


def _left_by_killed_replacement(final: Path) -> Path | None:
    """When ``final`` is missing: the newest complete copy a save killed between its two renames
    left (its marked ``.partial``: every rank's data was written and synced before the marker),
    else the complete ``.old``; None when there is none."""
    if final.exists() or final.is_symlink():
        return None
    return next((p for p in (partial_dir(final), old_dir(final)) if is_complete(p)), None)


def resolve_complete(path: Path) -> Path:
    """``path`` if complete, else the complete copy a save killed mid-replacement left."""
    if is_complete(path):
        return path
    return _left_by_killed_replacement(path) or path


def recover(final: Path) -> bool:
    """Finish a replacement a killed process left half done: move the copy :func:`resolve_complete`
    would pick to ``final``. True when this call moved it.

    Several processes may call it at once (no process group exists yet when it runs): rename is
    atomic, so one wins and the others' renames fail (source gone, or target now a non-empty
    directory) and find ``final`` complete. Never called while a save of ``final`` is in flight."""
    src = _left_by_killed_replacement(final)
    if src is None:
        return False
    try:
        os.rename(src, final)
    except OSError:  # another process moved it first
        return False
    fsync_dir(final.parent)
    if src != old_dir(final):  # rolled forward: the replaced copy is stale
        shutil.rmtree(old_dir(final), ignore_errors=True)
    return True


def remove(path: Path) -> None:
    """Delete a checkpoint and whatever a killed save of it left."""
    for p in (path, partial_dir(path), old_dir(path)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
