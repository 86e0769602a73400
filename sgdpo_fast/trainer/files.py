"""Writing into a run folder so that nothing is ever half-written, and failures read clearly.

* :func:`write_text` / :func:`write_json`: a file written to ``<path>.tmp``, flushed,
  fsync'ed and renamed over ``path`` (a reader sees the old file or the new one).
* :func:`write_folder`: a folder written as ``<path>.tmp/`` and renamed into place; the
  previous folder (if any) is replaced only once the new one is complete.
* :class:`RunWriteError`: any failed write (a full disk, a file-size limit, a read-only
  folder) as an ``OSError`` whose message names the file and the reason in one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Iterator
from ..data.records import fsync_dir  # noqa: F401  (also used by checkpoint.py through this module)


class RunWriteError(OSError):
    """Writing a file of a run failed; the message names the file and the reason."""


def describe_os_error(e: BaseException) -> str:
    """``"No space left on device"`` rather than ``"[Errno 28] No space left on device: 'x'"``;
    safetensors' own error keeps the operating system's words."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return text.split("I/O error: ", 1)[-1] or type(e).__name__


def _is_write_failure(e: BaseException) -> bool:
    # safetensors reports a failed write as SafetensorError (a plain Exception), not OSError
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a failure to write ``path`` into one RunWriteError naming it."""
    try:
        yield
    except RunWriteError:
        raise
    except Exception as e:
        if not _is_write_failure(e):
            raise
        err = RunWriteError(f"cannot write {path}: {describe_os_error(e)}")
        err.errno = getattr(e, "errno", None)
        raise err from e


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text(path: str, text: str) -> str:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    tmp = path + ".tmp"
    with writing(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def write_json(path: str, obj) -> str:
    """Atomically replace ``path`` with ``obj`` as indented, standard JSON (no NaN)."""
    return write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def write_folder(path: str, fill: Callable[[str], None]) -> str:
    """``fill(tmp)`` writes the folder's files into ``<path>.tmp``; only when it returns is
    the folder renamed to ``path`` (replacing an older one).  An interruption or a failed
    write leaves ``path`` as it was (the old folder, or none)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp):
            os.makedirs(tmp)
            fill(tmp)
            for name in os.listdir(tmp):
                p = os.path.join(tmp, name)
                if os.path.isfile(p):
                    fsync_file(p)
            fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_folder(tmp, path)


def commit_folder(tmp: str, path: str) -> str:
    """Rename the complete folder ``tmp`` to ``path``, replacing an older ``path`` only once
    ``tmp`` is in place (the second half of :func:`write_folder`)."""
    old = path + ".old"
    with writing(path):
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)
    return path
