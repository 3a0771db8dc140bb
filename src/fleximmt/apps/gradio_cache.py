"""Gradio's file cache as the web apps leave it: every served or uploaded file sits in a folder of
its own there; Gradio deletes the files (``delete_cache``) but never the folders. These go here."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path


def cache_entries(folder: str | Path) -> set[str]:
    """The names directly under ``folder`` now (none when it does not exist yet)."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


def remove_empty_folders(folder: str | Path, older_than_s: float, also: Collection[str] = ()) -> int:
    """Remove the empty folders directly under ``folder`` that nothing touched for ``older_than_s``
    seconds, and those whose names are in ``also`` whatever their age; returns how many. A folder
    emptied that long ago is not about to be reused (Gradio fills a folder as it makes it)."""
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and (
                entry.name in also or now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
            ):
                os.rmdir(entry.path)  # fails, and is skipped, unless the folder is empty
                removed += 1
        except OSError:
            continue
    return removed


def remove_served_files(blocks, folder: str | Path, before: Collection[str], older_than_s: float) -> int:
    """At a server's shutdown: delete the files Gradio cached for ``blocks`` (what Gradio itself deletes
    then; bundled examples stay), then the empty folders directly under ``folder`` that held them,
    that appeared while the server ran (not in ``before``, the names there at its start: its own
    folders whose files went earlier, and the one Gradio makes with the page), or that nothing touched
    for ``older_than_s``. Returns how many folders went."""
    from gradio.route_utils import delete_files_created_by_app

    root = Path(folder).resolve()
    held = {Path(file).resolve().parent for files in blocks.temp_file_sets for file in files}
    delete_files_created_by_app(blocks, age=None)
    ours = {p.name for p in held if p.parent == root} | (cache_entries(root) - set(before))
    return remove_empty_folders(root, older_than_s, also=ours)
