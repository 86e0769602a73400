"""JSONL data formats for preference and SFT training, with validation.

Two record shapes are understood:

* preference records: ``{"prompt": str, "chosen": str, "rejected": str, ...}``
* SFT records:        ``{"prompt": str, "response": str, ...}``

Every required field must be a string that is non-empty after stripping and valid
Unicode (no lone surrogates, which JSON's ``\ud800`` escapes can produce but no tokenizer
takes); extra keys are kept as they are.  A *source* is one of

* a path to a ``.jsonl`` file (one JSON object per line, blank lines skipped);
* ``"bundled:train"`` / ``"bundled:heldout"``: the task files shipped in
  ``sgdpo_fast/data/bundled/`` (see :mod:`sgdpo_fast.data.tasks`);
* ``"hf:<dataset name or local dir>[:<split>]"``: loaded with Hugging Face
  ``datasets`` (optional dependency; the split defaults to ``train``).  Offline by
  default: a local folder is read with the Hub switched off; a Hub name needs the
  explicit opt-in ``online=True`` (the command line's ``--online``).

Problems are reported as :class:`DataError` whose message starts with
``"{path}:{line}: "`` (1-based line numbers, blank lines counted) or, for
Hugging Face sources, ``"hf:{name}[{split}] row {i}: "`` (0-based row index).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

__all__ = [
    "DataError",
    "load_preferences",
    "load_sft",
    "read_jsonl",
    "write_jsonl",
    "PREFERENCE_KEYS",
    "SFT_KEYS",
]

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
SFT_KEYS = ("prompt", "response")


class DataError(ValueError):
    """A data source is missing, unreadable or holds an invalid record.

    When the problem is in one line of a file the message starts with
    ``"{path}:{line}: "`` (1-based line number).
    """


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data file does not exist (catchable as DataError or FileNotFoundError)."""


# ---------------------------------------------------------------------------
# Plain JSONL reading and writing
# ---------------------------------------------------------------------------

def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based and count blank lines.  Raises DataError for a
    line that is not JSON or not a JSON object, and DataFileNotFoundError when
    the file does not exist.
    """
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .jsonl file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: JSON nested too deeply to read "
                                    f"(Python's parser gives up); flatten the record") from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
                yield lineno, obj
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text: {e}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file into a list of dicts (no field validation).

    Blank lines are skipped; a line that is not a JSON object raises
    DataError naming the file and the 1-based line number.  An empty file
    gives an empty list.
    """
    return [obj for _, obj in _iter_jsonl(os.fspath(path))]


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> str:
    """Write records as JSONL, atomically, and return the path written.

    The data goes to ``path + ".tmp"`` first, is flushed and fsync'ed, then
    renamed over ``path`` with :func:`os.replace`, so readers never see a
    half-written file.  Parent directories are created.  One JSON object per
    line, UTF-8, ``ensure_ascii=False``; NaN/Infinity are refused so the
    output is always valid JSON.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for i, rec in enumerate(records):
                if not isinstance(rec, Mapping):
                    raise TypeError(
                        f"write_jsonl: record {i} is a {type(rec).__name__}, expected a dict")
                f.write(json.dumps(dict(rec), ensure_ascii=False, allow_nan=False))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(parent)
    return path


def fsync_dir(directory: str) -> None:
    """Best-effort fsync of a directory so a rename inside it is durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Validated loading
# ---------------------------------------------------------------------------

def load_preferences(source: str | os.PathLike, *, online: bool = False) -> list[dict]:
    """Load preference records ``{"prompt", "chosen", "rejected"}`` from a source.

    All three fields must be non-empty strings and ``chosen`` must differ from
    ``rejected`` (ignoring surrounding whitespace).  Extra keys are kept.
    See the module docstring for the accepted sources (``online``: allow an
    ``hf:`` Hub name to be downloaded).
    """
    return _load(source, PREFERENCE_KEYS, _check_pair, online)


def load_sft(source: str | os.PathLike, *, online: bool = False) -> list[dict]:
    """Load SFT records ``{"prompt", "response"}`` from a source.

    Both fields must be non-empty strings.  Extra keys are kept.  See the
    module docstring for the accepted sources (``online`` as in
    :func:`load_preferences`).
    """
    return _load(source, SFT_KEYS, None, online)


def _check_pair(rec: dict) -> str | None:
    """Extra rule for preference pairs: the two responses must differ."""
    if rec["chosen"].strip() == rec["rejected"].strip():
        return "'chosen' and 'rejected' are identical"
    return None


def _load(source, keys, extra_check, online=False) -> list[dict]:
    """Resolve ``source``, iterate its rows and validate each one."""
    if isinstance(source, str) and source.startswith("hf:"):
        label, rows = _hf_rows(source[len("hf:"):], online)
        where = lambda i: f"{label} row {i}"  # noqa: E731
    else:
        path = _resolve_path(source)
        label, rows = path, _iter_jsonl(path)
        where = lambda i: f"{path}:{i}"  # noqa: E731

    records = []
    for i, rec in rows:
        problem = _validate(rec, keys)
        if problem is None and extra_check is not None:
            problem = extra_check(rec)
        if problem is not None:
            raise DataError(f"{where(i)}: {problem}")
        records.append(rec)
    if not records:
        raise DataError(f"{label}: no records found (empty data source)")
    return records


def _resolve_path(source) -> str:
    """Turn a path or a ``bundled:<split>`` name into a file path."""
    if isinstance(source, str) and source.startswith("bundled:"):
        from .tasks import bundled_path  # local import: tasks imports this module

        try:
            return bundled_path(source[len("bundled:"):])
        except ValueError as e:
            raise DataError(f"{source}: {e}") from None
    try:
        return os.fspath(source)
    except TypeError:
        raise DataError(
            f"data source must be a path or a 'hf:'/'bundled:' string, got {source!r}") from None


def _validate(rec, keys) -> str | None:
    """Return a description of what is wrong with ``rec``, or None if it is valid."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {_json_type(rec)}"
    for key in keys:
        if key not in rec:
            present = ", ".join(map(str, rec)) or "none"
            return f"missing key '{key}' (keys present: {present})"
        value = rec[key]
        if not isinstance(value, str):
            return f"key '{key}' must be a string, got {_json_type(value)}"
        if not value.strip():
            return f"key '{key}' is an empty string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"key '{key}' holds a lone surrogate (U+{ord(value[e.start]):04X}) at "
                    f"character {e.start}: not valid Unicode text")
    return None


def _json_type(value) -> str:
    """Name a Python value by its JSON type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------

def _parse_hf(spec: str) -> tuple[str, str]:
    """Split ``"<name or dir>[:<split>]"`` into ``(name, split)``; split defaults to train.

    The last ``:`` separates the split only when what follows looks like a
    split name (no path separator), so a local path keeps its colons.
    """
    name, sep, split = spec.rpartition(":")
    if sep and name and split and "/" not in split and os.sep not in split:
        return name, split
    return spec, "train"


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _hf_rows(spec: str, online: bool = False) -> tuple[str, Iterator[tuple[int, object]]]:
    """Load a Hugging Face dataset split; return a label and ``(row_index, row)`` pairs.
    Without ``online`` only a local folder is accepted, and the Hub switches are set off
    (``datasets`` and ``huggingface_hub`` read them once, when first imported)."""
    name, split = _parse_hf(spec)
    label = f"hf:{name}[{split}]"
    if not name:
        raise DataError(f"{label}: empty dataset name")
    if not online:
        if not os.path.isdir(name):
            raise DataError(f"{label}: no local dataset folder {name}; downloading it from the "
                            f"Hugging Face Hub needs an explicit opt-in (--online, or "
                            f"online=True)")
        for k in OFFLINE_SWITCHES:
            os.environ.setdefault(k, "1")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{label}: loading 'hf:' sources needs the Hugging Face 'datasets' package; "
            "install it with `pip install datasets`") from None
    try:
        ds = _hf_load(datasets, name, split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; report them uniformly
        raise DataError(f"{label}: could not load dataset: {type(e).__name__}: {e}") from None

    def rows():
        for i, row in enumerate(ds):
            yield i, dict(row) if isinstance(row, Mapping) else row

    return label, rows()


def _hf_load(datasets, name: str, split: str):
    """Load one split by hub name or local directory (``save_to_disk`` output too)."""
    label = f"hf:{name}[{split}]"
    saved = os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f))
        for f in ("dataset_dict.json", "state.json"))
    if saved:
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"{label}: no split '{split}' (available: {', '.join(ds)})")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, split=split)
