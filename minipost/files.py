"""Atomic writes: a directory appears whole or not at all, so a killed run never leaves half of one.

`atomic_dir(path)` is how every checkpoint directory is written: a model (checkpoint.py), a resume
checkpoint (resume.py), an adapter (peft_format.py). Files go into a temporary sibling
directory that is renamed into place once complete; an interrupted save leaves the previous
directory as it was.
"""
import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temporary directory; on success it replaces `path` in one rename.

    Entries of an existing `path` that the new directory does not write (metrics.jsonl, resume
    states) are moved over, so saving a model keeps the run's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.is_dir():
        for entry in path.iterdir():
            if not (tmp / entry.name).exists():
                entry.rename(tmp / entry.name)
    if path.exists():
        path.rename(old)        # the only window without `path` is between these two renames
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
